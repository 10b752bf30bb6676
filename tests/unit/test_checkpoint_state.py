"""The checkpointing state of shim.task.process (InitProcess.checkpointing): what
Kill, Pause, Resume, Start, Delete and another checkpoint do while a checkpoint
runs, and that however it ends the container is thawed and back where it was."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from runtime.errors import FailedPrecondition, StasisError
from runtime.linux.runc import CheckpointOpts, CreateOpts, RuncError
from shim.task.process import InitProcess, Status
from tests.unit.test_process import FakeRunc, make, names, run


class DumpingRunc(FakeRunc):
    """FakeRunc whose ``runc checkpoint`` writes an image and, with ``hold`` set,
    waits for it (``dumping`` is set once it waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: asyncio.Event | None = None
        self.dumping = asyncio.Event()

    async def checkpoint(self, id: str, opts: CheckpointOpts) -> None:
        await self._call("checkpoint", id)
        Path(opts.image_path, "pages-1.img").write_bytes(b"pages")
        self.dumping.set()
        if self.hold is not None:
            await self.hold.wait()


async def running(tmp_path: Path) -> tuple[InitProcess, DumpingRunc]:
    p, _, _ = make(tmp_path)
    runc = DumpingRunc()
    p.runc = runc  # type: ignore[assignment]
    await p.create(CreateOpts(pid_file=str(tmp_path / "init.pid")))
    await p.start()
    runc.calls.clear()
    return p, runc


def opts(tmp_path: Path, **kw: bool) -> CheckpointOpts:
    return CheckpointOpts(image_path=str(tmp_path / "images"), **kw)


async def checkpoint_running(p: InitProcess, tmp_path: Path) -> None:
    """A leave-running checkpoint of a running process: freeze, dump, thaw."""
    async with p.checkpointing() as ck:
        await ck.freeze()
        await ck.dump(opts(tmp_path, leave_running=True))


async def soon() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_pause_and_resume_wait_for_the_checkpoint(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc = await running(tmp_path)
        async with p.checkpointing() as ck:
            await ck.freeze()
            assert p.status is Status.PAUSED  # frozen by the checkpoint
            pause = asyncio.ensure_future(p.pause())
            await soon()
            assert not pause.done()
            await ck.dump(opts(tmp_path, leave_running=True))
            await ck.thaw()
            assert p.status is Status.RUNNING
            await soon()
            assert not pause.done()
        await pause
        assert p.status is Status.PAUSED
        assert names(runc) == ["pause", "checkpoint", "resume", "pause"]
        resume = asyncio.ensure_future(p.resume())
        async with p.checkpointing() as ck:  # a paused container: no freeze, no thaw
            await soon()
            assert not resume.done() and p.status is Status.PAUSED
            await ck.freeze()
            await ck.dump(opts(tmp_path, leave_running=True))
            await ck.thaw()
        await resume
        assert p.status is Status.RUNNING
        assert names(runc)[4:] == ["checkpoint", "resume"]

    run(body())


def test_kill_goes_through_during_a_checkpoint(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc = await running(tmp_path)
        runc.hold = asyncio.Event()

        task = asyncio.ensure_future(checkpoint_running(p, tmp_path))
        await runc.dumping.wait()
        await p.kill(signal.SIGKILL, all=True)  # does not wait for the dump
        assert ("kill", "c1", signal.SIGKILL, True) in runc.calls
        p.exited(137)
        runc.hold.set()
        await task
        assert p.status is Status.STOPPED
        assert "resume" not in names(runc)  # nothing left to thaw
        with pytest.raises(
            FailedPrecondition, match="cannot checkpoint process c1 in state stopped"
        ):
            async with p.checkpointing():
                pass

    run(body())


def test_start_and_delete_are_refused_naming_the_checkpoint(tmp_path: Path) -> None:
    async def body() -> None:
        p, _ = await running(tmp_path)
        async with p.checkpointing():
            for op in (p.start, p.delete):
                with pytest.raises(FailedPrecondition) as err:
                    await op()
                assert str(err.value) == (
                    f"cannot {op.__name__} process c1: a checkpoint of it is in progress"
                )
        assert p.status is Status.RUNNING

    run(body())


def test_a_failed_checkpoint_leaves_the_container_running_and_thawed(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc = await running(tmp_path)
        runc.fail["checkpoint"] = RuncError("checkpoint", 1, "criu failed")
        with pytest.raises(StasisError, match="checkpoint of c1 failed"):
            await checkpoint_running(p, tmp_path)
        assert p.status is Status.RUNNING
        assert names(runc) == ["pause", "checkpoint", "resume"]
        # a cancelled one too
        runc.fail.clear()
        runc.hold = asyncio.Event()

        task = asyncio.ensure_future(checkpoint_running(p, tmp_path))
        await runc.dumping.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert p.status is Status.RUNNING
        assert names(runc)[-1] == "resume"
        await p.pause()  # nothing waits on a checkpoint any more
        assert p.status is Status.PAUSED

    run(body())


def test_checkpoints_of_one_container_never_interleave(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc = await running(tmp_path)
        order: list[str] = []

        async def checkpoint(name: str) -> None:
            async with p.checkpointing() as ck:
                order.append(f"{name} begins")
                await ck.freeze()
                await soon()
                await ck.thaw()
                order.append(f"{name} ends")

        await asyncio.gather(checkpoint("a"), checkpoint("b"))
        assert order == ["a begins", "a ends", "b begins", "b ends"]
        assert names(runc) == ["pause", "resume", "pause", "resume"]

    run(body())


def test_checkpoint_of_a_created_process_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        p, _, _ = make(tmp_path)
        await p.create(CreateOpts(pid_file=str(tmp_path / "init.pid")))
        with pytest.raises(
            FailedPrecondition, match="cannot checkpoint process c1 in state created"
        ):
            async with p.checkpointing():
                pass
        assert p.status is Status.CREATED

    run(body())
