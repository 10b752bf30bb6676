"""Tests for terminals: shim.task.console (runc's console socket) and shim.task.stdio.TerminalIO.

The test plays runc: it connects to the console socket and sends the master of a
pty made with ``os.openpty()``; a real child runs on the pty's slave, and the test
plays containerd on the stdin/stdout FIFOs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import socket
import stat
import struct
import tempfile
import termios
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import Unavailable
from runtime.linux.proc import Stdio, exit_code, spawn
from shim.task import console
from shim.task.console import ConsoleSocket, with_console
from shim.task.stdio import TerminalIO


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_threads(baseline: int, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(5):
            await coro

    asyncio.run(guarded())


@pytest.fixture
def console_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A short private directory for console sockets (unix paths: 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="stasis-con-") as d:
        monkeypatch.setattr(console, "CONSOLE_DIR", d)
        yield d


class Children:
    """Child processes of a test; reaped on exit, SIGKILLed first if still running."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def spawn(self, argv: list[str], stdio: Stdio) -> int:
        pid = spawn(argv, stdio)
        self.pids.add(pid)
        return pid

    async def wait(self, pid: int) -> int:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.pids.discard(pid)
                return exit_code(status)
            await asyncio.sleep(0.005)

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


def fifo(tmp: Path, name: str) -> str:
    path = str(tmp / name)
    os.mkfifo(path, 0o600)
    return path


def open_reader(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)


async def open_writer(path: str, timeout: float = 3.0) -> int:
    """Open a FIFO for writing once the shim's copier has it open for reading."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)


async def read_until(fd: int, expected: bytes, timeout: float = 3.0) -> bytes:
    """Read a non-blocking fd until ``expected`` arrived (or return what came)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while expected not in buf and time.monotonic() < deadline:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            await asyncio.sleep(0.01)
            continue
        if not data:
            await asyncio.sleep(0.01)
            continue
        buf += data
    return buf


@contextlib.contextmanager
def closing_fds(*fds: int) -> Iterator[None]:
    try:
        yield
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def winsize(fd: int) -> tuple[int, int]:
    """(columns, rows) of a terminal."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return cols, rows


def send_master(path: str, master: int) -> None:
    """What runc does with --console-socket: connect and send the master (SCM_RIGHTS)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        socket.send_fds(s, [b"/dev/ptmx"], [master])


def fake_runc(master: int, *, delay: float = 0.0) -> Callable[[str], Awaitable[None]]:
    """A ``runc exec/create`` that sends ``master`` over the console socket and
    returns (after ``delay``)."""

    async def runc(path: str) -> None:
        await asyncio.sleep(0)
        send_master(path, master)
        await asyncio.sleep(delay)

    return runc


class RecordingIO:
    """Records what with_console attaches."""

    def __init__(self) -> None:
        self.attached: list[int] = []

    def attach(self, master: int) -> None:
        self.attached.append(master)


# --------------------------------------------------------------------------- console socket


def test_console_socket_is_private_and_removed_on_close(console_dir: str) -> None:
    before = fd_count()
    sock = ConsoleSocket()
    try:
        assert os.path.dirname(sock.path) == console_dir
        assert len(sock.path.encode()) < 108
        st = os.stat(sock.path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        sock.close()
    assert os.listdir(console_dir) == []
    assert fd_count() == before
    sock.close()  # twice is harmless


def test_receive_returns_the_master(console_dir: str) -> None:
    master, slave = os.openpty()
    with closing_fds(master, slave):

        async def body() -> None:
            sock = ConsoleSocket()
            try:
                send_master(sock.path, master)
                got = await sock.receive()
            finally:
                sock.close()
            with closing_fds(got):
                assert got != master
                os.write(slave, b"hi\n")
                assert os.read(got, 100) == b"hi\r\n"

        run(body())


def test_with_console_attaches_the_master_and_removes_the_socket(console_dir: str) -> None:
    before = fd_count()
    master, slave = os.openpty()
    io = RecordingIO()
    paths: list[str] = []
    with closing_fds(master, slave):
        runc = fake_runc(master)

        async def run_and_record(path: str) -> None:
            paths.append(path)
            await runc(path)

        run(with_console(io, run_and_record))  # type: ignore[arg-type]
        [path] = paths
        assert not os.path.exists(path)
        assert os.listdir(console_dir) == []
        [got] = io.attached
        with closing_fds(got):
            os.write(slave, b"x\n")
            assert os.read(got, 100) == b"x\r\n"
    assert fd_count() == before


@pytest.mark.parametrize(
    "runc_sends,delay",
    [(False, 0.0), (True, 0.0), (True, 0.05)],
    ids=["before-sending", "right-after-sending", "after-the-shim-received"],
)
def test_with_console_failing_run_leaves_no_socket_and_no_fd(
    console_dir: str, runc_sends: bool, delay: float
) -> None:
    """runc failing (before or after it sent the master) leaves nothing behind: the
    socket file is gone and a master that arrived is closed."""
    io = RecordingIO()
    master, slave = os.openpty()
    with closing_fds(master, slave):
        before = fd_count()

        async def failing_runc(path: str) -> None:
            if runc_sends:
                send_master(path, master)
            await asyncio.sleep(delay)
            raise RuntimeError("runc exec failed")

        with pytest.raises(RuntimeError, match="runc exec failed"):
            run(with_console(io, failing_runc))  # type: ignore[arg-type]
        assert io.attached == []
        assert os.listdir(console_dir) == []
        assert fd_count() == before


def test_runc_sending_no_fd_is_unavailable(console_dir: str) -> None:
    io = RecordingIO()
    before = fd_count()

    async def runc(path: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            s.sendall(b"no terminal here")

    with pytest.raises(Unavailable, match="sent no terminal"):
        run(with_console(io, runc))  # type: ignore[arg-type]
    assert io.attached == []
    assert os.listdir(console_dir) == []
    assert fd_count() == before


def test_runc_connecting_and_closing_at_once_is_unavailable(console_dir: str) -> None:
    io = RecordingIO()

    async def runc(path: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)

    with pytest.raises(Unavailable):
        run(with_console(io, runc))  # type: ignore[arg-type]
    assert os.listdir(console_dir) == []


def test_runc_in_a_thread(console_dir: str) -> None:
    """runc is another process: its connect and send race the shim's accept."""
    master, slave = os.openpty()
    io = RecordingIO()
    with closing_fds(master, slave):

        async def runc(path: str) -> None:
            t = threading.Thread(target=send_master, args=(path, master))
            t.start()
            await asyncio.get_running_loop().run_in_executor(None, t.join)

        run(with_console(io, runc))  # type: ignore[arg-type]
        [got] = io.attached
        os.close(got)
    assert os.listdir(console_dir) == []


# --------------------------------------------------------------------------- TerminalIO


def test_terminal_io_lifecycle(tmp_path: Path, children: Children, console_dir: str) -> None:
    """Output reaches the stdout FIFO, stdin FIFO data reaches the child, resize
    reaches the terminal, and close() leaves no fd and no thread behind."""
    stdin, stdout = fifo(tmp_path, "in"), fifo(tmp_path, "out")
    threads = threading.active_count()
    before = fd_count()

    async def body() -> None:
        rout = open_reader(stdout)
        master, slave = os.openpty()
        with closing_fds(rout, master, slave):
            io = TerminalIO(stdin, stdout)
            try:
                await with_console(io, fake_runc(master))
                os.close(master)  # runc's copy; the shim holds its own now
                pid = children.spawn(
                    ["sh", "-c", "echo out; read x; stty size; echo got-$x"],
                    Stdio(slave, slave, slave),
                )
                io.started(asyncio.get_running_loop())
                assert b"out" in await read_until(rout, b"out")
                io.resize(120, 40)
                assert winsize(slave) == (120, 40)
                os.close(slave)  # the child's is the last: its exit ends the output
                w = await open_writer(stdin)
                with closing_fds(w):
                    os.write(w, b"hello\n")
                got = await read_until(rout, b"got-hello")
                assert b"40 120" in got  # stty size: rows columns
                assert b"got-hello" in got
                assert await children.wait(pid) == 0
                # EIO on the master (the last slave closed) ends the copy.
                assert await io.wait_output(timeout=3.0)
            finally:
                io.close()

    run(body())
    wait_threads(threads)
    assert threading.active_count() <= threads, "a thread of this test was left running"
    assert fd_count() == before


def test_terminal_io_close_stops_copiers_of_a_running_child(
    tmp_path: Path, children: Children, console_dir: str
) -> None:
    stdin, stdout = fifo(tmp_path, "in"), fifo(tmp_path, "out")
    threads = threading.active_count()
    before = fd_count()

    async def body() -> None:
        rout = open_reader(stdout)
        master, slave = os.openpty()
        with closing_fds(rout, master, slave):
            io = TerminalIO(stdin, stdout)
            await with_console(io, fake_runc(master))
            os.close(master)
            pid = children.spawn(["sh", "-c", "echo up; exec sleep 30"], Stdio(slave, slave, slave))
            io.started(asyncio.get_running_loop())
            assert b"up" in await read_until(rout, b"up")
            # The child and the test still hold the slave: no EOF will come.
            assert not await io.wait_output(timeout=0.05)
            io.close()
            assert await io.wait_output(timeout=3.0)
            io.resize(80, 24)  # after close: ignored
            io.close()  # twice is harmless
            os.kill(pid, signal.SIGKILL)
            await children.wait(pid)

    run(body())
    wait_threads(threads)
    assert threading.active_count() <= threads, "a thread of this test was left running"
    assert fd_count() == before


def test_terminal_io_without_stdin(tmp_path: Path, children: Children, console_dir: str) -> None:
    stdout = fifo(tmp_path, "out")
    threads = threading.active_count()
    before = fd_count()

    async def body() -> None:
        rout = open_reader(stdout)
        master, slave = os.openpty()
        with closing_fds(rout, master, slave):
            io = TerminalIO("", stdout)
            try:
                await with_console(io, fake_runc(master))
                os.close(master)
                pid = children.spawn(["sh", "-c", "echo alone"], Stdio(slave, slave, slave))
                os.close(slave)
                io.started(asyncio.get_running_loop())
                assert b"alone" in await read_until(rout, b"alone")
                assert await children.wait(pid) == 0
                assert await io.wait_output(timeout=3.0)
            finally:
                io.close()

    run(body())
    wait_threads(threads)
    assert fd_count() == before


def test_terminal_io_closed_before_attach(tmp_path: Path) -> None:
    before = fd_count()
    io = TerminalIO("", fifo(tmp_path, "out"))
    io.resize(80, 24)  # no terminal yet: ignored
    io.close()
    assert fd_count() == before


def test_terminal_io_closed_before_started(tmp_path: Path, console_dir: str) -> None:
    """Attached but never started (the exec failed after runc sent the pty)."""
    stdin, stdout = fifo(tmp_path, "in"), fifo(tmp_path, "out")
    before = fd_count()
    master, slave = os.openpty()
    with closing_fds(master, slave):
        io = TerminalIO(stdin, stdout)
        run(with_console(io, fake_runc(master)))
        io.resize(100, 30)
        assert winsize(slave) == (100, 30)
        io.close()
    assert fd_count() == before
