"""Restores at Create: ``prepare`` turns the Create of a container whose spec asks
for a restore (``stasis.dev/restore-from``), or containerd's own (``ctr run
--checkpoint``), into a restore with a ``Restore`` job. By then the checkpoint is
verified and its rootfs diff applied; at Start its CRIU images and the restored
tree are checked by a ``RestoreGate`` before anything runs, and GPU state is given
back after ``runc restore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from dataclasses import replace
from functools import partial
from typing import Any

from runtime import config
from runtime.capture import gpu
from runtime.errors import StasisError
from shim.checkpoint.take import (
    CRI_CONTAINER_NAME,
    RestoreGate,
    RestorePlan,
    RestoreTarget,
    prepare_restore,
    restore_request,
)
from shim.task.container import CreateConfig, ns_pids

log = logging.getLogger("stasis.restore")


async def prepare(cfg: CreateConfig, namespace: str) -> tuple[CreateConfig, Restore | None]:
    """``cfg`` as the Create of a restore, with its job; unchanged and None when it
    starts fresh (no restore asked, or restore-policy fresh after a failure)."""
    plan = None
    if cfg.checkpoint:  # containerd's own checkpoint (ctr run --checkpoint)
        cfg = replace(cfg, restore_timeout=config.load().restore.timeout_seconds)
    else:
        cfg, plan = await _by_annotation(cfg, namespace)
        if plan is None:
            return cfg, None
    try:
        return cfg, Restore(cfg, plan)
    except BaseException:
        if plan is not None:
            await asyncio.to_thread(plan.reader.close)
        raise


async def _by_annotation(
    cfg: CreateConfig, namespace: str
) -> tuple[CreateConfig, RestorePlan | None]:
    """Honour stasis.dev/restore-from: verify, apply the rootfs diff, restore at Start."""
    annotations = cfg.spec.get("annotations") or {}
    request = restore_request(annotations)
    if request is None:
        return cfg, None
    ref, policy = request
    upper = next((u for m in cfg.rootfs if (u := m.upperdir())), None)
    member = annotations.get(CRI_CONTAINER_NAME)
    try:
        conf = config.load()
        # With policy fresh, everything is checked now, while starting fresh is
        # still possible; with fail, the CRIU images are checked during Start.
        plan = await asyncio.to_thread(
            partial(
                prepare_restore,
                ref,
                upper,
                conf,
                defer_images=policy == "fail",
                container_name=member,
                spec=cfg.spec,
                target=RestoreTarget.of(namespace, annotations),
            )
        )
    except StasisError as e:
        if policy != "fresh":
            raise
        log.warning("container %s starts fresh (restore-policy fresh): %s", cfg.id, e)
        if upper is not None:
            await asyncio.to_thread(_empty_dir, upper)
        return cfg, None
    if plan is None:
        log.info("container %s starts fresh: pod checkpoint %s has no %r", cfg.id, ref, member)
        return cfg, None
    log.info("container %s restores from %s", cfg.id, ref)
    restored = replace(
        cfg,
        checkpoint=plan.images,
        restore_tcp_established=plan.tcp_established,
        restore_timeout=conf.restore.timeout_seconds,
        restore_ref=ref,
    )
    return restored, plan


def _empty_dir(path: str) -> None:
    """Remove everything inside ``path`` (a fresh upperdir after a failed restore)."""
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


class Restore:
    """The ``RestoreJob`` of one container (shim.task.restoring): its checkpoint
    (``plan``: None for containerd's own, which the shim did not verify) and the
    gate that holds the restored tree until it is checked (installed in the bundle
    now, so runc's CRIU runs it)."""

    def __init__(self, cfg: CreateConfig, plan: RestorePlan | None) -> None:
        self.id = cfg.id
        self.ref = plan.ref if plan is not None else cfg.checkpoint
        self.plan = plan
        self.gate = RestoreGate(cfg.bundle, self.ref, cfg.spec, plan)
        self.gate.install()
        self.gate.start()
        self._closed = False

    @property
    def _metadata(self) -> dict[str, Any]:
        return (self.plan.reader.metadata if self.plan is not None else None) or {}

    def execs(self) -> list[dict[str, Any]]:
        """The exec processes the checkpoint recorded."""
        execs = self._metadata.get("execs")
        return execs if isinstance(execs, list) else []

    async def restored(self, pid: int) -> None:
        """Give restored CUDA processes their GPU state back."""
        record = self._metadata.get("gpu")
        if not record:
            return
        # CRIU restored the CUDA processes with their GPU state in host memory: the
        # driver moves it back and unlocks them (in a thread: it can take a while).
        try:
            await asyncio.to_thread(gpu.resume_restored, self.id, record, ns_pids(pid))
        except StasisError:
            # Stuck without their GPU state: end them; Start fails with the reason.
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            raise

    async def verdict(self, pid: int) -> StasisError | None:
        """The gate's first error: neither a corrupt checkpoint nor one that exceeds
        the container's spec may run."""
        gate = self.gate
        bad = await gate.outcome(pid)
        if bad is not None:
            if not pid and gate.held("images") and not gate.held("ceiling"):
                return type(bad)(f"{bad} (its restored processes never ran)")
            return bad
        if not pid:
            return None
        if not gate.held("images") and gate.plan is not None:
            log.warning("CRIU did not run the restore gate of %s; its images matched", self.id)
        elif gate.plan is not None:
            log.debug(
                "restore of %s: CRIU waited %.3fs for the image check",
                self.id,
                gate.held_seconds(),
            )
        held = gate.held_seconds("ceiling")
        if held is not None:  # bench/checkpoint.py reads this line
            log.debug(
                "restore of %s: CRIU held %.4fs at pre-resume for the spec ceiling", self.id, held
            )
        return None

    async def close(self) -> None:
        """Stop the gate's checks, remove its files, close the checkpoint."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.gate.outcome(0)
        finally:
            self.gate.remove()
            if self.plan is not None:
                await asyncio.to_thread(self.plan.reader.close)
