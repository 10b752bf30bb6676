"""Tests for shim.task.process.ExecProcess: ``runc exec --detach`` driven by a fake runc.

The fake runc starts a real ``sleep`` as "the exec'd process" and writes its PID to
the pid file, so kills reach a real process; the test plays the reaper (waitpid,
then ``exited``). A fake io records what the process does with its stdio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from runtime.errors import FailedPrecondition, NotFound
from runtime.linux.proc import Stdio, exit_code, spawn
from runtime.linux.runc import ExecOpts, Runc, RuncError
from shim.task import console
from shim.task.process import ExecProcess, Exit, Status
from shim.task.stdio import ProcessIO

SPEC: dict[str, Any] = {
    "args": ["sh", "-c", "echo hi"],
    "cwd": "/",
    "env": ["PATH=/usr/bin:/bin"],
    "user": {"uid": 0, "gid": 0},
    "terminal": False,
}


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(5):
            await coro

    asyncio.run(guarded())


class Children:
    """Processes the fake runc started; SIGKILLed and reaped after the test."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def start(self) -> int:
        pid = spawn(["sleep", "30"], Stdio())
        self.pids.add(pid)
        return pid

    def reap(self, pid: int, timeout: float = 3.0) -> int:
        """Wait for ``pid`` to end (it was signalled) and return its exit code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.pids.discard(pid)
                return exit_code(status)
            time.sleep(0.005)
        raise AssertionError(f"process {pid} did not end")

    def cleanup(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        c.cleanup()


class FakeRunc:
    """``exec`` like ``runc exec --detach``: starts a process and writes its PID.

    It records each call and the spec file's content as runc would read it. With
    ``fail``, it raises (after writing the PID when ``fail_after_pid``); ``hook``
    runs once the process exists; with a console socket it sends a pty master
    over it, as runc does for ``terminal: true``.
    """

    def __init__(self, children: Children) -> None:
        self.children = children
        self.calls: list[tuple[str, ExecOpts, Stdio]] = []
        self.specs: list[dict[str, Any]] = []
        self.fail: Exception | None = None
        self.fail_after_pid = False
        self.write_pid = True
        self.hook: Callable[[], object] | None = None
        self.slave = -1  # the pty slave whose master went over the console socket

    async def exec(self, id: str, opts: ExecOpts, stdio: Stdio) -> None:
        self.calls.append((id, opts, stdio))
        await asyncio.sleep(0)
        with open(opts.process_json, encoding="utf-8") as f:
            self.specs.append(json.load(f))
        if self.fail is not None and not self.fail_after_pid:
            raise self.fail
        if opts.console_socket:
            self._send_pty(opts.console_socket)
        if self.write_pid:
            pid = self.children.start()
            Path(opts.pid_file).write_text(f"{pid}\n")
        if self.fail is not None:
            raise self.fail
        if self.hook is not None:
            self.hook()

    def _send_pty(self, path: str) -> None:
        # runc keeps the slave for the container and sends only the master.
        master, self.slave = os.openpty()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
                socket.send_fds(s, [b"pty"], [master])
        finally:
            os.close(master)

    def close(self) -> None:
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1


class FakeIO:
    """What ExecProcess uses of ProcessIO."""

    def __init__(self) -> None:
        self.child = Stdio(7, 8, 9)
        self.closed = 0
        self.waited: list[float] = []

    async def wait_output(self, timeout: float) -> bool:
        self.waited.append(timeout)
        return True

    def close(self) -> None:
        self.closed += 1


class FakeTerminalIO(FakeIO):
    """What ExecProcess uses of TerminalIO: the attached master, resizes."""

    def __init__(self) -> None:
        super().__init__()
        self.child = Stdio()
        self.attached: list[int] = []
        self.sizes: list[tuple[int, int]] = []

    def attach(self, master: int) -> None:
        self.attached.append(master)

    def resize(self, width: int, height: int) -> None:
        self.sizes.append((width, height))

    def close(self) -> None:
        super().close()
        for fd in self.attached:
            os.close(fd)
        self.attached.clear()


def make(
    bundle: Path, children: Children, *, terminal: bool = False, io: FakeIO | None = None
) -> tuple[ExecProcess, FakeRunc, FakeIO]:
    runc = FakeRunc(children)
    io = io or (FakeTerminalIO() if terminal else FakeIO())
    p = ExecProcess(
        "c1",
        "e1",
        str(bundle),
        cast(Runc, runc),
        cast(ProcessIO, io),
        ("", "", ""),
        dict(SPEC),
        terminal=terminal,
    )
    return p, runc, io


async def kill_and_reap(p: ExecProcess, children: Children, sig: int = signal.SIGKILL) -> Exit:
    """Kill through the process and report the exit as the reaper would."""
    await p.kill(sig)
    return p.exited(children.reap(p.pid))


# --------------------------------------------------------------------------- start


def test_start_execs_with_the_spec_and_removes_it(tmp_path: Path, children: Children) -> None:
    async def body() -> None:
        p, runc, io = make(tmp_path, children)
        await p.start()
        assert p.status is Status.RUNNING
        assert p.pid in children.pids
        [(id, opts, stdio)] = runc.calls
        assert id == "c1"
        assert stdio is io.child
        assert opts == ExecOpts(
            str(tmp_path / ".exec-e1.json"), str(tmp_path / ".exec-e1.pid"), None
        )
        # runc read the process spec from the bundle...
        assert runc.specs == [SPEC]
        # ...which holds nothing of the exec afterwards.
        assert os.listdir(tmp_path) == []

    run(body())


def test_on_pid_is_called_with_the_started_process(tmp_path: Path, children: Children) -> None:
    async def body() -> None:
        p, _, _ = make(tmp_path, children)
        seen: list[tuple[ExecProcess, int]] = []
        p.on_pid = lambda proc: seen.append((proc, proc.pid))
        await p.start()
        assert seen == [(p, p.pid)]
        assert p.pid > 0

    run(body())


def test_start_without_on_pid(tmp_path: Path, children: Children) -> None:
    async def body() -> None:
        p, _, _ = make(tmp_path, children)
        await p.start()  # on_pid is optional
        assert p.status is Status.RUNNING

    run(body())


@pytest.mark.parametrize("after_pid", [False, True], ids=["before-pid", "after-pid"])
def test_failed_exec_removes_the_spec_and_stays_created(
    tmp_path: Path, children: Children, after_pid: bool
) -> None:
    async def body() -> None:
        p, runc, io = make(tmp_path, children)
        seen: list[object] = []
        p.on_pid = seen.append
        runc.fail = RuncError("exec", 1, 'exec failed: "nope": executable file not found')
        runc.fail_after_pid = after_pid
        with pytest.raises(RuncError, match="executable file not found"):
            await p.start()
        assert os.listdir(tmp_path) == []  # spec and pid file gone
        assert p.status is Status.CREATED
        assert p.pid == 0
        assert seen == []
        # A failed exec can be deleted (containerd's cleanup does).
        await p.delete()
        assert io.closed == 1

    run(body())


def test_exec_without_a_pid_file_fails_and_cleans_up(tmp_path: Path, children: Children) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path, children)
        runc.write_pid = False
        with pytest.raises(FileNotFoundError):
            await p.start()
        assert os.listdir(tmp_path) == []
        assert p.status is Status.CREATED

    run(body())


def test_start_twice_is_refused(tmp_path: Path, children: Children) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path, children)
        await p.start()
        with pytest.raises(FailedPrecondition, match="c1/e1"):
            await p.start()
        assert len(runc.calls) == 1

    run(body())


def test_exit_during_start(tmp_path: Path, children: Children) -> None:
    """A process that exits (and is reaped) before runc exec returns ends stopped."""

    async def body() -> None:
        p, runc, _ = make(tmp_path, children)
        runc.hook = lambda: p.exited(0)
        seen: list[int] = []
        p.on_pid = lambda proc: seen.append(proc.pid)
        await p.start()
        assert p.status is Status.STOPPED
        assert seen == [p.pid]
        assert (await p.wait()).status == 0

    run(body())


# --------------------------------------------------------------------------- kill and wait


def test_kill_before_start_is_refused(tmp_path: Path, children: Children) -> None:
    async def body() -> None:
        p, runc, _ = make(tmp_path, children)
        with pytest.raises(FailedPrecondition, match="not started"):
            await p.kill(signal.SIGKILL)
        assert runc.calls == []
        assert p.status is Status.CREATED

    run(body())


def test_kill_signals_the_process_and_wait_returns_the_exit(
    tmp_path: Path, children: Children
) -> None:
    async def body() -> None:
        p, _, _ = make(tmp_path, children)
        await p.start()
        waiter = asyncio.ensure_future(p.wait())
        await asyncio.sleep(0)
        assert not waiter.done()
        e = await kill_and_reap(p, children, signal.SIGTERM)
        assert e.status == 128 + signal.SIGTERM
        assert p.status is Status.STOPPED
        assert await waiter == e
        assert p.exit == e
        assert await p.wait() == e  # again, after the fact

    run(body())


def test_kill_after_exit_is_not_found(tmp_path: Path, children: Children) -> None:
    async def body() -> None:
        p, _, _ = make(tmp_path, children)
        await p.start()
        await kill_and_reap(p, children)
        with pytest.raises(NotFound, match="c1/e1"):
            await p.kill(signal.SIGKILL)

    run(body())


def test_kill_of_a_vanished_process_is_not_found(tmp_path: Path, children: Children) -> None:
    """Gone but not yet reported by the reaper: ESRCH becomes NotFound."""

    async def body() -> None:
        p, _, _ = make(tmp_path, children)
        await p.start()
        os.kill(p.pid, signal.SIGKILL)
        children.reap(p.pid)
        with pytest.raises(NotFound, match="already finished"):
            await p.kill(signal.SIGTERM)
        assert p.status is Status.RUNNING  # until the exit is reported

    run(body())


def test_exit_is_recorded_once(tmp_path: Path, children: Children) -> None:
    async def body() -> None:
        p, _, _ = make(tmp_path, children)
        await p.start()
        first = await kill_and_reap(p, children)
        assert p.exited(0) == first
        assert p.exit == first

    run(body())


# --------------------------------------------------------------------------- pause, resume


def test_pause_and_resume_are_refused(tmp_path: Path, children: Children) -> None:
    async def body() -> None:
        p, _, _ = make(tmp_path, children)
        with pytest.raises(FailedPrecondition):
            await p.pause()
        await p.start()
        with pytest.raises(FailedPrecondition, match="cannot pause exec process c1/e1"):
            await p.pause()
        assert p.status is Status.RUNNING
        with pytest.raises(FailedPrecondition, match="resume"):
            await p.resume()
        assert p.status is Status.RUNNING

    run(body())


# --------------------------------------------------------------------------- delete


def test_delete_when_created(tmp_path: Path, children: Children) -> None:
    async def body() -> None:
        p, runc, io = make(tmp_path, children)
        await p.delete()
        assert io.waited == [2.0]
        assert io.closed == 1
        assert runc.calls == []
        assert p.status is Status.STOPPED
        with pytest.raises(NotFound, match="deleted"):
            await p.delete()
        with pytest.raises(NotFound, match="deleted"):
            await p.kill(signal.SIGKILL)
        with pytest.raises(FailedPrecondition):
            await p.start()
        assert io.closed == 1

    run(body())


def test_delete_when_stopped(tmp_path: Path, children: Children) -> None:
    async def body() -> None:
        p, _, io = make(tmp_path, children)
        await p.start()
        e = await kill_and_reap(p, children)
        await p.delete()
        assert io.closed == 1
        assert p.status is Status.STOPPED
        assert p.exit == e
        assert await p.wait() == e
        with pytest.raises(NotFound):
            await p.delete()

    run(body())


def test_delete_while_running_is_refused(tmp_path: Path, children: Children) -> None:
    async def body() -> None:
        p, _, io = make(tmp_path, children)
        await p.start()
        with pytest.raises(FailedPrecondition, match="running"):
            await p.delete()
        assert io.closed == 0
        assert p.status is Status.RUNNING

    run(body())


# --------------------------------------------------------------------------- terminal


def test_resize_without_a_terminal_is_refused(tmp_path: Path, children: Children) -> None:
    p, _, _ = make(tmp_path, children)
    with pytest.raises(FailedPrecondition, match="no terminal"):
        p.resize(80, 24)


def test_resize_with_a_terminal_but_an_io_without_one_is_refused(
    tmp_path: Path, children: Children
) -> None:
    p, _, _ = make(tmp_path, children, terminal=True, io=FakeIO())
    with pytest.raises(FailedPrecondition, match="no terminal"):
        p.resize(80, 24)


def test_resize_reaches_the_terminal(tmp_path: Path, children: Children) -> None:
    p, _, io = make(tmp_path, children, terminal=True)
    p.resize(120, 40)
    assert cast(FakeTerminalIO, io).sizes == [(120, 40)]


@pytest.fixture
def console_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A short private directory for console sockets (unix paths: 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="stasis-con-") as d:
        monkeypatch.setattr(console, "CONSOLE_DIR", d)
        yield d


def test_terminal_exec_attaches_the_pty_runc_sends(
    tmp_path: Path, children: Children, console_dir: str
) -> None:
    async def body() -> None:
        p, runc, io = make(tmp_path, children, terminal=True)
        tio = cast(FakeTerminalIO, io)
        try:
            await p.start()
            [(_, opts, _)] = runc.calls
            assert opts.console_socket is not None
            assert os.path.dirname(opts.console_socket) == console_dir
            assert p.status is Status.RUNNING
            assert os.listdir(console_dir) == []  # the socket is gone
            assert os.listdir(tmp_path) == []
            # The attached fd is the master of runc's pty: what the container
            # writes to the slave comes out of it.
            [master] = tio.attached
            os.write(runc.slave, b"ping\n")
            assert os.read(master, 100) == b"ping\r\n"
            await kill_and_reap(p, children)
            await p.delete()
            assert tio.attached == []
        finally:
            runc.close()

    run(body())


def test_terminal_exec_failure_leaves_no_socket(
    tmp_path: Path, children: Children, console_dir: str
) -> None:
    async def body() -> None:
        p, runc, io = make(tmp_path, children, terminal=True)
        runc.fail = RuncError("exec", 1, "no such file")
        with pytest.raises(RuncError):
            await p.start()
        assert cast(FakeTerminalIO, io).attached == []
        assert os.listdir(console_dir) == []
        assert os.listdir(tmp_path) == []

    run(body())
