"""The volumes of a Kubernetes pod checkpoint: PersistentVolumeClaims, their
PersistentVolumes and CSI VolumeSnapshots (docs/architecture.md, "Kubernetes volumes").

``record_volumes`` records each claim the pod mounts and its bound volume, sets the
volume's reclaim policy to ``Retain`` and, where asked, takes a VolumeSnapshot and
waits until it is ready; ``restore_volumes`` recreates every missing claim: from its
snapshot, else bound again to its retained volume, else new from its storage class.
Every API failure is one ``StasisError`` line naming the object and the reason. The
``kubernetes`` client is passed in; replies are read as raw JSON.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from runtime.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StasisError,
    Unavailable,
)

log = logging.getLogger("stasis.kubevolumes")

# The kubernetes client's API classes (untyped): kubernetes.client.CoreV1Api and
# kubernetes.client.CustomObjectsApi.
CoreV1Api = Any
CustomObjectsApi = Any

SNAPSHOT_ANNOTATION = "stasis.dev/volume-snapshot"
DEFAULT_CLASS_ANNOTATION = "snapshot.storage.kubernetes.io/is-default-class"
SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
SNAPSHOT_VERSION = "v1"
SNAPSHOT_LABEL_CLAIM = "stasis.dev/claim"
RECORD_VERSION = 1

# Written by controllers about one particular binding or provisioning: never carried
# over to a recreated object.
_DROPPED_ANNOTATIONS = frozenset(
    {
        "pv.kubernetes.io/bind-completed",
        "pv.kubernetes.io/bound-by-controller",
        "pv.kubernetes.io/migrated-to",
        "volume.beta.kubernetes.io/storage-provisioner",
        "volume.kubernetes.io/storage-provisioner",
        "volume.kubernetes.io/selected-node",
        "kubectl.kubernetes.io/last-applied-configuration",
    }
)
_POLL = 0.5  # seconds between two looks at a snapshot or a claim
_NAME_MAX = 253  # a DNS subdomain


# -- the pure core: reading and building objects ----------------------------------------


def _get(obj: Mapping[str, Any], camel: str) -> Any:
    """obj[camel], accepting the client's snake_case dicts (``to_dict()``) too."""
    if camel in obj:
        return obj[camel]
    snake = "".join("_" + c.lower() if c.isupper() else c for c in camel)
    return obj.get(snake)


def claim_names(pod: Mapping[str, Any]) -> list[str]:
    """The names of the PersistentVolumeClaims the pod's volumes reference, in order,
    each once. Generic ephemeral volumes are not among them: they belong to the pod
    and are created again with it."""
    names: list[str] = []
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        source = _get(volume, "persistentVolumeClaim")
        if source is None:
            continue
        name = _get(source, "claimName")
        if not name:
            raise InvalidArgument(f"pod volume {volume.get('name')!r}: claimName missing")
        if name not in names:
            names.append(name)
    return names


def pod_ref(pod: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) of a pod dict; InvalidArgument when the namespace is missing."""
    meta = pod.get("metadata") or {}
    namespace, name = meta.get("namespace"), meta.get("name", "?")
    if not namespace:
        raise InvalidArgument(f"pod {name}: metadata.namespace missing")
    return str(namespace), str(name)


def _annotations(meta: Mapping[str, Any]) -> dict[str, str]:
    return {
        k: v for k, v in (meta.get("annotations") or {}).items() if k not in _DROPPED_ANNOTATIONS
    }


def sanitize_claim(pvc: Mapping[str, Any]) -> dict[str, Any]:
    """What recreating the claim needs: name, namespace, labels, annotations (less the
    binding controller's) and spec; never status, uid, resourceVersion or finalizers."""
    meta = pvc.get("metadata") or {}
    out_meta: dict[str, Any] = {"name": meta["name"], "namespace": meta.get("namespace")}
    if meta.get("labels"):
        out_meta["labels"] = dict(meta["labels"])
    if annotations := _annotations(meta):
        out_meta["annotations"] = annotations
    return {"metadata": out_meta, "spec": copy.deepcopy(dict(pvc.get("spec") or {}))}


def sanitize_volume(pv: Mapping[str, Any]) -> dict[str, Any]:
    """The PersistentVolume as a record keeps it: name, labels, annotations and spec,
    with the claimRef reduced to the claim's namespace and name."""
    meta = pv.get("metadata") or {}
    out_meta: dict[str, Any] = {"name": meta["name"]}
    if meta.get("labels"):
        out_meta["labels"] = dict(meta["labels"])
    if annotations := _annotations(meta):
        out_meta["annotations"] = annotations
    spec = copy.deepcopy(dict(pv.get("spec") or {}))
    if ref := spec.get("claimRef"):
        spec["claimRef"] = {k: ref[k] for k in ("namespace", "name") if k in ref}
    return {"metadata": out_meta, "spec": spec}


def wants_snapshot(pvc: Mapping[str, Any], snapshot_all: bool = False) -> bool:
    """Whether the claim is to be snapshotted: snapshot_all, or its annotation is "true"."""
    annotations = (pvc.get("metadata") or {}).get("annotations") or {}
    return snapshot_all or str(annotations.get(SNAPSHOT_ANNOTATION, "")).lower() == "true"


def default_snapshot_class(classes: Sequence[Mapping[str, Any]], driver: str | None) -> str | None:
    """The name of the default VolumeSnapshotClass (annotated
    ``snapshot.storage.kubernetes.io/is-default-class: "true"``) for the CSI driver, or
    None when there is none (the VolumeSnapshot then names no class). With driver None
    (a volume that is not CSI) every default class counts. Several defaults for one
    driver are ambiguous, as for the snapshot controller: FailedPrecondition."""
    found = []
    for cls in classes:
        meta = cls.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        if str(annotations.get(DEFAULT_CLASS_ANNOTATION, "")).lower() != "true":
            continue
        if driver is not None and cls.get("driver") != driver:
            continue
        found.append(str(meta["name"]))
    if len(found) > 1:
        raise FailedPrecondition(
            f"several default VolumeSnapshotClasses for driver {driver or '(any)'}: "
            f"{', '.join(sorted(found))}; name one (snapshot_class)"
        )
    return found[0] if found else None


def snapshot_name(claim: str, suffix: str | None = None) -> str:
    """A fresh VolumeSnapshot name for the claim: ``<claim>-stasis-<suffix>``."""
    suffix = suffix or secrets.token_hex(4)
    tail = f"-stasis-{suffix}"
    return claim[: _NAME_MAX - len(tail)] + tail


def build_snapshot(name: str, namespace: str, claim: str, class_name: str | None) -> dict[str, Any]:
    """A snapshot.storage.k8s.io/v1 VolumeSnapshot of the claim."""
    spec: dict[str, Any] = {"source": {"persistentVolumeClaimName": claim}}
    if class_name:
        spec["volumeSnapshotClassName"] = class_name
    return {
        "apiVersion": f"{SNAPSHOT_GROUP}/{SNAPSHOT_VERSION}",
        "kind": "VolumeSnapshot",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {SNAPSHOT_LABEL_CLAIM: claim[:63]},
        },
        "spec": spec,
    }


def snapshot_status(vs: Mapping[str, Any]) -> tuple[bool, str | None]:
    """(readyToUse, the last error's message or None) of a VolumeSnapshot."""
    status = vs.get("status") or {}
    error = status.get("error") or {}
    return bool(status.get("readyToUse")), error.get("message")


def build_record(
    pvc: Mapping[str, Any],
    pv: Mapping[str, Any] | None,
    original_policy: str | None,
    snapshot: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The JSON-able record of one claim: the claim, its volume (name, reclaim policy
    before Stasis set Retain, the volume sanitized) and the snapshot's reference."""
    claim = sanitize_claim(pvc)
    record: dict[str, Any] = {
        "version": RECORD_VERSION,
        "claimName": claim["metadata"]["name"],
        "namespace": claim["metadata"]["namespace"],
        "claim": claim,
        "volume": None,
        "snapshot": None,
    }
    if pv is not None:
        record["volume"] = {
            "name": pv["metadata"]["name"],
            "originalReclaimPolicy": original_policy,
            "object": sanitize_volume(pv),
        }
    if snapshot is not None:
        meta = snapshot["metadata"]
        status = snapshot.get("status") or {}
        record["snapshot"] = {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "className": (snapshot.get("spec") or {}).get("volumeSnapshotClassName"),
            "restoreSize": status.get("restoreSize"),
        }
    return record


def check_record(record: Any) -> dict[str, Any]:
    """The record, if it has the shape build_record gives; InvalidArgument otherwise."""
    if (
        not isinstance(record, dict)
        or record.get("version") != RECORD_VERSION
        or not isinstance(record.get("claim"), dict)
        or not record.get("claimName")
    ):
        raise InvalidArgument(f"not a Stasis volume record (version {RECORD_VERSION}): {record!r}")
    return record


def build_restored_claim(
    record: Mapping[str, Any], namespace: str, volume: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The PersistentVolumeClaim that restores a record in namespace.

    * snapshotted: ``spec.dataSource`` is the VolumeSnapshot, no volumeName (the
      storage class provisions a volume with the snapshot's data);
    * else volume (the recorded PersistentVolume, still there): ``spec.volumeName``
      names it and the storage class is the volume's ("" for none), so the claim binds
      to it and to nothing else;
    * else (the volume is gone): no volumeName, the recorded storage class provisions
      a new, empty volume.
    """
    claim = record["claim"]
    meta: dict[str, Any] = {"name": record["claimName"], "namespace": namespace}
    for key in ("labels", "annotations"):
        if claim["metadata"].get(key):
            meta[key] = dict(claim["metadata"][key])
    spec = copy.deepcopy(dict(claim["spec"]))
    spec.pop("volumeName", None)
    snap = record.get("snapshot")
    if snap:
        spec.pop("dataSourceRef", None)
        spec["dataSource"] = {
            "apiGroup": SNAPSHOT_GROUP,
            "kind": "VolumeSnapshot",
            "name": snap["name"],
        }
    elif volume is not None:
        spec.pop("dataSource", None)
        spec.pop("dataSourceRef", None)
        spec["volumeName"] = volume["metadata"]["name"]
        spec["storageClassName"] = (volume.get("spec") or {}).get("storageClassName") or ""
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def claim_ref_patch(namespace: str, claim: str) -> list[dict[str, Any]]:
    """The JSON patch that reserves a retained PersistentVolume for the claim about to
    be created: claimRef names it, with no uid or resourceVersion (those of the deleted
    claim kept the volume Released), so the binder binds the two."""
    ref = {
        "kind": "PersistentVolumeClaim",
        "apiVersion": "v1",
        "namespace": namespace,
        "name": claim,
    }
    return [{"op": "add", "path": "/spec/claimRef", "value": ref}]


def retain_patch() -> list[dict[str, Any]]:
    """The JSON patch that sets a PersistentVolume's reclaim policy to Retain."""
    return [{"op": "add", "path": "/spec/persistentVolumeReclaimPolicy", "value": "Retain"}]


def volume_in_use(pv: Mapping[str, Any], live_claim_uid: str | None) -> bool:
    """Whether the PersistentVolume is bound to a claim that still exists (live_claim_uid:
    the uid of the claim its claimRef names, None when that claim is gone)."""
    ref = (pv.get("spec") or {}).get("claimRef") or {}
    return bool(ref.get("uid")) and ref.get("uid") == live_claim_uid


# -- API errors -------------------------------------------------------------------------


def _api_exception() -> type[BaseException]:
    cls: type[BaseException] = importlib.import_module("kubernetes.client.exceptions").ApiException
    return cls


def api_message(status: int | None, reason: str | None, body: Any) -> str:
    """The apiserver's one-line reason for a failed call (its Status message when the
    body is one), never the raw response."""
    message = None
    if body:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(body).get("message")
    text = message or reason or "no reason given"
    text = " ".join(str(text).split())
    return f"{text} (HTTP {status})" if status else text


_BY_STATUS: dict[int, type[StasisError]] = {
    400: InvalidArgument,
    401: PermissionDenied,
    403: PermissionDenied,
    404: NotFound,
    409: AlreadyExists,
    422: InvalidArgument,
}


@contextlib.contextmanager
def _api(what: str) -> Iterator[None]:
    """Turns an API failure inside into one StasisError line: ``<what>: <reason>``."""
    api_error = _api_exception()
    transport_error = importlib.import_module("urllib3.exceptions").HTTPError
    try:
        yield
    except StasisError:
        raise
    except api_error as e:
        status = getattr(e, "status", None)
        cls = _BY_STATUS.get(status or 0, Unavailable)
        msg = api_message(status, getattr(e, "reason", None), getattr(e, "body", None))
        raise cls(f"{what}: {msg}") from e
    except (OSError, transport_error) as e:
        raise Unavailable(f"{what}: apiserver unreachable: {' '.join(str(e).split())}") from e


def _json(reply: Any) -> dict[str, Any]:
    """A raw reply (``_preload_content=False``) as JSON."""
    data: dict[str, Any] = json.loads(reply.data)
    return data


def _read_claim(core: CoreV1Api, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        with _api(f"reading PersistentVolumeClaim {namespace}/{name}"):
            return _json(
                core.read_namespaced_persistent_volume_claim(
                    name, namespace, _preload_content=False
                )
            )
    except NotFound:
        return None


def _read_volume(core: CoreV1Api, name: str) -> dict[str, Any] | None:
    try:
        with _api(f"reading PersistentVolume {name}"):
            return _json(core.read_persistent_volume(name, _preload_content=False))
    except NotFound:
        return None


def _wait(
    what: Callable[[], str | None],
    timeout: float,
    describe: Callable[[], str],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Polls what() until it returns None (done); DeadlineExceeded with describe()."""
    deadline = clock() + timeout
    while True:
        if what() is None:
            return
        if clock() >= deadline:
            raise DeadlineExceeded(describe())
        time.sleep(_POLL)


# -- record -----------------------------------------------------------------------------


def record_volumes(
    core: CoreV1Api,
    custom: CustomObjectsApi,
    pod: dict[str, Any],
    *,
    snapshot_all: bool = False,
    snapshot_class: str | None = None,
    timeout: float = 300,
) -> list[dict[str, Any]]:
    """Records every PersistentVolumeClaim the pod mounts and keeps its data safe.

    For each claim: reads it and its bound PersistentVolume, sets the volume's reclaim
    policy to Retain (recording the original), and for a claim annotated
    ``stasis.dev/volume-snapshot: "true"`` (every claim with snapshot_all) creates a
    VolumeSnapshot (class snapshot_class, else the default class for the volume's CSI
    driver, else none) and waits until all are readyToUse (timeout seconds in all).
    Returns one JSON-able record per claim, for restore_volumes. On failure the
    snapshots this call created are deleted again; Retain stays (it loses nothing).
    """
    namespace, pod_name = pod_ref(pod)
    plans: list[tuple[dict[str, Any], dict[str, Any] | None, str | None]] = []
    for name in claim_names(pod):
        pvc = _read_claim(core, namespace, name)
        if pvc is None:
            raise NotFound(
                f"PersistentVolumeClaim {namespace}/{name} (used by pod {pod_name}): not found"
            )
        pv, policy = _retain_volume(core, pvc)
        plans.append((pvc, pv, policy))

    created: list[dict[str, Any]] = []
    classes: list[dict[str, Any]] | None = None
    try:
        for pvc, pv, _ in plans:
            if not wants_snapshot(pvc, snapshot_all):
                continue
            claim = pvc["metadata"]["name"]
            if pv is None:
                raise FailedPrecondition(
                    f"PersistentVolumeClaim {namespace}/{claim}: not bound to a volume, "
                    "cannot be snapshotted"
                )
            cls = snapshot_class
            if cls is None:
                if classes is None:
                    classes = _snapshot_classes(custom)
                driver = ((pv.get("spec") or {}).get("csi") or {}).get("driver")
                cls = default_snapshot_class(classes, driver)
            created.append(_create_snapshot(custom, namespace, claim, cls))
        ready = _wait_snapshots(custom, created, timeout)
    except BaseException:
        for vs in created:
            _delete_snapshot_quietly(custom, vs["metadata"]["namespace"], vs["metadata"]["name"])
        raise

    by_claim = {vs["spec"]["source"]["persistentVolumeClaimName"]: vs for vs in ready}
    return [
        build_record(pvc, pv, policy, by_claim.get(pvc["metadata"]["name"]))
        for pvc, pv, policy in plans
    ]


def _retain_volume(
    core: CoreV1Api, pvc: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """The claim's bound volume (None when unbound) and its reclaim policy before this
    call, after setting it to Retain."""
    meta = pvc["metadata"]
    volume_name = (pvc.get("spec") or {}).get("volumeName")
    if not volume_name or (pvc.get("status") or {}).get("phase") not in ("Bound", None):
        return None, None
    pv = _read_volume(core, volume_name)
    if pv is None:
        raise NotFound(
            f"PersistentVolume {volume_name} (bound to PersistentVolumeClaim "
            f"{meta['namespace']}/{meta['name']}): not found"
        )
    policy = (pv.get("spec") or {}).get("persistentVolumeReclaimPolicy")
    if policy != "Retain":
        with _api(f"setting reclaim policy Retain on PersistentVolume {volume_name}"):
            pv = _json(
                core.patch_persistent_volume(volume_name, retain_patch(), _preload_content=False)
            )
        log.info("PersistentVolume %s: reclaim policy %s -> Retain", volume_name, policy)
    return pv, policy


def _snapshot_classes(custom: CustomObjectsApi) -> list[dict[str, Any]]:
    with _api("listing VolumeSnapshotClasses"):
        reply = custom.list_cluster_custom_object(
            SNAPSHOT_GROUP, SNAPSHOT_VERSION, "volumesnapshotclasses"
        )
    items: list[dict[str, Any]] = reply.get("items") or []
    return items


def _create_snapshot(
    custom: CustomObjectsApi, namespace: str, claim: str, class_name: str | None
) -> dict[str, Any]:
    body = build_snapshot(snapshot_name(claim), namespace, claim, class_name)
    what = f"creating VolumeSnapshot {namespace}/{body['metadata']['name']} of {claim}"
    with _api(what):
        vs: dict[str, Any] = custom.create_namespaced_custom_object(
            SNAPSHOT_GROUP, SNAPSHOT_VERSION, namespace, "volumesnapshots", body
        )
    log.info("VolumeSnapshot %s/%s of %s created", namespace, vs["metadata"]["name"], claim)
    return vs


def _wait_snapshots(
    custom: CustomObjectsApi, snapshots: list[dict[str, Any]], timeout: float
) -> list[dict[str, Any]]:
    """The snapshots, re-read, once every one is readyToUse."""
    current = {vs["metadata"]["name"]: vs for vs in snapshots}
    pending = list(current)

    def not_ready() -> str | None:
        for name in list(pending):
            vs = current[name]
            ns = vs["metadata"]["namespace"]
            with _api(f"reading VolumeSnapshot {ns}/{name}"):
                vs = custom.get_namespaced_custom_object(
                    SNAPSHOT_GROUP, SNAPSHOT_VERSION, ns, "volumesnapshots", name
                )
            current[name] = vs
            if snapshot_status(vs)[0]:
                pending.remove(name)
        return pending[0] if pending else None

    def describe() -> str:
        vs = current[pending[0]]
        ns, name = vs["metadata"]["namespace"], vs["metadata"]["name"]
        claim = vs["spec"]["source"]["persistentVolumeClaimName"]
        error = snapshot_status(vs)[1]
        why = (
            f"last error: {' '.join(error.split())}"
            if error
            else ("no error reported (is a CSI snapshot controller running?)")
        )
        return f"VolumeSnapshot {ns}/{name} of {claim}: not readyToUse after {timeout:g}s, {why}"

    if pending:
        _wait(not_ready, timeout, describe)
    return [current[vs["metadata"]["name"]] for vs in snapshots]


def _delete_snapshot_quietly(custom: CustomObjectsApi, namespace: str, name: str) -> None:
    try:
        with _api(f"deleting VolumeSnapshot {namespace}/{name}"):
            custom.delete_namespaced_custom_object(
                SNAPSHOT_GROUP, SNAPSHOT_VERSION, namespace, "volumesnapshots", name
            )
    except StasisError as e:
        log.warning("%s", e)


# -- restore ----------------------------------------------------------------------------


def restore_volumes(
    core: CoreV1Api,
    custom: CustomObjectsApi,
    records: list[dict[str, Any]],
    namespace: str,
    timeout: float = 120,
    check_volume: Callable[[str, Mapping[str, Any]], None] | None = None,
) -> list[str]:
    """Recreates in namespace every recorded PersistentVolumeClaim that is missing
    there; one that exists is left alone (logged). Returns the names created.
    ``check_volume(claim, pv)``, when given, may refuse (raise) an existing volume
    before it is reserved for the claim.

    A snapshotted claim gets ``dataSource`` = its VolumeSnapshot (which must exist, in
    namespace). Otherwise a recorded volume that still exists is reserved for the new
    claim (its claimRef) and the claim names it; the call then waits (timeout
    seconds) until they are Bound. A volume that is gone leaves the claim to its
    storage class. On failure the claims this call created are deleted again.
    """
    checked = [check_record(r) for r in records]
    created: list[str] = []
    rebinding: list[tuple[str, str]] = []
    try:
        for record in checked:
            name = record["claimName"]
            if _read_claim(core, namespace, name) is not None:
                log.info("PersistentVolumeClaim %s/%s exists: left alone", namespace, name)
                continue
            volume = None
            if record.get("snapshot"):
                _check_snapshot(custom, record, namespace)
            elif record.get("volume"):
                volume = _reserve_volume(core, record, namespace, check_volume)
            body = build_restored_claim(record, namespace, volume)
            with _api(f"creating PersistentVolumeClaim {namespace}/{name}"):
                core.create_namespaced_persistent_volume_claim(
                    namespace, body, _preload_content=False
                )
            created.append(name)
            if volume is not None:
                rebinding.append((name, volume["metadata"]["name"]))
            log.info("PersistentVolumeClaim %s/%s created: %s", namespace, name, body["spec"])
        for claim, volume_name in rebinding:
            _wait_bound(core, namespace, claim, volume_name, timeout)
    except BaseException:
        for name in created:
            _delete_claim_quietly(core, namespace, name)
        raise
    return created


def _check_snapshot(custom: CustomObjectsApi, record: Mapping[str, Any], namespace: str) -> None:
    snap = record["snapshot"]
    ref = f"VolumeSnapshot {snap['namespace']}/{snap['name']}"
    if snap["namespace"] != namespace:
        raise FailedPrecondition(
            f"{ref}: cannot restore PersistentVolumeClaim {record['claimName']} into namespace "
            f"{namespace} (a claim's dataSource must be in its own namespace)"
        )
    try:
        with _api(f"reading {ref}"):
            custom.get_namespaced_custom_object(
                SNAPSHOT_GROUP, SNAPSHOT_VERSION, namespace, "volumesnapshots", snap["name"]
            )
    except NotFound as e:
        raise NotFound(f"{ref} (of PersistentVolumeClaim {record['claimName']}): not found") from e


def _reserve_volume(
    core: CoreV1Api,
    record: Mapping[str, Any],
    namespace: str,
    check_volume: Callable[[str, Mapping[str, Any]], None] | None = None,
) -> dict[str, Any] | None:
    """The recorded volume, its claimRef pointed at the claim about to be created; None
    when the volume is gone. FailedPrecondition when a live claim holds it."""
    volume_name = record["volume"]["name"]
    claim = record["claimName"]
    pv = _read_volume(core, volume_name)
    if pv is None:
        log.info(
            "PersistentVolume %s is gone: %s/%s gets a new volume from its storage class",
            volume_name,
            namespace,
            claim,
        )
        return None
    ref = (pv.get("spec") or {}).get("claimRef") or {}
    if ref.get("uid"):
        holder = _read_claim(core, ref.get("namespace", ""), ref.get("name", ""))
        uid = (holder or {}).get("metadata", {}).get("uid")
        if volume_in_use(pv, uid):
            raise FailedPrecondition(
                f"PersistentVolume {volume_name}: bound to PersistentVolumeClaim "
                f"{ref.get('namespace')}/{ref.get('name')}, cannot restore "
                f"{namespace}/{claim} onto it"
            )
    if check_volume is not None:
        check_volume(claim, pv)
    with _api(f"reserving PersistentVolume {volume_name} for {namespace}/{claim}"):
        pv = _json(
            core.patch_persistent_volume(
                volume_name, claim_ref_patch(namespace, claim), _preload_content=False
            )
        )
    return pv


def _wait_bound(
    core: CoreV1Api, namespace: str, claim: str, volume_name: str, timeout: float
) -> None:
    last: dict[str, Any] = {}

    def unbound() -> str | None:
        pvc = _read_claim(core, namespace, claim) or {}
        last["phase"] = (pvc.get("status") or {}).get("phase")
        return None if last["phase"] == "Bound" else claim

    def describe() -> str:
        pv = _read_volume(core, volume_name) or {}
        pv_phase = (pv.get("status") or {}).get("phase", "gone")
        return (
            f"PersistentVolumeClaim {namespace}/{claim}: not Bound to PersistentVolume "
            f"{volume_name} after {timeout:g}s (claim {last.get('phase')}, volume {pv_phase})"
        )

    _wait(unbound, timeout, describe)


def _delete_claim_quietly(core: CoreV1Api, namespace: str, name: str) -> None:
    try:
        with _api(f"deleting PersistentVolumeClaim {namespace}/{name}"):
            core.delete_namespaced_persistent_volume_claim(name, namespace, _preload_content=False)
    except StasisError as e:
        log.warning("%s", e)
