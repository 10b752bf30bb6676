"""Stasis checkpoints of a container: CRIU images, the rootfs diff taken from the
overlay upperdir, the spec and metadata, written into a store with the manifest
last; and the restore side: verify, apply the diff, restore at Start.

Container-level orchestration only: no protobuf here (the RPC edge converts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from runtime import cgroups, rootfs, upload
from runtime.config import Config
from runtime.digest import TailDigester
from runtime.errors import DataLoss, FailedPrecondition, InvalidArgument, StasisError
from runtime.runc import CheckpointOpts
from runtime.store import (
    CheckpointReader,
    LocalStore,
    default_store,
    open_store,
    resolve_source,
)
from shim.container import Container
from shim.main import RESTORE_ANNOTATION
from shim.process import Status

log = logging.getLogger("stasis.checkpoint")

RUNTIME = "io.containerd.stasis.v2"
RESTORE_FROM = RESTORE_ANNOTATION
RESTORE_POLICY = "stasis.dev/restore-policy"
IMAGE_ANNOTATIONS = ("io.kubernetes.cri.image-name", "io.containerd.image.name")
CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
POD_FILE = "pod.json"  # what makes a checkpoint a pod checkpoint (runtime/kube.py)
POD_FILE_MAX = 4 << 20
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointSpec:
    """What to checkpoint and where (a Checkpoint request, decoded)."""

    store: str = ""
    name: str = ""
    exit: bool = False
    tcp_established: bool = False
    image: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    #: When set, the image is not known yet: awaited once the dump is done, just
    #: before it is recorded ("" from it: the annotations' image, as for ``image``).
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
    container: Container, spec: CheckpointSpec, config: Config, namespace: str
) -> CheckpointResult:
    """Checkpoint ``container`` into a store; the container keeps running unless ``exit``.

    Files and memory are taken at one moment: the container is frozen while
    the rootfs diff is captured and CRIU dumps it. On any failure the partial
    checkpoint is removed (the manifest is written last, so nothing half-done
    ever looks complete) and the container is thawed and keeps running.
    Checkpoints of one container run one after the other, never interleaved.
    """
    async with container.checkpoint_lock:
        return await _checkpoint(container, spec, config, namespace)


async def _checkpoint(
    container: Container, spec: CheckpointSpec, config: Config, namespace: str
) -> CheckpointResult:
    init = container.init
    if init.status not in (Status.RUNNING, Status.PAUSED):
        raise FailedPrecondition(
            f"cannot checkpoint container {container.id}: it is {init.status.name.lower()}"
        )
    store = open_store(spec.store, config) if spec.store else default_store(config)
    name = spec.name or f"{container.id}-{_utc_stamp()}"
    oci = _spec(container)
    annotations = oci.get("annotations") or {}
    annotated = next((annotations[k] for k in IMAGE_ANNOTATIONS if k in annotations), "")
    started = time.monotonic()
    # Asked now, answered by the time the metadata is written (each a process, the
    # first time a shim checkpoints): not after the dump, when the caller waits.
    versions = asyncio.ensure_future(_versions(container))
    versions.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failed dump
    async with upload.begin(store, name, container.runc.spawner) as writer:
        upper = _upperdir(container)
        was_running = init.status == Status.RUNNING
        # Exec'd processes join the init's tree, which is what CRIU dumps.
        execs = await container.detach_execs()
        from runtime import gpu  # loads libcuda only now, and only if present

        # CUDA processes: the driver moves their GPU state into host memory (lock,
        # then checkpoint) for CRIU to dump; it needs them running, so before the freeze.
        cuda = await gpu.suspend_container(
            container.id, lambda: container.runc.ps(container.id), not was_running
        )
        digester: TailDigester | None = None
        try:
            if was_running:
                await init.pause()
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
                await container.checkpoint(
                    CheckpointOpts(
                        image_path=images,
                        leave_running=not spec.exit,
                        tcp_established=spec.tcp_established,
                        shell_job=init.terminal,
                    )
                )
            finally:
                # Thaw first: hashing what CRIU wrote last needs no frozen container.
                if was_running and init.status == Status.PAUSED:
                    await init.resume()
                frozen = time.monotonic() - frozen_at
                if digester is not None:
                    tail = await asyncio.to_thread(digester.finish)
                    hashed_at = time.monotonic()
        except BaseException:
            if cuda is not None:  # the container runs on: give its GPU state back
                await gpu.undo_suspend(container.id, cuda)
            raise
        if cuda is not None and not spec.exit:  # after a leave-running dump
            await gpu.resume_container(container.id, cuda)
        known = {f"checkpoint/{name}": digest for name, digest in tail.items()}
        image = (await _later_image(container.id, spec)) or annotated
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


async def _later_image(id: str, spec: CheckpointSpec) -> str:
    """The image to record: ``spec.image``, or what ``spec.image_later`` gives.

    It is asked this late so that the caller's lookup runs alongside the dump. A
    caller that finds the container is not the one it meant (FailedPrecondition)
    fails the checkpoint, unless the dump already stopped the container (``exit``):
    then failing would lose its state, and the checkpoint is kept.
    """
    if spec.image_later is None:
        return spec.image
    try:
        return await spec.image_later()
    except FailedPrecondition as e:
        if not spec.exit:
            raise
        log.warning("checkpoint of %s: %s; kept, as the dump already stopped it", id, e)
        return ""


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
) -> RestorePlan | None:
    """Open and verify a checkpoint and apply its rootfs diff into ``upperdir``.

    ``ref`` names a container checkpoint, or a pod checkpoint (its ``pod.json``
    maps container names to container checkpoints of the same store): then the
    container named ``container_name`` (the CRI container name) is restored, and
    None means the pod checkpoint has no such container (it starts fresh).

    Runs before the rootfs is mounted (the diff goes into the new container's
    empty upperdir). Raises with a message naming the checkpoint and the reason.
    With ``defer_images``, a local checkpoint's CRIU images are left for a
    ``RestoreGate`` to check during the restore.
    """
    reader: CheckpointReader | None = None
    try:
        # The annotation is not trusted input: checked and resolved in one step,
        # and the store opens the checkpoint through what it checked.
        store, name = resolve_source(ref, config)
        reader = store.open(name)
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
        if reader.metadata.get("gpu"):  # GPU state restores only onto the same GPUs
            from runtime import gpu

            gpu.check_restore(reader.metadata)
        # Local images are hashed while CRIU restores them (RestoreGate); a
        # remote store verifies as it downloads, before CRIU can read anything.
        pending = defer_images and isinstance(store, LocalStore) and not reader.manifest.encryption
        reader.verify(only=_not_images if pending else None)
        if reader.manifest.encryption:  # decrypt the images here, off the shim's event loop
            reader.file("checkpoint")
        if upperdir is not None and "rootfs-diff.tar" in reader.manifest.files:
            rootfs.apply(
                reader.file("rootfs-diff.tar"),
                reader.file("deleted.files"),
                upperdir,
                allow_devices=config.restore.allow_devices,
                allow_setuid=config.restore.allow_setuid,
            )
    except StasisError as e:
        if reader is not None:
            reader.close()
        raise type(e)(f"restore from checkpoint {ref!r}: {e}") from e
    except OSError as e:
        if reader is not None:
            reader.close()
        raise FailedPrecondition(f"restore from checkpoint {ref!r}: {e}") from e
    return RestorePlan(ref, reader, pending)


def _pod_member(reader: CheckpointReader, container_name: str | None) -> str | None:
    """The container checkpoint a pod checkpoint records for ``container_name``."""
    if not container_name:
        raise InvalidArgument(
            f"{reader.name!r} is a pod checkpoint: only a Kubernetes container "
            f"(annotation {CRI_CONTAINER_NAME}) can be restored from it"
        )
    reader.verify()  # pod.json is small: check it (and the manifest) now
    try:
        with open(reader.file(POD_FILE), "rb") as f:
            doc = json.loads(f.read(POD_FILE_MAX))
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
# Stasis restore gate. CRIU runs this at every restore stage; at post-restore
# (every process restored, none resumed yet) it waits for the shim's verdict on
# the checkpoint's CRIU images: anything but "ok" makes CRIU abort the restore
# and kill the tree (CRIU ignores a failing pre-resume script, not this one).
[ "$CRTOOLS_SCRIPT_ACTION" = post-restore ] || exit 0
: > {held}
i=0
while [ ! -e {verdict} ]; do
    i=$((i + 1))
    [ "$i" -le {polls} ] || exit 1
    # No verdict ever comes from a dead shim.
    kill -0 {shim} 2>/dev/null || exit 1
    sleep 0.005
done
read -r verdict < {verdict}
[ "$verdict" = ok ]
"""


class RestoreGate:
    """Overlaps the sha256 check of a local checkpoint's CRIU images with ``runc
    restore``, without ever letting a process of a corrupt checkpoint run.

    ``install`` points runc at a CRIU configuration whose action script blocks
    at post-restore until the verdict file exists; ``start`` hashes the images in
    a thread and writes the verdict. After the restore, ``outcome`` waits for
    the check and returns its error, if any.
    """

    def __init__(self, bundle: str, plan: RestorePlan, timeout: float = 600.0) -> None:
        self.dir = os.path.join(bundle, "restore-gate")
        self.verdict = os.path.join(self.dir, "verdict")
        self.held = os.path.join(self.dir, "held")  # CRIU reached post-restore
        self.plan = plan
        self.timeout = timeout
        self._task: asyncio.Task[StasisError | None] | None = None

    def install(self, bundle: str, spec: dict[str, Any]) -> None:
        """Write the script and CRIU config, and name them in the bundle's config.json."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        import shlex

        script = os.path.join(self.dir, "gate.sh")
        polls = int(self.timeout / 0.005)
        _write_atomic(
            script,
            _GATE_SCRIPT.format(
                verdict=shlex.quote(self.verdict),
                held=shlex.quote(self.held),
                polls=polls,
                shim=os.getpid(),
            ),
            0o700,
        )
        conf = os.path.join(self.dir, "criu.conf")
        _write_atomic(conf, f"action-script {script}\n", 0o600)
        annotated = {**spec, "annotations": {**(spec.get("annotations") or {})}}
        annotated["annotations"][CRIU_CONFIG_ANNOTATION] = conf
        _write_atomic(os.path.join(bundle, "config.json"), json.dumps(annotated), 0o644)

    def start(self) -> None:
        """Begin hashing the images (call on the event loop)."""
        self._task = asyncio.ensure_future(asyncio.to_thread(self._check))

    def _check(self) -> StasisError | None:
        error: StasisError | None = None
        began = time.monotonic()
        try:
            self.plan.reader.verify(only=_images)
        except StasisError as e:
            error = type(e)(f"restore from checkpoint {self.plan.ref!r}: {e}")
        except OSError as e:
            error = FailedPrecondition(f"restore from checkpoint {self.plan.ref!r}: {e}")
        _write_atomic(self.verdict, "ok\n" if error is None else "bad\n", 0o600)
        log.debug(
            "restore gate: images of %s checked in %.3fs", self.plan.ref, time.monotonic() - began
        )
        return error

    def held_seconds(self) -> float | None:
        """How long CRIU waited at post-restore for the verdict (None: it did not)."""
        try:
            return max(0.0, os.stat(self.verdict).st_mtime - os.stat(self.held).st_mtime)
        except OSError:
            return None

    async def outcome(self) -> StasisError | None:
        """The images' check, once done: None when they match the manifest."""
        assert self._task is not None, "gate not started"
        return await asyncio.shield(self._task)

    def was_held(self) -> bool:
        """Whether CRIU ran the gate at post-restore (held the restored processes)."""
        return os.path.exists(self.held)

    def remove(self) -> None:
        """Remove the gate's files."""
        shutil.rmtree(self.dir, ignore_errors=True)


def _write_atomic(path: str, text: str, mode: int) -> None:
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
