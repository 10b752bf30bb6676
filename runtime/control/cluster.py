"""The API calls of the agent and the controller: stasis.dev objects read, listed,
watched, created, patched and deleted; Events posted; every failure one StasisError
(NotFound, AlreadyExists, Aborted on a stale resourceVersion, Unavailable).

``Informer`` keeps one resource kind's objects flowing to a handler: a list, then a
watch from its resourceVersion, a fresh list on expiry or failure and every
``resync`` seconds, so a missed event is made up for within that time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from runtime.control.metrics import Metrics
from runtime.control.resources import DATA_FINALIZER, GROUP, KINDS, VERSION, message
from runtime.errors import Aborted, NotFound, StasisError
from runtime.kube.pods import call, remove_pod_checkpoint

log = logging.getLogger("stasis.control")

Obj = dict[str, Any]


class Cluster:
    """The stasis.dev objects and the pods, through one API client."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.coordination = client.CoordinationV1Api(api_client)
        self._json = api_client.sanitize_for_serialization

    def _call(self, doing: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return call(doing, fn, *args, **kw)
        except StasisError as e:
            if getattr(e.__cause__, "status", None) == 409 and "resourceVersion" in kw.get(
                "body", {}
            ).get("metadata", {}):
                raise Aborted(str(e)) from e
            raise

    def get(self, plural: str, ns: str, name: str) -> Obj | None:
        """The object, or None if there is none."""
        try:
            obj: Obj = self._call(
                f"get {plural} {ns}/{name}",
                self.custom.get_namespaced_custom_object, GROUP, VERSION, ns, plural, name,
            )  # fmt: skip
        except NotFound:
            return None
        return obj

    def objects(
        self, plural: str, ns: str | None = None, labels: str = ""
    ) -> tuple[list[Obj], str]:
        """The objects (of ``ns``, else of every namespace) and the list's resourceVersion."""
        if ns is None:
            out = self._call(
                f"list {plural}", self.custom.list_cluster_custom_object, GROUP, VERSION, plural,
                label_selector=labels,
            )  # fmt: skip
        else:
            out = self._call(
                f"list {plural} in {ns}", self.custom.list_namespaced_custom_object, GROUP,
                VERSION, ns, plural, label_selector=labels,
            )  # fmt: skip
        items: list[Obj] = list(out.get("items") or [])
        for obj in items:  # what a list leaves out of its items, as watch events have it
            obj.setdefault("kind", KINDS[plural])
            obj.setdefault("apiVersion", f"{GROUP}/{VERSION}")
        return items, str((out.get("metadata") or {}).get("resourceVersion"))

    def watch(self, plural: str, resource_version: str, timeout: int) -> Iterator[tuple[str, Obj]]:
        """(event type, object) of every change after ``resource_version``, for at most
        ``timeout`` seconds; Aborted when that version is too old to watch from."""
        from kubernetes import watch

        w = watch.Watch()
        try:
            for event in w.stream(
                self.custom.list_cluster_custom_object, GROUP, VERSION, plural,
                resource_version=resource_version, timeout_seconds=timeout,
                allow_watch_bookmarks=True,
            ):  # fmt: skip
                kind, obj = event.get("type"), event.get("raw_object") or event.get("object")
                if kind == "ERROR":
                    raise Aborted(f"watch {plural}: {message((obj or {}).get('message', obj))}")
                yield str(kind), obj
        finally:
            w.stop()

    def create(self, plural: str, ns: str, body: Obj) -> Obj:
        obj: Obj = self._call(
            f"create {plural} in {ns}",
            self.custom.create_namespaced_custom_object, GROUP, VERSION, ns, plural, body,
        )  # fmt: skip
        return obj

    def patch(self, plural: str, ns: str, name: str, body: Obj, *, status: bool = False) -> Obj:
        """A merge patch of the object (of its status subresource with ``status``); with
        ``metadata.resourceVersion`` in ``body``, Aborted if the object changed since."""
        fn = (
            self.custom.patch_namespaced_custom_object_status
            if status
            else self.custom.patch_namespaced_custom_object
        )
        obj: Obj = self._call(
            f"patch {plural} {ns}/{name}", fn, GROUP, VERSION, ns, plural, name, body=body
        )
        return obj

    def set_status(self, obj: Obj, status: Obj, *, if_unchanged: bool = False) -> Obj:
        """Merge ``status`` into the object's status; with ``if_unchanged``, only if the
        object is still at the resourceVersion it was read at (Aborted otherwise)."""
        meta = obj["metadata"]
        body: Obj = {"status": status}
        if if_unchanged:
            body["metadata"] = {"resourceVersion": meta["resourceVersion"]}
        return self.patch(plural_of(obj), meta["namespace"], meta["name"], body, status=True)

    def delete(self, plural: str, ns: str, name: str) -> None:
        with contextlib.suppress(NotFound):
            self._call(
                f"delete {plural} {ns}/{name}",
                self.custom.delete_namespaced_custom_object, GROUP, VERSION, ns, plural, name,
            )  # fmt: skip

    def remove_finalizer(self, obj: Obj, finalizer: str) -> None:
        """Drop ``finalizer`` from the object, if it is still as read (Aborted otherwise)."""
        meta = obj["metadata"]
        rest = [f for f in meta.get("finalizers") or [] if f != finalizer]
        body = {"metadata": {"finalizers": rest, "resourceVersion": meta["resourceVersion"]}}
        with contextlib.suppress(NotFound):
            self.patch(plural_of(obj), meta["namespace"], meta["name"], body)

    def event(self, obj: Obj, kind: str, reason: str, text: str, component: str) -> None:
        """A Kubernetes Event about ``obj`` (a pod or one of ours); failures are logged."""
        from kubernetes import client

        meta = obj.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta.get('name', 'stasis')}."),
            involved_object=client.V1ObjectReference(
                api_version=obj.get("apiVersion"), kind=obj.get("kind"), name=meta.get("name"),
                namespace=ns, uid=meta.get("uid"), resource_version=meta.get("resourceVersion"),
            ),
            reason=reason, message=message(text), type=kind,
            source=client.V1EventSource(component=component),
            first_timestamp=when, last_timestamp=when, count=1,
        )  # fmt: skip
        try:
            self._call("post an event", self.core.create_namespaced_event, ns, body)
        except StasisError as e:
            log.warning("event %s on %s/%s not posted: %s", reason, ns, meta.get("name"), e)

    def pods(self, ns: str) -> list[Obj]:
        out = self._call(f"list pods in {ns}", self.core.list_namespaced_pod, ns)
        items: list[Obj] = self._json(out).get("items") or []
        return items

    def node_exists(self, name: str) -> bool:
        try:
            self._call(f"node {name}", self.core.read_node, name)
        except NotFound:
            return False
        return True


def remove_data(
    cluster: Cluster, obj: Obj, ref: str, *, config: Any, metrics: Metrics, component: str
) -> None:
    """A deleted Checkpoint's data (pod checkpoint ``ref`` and its containers') removed
    from the store, then its data finalizer; a store failure keeps the finalizer (an
    Event says why) for the next resync to try again."""
    if ref:
        try:
            remove_pod_checkpoint(ref, config)
        except NotFound:
            pass
        except StasisError as e:
            metrics.store_error()
            cluster.event(obj, "Warning", "DataNotRemoved", str(e), component)
            return
    with contextlib.suppress(Aborted):  # changed meanwhile: its next event comes back
        cluster.remove_finalizer(obj, DATA_FINALIZER)


def plural_of(obj: Obj) -> str:
    """The resource (plural) of one of our objects, from its kind."""
    return next(plural for plural, kind in KINDS.items() if kind == obj.get("kind"))


class Informer:
    """Calls ``handle`` with every object of ``plural`` once listed and on every change
    (not on deletion: a deleted object is gone); runs until ``stop`` is set."""

    def __init__(
        self,
        cluster: Cluster,
        plural: str,
        handle: Callable[[Obj], None],
        *,
        resync: float = 30.0,
    ) -> None:
        self.cluster, self.plural, self.handle, self.resync = cluster, plural, handle, resync

    def run(self, stop: threading.Event) -> None:
        backoff = 1.0
        while not stop.is_set():
            try:
                items, version = self.cluster.objects(self.plural)
                for obj in items:
                    self._handle(obj)
                deadline = time.monotonic() + self.resync
                while not stop.is_set() and time.monotonic() < deadline:
                    timeout = max(1, int(deadline - time.monotonic()))
                    for kind, obj in self.cluster.watch(self.plural, version, timeout):
                        version = str(obj.get("metadata", {}).get("resourceVersion", version))
                        if kind in ("ADDED", "MODIFIED"):
                            self._handle(obj)
                        if stop.is_set():
                            break
                backoff = 1.0
            except Exception as e:  # the API server restarting, a watch expired
                log.warning("%s: %s; listing again in %.0f s", self.plural, e, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _handle(self, obj: Obj) -> None:
        try:
            self.handle(obj)
        except Exception:
            meta = obj.get("metadata") or {}
            log.exception("%s %s/%s", self.plural, meta.get("namespace"), meta.get("name"))
