"""Tests for shim.task.process: the init process state machine, driven by a fake runc and io."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import pytest

from runtime.errors import FailedPrecondition, NotFound
from runtime.linux.proc import Stdio
from runtime.linux.runc import CreateOpts, Runc
from shim.task.process import Exit, InitProcess, Status
from shim.task.stdio import ProcessIO
from tests.unit.test_cgroups import frozen_candidate  # noqa: F401  (a fixture)


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(5):
            await coro

    asyncio.run(guarded())


class FakeRunc:
    """Records calls; a hook per method can act mid-call (e.g. deliver an exit)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.hooks: dict[str, Callable[[], object]] = {}
        self.fail: dict[str, Exception] = {}

    async def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        await asyncio.sleep(0)
        if name in self.hooks:
            self.hooks[name]()
        if name in self.fail:
            raise self.fail[name]

    async def create(self, id: str, bundle: str, opts: CreateOpts, stdio: Stdio) -> None:
        await self._call("create", id, bundle, stdio)
        Path(opts.pid_file).write_text("4242\n")

    async def start(self, id: str) -> None:
        await self._call("start", id)

    async def kill(self, id: str, sig: int = signal.SIGTERM, *, all: bool = False) -> None:
        await self._call("kill", id, sig, all)

    async def pause(self, id: str) -> None:
        await self._call("pause", id)

    async def resume(self, id: str) -> None:
        await self._call("resume", id)

    async def delete(self, id: str, *, force: bool = False) -> None:
        await self._call("delete", id, force)


class FakeIO:
    def __init__(self) -> None:
        self.child = Stdio(7, 8, 9)
        self.closed = 0
        self.waited: list[float] = []
        self.drained = True

    async def wait_output(self, timeout: float) -> bool:
        self.waited.append(timeout)
        return self.drained

    def close(self) -> None:
        self.closed += 1


def make(bundle: Path) -> tuple[InitProcess, FakeRunc, FakeIO]:
    runc, io = FakeRunc(), FakeIO()
    p = InitProcess(
        "c1", str(bundle), cast(Runc, runc), cast(ProcessIO, io), ("", "", ""), terminal=False
    )
    return p, runc, io


def names(runc: FakeRunc) -> list[str]:
    return [c[0] for c in runc.calls]


# --------------------------------------------------------------------------- happy paths


def test_create_reads_pid(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, io = make(tmp_path)
        await p.create(CreateOpts(pid_file=str(tmp_path / "init.pid")))
        assert p.pid == 4242
        assert runc.calls == [("create", "c1", str(tmp_path), io.child)]
        assert p.status is Status.CREATED
        assert p.exit is None

    run(body())


def test_full_lifecycle(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, io = make(tmp_path)
        (tmp_path / "init.pid").write_text("4242")
        await p.start()
        assert p.status is Status.RUNNING
        await p.pause()
        assert p.status is Status.PAUSED
        await p.resume()
        assert p.status is Status.RUNNING
        await p.kill(signal.SIGKILL, all=True)
        assert p.status is Status.RUNNING  # until the reaper reports the exit
        e = p.exited(137)
        assert e.status == 137
        assert p.status is Status.STOPPED
        assert await p.wait() == e
        await p.delete()
        assert p.status is Status.STOPPED
        assert names(runc) == ["start", "pause", "resume", "kill", "delete"]
        assert runc.calls[3] == ("kill", "c1", signal.SIGKILL, True)
        assert runc.calls[4] == ("delete", "c1", False)  # exited: no --force
        assert io.closed == 1
        assert io.waited == [2.0]
        assert not (tmp_path / "init.pid").exists()

    run(body())


def test_kill_in_created_and_paused(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path)
        await p.kill()
        await p.start()
        await p.pause()
        await p.kill(signal.SIGKILL)
        assert runc.calls == [
            ("kill", "c1", signal.SIGTERM, False),
            ("start", "c1"),
            ("pause", "c1"),
            ("kill", "c1", signal.SIGKILL, False),
        ]
        p.exited(137)  # a paused process can still die (SIGKILL)
        assert p.status is Status.STOPPED

    run(body())


def test_delete_when_created_forces(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, io = make(tmp_path)
        await p.delete()
        assert runc.calls == [("delete", "c1", True)]
        assert io.closed == 1
        assert p.status is Status.STOPPED
        with pytest.raises(NotFound, match="was deleted"):
            await p.delete()
        with pytest.raises(NotFound, match="was deleted"):
            await p.kill()
        with pytest.raises(FailedPrecondition):
            await p.start()

    run(body())


def test_delete_tolerates_runc_not_found(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path)
        runc.fail["delete"] = NotFound("container does not exist")
        p.exited(0)
        await p.delete()
        assert p.status is Status.STOPPED
        with pytest.raises(NotFound):
            await p.delete()

    run(body())


def test_delete_warns_when_output_is_still_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        p, _, io = make(tmp_path)
        io.drained = False
        p.exited(0)
        await p.delete()
        assert io.closed == 1

    run(body())
    assert "output of c1 still open after its exit" in caplog.text


# --------------------------------------------------------------------------- refusals


def test_start_twice_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path)
        await p.start()
        with pytest.raises(FailedPrecondition, match="cannot start process c1 in state running"):
            await p.start()
        assert names(runc) == ["start"]

    run(body())


def test_pause_and_resume_when_created_are_refused(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path)
        with pytest.raises(FailedPrecondition, match="cannot pause process c1 in state created"):
            await p.pause()
        with pytest.raises(FailedPrecondition, match="cannot resume"):
            await p.resume()
        assert runc.calls == []
        assert p.status is Status.CREATED

    run(body())


def test_delete_when_running_or_paused_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, io = make(tmp_path)
        await p.start()
        with pytest.raises(FailedPrecondition, match="cannot delete process c1 in state running"):
            await p.delete()
        await p.pause()
        with pytest.raises(FailedPrecondition, match="in state paused"):
            await p.delete()
        with pytest.raises(FailedPrecondition, match="cannot pause"):
            await p.pause()
        await p.resume()
        with pytest.raises(FailedPrecondition, match="cannot resume"):
            await p.resume()
        assert io.closed == 0
        assert "delete" not in names(runc)

    run(body())


def test_after_exit(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path)
        await p.start()
        p.exited(3)
        # A kill still goes to runc: with --all it reaches what the init left in a
        # shared PID namespace; for the init alone runc's "not running" is NotFound.
        await p.kill(signal.SIGKILL, all=True)
        runc.fail["kill"] = NotFound("process already finished")
        with pytest.raises(NotFound, match="already finished"):
            await p.kill()
        for op in (p.start, p.pause, p.resume):
            with pytest.raises(FailedPrecondition, match="in state stopped"):
                await op()
        assert names(runc) == ["start", "kill", "kill"]
        assert runc.calls[1][1:] == ("c1", signal.SIGKILL, True)

    run(body())


def test_failed_runc_start_keeps_created(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path)
        runc.fail["start"] = FailedPrecondition("boom")
        with pytest.raises(FailedPrecondition, match="boom"):
            await p.start()
        assert p.status is Status.CREATED
        del runc.fail["start"]
        await p.start()
        assert p.status is Status.RUNNING

    run(body())


def test_failed_runc_pause_keeps_running(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path)
        await p.start()
        runc.fail["pause"] = FailedPrecondition("freeze failed")
        with pytest.raises(FailedPrecondition, match="freeze failed"):
            await p.pause()
        assert p.status is Status.RUNNING

    run(body())


# --------------------------------------------------------------------------- exits


def test_exit_during_start_stays_stopped(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path)
        runc.hooks["start"] = lambda: p.exited(0)  # a process that ends at once
        await p.start()
        assert p.status is Status.STOPPED
        assert p.exit is not None and p.exit.status == 0

    run(body())


def test_exit_is_recorded_once(tmp_path: Path) -> None:
    async def body() -> None:
        p, _, _ = make(tmp_path)
        await p.start()
        first = p.exited(1)
        second = p.exited(2)
        assert second == first
        assert p.exit == first
        assert (await p.wait()).status == 1

    run(body())


def test_wait_blocks_until_exit(tmp_path: Path) -> None:
    async def body() -> None:
        p, _, _ = make(tmp_path)
        await p.start()
        waiter = asyncio.ensure_future(p.wait())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        e = p.exited(143)
        assert await waiter == e
        assert isinstance(e, Exit)
        assert e.at_ns > 0

    run(body())


def test_operations_are_serialised(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path)
        gate = asyncio.Event()
        order: list[str] = []

        async def slow_start(id: str) -> None:
            order.append("start-begin")
            await gate.wait()
            order.append("start-end")

        runc.start = slow_start  # type: ignore[method-assign]
        starting = asyncio.ensure_future(p.start())
        await asyncio.sleep(0)
        pausing = asyncio.ensure_future(p.pause())
        await asyncio.sleep(0.01)
        assert order == ["start-begin"]
        gate.set()
        await starting
        await pausing  # runs after start: the process is running by then
        assert p.status is Status.PAUSED

    run(body())


def test_describe(tmp_path: Path) -> None:
    p, _, _ = make(tmp_path)
    assert p.describe() == "c1"
    p.id = "exec1"
    assert p.describe() == "c1/exec1"


def test_exit_during_resume_stays_stopped(tmp_path: Path) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path)
        await p.start()
        await p.pause()
        runc.hooks["resume"] = lambda: p.exited(143)  # thawed with a pending SIGTERM
        await p.resume()
        assert p.status is Status.STOPPED

    run(body())


def test_exit_after_delete_of_created_process(tmp_path: Path) -> None:
    async def body() -> None:
        p, _, _ = make(tmp_path)
        await p.delete()  # runc delete --force kills the init ...
        p.exited(137)  # ... whose exit the reaper reports afterwards
        assert (await p.wait()).status == 137

    run(body())


def test_pause_tries_again_when_the_freezer_gives_up(tmp_path: Path) -> None:
    from runtime.linux.runc import RuncError

    async def body() -> None:
        p, runc, _ = make(tmp_path)
        await p.create(CreateOpts(pid_file=str(tmp_path / "pid")))
        await p.start()
        failures = [RuncError("pause", 1, "unable to freeze")] * 2

        def flaky() -> None:
            if failures:
                raise failures.pop()

        runc.hooks["pause"] = flaky
        await p.pause()
        assert p.status == Status.PAUSED
        assert names(runc)[-5:] == ["pause", "resume", "pause", "resume", "pause"]

        # Other errors, and a freezer that never gives in, fail the pause.
        await p.resume()
        runc.hooks["pause"] = lambda: (_ for _ in ()).throw(
            RuncError("pause", 1, "unable to freeze")
        )
        with pytest.raises(RuncError, match="unable to freeze"):
            await p.pause()
        assert p.status == Status.RUNNING

    run(body())


# --------------------------------------------------------------------------- the freezer


def _freezer_state(top: str) -> str:
    with open(f"/sys/fs/cgroup/freezer{top}/freezer.state", encoding="ascii") as f:
        return f.read().strip()


def test_pause_and_resume_write_the_freezer_directly(
    tmp_path: Path,
    frozen_candidate: tuple[int, str],  # noqa: F811
) -> None:
    pid, path = frozen_candidate

    async def body() -> None:
        p, runc, _ = make(tmp_path)
        (tmp_path / "init.pid").write_text(str(pid))
        await p.start()
        p.pid, p.cgroups_path = pid, path
        await p.pause()
        assert p.status is Status.PAUSED
        assert _freezer_state(path) == "FROZEN"
        await p.resume()
        assert p.status is Status.RUNNING
        assert _freezer_state(path) == "THAWED"
        assert names(runc) == ["start"]  # no runc pause, no runc resume

    run(body())


def test_pause_leaves_a_cgroup_the_init_is_not_in_to_runc(
    tmp_path: Path,
    frozen_candidate: tuple[int, str],  # noqa: F811
) -> None:
    pid, path = frozen_candidate

    async def body() -> None:
        p, runc, _ = make(tmp_path)
        await p.start()
        p.pid, p.cgroups_path = pid, path + "-elsewhere"
        await p.pause()
        await p.resume()
        assert names(runc) == ["start", "pause", "resume"]
        assert _freezer_state(path) == "THAWED"

    run(body())
