"""Tests for a restore's deadline (shim.task.restoring, the _Restoring state of shim.task.process):
a `runc restore` stand-in that hangs as a real process tree is killed whole at the
timeout, by a kill or a delete of the task, or when Start is cancelled; the process
lock is free meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from runtime.errors import DeadlineExceeded, FailedPrecondition
from runtime.linux.proc import ForkSpawner, Stdio
from runtime.linux.runc import CheckpointOpts, RestoreOpts, Runc, RuncError
from shim.task.process import Exit, InitProcess, Status
from shim.task.stdio import ProcessIO
from tests.unit.test_process import FakeIO, FakeRunc

SOURCE = "file:///var/lib/stasis/checkpoints/ck1"


class TreeRunc(FakeRunc):
    """FakeRunc whose restore is a real process tree: ``sh`` (standing for runc) with a
    ``sleep`` child (for CRIU), which hangs unless ``hang`` is False."""

    def __init__(self, root: Path, hang: bool = True) -> None:
        super().__init__()
        self.root = str(root)
        self.hang = hang
        self.marker = root / "tree"
        self.tree: list[int] = []

    async def restore(
        self,
        id: str,
        bundle: str,
        opts: RestoreOpts,
        stdio: Stdio,
        started: Callable[[int], None] | None = None,
    ) -> None:
        self.calls.append(("restore", id))
        if not self.hang:
            Path(opts.pid_file).write_text("4242\n")
            return
        script = (
            f"sleep 60 & echo $$ $! > {self.marker}.tmp; mv {self.marker}.tmp {self.marker}; wait"
        )
        done = await ForkSpawner().run(["sh", "-c", script], started=started)
        if done.status != 0:
            raise RuncError("restore", done.status, "criu failed")

    async def running_tree(self) -> list[int]:
        """The stand-in's PIDs, once it runs."""
        while not self.marker.exists():
            await asyncio.sleep(0.01)
        self.tree = [int(p) for p in self.marker.read_text().split()]
        return self.tree


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


async def all_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 3
    while not all(gone(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if not gone(p)]}"
        await asyncio.sleep(0.02)


def make(
    tmp_path: Path, timeout: float, hang: bool = True
) -> tuple[InitProcess, TreeRunc, list[Exit]]:
    runc = TreeRunc(tmp_path, hang)
    p = InitProcess("c1", str(tmp_path), cast(Runc, runc), cast(ProcessIO, FakeIO()), ("", "", ""))
    work = tmp_path / "criu-restore"
    work.mkdir()
    p.prepare_restore(
        RestoreOpts(
            CheckpointOpts(str(tmp_path / "images"), str(work)), str(tmp_path / "init.pid")
        ),
        timeout=timeout,
        source=SOURCE,
    )
    lost: list[Exit] = []
    p.on_lost_exit = lambda proc, e: lost.append(e)
    return p, runc, lost


def run(coro: Any) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(10):
            await coro

    asyncio.run(guarded())


def test_a_hung_restore_ends_at_its_timeout_with_its_whole_tree(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, lost = make(tmp_path, timeout=0.5)
        began = time.monotonic()
        start = asyncio.ensure_future(p.start())
        tree = await runc.running_tree()
        with pytest.raises(DeadlineExceeded) as err:
            await start
        assert time.monotonic() - began < 3
        message = str(err.value)
        assert f"restore of c1 from checkpoint {SOURCE!r}" in message
        assert "did not finish within 0.5 s (restore.timeout_seconds)" in message
        assert str(tmp_path / "criu-restore" / "restore.log") in message
        await all_gone(tree)
        # Failed, not stopped: nothing ran. Kill is refused, delete works.
        assert p.status is Status.CREATED and p.exit is None and not lost
        with pytest.raises(FailedPrecondition):
            await p.kill(signal.SIGKILL)
        await p.delete()
        assert p.status is Status.STOPPED
        assert ("delete", "c1", True) in runc.calls

    run(body())


def test_kill_ends_a_restore_at_once_and_the_task_exits(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, lost = make(tmp_path, timeout=60)
        start = asyncio.ensure_future(p.start())
        tree = await runc.running_tree()
        began = time.monotonic()
        await p.kill(signal.SIGKILL, all=True)
        assert time.monotonic() - began < 2
        await all_gone(tree)
        with pytest.raises(FailedPrecondition, match=r"ended before it finished: .*killed"):
            await start
        assert p.status is Status.STOPPED
        assert (await p.wait()).status == 128 + signal.SIGKILL
        assert [e.status for e in lost] == [137]  # reported, as the reaper would have
        assert "kill" not in [c[0] for c in runc.calls]  # runc has nothing to kill
        await p.delete()

    run(body())


def test_delete_ends_a_restore(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path, timeout=60)
        start = asyncio.ensure_future(p.start())
        tree = await runc.running_tree()
        await p.delete()
        await all_gone(tree)
        with pytest.raises(FailedPrecondition, match="the task was deleted"):
            await start
        assert p.status is Status.STOPPED

    run(body())


def test_the_process_lock_is_free_while_restoring(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path, timeout=60)
        start = asyncio.ensure_future(p.start())
        tree = await runc.running_tree()
        # Answered at once (not after the restore): the lock is not held across it.
        async with asyncio.timeout(1):
            with pytest.raises(FailedPrecondition, match="state created"):
                await p.pause()
            with pytest.raises(FailedPrecondition, match="state created"):
                await p.start()
        assert p.status is Status.CREATED
        await p.kill(signal.SIGKILL)
        await all_gone(tree)
        with pytest.raises(FailedPrecondition):
            await start

    run(body())


def test_a_cancelled_start_kills_the_restore(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path, timeout=60)
        start = asyncio.ensure_future(p.start())
        tree = await runc.running_tree()
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start
        await all_gone(tree)
        assert p.status is Status.CREATED
        async with asyncio.timeout(1):  # the lock was given back
            await p.delete()
        assert p.status is Status.STOPPED

    run(body())


def test_a_restore_that_finishes_runs_and_kills_normally(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, lost = make(tmp_path, timeout=60, hang=False)
        await p.start()
        assert p.status is Status.RUNNING and p.pid == 4242
        await p.kill(signal.SIGTERM)
        assert runc.calls[-1] == ("kill", "c1", signal.SIGTERM, False)
        assert not lost

    run(body())


def test_no_descriptor_leaks(tmp_path: Path) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()

        async def body(where: Path = tmp_path / name) -> None:
            p, runc, _ = make(where, timeout=0.2)
            with pytest.raises(DeadlineExceeded):
                await p.start()
            await all_gone(runc.tree or await runc.running_tree())

        run(body())
    assert fds() == before
