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
import platform
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from runtime import cgroups, rootfs
from runtime.config import Config
from runtime.digest import TailDigester
from runtime.errors import FailedPrecondition, InvalidArgument, StasisError
from runtime.runc import CheckpointOpts
from runtime.store import CheckpointReader, default_store, open_store, resolve
from shim.container import Container
from shim.process import Status

log = logging.getLogger("stasis.checkpoint")

RUNTIME = "io.containerd.stasis.v2"
RESTORE_FROM = "stasis.dev/restore-from"
RESTORE_POLICY = "stasis.dev/restore-policy"
IMAGE_ANNOTATIONS = ("io.kubernetes.cri.image-name", "io.containerd.image.name")
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
    """
    init = container.init
    if init.status not in (Status.RUNNING, Status.PAUSED):
        raise FailedPrecondition(
            f"cannot checkpoint container {container.id}: it is {init.status.name.lower()}"
        )
    store = open_store(spec.store, config) if spec.store else default_store(config)
    name = spec.name or f"{container.id}-{_utc_stamp()}"
    oci = _spec(container)
    annotations = oci.get("annotations") or {}
    image = spec.image or next((annotations[k] for k in IMAGE_ANNOTATIONS if k in annotations), "")
    started = time.monotonic()
    with store.begin(name) as writer:
        upper = _upperdir(container)
        was_running = init.status == Status.RUNNING
        # Exec'd processes join the init's tree, which is what CRIU dumps.
        execs = await container.detach_execs()
        if was_running:
            await init.pause()
        frozen_at = time.monotonic()
        diff: rootfs.DiffStats | None = None
        try:
            if upper is not None:
                diff = await asyncio.to_thread(
                    rootfs.capture,
                    upper,
                    writer.path("rootfs-diff.tar"),
                    writer.path("deleted.files"),
                )
            images = writer.path("checkpoint", directory=True)
            # Hash the images as CRIU writes them: the commit then neither
            # re-reads them nor waits for all of their writeback.
            digester = TailDigester(images).start()
            try:
                await container.checkpoint(
                    CheckpointOpts(
                        image_path=images,
                        leave_running=not spec.exit,
                        tcp_established=spec.tcp_established,
                        shell_job=init.terminal,
                    )
                )
            finally:
                tail = await asyncio.to_thread(digester.finish)
        finally:
            if was_running and init.status == Status.PAUSED:
                await init.resume()
        frozen = time.monotonic() - frozen_at
        known = {f"checkpoint/{name}": digest for name, digest in tail.items()}
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
        metadata = {
            "format": FORMAT_VERSION,
            "container_id": container.id,
            "namespace": namespace,
            "image": image,
            "runtime": RUNTIME,
            "runc": await container.runc.version(),
            "criu": await _criu_version(container),
            "host": socket.gethostname(),
            "kernel": platform.release(),
            "cgroup_mode": "v2" if cgroups.unified() else "v1",
            "exit": spec.exit,
            "tcp_established": spec.tcp_established,
            "labels": spec.labels,
            "execs": execs,
            "sizes": {
                "criu_images": criu_size,
                "rootfs_diff_files": diff.files if diff else 0,
                "rootfs_diff_bytes": diff.bytes if diff else 0,
                "rootfs_deleted": diff.deleted if diff else 0,
            },
            "frozen_seconds": round(frozen, 6),
        }
        writer.write_bytes("stasis.json", json.dumps(metadata, indent=1).encode())
        info = await asyncio.to_thread(writer.commit, metadata, known)
    return CheckpointResult(
        ref=info.ref,
        name=info.name,
        size=info.size,
        criu_size=criu_size,
        seconds=time.monotonic() - started,
        frozen_seconds=frozen,
    )


async def _criu_version(container: Container) -> str:
    try:
        done = await container.runc.spawner.run(["criu", "--version"], capture=True)
    except OSError:
        return ""
    lines = done.stdout.decode(errors="replace").splitlines()
    return str(lines[0].strip()) if lines else ""


@dataclass(frozen=True)
class RestorePlan:
    """A verified checkpoint to restore a new container from."""

    ref: str
    reader: CheckpointReader

    @property
    def images(self) -> str:
        """The CRIU image directory."""
        return self.reader.file("checkpoint")

    @property
    def tcp_established(self) -> bool:
        """Whether the dump allowed established TCP connections (restore must too)."""
        return bool(self.reader.metadata.get("tcp_established"))


def restore_request(annotations: dict[str, str]) -> tuple[str, str] | None:
    """(REF, policy) when the spec asks for a restore, else None."""
    ref = annotations.get(RESTORE_FROM, "").strip()
    if not ref:
        return None
    policy = annotations.get(RESTORE_POLICY, "fail").strip() or "fail"
    if policy not in ("fail", "fresh"):
        raise InvalidArgument(f"{RESTORE_POLICY} must be 'fail' or 'fresh', not {policy!r}")
    return ref, policy


def prepare_restore(ref: str, upperdir: str | None, config: Config) -> RestorePlan:
    """Open and verify a checkpoint and apply its rootfs diff into ``upperdir``.

    Runs before the rootfs is mounted (the diff goes into the new container's
    empty upperdir). Raises with a message naming the checkpoint and the reason.
    """
    try:
        store, name = resolve(ref, config)
        reader = store.open(name)
        reader.verify()
        if upperdir is not None and "rootfs-diff.tar" in reader.manifest.files:
            rootfs.apply(reader.file("rootfs-diff.tar"), reader.file("deleted.files"), upperdir)
    except StasisError as e:
        raise type(e)(f"restore from checkpoint {ref!r}: {e}") from e
    except OSError as e:
        raise FailedPrecondition(f"restore from checkpoint {ref!r}: {e}") from e
    return RestorePlan(ref, reader)
