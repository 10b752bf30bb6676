"""The controller (`stasis controller`, one leader at a time): assigns each new
Checkpoint to its pod's node, turns Restores into pods, runs CheckpointPolicies
(periodic checkpoints, retention).

Guarantees: a Checkpoint is assigned (Pending, ``status.node``, the data finalizer)
only for a Running pod, and Failed when no agent takes it in time; a Restore creates
its pod at most once (the pod's name is in its status before the pod is created)
and ends Succeeded once the pod runs, Failed with the kubelet's reason otherwise;
retention deletes only Checkpoints its policy made, never Pending or Running ones,
and their data goes through the agents' finalizer.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any

from runtime.control import resources as r
from runtime.control.cluster import Cluster, Informer, Obj, remove_data
from runtime.control.metrics import Metrics
from runtime.errors import Aborted, FailedPrecondition, NotFound, StasisError
from runtime.kube import pods
from runtime.names import RESTORE_ANNOTATION

log = logging.getLogger("stasis.controller")
COMPONENT = "stasis-controller"


class Controller:
    def __init__(
        self,
        cluster: Cluster,
        *,
        config: Any,
        metrics: Metrics,
        pending_timeout: float = 120.0,
        restore_timeout: float = 300.0,
        tick: float = 2.0,
    ) -> None:
        self.cluster, self.config, self.metrics = cluster, config, metrics
        self.pending_timeout, self.restore_timeout, self.tick_seconds = (
            pending_timeout,
            restore_timeout,
            tick,
        )
        self._restoring: set[str] = set()  # Restores being handled (informer or tick)
        self._lock = threading.Lock()

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set."""
        informers = [
            Informer(self.cluster, r.CHECKPOINTS, self.on_checkpoint),
            Informer(self.cluster, r.RESTORES, self.on_restore),
        ]
        threads = [
            threading.Thread(target=i.run, args=(stop,), name=i.plural, daemon=True)
            for i in informers
        ]
        for t in threads:
            t.start()
        while not stop.wait(self.tick_seconds):
            try:
                self.tick()
            except Exception:
                log.exception("tick")
        for t in threads:
            t.join(timeout=10)

    def tick(self) -> None:
        """What no event announces: restores to follow, policies due."""
        restores, _ = self.cluster.objects(r.RESTORES)
        for obj in restores:
            if r.phase(obj) not in r.DONE:
                self.on_restore(obj)
        policies, _ = self.cluster.objects(r.POLICIES)
        for obj in policies:
            try:
                self.run_policy(obj)
            except StasisError as e:
                log.warning("policy %s: %s", obj["metadata"]["name"], e)

    # -- checkpoints ---------------------------------------------------------------------

    def on_checkpoint(self, obj: Obj) -> None:
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            self._orphaned(obj)
        elif r.phase(obj) == "":
            self._assign(obj)
        elif (
            r.phase(obj) == r.PENDING and _age(meta.get("creationTimestamp")) > self.pending_timeout
        ):
            node = r.status(obj).get("node")
            self._fail(obj, f"no agent on node {node} took it within {self.pending_timeout:.0f} s")

    def _assign(self, obj: Obj) -> None:
        meta = obj["metadata"]
        ns = meta["namespace"]
        try:
            spec = r.CheckpointSpec.parse(obj)
            pod = pods.get_pod(self.cluster.core, ns, spec.pod)
            node = (pod.get("spec") or {}).get("nodeName") or ""
            pod_phase = (pod.get("status") or {}).get("phase")
            if pod_phase != "Running" or not node:
                raise FailedPrecondition(f"pod {ns}/{spec.pod} is {pod_phase}, not Running")
        except StasisError as e:
            self._fail(obj, e)
            return
        labels = dict(meta.get("labels") or {}, **{r.POD_LABEL: spec.pod})
        finalizers = [*(meta.get("finalizers") or []), r.DATA_FINALIZER]
        body = {
            "metadata": {
                "labels": labels,
                "finalizers": sorted(set(finalizers)),
                "resourceVersion": meta["resourceVersion"],
            }
        }
        try:
            obj = self.cluster.patch(r.CHECKPOINTS, ns, meta["name"], body)
            self.cluster.set_status(
                obj,
                {"phase": r.PENDING, "node": node, "podUID": pod["metadata"]["uid"]},
                if_unchanged=True,
            )
        except (Aborted, NotFound):
            return  # changed meanwhile: its next event comes back here

    def _orphaned(self, obj: Obj) -> None:
        """A deleted Checkpoint whose node's agent cannot remove the data: none was
        written, or the node is gone (then the data is removed from here)."""
        meta = obj["metadata"]
        if r.DATA_FINALIZER not in (meta.get("finalizers") or []):
            return
        node, ref = r.status(obj).get("node"), r.status(obj).get("ref")
        if r.phase(obj) == r.RUNNING or (node and self.cluster.node_exists(node)):
            return  # the agent's
        remove_data(
            self.cluster,
            obj,
            str(ref or ""),
            config=self.config,
            metrics=self.metrics,
            component=COMPONENT,
        )

    # -- restores ------------------------------------------------------------------------

    def on_restore(self, obj: Obj) -> None:
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        if r.phase(obj) in r.DONE or meta.get("deletionTimestamp"):
            return
        with self._lock:
            if key in self._restoring:
                return
            self._restoring.add(key)
        try:
            if r.phase(obj) in ("", r.PENDING):
                self._start_restore(obj)
            else:
                self._follow_restore(obj)
        except StasisError as e:
            self.metrics.restore("failed")
            self._fail(obj, e)
        finally:
            with self._lock:
                self._restoring.discard(key)

    def _start_restore(self, obj: Obj) -> None:
        ns = obj["metadata"]["namespace"]
        spec = r.RestoreSpec.parse(obj)
        ref = spec.ref
        if spec.checkpoint:
            ck = self.cluster.get(r.CHECKPOINTS, ns, spec.checkpoint)
            if ck is None:
                raise NotFound(f"Checkpoint {ns}/{spec.checkpoint} does not exist")
            if r.phase(ck) == r.FAILED:
                raise FailedPrecondition(f"Checkpoint {ns}/{spec.checkpoint} failed")
            if r.phase(ck) != r.SUCCEEDED:
                if r.phase(obj) != r.PENDING:
                    self.cluster.set_status(
                        obj, {"phase": r.PENDING, "message": f"waiting for {spec.checkpoint}"}
                    )
                return
            ref = str(r.status(ck).get("ref") or "")
        _, record = pods.read_pod_checkpoint(ref, self.config)
        name = spec.pod or str(record.get("name") or "")
        try:
            obj = self.cluster.set_status(
                obj,
                {"phase": r.RUNNING, "ref": ref, "podName": name, "startTime": r.now()},
                if_unchanged=True,
            )  # fmt: skip
        except (Aborted, NotFound):
            return
        self._create_pod(obj)

    def _create_pod(self, obj: Obj) -> None:
        meta, st = obj["metadata"], r.status(obj)
        ns, ref, name = meta["namespace"], st["ref"], st["podName"]
        spec = r.RestoreSpec.parse(obj)
        try:
            existing = pods.get_pod(self.cluster.core, ns, name)
        except NotFound:
            existing = None
        if existing is not None:
            if (existing["metadata"].get("annotations") or {}).get(RESTORE_ANNOTATION):
                return  # ours, being restored
            raise FailedPrecondition(f"pod {ns}/{name} exists: give spec.podName another name")
        pods.restore_pod(
            self.cluster.core, ref, name=name, namespace=ns, node=spec.node or None,
            custom=self.cluster.custom, wait=False, timeout=5.0, config=self.config,
        )  # fmt: skip
        self.cluster.event(obj, "Normal", "PodCreated", f"pod {name} from {ref}", COMPONENT)

    def _follow_restore(self, obj: Obj) -> None:
        meta, st = obj["metadata"], r.status(obj)
        ns, name = meta["namespace"], str(st.get("podName") or "")
        try:
            pod = pods.get_pod(self.cluster.core, ns, name)
        except NotFound:
            self._create_pod(obj)  # the controller stopped before creating it
            return
        if pods.pod_running(pod):
            seconds = _age(st.get("startTime"))
            self.metrics.restore("succeeded", seconds)
            self.cluster.set_status(
                obj,
                {"phase": r.SUCCEEDED, "node": (pod.get("spec") or {}).get("nodeName", ""),
                 "completionTime": r.now()},
            )  # fmt: skip
            self.cluster.event(obj, "Normal", "Restored", f"pod {name} runs", COMPONENT)
        elif _age(st.get("startTime")) > self.restore_timeout:
            raise FailedPrecondition(f"pod {ns}/{name} not running after {self.restore_timeout} s")

    # -- policies ------------------------------------------------------------------------

    def run_policy(self, obj: Obj) -> None:
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        try:
            spec = r.PolicySpec.parse(obj)
        except StasisError as e:
            if r.status(obj).get("message") != r.message(e):
                self.cluster.set_status(obj, {"message": r.message(e)})
            return
        selected = [
            p for p in self.cluster.pods(ns)
            if spec.selector.matches(p["metadata"].get("labels"))
            and (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
        ]  # fmt: skip
        made, _ = self.cluster.objects(r.CHECKPOINTS, ns, labels=f"{r.POLICY_LABEL}={name}")
        by_pod: dict[str, list[Obj]] = {}
        for c in made:
            by_pod.setdefault(str((c.get("spec") or {}).get("podName")), []).append(c)
        created = ""
        for pod in selected:
            pod_name = pod["metadata"]["name"]
            mine = by_pod.get(pod_name, [])
            if spec.interval is None or any(r.phase(c) not in r.DONE for c in mine):
                continue
            last = max((c["metadata"].get("creationTimestamp", "") for c in mine), default=None)
            if r.due(last, spec.interval):
                body = {
                    "apiVersion": f"{r.GROUP}/{r.VERSION}",
                    "kind": "Checkpoint",
                    "metadata": {
                        "generateName": f"{pod_name[:57]}-",
                        "labels": {r.POLICY_LABEL: name, r.POD_LABEL: pod_name},
                    },
                    "spec": {"podName": pod_name, **({"store": spec.store} if spec.store else {})},
                }
                self.cluster.create(r.CHECKPOINTS, ns, body)
                created = r.now()
        if spec.keep is not None:
            for mine in by_pod.values():
                for c in r.retention(mine, spec.keep):
                    self.cluster.delete(r.CHECKPOINTS, ns, c["metadata"]["name"])
                    self.metrics.deleted.inc()
        patch: dict[str, Any] = {"pods": len(selected)}
        if created:
            patch["lastCheckpointTime"] = created
        if any(r.status(obj).get(k) != v for k, v in patch.items()):
            self.cluster.set_status(obj, patch)

    def _fail(self, obj: Obj, error: object) -> None:
        log.warning("%s %s failed: %s", obj.get("kind"), obj["metadata"]["name"], error)
        try:
            self.cluster.set_status(obj, r.failed(error))
        except NotFound:
            return
        reason = "RestoreFailed" if obj.get("kind") == "Restore" else "CheckpointFailed"
        self.cluster.event(obj, "Warning", reason, str(error), COMPONENT)


def _age(when: object) -> float:
    """Seconds since an API time (0 when absent)."""
    t = r.parse_time(when)
    return (datetime.now(UTC) - t).total_seconds() if t else 0.0
