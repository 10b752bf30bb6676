"""Kubernetes pods on Stasis: pod checkpoints and transparent restore of pods.

A *pod checkpoint* is a small checkpoint of its own (same store, same writer API,
manifest last) holding ``pod.json``: the pod's sanitized manifest, a map
{container name: container checkpoint name} (those are ordinary container
checkpoints in the same store) and the volume records of
``runtime.kube.volumes``. A pod whose annotation ``stasis.dev/restore-from``
names it, on RuntimeClass ``stasis``, has each container restored by the shim
from the container of the same name (``shim/checkpoint/take.py``).

Library API (what ``stasis kube`` calls, and a controller may): ``connect``,
``checkpoint_pod``, ``restore_pod``, ``install_runtime_class``. The ``kubernetes``
client is imported only here, and only when called; the shim never imports this
module.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from runtime.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StasisError,
    Unavailable,
)
from runtime.names import (
    POD_FILE,
    POD_FILE_MAX,
    RESTORE_ANNOTATION,
    RESTORE_GRANT,
    RESTORE_POLICY,
    RUNTIME,
)

if TYPE_CHECKING:
    from kubernetes import client as k8s

log = logging.getLogger("stasis.kube")

RUNTIME_CLASS = "stasis"
HANDLER = "stasis"
CRI_NAMESPACE = "k8s.io"  # containerd namespace of the CRI plugin
RESTORE_FROM = RESTORE_ANNOTATION
POD_FORMAT = 1
SPEC_FILE = "spec.dump"  # the OCI spec a container checkpoint recorded
SPEC_FILE_MAX = 4 << 20
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# Annotations not carried into a restored pod: a previous restore's, kubectl's.
_DROPPED_ANNOTATIONS = (
    RESTORE_FROM,
    RESTORE_POLICY,
    RESTORE_GRANT,
    "kubectl.kubernetes.io/last-applied-configuration",
)
# Waiting reasons after which a pod does not get to Running by itself.
_STUCK = frozenset(
    {
        "CreateContainerError",
        "CreateContainerConfigError",
        "RunContainerError",
        "CrashLoopBackOff",
        "ErrImageNeverPull",
        "InvalidImageName",
    }
)
TASK_SERVICE = "containerd.task.v2.Task"
_PAUSED = 4  # containerd.v1.types.Status.PAUSED
CHECKPOINT_SERVICE = "stasis.v1.Checkpointer"


# --------------------------------------------------------------------------- clients


def connect(kubeconfig: str | None = None) -> k8s.ApiClient:
    """An API client: from ``kubeconfig``, else $KUBECONFIG or ~/.kube/config, else
    the in-cluster service account."""
    from kubernetes import client, config

    try:
        if kubeconfig:
            api = config.new_client_from_config(config_file=kubeconfig)
        else:
            try:
                api = config.new_client_from_config()
            except config.ConfigException:
                config.load_incluster_config()
                api = client.ApiClient()
    except (config.ConfigException, OSError) as e:
        raise FailedPrecondition(f"no Kubernetes API configuration: {e}") from e
    if not api.configuration.verify_ssl:
        # The kubeconfig asks for it (insecure-skip-tls-verify): kubectl does not warn.
        import urllib3

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    return api


def _api_error(e: Exception, doing: str) -> StasisError:
    """A StasisError for a failed API call (kubernetes.client.ApiException)."""
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None) or str(e)
    body = getattr(e, "body", None)
    with contextlib.suppress(ValueError, KeyError, TypeError):
        reason = json.loads(body)["message"] if body else reason
    text = f"{doing}: {reason}"
    if status == 404:
        return NotFound(text)
    if status == 409:
        return AlreadyExists(text)
    if status in (400, 422):
        return InvalidArgument(text)
    if status is None or status >= 500:
        return Unavailable(text)
    return StasisError(text)


def call(doing: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, an API call; its failure as the StasisError of its status."""
    from kubernetes.client import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*args, **kwargs)
    except ApiException as e:
        raise _api_error(e, doing) from e
    except (HTTPError, OSError) as e:
        raise Unavailable(f"{doing}: cannot reach the API server: {e}") from e


def get_pod(core: k8s.CoreV1Api, namespace: str, name: str) -> dict[str, Any]:
    """The pod as the API's JSON."""
    obj = call(f"pod {namespace}/{name}", core.read_namespaced_pod, name, namespace)
    pod: dict[str, Any] = core.api_client.sanitize_for_serialization(obj)
    return pod


# --------------------------------------------------------------------------- pure logic


def split_pod(ref: str) -> tuple[str, str]:
    """NAMESPACE/POD (or POD, in ``default``) -> (namespace, pod)."""
    namespace, _, name = ref.rpartition("/")
    if not name or "/" in namespace:
        raise InvalidArgument(f"{ref!r}: give NAMESPACE/POD")
    return namespace or "default", name


def running_containers(pod: dict[str, Any]) -> dict[str, str]:
    """Container name -> containerd container ID of the pod's running containers."""
    ids: dict[str, str] = {}
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        cid = status.get("containerID") or ""
        if "running" not in (status.get("state") or {}) or not cid:
            continue
        runtime, sep, id = cid.partition("://")
        if not sep or runtime != "containerd":
            raise FailedPrecondition(
                f"container {status.get('name')}: {cid!r} is not a containerd container"
            )
        ids[status["name"]] = id
    return ids


def _token_volumes(spec: dict[str, Any]) -> set[str]:
    """Volumes mounted at the service-account path (the admission controller adds them)."""
    names = set()
    for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        for m in c.get("volumeMounts") or []:
            if m.get("mountPath") == SERVICE_ACCOUNT_MOUNT:
                names.add(m.get("name"))
    return names


def sanitize_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """The manifest to create the pod again from: no status, uid, resourceVersion,
    owner, node, or what admission controllers add back (service-account token
    volume, computed priority)."""
    meta = pod.get("metadata") or {}
    spec = copy.deepcopy(pod.get("spec") or {})
    tokens = _token_volumes(spec)
    spec["volumes"] = [v for v in spec.get("volumes") or [] if v.get("name") not in tokens]
    if not spec["volumes"]:
        del spec["volumes"]
    for c in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        mounts = [m for m in c.get("volumeMounts") or [] if m.get("name") not in tokens]
        if mounts:
            c["volumeMounts"] = mounts
        else:
            c.pop("volumeMounts", None)
    for key in ("nodeName", "priority", "ephemeralContainers"):
        spec.pop(key, None)
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items() if k not in _DROPPED_ANNOTATIONS
    }
    new_meta: dict[str, Any] = {"name": meta.get("name"), "namespace": meta.get("namespace")}
    if meta.get("labels"):
        new_meta["labels"] = dict(meta["labels"])
    if annotations:
        new_meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": new_meta, "spec": spec}


def pod_record(
    pod: dict[str, Any], containers: dict[str, str], volumes: list[dict[str, Any]]
) -> dict[str, Any]:
    """What ``pod.json`` holds."""
    meta = pod.get("metadata") or {}
    return {
        "format": POD_FORMAT,
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "node": (pod.get("spec") or {}).get("nodeName", ""),  # information only
        "checkpointed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pod": sanitize_pod(pod),
        "containers": dict(containers),
        "volumes": volumes,
    }


def restore_manifest(
    record: dict[str, Any],
    ref: str,
    *,
    name: str | None = None,
    namespace: str | None = None,
    node: str | None = None,
    policy: str = "fail",
) -> dict[str, Any]:
    """The pod to create: the recorded one on RuntimeClass stasis, annotated to
    restore from pod checkpoint ``ref``."""
    if policy not in ("fail", "fresh"):
        raise InvalidArgument(f"restore policy must be 'fail' or 'fresh', not {policy!r}")
    try:
        manifest = copy.deepcopy(record["pod"])
        meta = manifest.setdefault("metadata", {})
        spec = manifest["spec"]
    except (KeyError, TypeError) as e:
        raise InvalidArgument(f"pod checkpoint {ref}: {POD_FILE} records no pod: {e}") from e
    meta["name"] = name or meta.get("name")
    meta["namespace"] = namespace or meta.get("namespace") or "default"
    meta["annotations"] = {
        **(meta.get("annotations") or {}),
        RESTORE_FROM: ref,
        RESTORE_POLICY: policy,
    }
    spec["runtimeClassName"] = RUNTIME_CLASS
    if node:
        spec["nodeName"] = node
    return dict(manifest)


def _stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _pvcs(pod: dict[str, Any]) -> list[str]:
    return [
        v["persistentVolumeClaim"].get("claimName", "")
        for v in (pod.get("spec") or {}).get("volumes") or []
        if v.get("persistentVolumeClaim")
    ]


def _kubevolumes() -> Any:
    """runtime.kube.volumes, or None where it is not installed."""
    try:
        from runtime.kube import volumes as kubevolumes
    except ModuleNotFoundError as e:
        if e.name != "runtime.kube.volumes":
            raise
        return None
    return kubevolumes


# --------------------------------------------------------------------------- the shim


@dataclass(frozen=True)
class _Target:
    name: str  # Kubernetes container name
    id: str  # containerd container ID
    socket: str  # its shim's socket
    image: str


class _Shims:
    """ttrpc connections to the shims of a pod (one per socket)."""

    def __init__(self) -> None:
        from runtime.rpc import ttrpc_server as ttrpc

        self._ttrpc = ttrpc
        self._clients: dict[str, Any] = {}

    async def call(self, t: _Target, service: str, method: str, payload: bytes) -> bytes:
        try:
            client = self._clients.get(t.socket)
            if client is None or client.closed:
                client = await self._ttrpc.Client.connect(t.socket)
                self._clients[t.socket] = client
            data: bytes = await client.call(
                service, method, payload, metadata={"containerd-namespace-ttrpc": CRI_NAMESPACE}
            )
        except self._ttrpc.RPCError as e:
            raise StasisError(f"container {t.name} ({t.id}): {method}: {e.message}") from e
        return data

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()


def _targets(address: str, ids: dict[str, str], node: str) -> list[_Target]:
    from runtime.names import GROUP_ANNOTATIONS, socket_path
    from runtime.rpc.containerd import get_container

    targets = []
    for name, id in ids.items():
        try:
            info = get_container(address, CRI_NAMESPACE, id)
        except NotFound as e:
            raise NotFound(
                f"container {name} ({id}) is not in containerd at {address}: run this on "
                f"the pod's node ({node or 'unknown'})"
            ) from e
        if info.runtime != RUNTIME:
            raise FailedPrecondition(
                f"container {name} runs on {info.runtime or 'an unknown runtime'}, not "
                f"{RUNTIME}: give the pod runtimeClassName: {RUNTIME_CLASS}"
            )
        ann = info.annotations
        group = next((ann[k] for k in GROUP_ANNOTATIONS if ann.get(k)), "") or id
        targets.append(_Target(name, id, socket_path(address, CRI_NAMESPACE, group), info.image))
    return targets


async def _freeze_dump(
    targets: list[_Target],
    store: str,
    name: str,
    after_dump: Callable[[], Any],
    leave_running: bool,
    stop: Callable[[], Any],
) -> tuple[dict[str, dict[str, Any]], Any, float]:
    """Pause every container, dump each, run ``after_dump`` (still frozen), then
    resume them, or (not ``leave_running``) run ``stop`` and SIGKILL them first.
    Returns (container name -> checkpoint result, after_dump's value, frozen seconds).
    Any failure before the end resumes what was paused and removes nothing
    itself: the caller removes the container checkpoints listed in the error."""
    from protos.containerd.task.v2 import shim_pb2 as task
    from protos.stasis.v1 import checkpoint_pb2 as pb

    shims = _Shims()
    paused: list[_Target] = []
    results: dict[str, dict[str, Any]] = {}
    stopped = False
    try:
        for t in targets:
            await shims.call(
                t, TASK_SERVICE, "Pause", task.PauseRequest(id=t.id).SerializeToString()
            )
            paused.append(t)
        frozen_at = time.monotonic()
        for t in targets:
            req = pb.CheckpointRequest(
                id=t.id, store=store, name=f"{name}.{t.name}", exit=False, image=t.image
            )
            raw = await shims.call(t, CHECKPOINT_SERVICE, "Checkpoint", req.SerializeToString())
            resp = pb.CheckpointResponse.FromString(raw)
            results[t.name] = {"ref": resp.ref, "name": resp.name, "size": resp.size,
                               "seconds": round(resp.seconds, 3)}  # fmt: skip
        extra = await asyncio.to_thread(after_dump)
        if not leave_running:
            # Deleted first, so that the kubelet restarts none of them; killed while
            # frozen, so that no process runs past the checkpoint (a pending SIGKILL
            # wins over any other signal once they thaw).
            await asyncio.to_thread(stop)
            stopped = True
            for t in targets:
                kill = task.KillRequest(id=t.id, signal=signal.SIGKILL, all=True)
                await shims.call(t, TASK_SERVICE, "Kill", kill.SerializeToString())
        frozen = time.monotonic() - frozen_at
    except BaseException as e:
        if results:
            e.add_note(f"written: {json.dumps({k: v['ref'] for k, v in results.items()})}")
        raise _Partial(e, results) from e
    finally:
        for t in paused:
            try:
                resume = task.ResumeRequest(id=t.id).SerializeToString()
                await shims.call(t, TASK_SERVICE, "Resume", resume)
            except (StasisError, OSError) as err:
                if not stopped:
                    log.error("container %s (%s) could not be resumed: %s", t.name, t.id, err)
        await shims.close()
    return results, extra, frozen


def resume_pod(core: k8s.CoreV1Api, namespace: str, pod_name: str, *, address: str) -> int:
    """Resume every container of the pod that a checkpoint left paused (its taker
    stopped between pause and resume); returns how many were resumed."""
    from protos.containerd.task.v2 import shim_pb2 as task

    pod = get_pod(core, namespace, pod_name)
    node = str((pod.get("spec") or {}).get("nodeName") or "")
    targets = _targets(address, running_containers(pod), node)

    async def resume_all() -> int:
        shims, resumed = _Shims(), 0
        try:
            for t in targets:
                state = task.StateResponse.FromString(
                    await shims.call(t, TASK_SERVICE, "State",
                                     task.StateRequest(id=t.id).SerializeToString())
                )  # fmt: skip
                if state.status == _PAUSED:
                    req = task.ResumeRequest(id=t.id).SerializeToString()
                    await shims.call(t, TASK_SERVICE, "Resume", req)
                    resumed += 1
        finally:
            await shims.close()
        return resumed

    return asyncio.run(resume_all())


class _Partial(Exception):
    def __init__(self, error: BaseException, written: dict[str, dict[str, Any]]) -> None:
        super().__init__(str(error))
        self.error = error
        self.written = written


# --------------------------------------------------------------------------- checkpoint


def checkpoint_pod(
    core: k8s.CoreV1Api,
    namespace: str,
    pod_name: str,
    *,
    address: str,
    store: str = "",
    name: str = "",
    leave_running: bool = False,
    custom: k8s.CustomObjectsApi | None = None,
    snapshot_volumes: bool = False,
    snapshot_class: str | None = None,
    config: Any = None,
) -> dict[str, Any]:
    """Checkpoint every running container of a pod at one moment; run on its node.

    All containers are paused before any is dumped (through its shim's
    Checkpointer, into ``store``: a directory, file:// or s3:// URL, or "" for the
    shim's default store), the volumes are recorded while they are still frozen,
    then they are resumed; without ``leave_running`` the pod is deleted and its
    containers killed before they thaw instead (``stasis checkpoint --exit``: the
    workload stops at the checkpoint; the kubelet does not restart it). Then the
    pod checkpoint is written into the same store. Returns its ``ref`` and
    ``name``, and each container's checkpoint.
    """
    from runtime import config as config_mod
    from runtime.store.model import check_name
    from runtime.store.resolve import resolve

    started = time.monotonic()
    cfg = config if config is not None else config_mod.load()
    pod = get_pod(core, namespace, pod_name)
    phase = (pod.get("status") or {}).get("phase")
    if phase != "Running":
        raise FailedPrecondition(f"pod {namespace}/{pod_name} is {phase or 'unknown'}, not Running")
    ids = running_containers(pod)
    if not ids:
        raise FailedPrecondition(f"pod {namespace}/{pod_name} has no running container")
    name = check_name(name or f"{namespace}-{pod_name}-{_stamp()}")
    for c in ids:
        check_name(f"{name}.{c}")
    volumes_mod = _kubevolumes()
    if volumes_mod is None and _pvcs(pod):
        raise FailedPrecondition(
            f"pod {namespace}/{pod_name} mounts claims {_pvcs(pod)}, and runtime.kube.volumes "
            "(which records them) is not installed"
        )
    if store and "://" not in store:
        store = os.path.abspath(store)
    node = (pod.get("spec") or {}).get("nodeName", "")
    targets = _targets(address, ids, node)

    def record_volumes() -> list[dict[str, Any]]:
        if volumes_mod is None:
            return []
        from kubernetes import client

        records: list[dict[str, Any]] = volumes_mod.record_volumes(
            core,
            custom or client.CustomObjectsApi(core.api_client),
            pod,
            snapshot_all=snapshot_volumes,
            snapshot_class=snapshot_class,
        )
        return records

    def delete_pod() -> None:
        call(f"delete pod {namespace}/{pod_name}", core.delete_namespaced_pod, pod_name, namespace)

    try:
        members, volumes, frozen = asyncio.run(
            _freeze_dump(targets, store, name, record_volumes, leave_running, delete_pod)
        )
    except _Partial as p:
        _remove_refs([m["ref"] for m in p.written.values()], cfg)
        if isinstance(p.error, StasisError):
            raise type(p.error)(f"checkpoint of pod {namespace}/{pod_name}: {p.error}") from p.error
        raise p.error from None
    record = pod_record(pod, {c: m["name"] for c, m in members.items()}, volumes)
    first = next(iter(members.values()))["ref"]
    target, _ = resolve(first, cfg)  # the store the shim wrote into
    try:
        with target.begin(name) as writer:
            writer.write_bytes(POD_FILE, json.dumps(record, indent=1).encode())
            info = writer.commit(
                {"kind": "pod", "namespace": namespace, "pod": pod_name, "node": node,
                 "containers": record["containers"]}
            )  # fmt: skip
    except StasisError as e:
        raise type(e)(
            f"pod {namespace}/{pod_name}: containers checkpointed "
            f"({', '.join(m['ref'] for m in members.values())}) but the pod checkpoint "
            f"{name} was not written: {e}"
        ) from e
    return {
        "ref": info.ref,
        "name": info.name,
        "containers": members,
        "volumes": len(volumes),
        "stopped": not leave_running,
        "seconds": round(time.monotonic() - started, 3),
        "frozen_seconds": round(frozen, 3),
    }


def _remove_refs(refs: list[str], cfg: Any) -> None:
    from runtime.store.resolve import resolve

    for ref in refs:
        try:
            store, n = resolve(ref, cfg)
            store.remove(n)
        except StasisError as e:
            log.warning("could not remove %s: %s", ref, e)


def remove_pod_checkpoint(ref: str, config: Any = None) -> None:
    """Remove pod checkpoint ``ref`` and its containers' checkpoints from the store: the
    containers' first, so that what a failure leaves is still found by ``ref``."""
    from runtime import config as config_mod
    from runtime.store.resolve import resolve

    cfg = config if config is not None else config_mod.load()
    absolute, record = read_pod_checkpoint(ref, cfg)
    store, name = resolve(absolute, cfg)
    members = record.get("containers")
    for member in members.values() if isinstance(members, dict) else ():
        if isinstance(member, str):
            with contextlib.suppress(NotFound):  # removed by an earlier try
                store.remove(member)
    store.remove(name)


# --------------------------------------------------------------------------- restore


def read_pod_checkpoint(ref: str, config: Any = None) -> tuple[str, dict[str, Any]]:
    """(absolute reference, pod.json) of pod checkpoint ``ref``, verified."""
    from runtime import config as config_mod
    from runtime.store.resolve import resolve

    cfg = config if config is not None else config_mod.load()
    store, name = resolve(ref, cfg)
    with store.open(name) as reader:
        if POD_FILE not in reader.manifest.files:
            raise InvalidArgument(f"{ref!r} is a container checkpoint, not a pod checkpoint")
        reader.verify()
        from runtime import boundedjson

        record = boundedjson.load_file(
            reader.file(POD_FILE),
            f"pod checkpoint {ref}: {POD_FILE}",
            max_bytes=POD_FILE_MAX,
            error=InvalidArgument,
        )
        if not isinstance(record, dict):
            raise InvalidArgument(f"pod checkpoint {ref}: {POD_FILE} is not a JSON object")
        return reader.info.ref, record


def read_members(ref: str, record: dict[str, Any], config: Any = None) -> dict[str, Any]:
    """Container name -> ``podpolicy.Recorded`` of each container checkpoint that
    pod checkpoint ``ref`` (its ``pod.json``: ``record``) maps a container to, read
    from its ``spec.dump`` (checked against its manifest) in the pod checkpoint's
    store, as the shim will restore it."""
    import hashlib

    from runtime import config as config_mod
    from runtime.security import podpolicy
    from runtime.store.model import check_name
    from runtime.store.resolve import resolve

    cfg = config if config is not None else config_mod.load()
    containers = record.get("containers")
    if not isinstance(containers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in containers.items()
    ):
        raise InvalidArgument(f"pod checkpoint {ref}: {POD_FILE}: 'containers' is malformed")
    store, _ = resolve(ref, cfg)
    members: dict[str, Any] = {}
    for container, member in containers.items():
        check_name(member)
        with store.open(member) as reader:
            files = reader.manifest.files
            if POD_FILE in files:
                raise InvalidArgument(f"container {container}: {member!r} is a pod checkpoint")
            if SPEC_FILE not in files:
                raise PermissionDenied(
                    f"pod checkpoint {ref}: container {container}: checkpoint {member} "
                    f"records no {SPEC_FILE}, nothing to hold the pod to"
                )
            # Only this file, not the whole checkpoint (an S3 reader's verify downloads
            # every image): a remote or encrypted one is checked as it is fetched or
            # decrypted, a local plain one is hashed here, as read.
            fd = os.open(reader.file(SPEC_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                data = f.read(SPEC_FILE_MAX + 1)
            if len(data) > SPEC_FILE_MAX:
                raise DataLoss(f"checkpoint {member}: {SPEC_FILE} exceeds {SPEC_FILE_MAX} bytes")
            if reader.manifest.encryption is None and (
                hashlib.sha256(data).hexdigest() != files[SPEC_FILE].sha256
            ):
                raise DataLoss(f"checkpoint {member}: {SPEC_FILE}: sha256 mismatch")
            try:
                spec = json.loads(data)
            except (ValueError, RecursionError) as e:
                raise DataLoss(f"checkpoint {member}: {SPEC_FILE}: {e}") from e
            members[container] = podpolicy.recorded(spec, member)
    return members


def restore_pod(
    core: k8s.CoreV1Api,
    ref: str,
    *,
    name: str | None = None,
    namespace: str | None = None,
    node: str | None = None,
    policy: str = "fail",
    custom: k8s.CustomObjectsApi | None = None,
    wait: bool = True,
    timeout: float = 120.0,
    config: Any = None,
    allow_cross_namespace: bool = False,
) -> str:
    """Create the pod of pod checkpoint ``ref`` again (its volumes first), on
    RuntimeClass stasis with the restore annotation; with ``wait``, until it runs.
    Returns the pod's name. A pod that cannot start raises, naming the reason the
    kubelet gives (the pod is left for inspection).

    Into another namespace than the checkpointed pod's only with
    ``allow_cross_namespace`` (or ``restore.cross_namespace`` in the config):
    the pod then carries a grant signed with this node's key, which the shims
    check (PermissionDenied otherwise). Nothing is created when the recorded pod
    asks for more than its container checkpoints ran with (``runtime.security.podpolicy``).
    """
    from runtime.security import podpolicy

    absolute, record = read_pod_checkpoint(ref, config)
    manifest = restore_manifest(
        record, absolute, name=name, namespace=namespace, node=node, policy=policy
    )
    members = read_members(absolute, record, config)
    if not allow_cross_namespace:
        from runtime import config as config_mod

        cfg = config if config is not None else config_mod.load()
        allow_cross_namespace = cfg.restore.cross_namespace
    podpolicy.check_pod(manifest, members, allow_cross_namespace=allow_cross_namespace)
    meta = manifest["metadata"]
    pod_name, ns = meta["name"], meta["namespace"]
    meta["annotations"].pop(RESTORE_GRANT, None)
    if ns != record.get("namespace"):
        meta["annotations"][RESTORE_GRANT] = _cross_namespace_grant(
            absolute, str(record.get("namespace")), ns, allow_cross_namespace, config
        )
    deadline = time.monotonic() + timeout
    records = record.get("volumes") or []
    if records:
        volumes_mod = _kubevolumes()
        if volumes_mod is None:
            raise FailedPrecondition(
                f"pod checkpoint {ref} records volumes, and runtime.kube.volumes is not installed"
            )
        from kubernetes import client

        volumes_mod.restore_volumes(
            core,
            custom or client.CustomObjectsApi(core.api_client),
            records,
            ns,
            check_volume=lambda claim, pv: podpolicy.check_volume(manifest, claim, pv, members),
        )
    _wait_name_free(core, ns, pod_name, deadline)
    call(f"create pod {ns}/{pod_name}", core.create_namespaced_pod, ns, manifest)
    if wait:
        wait_running(core, ns, pod_name, max(deadline - time.monotonic(), 1.0))
    return str(pod_name)


def _cross_namespace_grant(ref: str, recorded: str, ns: str, allowed: bool, config: Any) -> str:
    """A grant (runtime.store.signing) to restore checkpoint ``ref`` of namespace ``recorded``
    into ``ns``; PermissionDenied unless the caller or the config allows it."""
    import hashlib

    from runtime import config as config_mod
    from runtime.store.resolve import resolve, signing_for

    cfg = config if config is not None else config_mod.load()
    if not (allowed or cfg.restore.cross_namespace):
        raise PermissionDenied(
            f"pod checkpoint {ref} was taken in namespace {recorded!r}, not {ns!r}: "
            "restoring it there needs --allow-cross-namespace"
        )
    store, name = resolve(ref, cfg)
    with store.open(name) as reader:  # verifies the signature again
        digest = hashlib.sha256(reader.manifest.to_json()).hexdigest()
    log.warning("pod checkpoint %s (namespace %s) restored into namespace %s", ref, recorded, ns)
    return signing_for(cfg).grant(digest, ns)


def _wait_name_free(core: k8s.CoreV1Api, ns: str, name: str, deadline: float) -> None:
    """Waits while a pod of that name is being deleted (a checkpoint that stopped it)."""
    while True:
        try:
            pod = get_pod(core, ns, name)
        except NotFound:
            return
        if not (pod.get("metadata") or {}).get("deletionTimestamp"):
            raise AlreadyExists(f"pod {ns}/{name} exists: restore under another --name")
        if time.monotonic() > deadline:
            raise AlreadyExists(f"pod {ns}/{name} is still being deleted")
        time.sleep(0.5)


def wait_running(core: k8s.CoreV1Api, ns: str, name: str, timeout: float) -> dict[str, Any]:
    """Waits until the pod runs with every container ready; raises with the
    kubelet's reason when a container is stuck (a failed restore) or on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        pod = get_pod(core, ns, name)
        if pod_running(pod):
            return pod
        if time.monotonic() > deadline:
            status = pod.get("status") or {}
            raise Unavailable(f"pod {ns}/{name} not running after {timeout:.0f} s: {status}")
        time.sleep(0.2)


def pod_running(pod: dict[str, Any]) -> bool:
    """Whether the pod runs with every container ready (False: not yet); raises with
    the kubelet's reason when a container is stuck (a failed restore) or it ended."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    where = f"pod {meta.get('namespace')}/{meta.get('name')}"
    statuses = status.get("containerStatuses") or []
    if status.get("phase") == "Running" and statuses and all(s.get("ready") for s in statuses):
        return True
    for s in statuses:
        waiting = (s.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _STUCK:
            raise FailedPrecondition(
                f"{where}: container {s.get('name')}: {waiting.get('reason')}: "
                f"{waiting.get('message') or _last_message(s)}"
            )
    if status.get("phase") in ("Failed", "Succeeded"):
        raise FailedPrecondition(f"{where} is {status['phase']}: {status}")
    return False


def _last_message(s: dict[str, Any]) -> str:
    term = (s.get("lastState") or {}).get("terminated") or {}
    return str(term.get("message") or term.get("reason") or "")


# --------------------------------------------------------------------------- install


def runtime_class() -> dict[str, Any]:
    """The RuntimeClass object of the stasis handler."""
    return {
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {"name": RUNTIME_CLASS},
        "handler": HANDLER,
    }


def install_runtime_class(api_client: k8s.ApiClient) -> bool:
    """Registers RuntimeClass ``stasis``; False if it was there already (same handler)."""
    from kubernetes import client

    node = client.NodeV1Api(api_client)
    try:
        call("create RuntimeClass stasis", node.create_runtime_class, runtime_class())
        return True
    except AlreadyExists:
        pass
    existing = call("RuntimeClass stasis", node.read_runtime_class, RUNTIME_CLASS)
    if existing.handler != HANDLER:
        raise FailedPrecondition(
            f"RuntimeClass {RUNTIME_CLASS} exists with handler {existing.handler!r}, "
            f"not {HANDLER!r}"
        )
    return False
