"""Stasis checkpoints of a container: CRIU images, the rootfs diff taken from the
overlay upperdir, the spec and metadata, written into a store with the manifest
last; and the restore side: verify, apply the diff, restore at Start.

Container-level orchestration only: no protobuf here (the RPC edge converts).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from runtime import boundedjson
from runtime.capture import gpu as capture_gpu
from runtime.capture import rootfs
from runtime.capture.digest import TailDigester
from runtime.capture.gpu import GpuBackend
from runtime.config import Config
from runtime.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    StasisError,
)
from runtime.linux import cgroups
from runtime.linux.runc import CheckpointOpts
from runtime.names import (
    METADATA_FILE,
    POD_FILE,
    POD_FILE_MAX,
    RESTORE_ANNOTATION,
    RESTORE_GRANT,
    RESTORE_POLICY,
    RUNTIME,
)
from runtime.security import ceiling
from runtime.store import upload
from runtime.store.api import CheckpointReader, Store
from runtime.store.local import LocalStore
from runtime.store.metadata import restore_metadata
from runtime.store.resolve import resolve_source, signing_for
from shim.task.container import Container
from shim.task.process import Status

log = logging.getLogger("stasis.checkpoint")

RESTORE_FROM = RESTORE_ANNOTATION
IMAGE_ANNOTATIONS = ("io.kubernetes.cri.image-name", "io.containerd.image.name")
CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
# The Kubernetes namespace of a CRI container, as containerd's CRI plugin sets it
# (pod annotations reach the shim only as stasis.dev/*, so a pod cannot fake it).
KUBE_NAMESPACE_ANNOTATIONS = ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace")
METADATA_MAX = 1 << 20
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointSpec:
    """What to checkpoint and where (a Checkpoint request, decoded)."""

    name: str = ""
    exit: bool = False
    tcp_established: bool = False
    image: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    #: When set, the image is not known yet: awaited once the dump is done, just
    #: before it is recorded ("" from it: the annotations' image, as for ``image``);
    #: what it raises fails the checkpoint.
    image_later: Callable[[], Awaitable[str]] | None = None


@dataclass(frozen=True)
class CheckpointResult:
    """What a checkpoint produced."""

    ref: str
    name: str
    size: int
    criu_size: int
    seconds: float
    frozen_seconds: float


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _dir_size(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _spec(container: Container) -> dict[str, Any]:
    with open(os.path.join(container.bundle, "config.json"), "rb") as f:
        spec: dict[str, Any] = json.load(f)
    return spec


def _upperdir(container: Container) -> str | None:
    for m in container.config.rootfs:
        upper = m.upperdir()
        if upper:
            return upper
    return None


async def checkpoint(
    container: Container,
    spec: CheckpointSpec,
    *,
    store: Store,
    gpu: GpuBackend | None,
    namespace: str,
) -> CheckpointResult:
    """Checkpoint ``container`` into ``store``; it keeps running unless ``exit``.

    Files and memory are taken at one moment: the container is frozen while
    the rootfs diff is captured and CRIU dumps it, all in its init's
    checkpointing state (``InitProcess.checkpointing``), so checkpoints of one
    container never interleave, nor do they with Pause, Resume, Update or Exec.
    ``gpu`` (None: no GPU support) moves CUDA processes' GPU state into host
    memory before the freeze and back after a leave-running dump. On any failure
    the partial checkpoint is removed (the manifest is written last, so nothing
    half-done ever looks complete) and the container is thawed and keeps running.
    """
    init = container.init
    if init.status not in (Status.RUNNING, Status.PAUSED):  # before any store work
        raise FailedPrecondition(
            f"cannot checkpoint container {container.id}: it is {init.status.name.lower()}"
        )
    name = spec.name or f"{container.id}-{_utc_stamp()}"
    oci = _spec(container)
    annotations = oci.get("annotations") or {}
    annotated = next((annotations[k] for k in IMAGE_ANNOTATIONS if k in annotations), "")
    kube_namespace = kube_namespace_of(annotations)
    started = time.monotonic()
    # Asked now, answered by the time the metadata is written (each a process, the
    # first time a shim checkpoints): not after the dump, when the caller waits.
    versions = asyncio.ensure_future(_versions(container))
    versions.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failed dump
    async with upload.begin(store, name, container.runc.spawner) as writer:
        upper = _upperdir(container)
        async with init.checkpointing() as ck:
            # Exec'd processes join the init's tree, which is what CRIU dumps.
            execs = await container.detach_execs()
            # CUDA processes: the driver moves their GPU state into host memory (lock,
            # then checkpoint) for CRIU to dump; it needs them running, so before the freeze.
            cuda = await capture_gpu.suspend_container(
                gpu, container.id, lambda: container.runc.ps(container.id), ck.paused
            )
            digester: TailDigester | None = None
            try:
                await ck.freeze()
                frozen_at = time.monotonic()
                diff: rootfs.DiffStats | None = None
                try:
                    if upper is not None:
                        diff = await asyncio.to_thread(
                            partial(
                                rootfs.capture,
                                upper,
                                writer.path("rootfs-diff.tar"),
                                writer.path("deleted.files"),
                                durable=False,  # the commit fsyncs every file
                            )
                        )
                    images = writer.path("checkpoint", directory=True)
                    # Hash the images as CRIU writes them: the commit then neither
                    # re-reads them nor waits for all of their writeback.
                    digester = TailDigester(images).start()
                    await ck.dump(
                        CheckpointOpts(
                            image_path=images,
                            leave_running=not spec.exit,
                            tcp_established=spec.tcp_established,
                            shell_job=init.terminal,
                        )
                    )
                finally:
                    # Thaw first: hashing what CRIU wrote last needs no frozen container.
                    await ck.thaw()
                    frozen = time.monotonic() - frozen_at
                    if digester is not None:
                        tail = await asyncio.to_thread(digester.finish)
                        hashed_at = time.monotonic()
            except BaseException:
                if cuda is not None:  # the container runs on: give its GPU state back
                    await capture_gpu.undo_suspend(container.id, cuda)
                raise
            if cuda is not None and not spec.exit:  # after a leave-running dump
                await capture_gpu.resume_container(container.id, cuda)
        known = {f"checkpoint/{name}": digest for name, digest in tail.items()}
        later = spec.image_later
        image = (await later() if later is not None else spec.image) or annotated
        writer.write_bytes("spec.dump", json.dumps(oci, indent=1).encode())
        checkpointed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        config_dump = {
            "id": container.id,
            "name": container.id,
            "rootfsImageName": image,
            "rootfsImageRef": image,
            "runtime": RUNTIME,
            "createdTime": checkpointed,
            "checkpointedTime": checkpointed,
            "restored": False,
        }
        writer.write_bytes("config.dump", json.dumps(config_dump, indent=1).encode())
        criu_size = _dir_size(writer.path("checkpoint"))
        runc_version, criu_version = await versions
        metadata = {
            "format": FORMAT_VERSION,
            "container_id": container.id,
            "namespace": namespace,
            **({"kube_namespace": kube_namespace} if kube_namespace else {}),
            "image": image,
            "runtime": RUNTIME,
            "runc": runc_version,
            "criu": criu_version,
            "host": socket.gethostname(),
            "kernel": os.uname().release,
            "cgroup_mode": "v2" if cgroups.unified() else "v1",
            "exit": spec.exit,
            "tcp_established": spec.tcp_established,
            "labels": spec.labels,
            "execs": execs,
            # What this container's spec allowed: a restore into a spec that allows
            # less is refused before CRIU runs (the kernel's view is checked after).
            "security": ceiling.profile(oci),
            **({"gpu": cuda.record} if cuda is not None else {}),
            "sizes": {
                "criu_images": criu_size,
                "rootfs_diff_files": diff.files if diff else 0,
                "rootfs_diff_bytes": diff.bytes if diff else 0,
                "rootfs_deleted": diff.deleted if diff else 0,
            },
            "frozen_seconds": round(frozen, 6),
        }
        writer.write_bytes("stasis.json", json.dumps(metadata, indent=1).encode())
        info = await writer.commit(metadata, known)
        log.debug(
            "checkpoint %s of %s: frozen %.3fs, images hashed +%.3fs, committed +%.3fs",
            info.name,
            container.id,
            frozen,
            hashed_at - frozen_at - frozen,
            time.monotonic() - hashed_at,
        )
    return CheckpointResult(
        ref=info.ref,
        name=info.name,
        size=info.size,
        criu_size=criu_size,
        seconds=time.monotonic() - started,
        frozen_seconds=frozen,
    )


# Versions, asked once per shim (they do not change under a running shim).
_VERSIONS: dict[str, Any] = {}


async def _versions(container: Container) -> tuple[Any, str]:
    """runc's and CRIU's versions, asked at once."""
    runc, criu = await asyncio.gather(_runc_version(container), _criu_version(container))
    return runc, criu


async def _runc_version(container: Container) -> Any:
    key = f"runc:{container.runc.binary}"
    if key not in _VERSIONS:
        _VERSIONS[key] = await container.runc.version()
    return _VERSIONS[key]


async def _criu_version(container: Container) -> str:
    if "criu" in _VERSIONS:
        return str(_VERSIONS["criu"])
    try:
        done = await container.runc.spawner.run(["criu", "--version"], capture=True)
    except OSError:
        return ""
    lines = done.stdout.decode(errors="replace").splitlines()
    _VERSIONS["criu"] = str(lines[0].strip()) if lines else ""
    return str(_VERSIONS["criu"])


def kube_namespace_of(annotations: dict[str, Any]) -> str:
    """The Kubernetes namespace a container's spec annotations name ("" outside CRI)."""
    for key in KUBE_NAMESPACE_ANNOTATIONS:
        value = annotations.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


@dataclass(frozen=True)
class RestoreTarget:
    """Where a restore puts a checkpoint: the shim's containerd namespace, the new
    container's Kubernetes namespace ("" outside CRI), and a ``stasis kube restore``
    grant for another Kubernetes namespace (its annotation's value, "" if none)."""

    namespace: str
    kube_namespace: str = ""
    grant: str = ""

    @classmethod
    def of(cls, namespace: str, annotations: dict[str, Any]) -> RestoreTarget:
        """The target of a new container in ``namespace`` with these spec annotations."""
        grant = annotations.get(RESTORE_GRANT)
        return cls(
            namespace, kube_namespace_of(annotations), grant if isinstance(grant, str) else ""
        )


@dataclass(frozen=True)
class RestorePlan:
    """A checkpoint to restore a new container from: verified, except the CRIU
    images when ``images_pending`` (a ``RestoreGate`` checks those during the
    restore, before anything runs)."""

    ref: str
    reader: CheckpointReader
    images_pending: bool = False

    @property
    def images(self) -> str:
        """The CRIU image directory."""
        return self.reader.file("checkpoint")

    @property
    def tcp_established(self) -> bool:
        """Whether the dump allowed established TCP connections (restore must too)."""
        return bool(self.reader.metadata.get("tcp_established"))


def restore_request(annotations: dict[str, str]) -> tuple[str, str] | None:
    """(REF, policy) when the spec asks for a restore, else None.

    A CRI sandbox (the pod's pause container) carries the pod's annotations too,
    but is never restored: None for it.
    """
    ref = annotations.get(RESTORE_FROM, "").strip()
    if not ref or annotations.get(CRI_CONTAINER_TYPE) == "sandbox":
        return None
    policy = annotations.get(RESTORE_POLICY, "fail").strip() or "fail"
    if policy not in ("fail", "fresh"):
        raise InvalidArgument(f"{RESTORE_POLICY} must be 'fail' or 'fresh', not {policy!r}")
    return ref, policy


def prepare_restore(
    ref: str,
    upperdir: str | None,
    config: Config,
    *,
    defer_images: bool = False,
    container_name: str | None = None,
    spec: dict[str, Any] | None = None,
    target: RestoreTarget | None = None,
) -> RestorePlan | None:
    """Open and verify a checkpoint and apply its rootfs diff into ``upperdir``.

    ``ref`` names a container checkpoint, or a pod checkpoint (its ``pod.json``
    maps container names to container checkpoints of the same store): then the
    container named ``container_name`` (the CRI container name) is restored, and
    None means the pod checkpoint has no such container (it starts fresh).

    Runs before the rootfs is mounted (the diff goes into the new container's
    empty upperdir). Raises with a message naming the checkpoint and the reason.
    With ``defer_images``, a local checkpoint's CRIU images are left for a
    ``RestoreGate`` to check during the restore. A checkpoint whose recorded
    security profile exceeds ``spec`` (the new container's) is refused here.

    Opening verifies the checkpoint's signature; with ``target`` (the shim
    always gives it), a checkpoint taken in another containerd or Kubernetes
    namespace is refused (PermissionDenied), unless ``restore.cross_namespace``
    or, for the Kubernetes namespace, a valid grant allows it.
    """
    reader: CheckpointReader | None = None
    try:
        # The annotation is not trusted input: checked and resolved in one step,
        # and the store opens the checkpoint through what it checked.
        store, name = resolve_source(ref, config)
        reader = store.open(name)
        # What a grant names: the checkpoint the annotation points at.
        digest = hashlib.sha256(reader.manifest.to_json()).hexdigest()
        if POD_FILE in reader.manifest.files:
            member = _pod_member(reader, container_name)
            reader.close()
            reader = None
            if member is None:
                return None
            reader = store.open(member)
            if POD_FILE in reader.manifest.files:
                raise InvalidArgument(
                    f"container {container_name!r}: {member!r} is a pod checkpoint"
                )
        # Every field the restore acts on, checked before anything runs.
        metadata = restore_metadata(reader)
        if metadata.get("gpu"):  # GPU state restores only onto the same GPUs
            capture_gpu.check_restore(metadata)
        # Local images are hashed while CRIU restores them (RestoreGate); a
        # remote store verifies as it downloads, before CRIU can read anything.
        pending = defer_images and isinstance(store, LocalStore) and not reader.manifest.encryption
        reader.verify(only=_not_images if pending else None)
        if spec is not None:
            _check_profile(reader, spec)
        if target is not None:
            _check_namespace(reader, target, config, digest)
        if reader.manifest.encryption:  # decrypt the images here, off the shim's event loop
            reader.file("checkpoint")
        if upperdir is not None and "rootfs-diff.tar" in reader.manifest.files:
            rootfs.apply(
                reader.file("rootfs-diff.tar"),
                reader.file("deleted.files"),
                upperdir,
                allow_devices=config.restore.allow_devices,
                allow_setuid=config.restore.allow_setuid,
                max_bytes=config.limits.max_diff_bytes,
                reserve_bytes=config.limits.reserve_bytes,
            )
    except StasisError as e:
        if reader is not None:
            reader.close()
        raise type(e)(f"restore from checkpoint {ref!r}: {e}") from e
    except OSError as e:
        if reader is not None:
            reader.close()
        raise FailedPrecondition(f"restore from checkpoint {ref!r}: {e}") from e
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        # Checkpoint data that got past the checks above: still an error the
        # caller can act on (restore-policy fresh starts fresh), not a crash.
        if reader is not None:
            reader.close()
        raise DataLoss(
            f"restore from checkpoint {ref!r}: malformed ({type(e).__name__}: {e})"
        ) from e
    return RestorePlan(ref, reader, pending)


def _check_profile(reader: CheckpointReader, spec: dict[str, Any]) -> None:
    """Refuse a checkpoint whose recorded profile exceeds the new container's spec."""
    recorded = reader.metadata.get("security")
    if recorded is None:
        return  # not recorded (an older checkpoint): the kernel's view is checked alone
    try:
        theirs = ceiling.recorded_ceiling(recorded)
    except ValueError as e:
        raise DataLoss(f"{reader.name!r}: {METADATA_FILE}: {e}") from e
    problems = ceiling.Ceiling.from_spec(spec).admits(theirs)
    if problems:
        raise PermissionDenied(
            f"refused: the checkpointed container held more than this container's spec "
            f"allows: {'; '.join(problems)}"
        )


def signed_metadata(reader: CheckpointReader) -> dict[str, Any]:
    """The checkpoint's ``stasis.json``, read once and checked against its (signed)
    manifest entry: what it says is what the signer wrote. {} if it has none."""
    entry = reader.manifest.files.get(METADATA_FILE)
    if entry is None:
        return {}
    where = f"checkpoint {reader.name}: {METADATA_FILE}"
    if entry.size > METADATA_MAX:
        raise DataLoss(f"{where} is larger than {METADATA_MAX} bytes")
    with open(reader.file(METADATA_FILE), "rb") as f:
        data = f.read(METADATA_MAX + 1)
    # An encrypted checkpoint's copy was checked as it was decrypted (its
    # manifest lists the ciphertext's digest).
    if not reader.manifest.encryption and (
        len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256
    ):
        raise DataLoss(f"{where} does not match the manifest")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise DataLoss(f"{where} is not valid JSON") from e
    if not isinstance(doc, dict):
        raise DataLoss(f"{where} is not a JSON object")
    return doc


def _check_namespace(
    reader: CheckpointReader, target: RestoreTarget, config: Config, digest: str
) -> None:
    """PermissionDenied if the checkpoint was taken in another namespace than ``target``."""
    recorded = signed_metadata(reader)
    kube = recorded.get("kube_namespace") or ""
    containerd = recorded.get("namespace") or ""
    crossed = []
    if isinstance(containerd, str) and containerd and containerd != target.namespace:
        crossed.append(f"containerd namespace {containerd!r}, not {target.namespace!r}")
    if isinstance(kube, str) and kube != target.kube_namespace:
        crossed.append(
            f"Kubernetes namespace {kube or '(none)'!r}, not {target.kube_namespace or '(none)'!r}"
        )
    if not crossed or config.restore.cross_namespace:
        return
    granted = (
        len(crossed) == 1
        and kube != target.kube_namespace
        and target.grant
        and signing_for(config).check_grant(target.grant, digest, target.kube_namespace)
    )
    if granted:
        log.warning(
            "checkpoint %s (namespace %s) restores into namespace %s by a signed grant",
            reader.name,
            kube,
            target.kube_namespace,
        )
        return
    raise PermissionDenied(
        f"checkpoint {reader.name} was taken in {' and '.join(crossed)}: restoring it into "
        "another namespace needs restore.cross_namespace = true in the Stasis config "
        "(or `stasis kube restore --allow-cross-namespace`)"
    )


def _pod_member(reader: CheckpointReader, container_name: str | None) -> str | None:
    """The container checkpoint a pod checkpoint records for ``container_name``."""
    if not container_name:
        raise InvalidArgument(
            f"{reader.name!r} is a pod checkpoint: only a Kubernetes container "
            f"(annotation {CRI_CONTAINER_NAME}) can be restored from it"
        )
    reader.verify()  # pod.json is small: check it (and the manifest) now
    doc = boundedjson.load_file(
        reader.file(POD_FILE),
        f"{POD_FILE} of pod checkpoint {reader.name!r}",
        max_bytes=POD_FILE_MAX,
    )
    try:
        containers = doc["containers"]
        member = containers.get(container_name)
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise DataLoss(f"{POD_FILE} of pod checkpoint {reader.name!r} is malformed: {e}") from e
    if member is None:
        return None
    if not isinstance(member, str):
        raise DataLoss(f"{POD_FILE}: container {container_name!r}: not a checkpoint name")
    return member


def _images(rel: str) -> bool:
    return rel.startswith("checkpoint/")


def _not_images(rel: str) -> bool:
    return not _images(rel)


CRIU_CONFIG_ANNOTATION = "org.criu.config"  # runc hands this file to CRIU

_GATE_SCRIPT = """#!/bin/sh
# Stasis restore gate. CRIU runs this at every restore stage and it waits for the
# shim's verdict at two: post-restore (every process restored, none resumed), on the
# checkpoint's CRIU images, and pre-resume (credentials, seccomp and mounts final,
# every thread stopped by CRIU before its first instruction), on the restored tree
# against the new container's spec. Anything but "ok" fails it: CRIU aborts at
# post-restore; it ignores a failing pre-resume script, so there the shim (or, with
# no verdict, this script) kills the tree first, and CRIU fails to resume it.
# The images take a while to hash; the tree's check takes milliseconds.
case "$CRTOOLS_SCRIPT_ACTION" in
post-restore) stage=images nap=0.005 polls={polls} ;;
pre-resume) stage=ceiling nap=0.001 polls={polls_fast} ;;
*) exit 0 ;;
esac
# One write of a whole line: the shim takes the PID once it ends in a newline.
echo "$CRTOOLS_INIT_PID" > {dir}/$stage.held
i=0
while [ ! -e {dir}/$stage.verdict ]; do
    i=$((i + 1))
    # No verdict ever comes from a dead shim.
    if [ "$i" -gt "$polls" ] || ! kill -0 {shim} 2>/dev/null; then
        # At pre-resume CRIU traces the tree: only with CRIU ($PPID) gone can it die.
        [ "$stage" = images ] || kill -KILL "$CRTOOLS_INIT_PID" "$PPID"
        exit 1
    fi
    sleep $nap
done
read -r verdict < {dir}/$stage.verdict
: > {dir}/$stage.done
[ "$verdict" = ok ]
"""


class RestoreGate:
    """Holds a restored tree before it runs until the shim has checked it.

    ``install`` points runc at a CRIU configuration whose action script blocks at
    post-restore until the images' verdict exists and at pre-resume until the
    ceiling's does. ``start`` hashes the images in a thread (when ``plan`` left
    them to the gate; otherwise their verdict is "ok" at once) and watches for
    pre-resume, where every restored process is checked against ``spec``
    (``runtime.security.ceiling``) and the tree is killed before its first instruction if
    anything exceeds it. After the restore, ``outcome`` returns the first error.
    """

    def __init__(
        self,
        bundle: str,
        ref: str,
        spec: dict[str, Any],
        plan: RestorePlan | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.bundle = bundle
        self.dir = os.path.join(bundle, "restore-gate")
        self.ref = ref
        self.spec = spec
        self.plan = plan if plan is not None and plan.images_pending else None
        self.timeout = timeout
        self._images: asyncio.Future[StasisError | None] | None = None
        self._ceiling: asyncio.Future[StasisError | None] | None = None
        self._done = threading.Event()

    def _file(self, stage: str, kind: str) -> str:
        return os.path.join(self.dir, f"{stage}.{kind}")

    def install(self) -> None:
        """Write the script and CRIU config, and name them in the bundle's config.json."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        import shlex

        script = os.path.join(self.dir, "gate.sh")
        _write_atomic(
            script,
            _GATE_SCRIPT.format(
                dir=shlex.quote(self.dir),
                polls=int(self.timeout / 0.005),
                polls_fast=int(self.timeout / 0.001),
                shim=os.getpid(),
            ),
            0o700,
        )
        if self.plan is None:  # nothing left to check at post-restore
            _write_atomic(self._file("images", "verdict"), "ok\n", 0o600)
        conf = os.path.join(self.dir, "criu.conf")
        _write_atomic(conf, f"action-script {script}\n", 0o600)
        spec = self.spec
        annotated = {**spec, "annotations": {**(spec.get("annotations") or {})}}
        annotated["annotations"][CRIU_CONFIG_ANNOTATION] = conf
        _write_atomic(os.path.join(self.bundle, "config.json"), json.dumps(annotated), 0o644)

    def start(self) -> None:
        """Begin hashing the images and watching for pre-resume (call on the event loop)."""
        if self.plan is not None:
            self._images = asyncio.ensure_future(asyncio.to_thread(self._check_images))
        self._ceiling = asyncio.ensure_future(asyncio.to_thread(self._check_ceiling))

    def _check_images(self) -> StasisError | None:
        assert self.plan is not None
        error: StasisError | None = None
        began = time.monotonic()
        try:
            self.plan.reader.verify(only=_images)
        except StasisError as e:
            error = type(e)(f"restore from checkpoint {self.ref!r}: {e}")
        except OSError as e:
            error = FailedPrecondition(f"restore from checkpoint {self.ref!r}: {e}")
        _write_atomic(self._file("images", "verdict"), "ok\n" if error is None else "bad\n", 0o600)
        log.debug("restore gate: images of %s checked in %.3fs", self.ref, time.monotonic() - began)
        return error

    def _check_ceiling(self) -> StasisError | None:
        held = self._file("ceiling", "held")
        while not self._done.is_set():
            try:
                with open(held, "rb") as f:
                    line = f.read(32)
                if line.endswith(b"\n"):  # the script's write is whole
                    pid = int(line)
                    break
            except (OSError, ValueError):
                pass
            self._done.wait(0.001)
        else:
            return None  # the restore ended before pre-resume: outcome() decides
        began = time.monotonic()
        error = self._judge(pid, before_run=True)
        _write_atomic(self._file("ceiling", "verdict"), "ok\n" if error is None else "bad\n", 0o600)
        log.debug("restore gate: tree of %d checked in %.3fs", pid, time.monotonic() - began)
        return error

    def _judge(self, pid: int, *, before_run: bool) -> StasisError | None:
        """Check the tree rooted at ``pid``; on any excess kill it and say why."""
        try:
            limit = ceiling.Ceiling.from_spec(self.spec)
            problems = ceiling.check_restored(limit, pid, _container_cgroups(pid))
        except (OSError, ValueError) as e:
            problems = [f"the restored processes could not be checked: {e}"]
        if not problems:
            return None
        _kill_tree(pid)
        shown = "; ".join(problems[:6]) + (
            f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        )
        ran = "were killed before they ran" if before_run else "were killed"
        return PermissionDenied(
            f"restore from checkpoint {self.ref!r} refused: it exceeds the container's spec: "
            f"{shown} (its restored processes {ran})"
        )

    def finish(self) -> None:
        """The restore is over (runc returned): stop watching for pre-resume."""
        self._done.set()

    def held(self, stage: str) -> bool:
        """Whether CRIU ran the gate at ``stage`` ("images" or "ceiling")."""
        return os.path.exists(self._file(stage, "held"))

    def held_seconds(self, stage: str = "images") -> float | None:
        """How long CRIU waited at ``stage`` for its verdict (None: it did not)."""
        try:
            done = os.stat(self._file(stage, "done")).st_mtime
            return max(0.0, done - os.stat(self._file(stage, "held")).st_mtime)
        except OSError:
            return None

    async def outcome(self, pid: int) -> StasisError | None:
        """The gate's first error once its checks are done (None: the restore may run).

        ``pid`` is the restored init: when CRIU never reached pre-resume but the
        restore succeeded, the tree is checked now, running, and killed on excess.
        """
        self.finish()
        for task in (self._images, self._ceiling):
            if task is not None:
                error = await asyncio.shield(task)
                if error is not None:
                    return error
        if pid > 0 and not self.held("ceiling"):
            log.warning("CRIU did not run the restore gate at pre-resume; checking %d now", pid)
            return await asyncio.to_thread(self._judge, pid, before_run=False)
        return None

    def remove(self) -> None:
        """Remove the gate's files."""
        shutil.rmtree(self.dir, ignore_errors=True)


def _criu_of(init: int) -> int | None:
    """The CRIU process restoring ``init``: its tracer at pre-resume (None: not traced
    by CRIU)."""
    try:
        with open(f"/proc/{init}/status", "rb") as f:
            status = f.read(1 << 16)
        tracer = int(status.split(b"TracerPid:", 1)[1].split(None, 1)[0])
        with open(f"/proc/{tracer}/comm", "rb") as f:
            return tracer if tracer > 0 and f.read(64).strip() == b"criu" else None
    except (OSError, IndexError, ValueError):
        return None


def _container_cgroups(init: int) -> dict[str, str] | None:
    """The new container's cgroups: those runc put CRIU in (None: CRIU not found)."""
    criu = _criu_of(init)
    try:
        return ceiling.cgroup_paths(criu) if criu is not None else None
    except OSError:
        return None


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its descendants, and the CRIU that restores them.

    At pre-resume CRIU holds every thread in a ptrace stop: SIGKILLed there, a
    thread dies without running an instruction once it leaves the stop, but only
    CRIU, its tracer, could reap it, and CRIU's own clean-up then waits for the
    init forever. With CRIU killed too the tracees are released and die.
    """
    criu = _criu_of(pid)
    try:
        pids = ceiling.process_tree(pid)
    except ValueError:
        pids = [pid]
    for p in reversed(pids):
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    if criu is not None:
        with contextlib.suppress(OSError):
            os.kill(criu, signal.SIGKILL)


def _write_atomic(path: str, text: str, mode: int) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
