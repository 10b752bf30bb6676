"""A restore's two halves below the checkpoint layer: ``RestoreJob``, what the
checkpoint layer does around ``runc restore``, and ``RestoreRun``, a ``runc restore``
with a deadline, which a kill or a delete of the task ends at once.

runc hands a restore to CRIU (``criu swrk``, runc's child), which can hang: a stuck
action script, a blocked file system. ``RestoreRun`` bounds it. When its timeout
expires, when the task is killed or deleted meanwhile, or when the Start request
itself is cancelled, it SIGKILLs runc and every process of the restore, found by
PID and never by name: runc's descendants, and the members of the container's
cgroup (runc moves CRIU there before CRIU restores anything) that descend from
this shim. It then waits for runc's exit and removes what the half-done restore
left: CRIU's mounts under its work directory (its cgroup yard), runc's criu-root
mount, and the container's cgroup once empty. The caller holds no lock while
``run`` waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
from collections.abc import Awaitable
from typing import Any, Protocol

from runtime.errors import DeadlineExceeded, FailedPrecondition, StasisError
from runtime.linux import cgroups
from runtime.linux import mount as mounts
from runtime.linux.leftovers import remove_criu_root
from runtime.linux.proc import descendants, is_zombie, parent_of

log = logging.getLogger("stasis.restoring")

# How long the processes of an ended restore get to die after SIGKILL, and runc's
# exit to be reaped, before the shim goes on without them (a process stuck in the
# kernel cannot be hurried).
KILL_WAIT_S = 10.0
_POLL_S = 0.02
_MAX_DEPTH = 256  # ppid chain walked to tell a shim descendant


class RestoreJob(Protocol):
    """A restore from a checkpoint, prepared by the checkpoint layer before Create
    (``shim.checkpoint.restore``) and owned by the container's created-from-checkpoint
    init: what happens around its ``runc restore``."""

    #: The checkpoint, as errors name it.
    ref: str

    def execs(self) -> list[dict[str, Any]]:
        """The exec processes the checkpoint recorded (restored with the init's tree)."""
        ...

    async def restored(self, pid: int) -> None:
        """``runc restore`` returned with the tree's init as ``pid``: finish what CRIU
        cannot (GPU state); raising fails the Start."""
        ...

    async def verdict(self, pid: int) -> StasisError | None:
        """Once Start returned (``pid`` 0: it failed): why the restored tree must not
        run, or None."""
        ...

    async def close(self) -> None:
        """Release the checkpoint and what checked it (idempotent)."""
        ...


class Outcome(enum.Enum):
    """How a restore run ended."""

    RESTORED = "restored"  # runc restore returned 0
    FAILED = "failed"  # runc restore failed on its own
    TIMED_OUT = "timed out"
    ABORTED = "aborted"  # ended by abort() (a kill or a delete of the task)


class RestoreRun:
    """One ``runc restore`` of a container, bounded by ``timeout`` seconds.

    ``started`` is the spawner's callback (runc's PID); ``run`` awaits the restore;
    ``abort`` ends it from another request. ``what`` names the restore in errors
    ("restore of ID from checkpoint REF").
    """

    def __init__(
        self,
        container_id: str,
        *,
        what: str,
        runc_root: str,
        cgroups_path: str,
        work_path: str,
        timeout: float,
    ) -> None:
        self.container_id = container_id
        self.what = what
        self.runc_root = runc_root
        self.cgroups_path = cgroups_path
        self.work_path = work_path
        self.timeout = timeout
        self.outcome: Outcome | None = None
        self.why = ""  # why abort() ended it
        self._pid = 0
        self._pidfd = -1  # runc's: its PID is ours to walk only while this says it exists
        self._abort = asyncio.Event()
        self._finished = asyncio.Event()

    def started(self, pid: int) -> None:
        """runc runs as ``pid`` (called by the spawner right after the spawn)."""
        self._pid = pid
        with contextlib.suppress(OSError):
            self._pidfd = os.pidfd_open(pid)

    async def run(self, restore: Awaitable[None]) -> None:
        """Await ``restore`` (the runc call); re-raises its error. On timeout raises
        DeadlineExceeded, on abort FailedPrecondition, both once everything of the
        restore is killed and cleaned up; a cancelled caller gets the same cleanup."""
        task = asyncio.ensure_future(restore)
        aborted = asyncio.ensure_future(self._abort.wait())
        try:
            try:
                done, _ = await asyncio.wait(
                    {task, aborted}, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
                )
            except asyncio.CancelledError:
                self.outcome = Outcome.ABORTED
                self.why = "its Start request was cancelled"
                await self._end(task)
                raise
            if task in done:
                if task.exception() is None:
                    self.outcome = Outcome.RESTORED
                    return
                self.outcome = Outcome.FAILED
                # runc cleans up after a CRIU that failed, but not after one that died.
                await asyncio.to_thread(self._remove_leftovers)
                task.result()  # raises runc's error
            self.outcome = Outcome.ABORTED if aborted in done else Outcome.TIMED_OUT
            await self._end(task)
        finally:
            aborted.cancel()
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
            self._finished.set()
        log_hint = os.path.join(self.work_path, "restore.log") if self.work_path else ""
        log_part = f"; CRIU's log: {log_hint}" if log_hint else ""
        if self.outcome is Outcome.TIMED_OUT:
            raise DeadlineExceeded(
                f"{self.what}: runc restore did not finish within {self.timeout:g} s "
                f"(restore.timeout_seconds); CRIU and runc were killed{log_part}"
            )
        raise FailedPrecondition(
            f"{self.what}: ended before it finished: the task was {self.why}{log_part}"
        )

    async def abort(self, why: str) -> Outcome:
        """End the restore now, unless it is over already; returns once it is over and
        cleaned up, with how it ended (ABORTED when this or another abort ended it)."""
        if self.outcome is None and not self._abort.is_set():
            self.why = why
            self._abort.set()
        await self._finished.wait()
        assert self.outcome is not None
        return self.outcome

    async def _end(self, task: asyncio.Future[None]) -> None:
        """Kill every process of the restore, wait for runc, remove what it left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + KILL_WAIT_S
        log.warning("%s %s: killing runc and CRIU", self.what, self.outcome_text())
        while self._kill_pass():
            if loop.time() >= deadline:
                log.error("%s: processes still alive %g s after SIGKILL", self.what, KILL_WAIT_S)
                break
            await asyncio.sleep(_POLL_S)
        # The shim's reaper collects runc, which ends the runc call.
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await asyncio.shield(task)
        except TimeoutError:
            log.error("%s: runc did not exit after SIGKILL", self.what)
            task.cancel()
        except Exception as e:  # runc's error for its SIGKILL: expected
            log.debug("%s: runc ended: %s", self.what, e)
        await asyncio.to_thread(self._remove_leftovers)

    def outcome_text(self) -> str:
        """How it ended, for logs."""
        if self.outcome is Outcome.ABORTED:
            return f"ended ({self.why})"
        return self.outcome.value if self.outcome is not None else "running"

    def _runc_tree(self) -> set[int]:
        """runc and its descendants, or nothing once runc is reaped (its PID may then
        name another process)."""
        if self._pidfd < 0:
            return set()
        try:
            signal.pidfd_send_signal(self._pidfd, 0)
        except OSError:
            return set()
        return {self._pid, *descendants(self._pid)}

    def _kill_pass(self) -> int:
        """SIGKILL every live process of the restore; returns how many were alive.

        Runs without awaiting: runc, an unreaped child of this shim, keeps its PID
        throughout. Every other PID is opened as a pidfd and checked again (still a
        child of the tree, or still in the cgroup) before anything is signalled, so a
        PID reused meanwhile is never signalled, and no child is missed because its
        parent died (and it was reparented) earlier in the same pass.
        """
        tree = self._runc_tree()
        found = tree | cgroups.members(self.cgroups_path)
        found.discard(os.getpid())
        targets: list[int] = []  # pidfds
        try:
            for pid in found:
                if pid == self._pid and pid in tree:
                    if not is_zombie(pid):
                        targets.append(os.dup(self._pidfd))
                    continue
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue  # gone
                if self._ours(pid, tree) and not is_zombie(pid):
                    targets.append(fd)
                else:
                    os.close(fd)
            for fd in targets:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            for fd in targets:
                os.close(fd)
        return len(targets)

    def _ours(self, pid: int, tree: set[int]) -> bool:
        if parent_of(pid) in tree:
            return True
        # In the container's cgroup: CRIU and what it started, or their orphans (then
        # children of this shim, the subreaper). A spec may name a cgroup that others
        # share: only this shim's descendants are ever killed.
        return cgroups.contains(pid, self.cgroups_path) and _descends_from(pid, os.getpid())

    def _remove_leftovers(self) -> None:
        """CRIU's mounts under its work directory, runc's criu-root, the empty cgroup."""
        if self.work_path and os.path.isdir(self.work_path):
            left = mounts.unmount_below(self.work_path)
            if left:
                log.error("%s: could not unmount %s", self.what, ", ".join(left))
            with contextlib.suppress(OSError):
                for entry in os.scandir(self.work_path):
                    if entry.name.startswith(".criu.") and entry.is_dir(follow_symlinks=False):
                        with contextlib.suppress(OSError):
                            os.rmdir(entry.path)  # CRIU's cgroup yard, empty once unmounted
        remove_criu_root(self.runc_root, self.container_id)
        cgroups.remove_empty(self.cgroups_path)


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(_MAX_DEPTH):
        pid = parent_of(pid)
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False
