"""Tests for shim.task.stdio.ProcessIO with real FIFOs, files and child processes.

Each test plays containerd's part (it opens the FIFOs like a client does) and
runs a real child with ``io.child`` as its stdio. Children are reaped with a
polling ``waitpid`` and killed in ``finally`` if a test
fails early.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import InvalidArgument
from runtime.linux.proc import exit_code, spawn
from shim.task.stdio import ProcessIO


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_threads(baseline: int, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def _copiers_end() -> Iterator[None]:
    """A test's copier threads end (and close the fds they own) before the next test
    starts: a copier that outlived its test closed fds under the next one's count."""
    baseline = threading.active_count()
    yield
    wait_threads(baseline)


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(5):
            await coro

    asyncio.run(guarded())


class Children:
    """Child processes of a test; reaped on exit, SIGKILLed first if still running."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def spawn(self, argv: Sequence[str], io: ProcessIO) -> int:
        pid = spawn(argv, io.child)
        self.pids.add(pid)
        return pid

    async def wait(self, pid: int) -> int:
        # Polling (no thread blocked in waitpid) keeps a timed-out wait cancellable.
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


# --------------------------------------------------------------------------- output


def test_output_reaches_fifos(tmp_path: Path, children: Children) -> None:
    out, err = fifo(tmp_path, "out"), fifo(tmp_path, "err")

    async def body() -> None:
        rout, rerr = open_reader(out), open_reader(err)
        with closing_fds(rout, rerr):
            io = ProcessIO("", out, err)
            try:
                assert io.child.stdin is None
                pid = children.spawn(["sh", "-c", "echo hello; echo oops >&2"], io)
                io.started(asyncio.get_running_loop())
                assert await read_until(rout, b"hello\n") == b"hello\n"
                assert await read_until(rerr, b"oops\n") == b"oops\n"
                assert await children.wait(pid) == 0
                assert await io.wait_output(2.0)
            finally:
                io.close()

    run(body())


def test_large_output_is_copied_whole(tmp_path: Path, children: Children) -> None:
    out = fifo(tmp_path, "out")
    size = 3 << 20

    async def body() -> None:
        rout = open_reader(out)
        with closing_fds(rout):
            io = ProcessIO("", out, "")
            try:
                pid = children.spawn(["head", "-c", str(size), "/dev/zero"], io)
                io.started(asyncio.get_running_loop())
                got = 0
                deadline = time.monotonic() + 4
                while got < size and time.monotonic() < deadline:
                    try:
                        got += len(os.read(rout, 1 << 20))
                    except BlockingIOError:
                        await asyncio.sleep(0.005)
                assert got == size
                assert await children.wait(pid) == 0
                assert await io.wait_output(2.0)
            finally:
                io.close()

    run(body())


def test_output_kept_while_the_reader_is_away(tmp_path: Path, children: Children) -> None:
    # The shim keeps a read end of the FIFO: output written while containerd's
    # reader is gone (a restart) waits in the FIFO instead of failing with EPIPE.
    out = fifo(tmp_path, "out")

    async def body() -> None:
        io = ProcessIO("", out, "")
        try:
            first = open_reader(out)
            os.close(first)  # the reader went away
            pid = children.spawn(["sh", "-c", "echo early; sleep 0.3; echo late"], io)
            io.started(asyncio.get_running_loop())
            await asyncio.sleep(0.1)
            rout = open_reader(out)  # ... and came back
            with closing_fds(rout):
                assert await read_until(rout, b"late\n") == b"early\nlate\n"
            assert await children.wait(pid) == 0
            assert await io.wait_output(2.0)
        finally:
            io.close()

    run(body())


def test_empty_paths_use_dev_null(children: Children) -> None:
    async def body() -> None:
        io = ProcessIO("", "", "")
        try:
            assert io.child.stdin is None
            pid = children.spawn(["sh", "-c", "echo out; echo err >&2; cat"], io)
            io.started(asyncio.get_running_loop())
            assert await children.wait(pid) == 0  # cat read EOF from /dev/null
            assert await io.wait_output(2.0)
        finally:
            io.close()

    run(body())


def test_file_uri_and_plain_path_append(tmp_path: Path, children: Children) -> None:
    log = tmp_path / "new-dir" / "log"  # the directory is created
    plain = tmp_path / "plain"
    plain.write_text("before\n")

    async def body() -> None:
        for word in ("one", "two"):
            io = ProcessIO("", f"file://{log}", str(plain))
            try:
                pid = children.spawn(["sh", "-c", f"echo {word}; echo {word}-err >&2"], io)
                io.started(asyncio.get_running_loop())
                assert await children.wait(pid) == 0
                assert await io.wait_output(2.0)
            finally:
                io.close()

    run(body())
    assert log.read_text() == "one\ntwo\n"
    assert plain.read_text() == "before\none-err\ntwo-err\n"
    assert log.stat().st_mode & 0o777 == 0o600


def test_stdout_and_stderr_to_the_same_file(tmp_path: Path, children: Children) -> None:
    # containerd passes one file:// URI for both streams; O_APPEND keeps both.
    log = tmp_path / "both.log"
    uri = f"file://{log}"

    async def body() -> None:
        io = ProcessIO("", uri, uri)
        try:
            script = "for i in 1 2 3; do echo out$i; echo err$i >&2; done"
            pid = children.spawn(["sh", "-c", script], io)
            io.started(asyncio.get_running_loop())
            assert await children.wait(pid) == 0
            assert await io.wait_output(2.0)
        finally:
            io.close()

    run(body())
    assert sorted(log.read_text().splitlines()) == ["err1", "err2", "err3", "out1", "out2", "out3"]


def test_wait_output_before_started() -> None:
    async def body() -> None:
        io = ProcessIO("", "", "")
        try:
            assert await io.wait_output(0.01)
        finally:
            io.close()

    before = fd_count()
    run(body())
    assert fd_count() == before


def test_wait_output_times_out_while_the_child_writes(children: Children) -> None:
    async def body() -> None:
        io = ProcessIO("", "", "")
        try:
            pid = children.spawn(["sleep", "0.3"], io)  # holds stdout and stderr open
            io.started(asyncio.get_running_loop())
            assert not await io.wait_output(0.05)
            assert await children.wait(pid) == 0
            assert await io.wait_output(2.0)
        finally:
            io.close()

    run(body())


# --------------------------------------------------------------------------- delivery


def test_output_waits_for_a_reader_that_comes_late(tmp_path: Path, children: Children) -> None:
    """Nothing goes into a FIFO no one has open: the kernel would drop it when the
    shim closes its ends, and the late reader would wait for a writer forever."""
    out = fifo(tmp_path, "out")

    async def body() -> None:
        io = ProcessIO("", out, "")
        try:
            pid = children.spawn(["echo", "early"], io)
            io.started(asyncio.get_running_loop())
            assert await children.wait(pid) == 0
            await asyncio.sleep(0.1)
            assert not io.delivered()  # still in the pipe
            rout = open_reader(out)
            with closing_fds(rout):
                assert await read_until(rout, b"early\n") == b"early\n"
                assert await io.wait_output(2.0)
                assert os.read(rout, 100) == b""  # EOF: the shim closed its write end
            assert io.delivered()
        finally:
            io.close()

    run(body())


def test_delivered_once_the_reader_read_everything(tmp_path: Path, children: Children) -> None:
    out, err = fifo(tmp_path, "out"), fifo(tmp_path, "err")

    async def body() -> None:
        rout, rerr = open_reader(out), open_reader(err)
        with closing_fds(rout, rerr):
            io = ProcessIO("", out, err)
            try:
                pid = children.spawn(["sh", "-c", "echo hello; echo oops >&2"], io)
                io.started(asyncio.get_running_loop())
                assert await children.wait(pid) == 0
                assert await io.wait_output(2.0)  # everything is in the FIFOs
                assert not io.delivered()
                assert not await io.wait_delivered(0.05)
                assert await read_until(rout, b"hello\n") == b"hello\n"
                assert not io.delivered()  # stderr is still unread
                assert await read_until(rerr, b"oops\n") == b"oops\n"
                assert io.delivered()
            finally:
                io.close()

    run(body())


def test_not_delivered_while_the_copier_lags_behind_the_exit(
    tmp_path: Path, children: Children, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race behind lost `ctr run --rm` output: the process has exited (and
    would be reported) while its output is still in the pipe, not yet copied."""
    import shim.task.stdio

    out = fifo(tmp_path, "out")
    copy = shim.task.stdio._copy
    late = threading.Event()

    def lagging(*args: Any, **kw: Any) -> None:
        late.wait(2)
        copy(*args, **kw)

    monkeypatch.setattr(shim.task.stdio, "_copy", lagging)

    async def body() -> None:
        rout = open_reader(out)
        with closing_fds(rout):
            io = ProcessIO("", out, "")
            try:
                pid = children.spawn(["echo", "hello"], io)
                io.started(asyncio.get_running_loop())
                assert await children.wait(pid) == 0
                reported: list[float] = []
                io.when_delivered(lambda: reported.append(time.monotonic()))
                await asyncio.sleep(0.1)
                assert not reported, "exit reported with its output still in the pipe"
                late.set()
                assert await read_until(rout, b"hello\n") == b"hello\n"
                await asyncio.sleep(0.1)
                assert len(reported) == 1
            finally:
                late.set()
                io.close()

    run(body())


def test_when_delivered_gives_up_on_a_client_that_never_reads(
    tmp_path: Path, children: Children
) -> None:
    out = fifo(tmp_path, "out")

    async def body() -> None:
        rout = open_reader(out)
        with closing_fds(rout):
            io = ProcessIO("", out, "")
            try:
                pid = children.spawn(["echo", "unread"], io)
                io.started(asyncio.get_running_loop())
                assert await children.wait(pid) == 0
                done = asyncio.Event()
                t0 = time.monotonic()
                io.when_delivered(done.set, timeout=0.2)
                await done.wait()
                assert 0.15 < time.monotonic() - t0 < 1.5
                assert not io.delivered()
            finally:
                io.close()
        assert io.delivered()  # closed: nothing more to wait for

    run(body())


def test_when_delivered_calls_back_at_once_when_nothing_is_pending() -> None:
    async def body() -> None:
        io = ProcessIO("", "", "")
        try:
            called: list[int] = []
            io.when_delivered(lambda: called.append(1))
            assert called == [1]
        finally:
            io.close()

    run(body())


# --------------------------------------------------------------------------- stdin


def test_stdin_reaches_the_child(tmp_path: Path, children: Children) -> None:
    inp, out = fifo(tmp_path, "in"), fifo(tmp_path, "out")

    async def body() -> None:
        rout = open_reader(out)
        with closing_fds(rout):
            io = ProcessIO(inp, out, "")
            try:
                assert io.child.stdin is not None
                pid = children.spawn(["sh", "-c", "read x; echo got-$x"], io)
                io.started(asyncio.get_running_loop())
                w = await open_writer(inp)
                with closing_fds(w):
                    os.write(w, b"abc\n")
                    assert await read_until(rout, b"got-abc\n") == b"got-abc\n"
                assert await children.wait(pid) == 0
            finally:
                io.close()

    run(body())


def test_close_stdin_delivers_what_the_client_wrote_first(
    tmp_path: Path, children: Children
) -> None:
    # CRI writes the input, then calls CloseIO at once: the input must still arrive.
    inp, out = fifo(tmp_path, "in"), fifo(tmp_path, "out")

    async def body() -> None:
        rout = open_reader(out)
        with closing_fds(rout):
            io = ProcessIO(inp, out, "")
            try:
                pid = children.spawn(["cat"], io)
                io.started(asyncio.get_running_loop())
                w = await open_writer(inp)
                with closing_fds(w):
                    os.write(w, b"via-stdin\n")
                    io.close_stdin()  # before the copier had a chance to read it
                    assert await children.wait(pid) == 0
                assert await read_until(rout, b"via-stdin\n") == b"via-stdin\n"
            finally:
                io.close()

    for _ in range(20):
        run(body())


def test_client_closing_stdin_gives_eof(tmp_path: Path, children: Children) -> None:
    inp, out = fifo(tmp_path, "in"), fifo(tmp_path, "out")

    async def body() -> None:
        rout = open_reader(out)
        with closing_fds(rout):
            io = ProcessIO(inp, out, "")
            try:
                pid = children.spawn(["cat"], io)
                io.started(asyncio.get_running_loop())
                w = await open_writer(inp)
                os.write(w, b"line\n")
                os.close(w)
                assert await children.wait(pid) == 0
                assert await read_until(rout, b"line\n") == b"line\n"
            finally:
                io.close()

    run(body())


def test_close_stdin_gives_eof(tmp_path: Path, children: Children) -> None:
    inp, out = fifo(tmp_path, "in"), fifo(tmp_path, "out")

    async def body() -> None:
        rout = open_reader(out)
        with closing_fds(rout):
            io = ProcessIO(inp, out, "")
            try:
                pid = children.spawn(["cat"], io)
                io.started(asyncio.get_running_loop())
                w = await open_writer(inp)
                with closing_fds(w):
                    os.write(w, b"x\n")
                    assert await read_until(rout, b"x\n") == b"x\n"
                    io.close_stdin()  # the client's writer is still open
                    assert await children.wait(pid) == 0
                io.close_stdin()  # twice is fine
            finally:
                io.close()

    run(body())


def test_close_stdin_before_the_client_opened_it(tmp_path: Path, children: Children) -> None:
    inp = fifo(tmp_path, "in")

    async def body() -> None:
        io = ProcessIO(inp, "", "")
        try:
            pid = children.spawn(["cat"], io)
            io.started(asyncio.get_running_loop())
            await asyncio.sleep(0.1)  # the copier now waits in open() for a writer
            io.close_stdin()
            assert await asyncio.wait_for(children.wait(pid), 2) == 0
        finally:
            io.close()

    run(body())


def test_close_stdin_before_started(children: Children, tmp_path: Path) -> None:
    inp = fifo(tmp_path, "in")
    before = fd_count()

    async def body() -> None:
        io = ProcessIO(inp, "", "")
        try:
            pid = children.spawn(["cat"], io)
            io.close_stdin()
            io.started(asyncio.get_running_loop())
            assert await children.wait(pid) == 0
            assert await io.wait_output(2.0)
        finally:
            io.close()

    threads = threading.active_count()
    run(body())
    wait_threads(threads)
    assert threading.active_count() <= threads, "a thread of this test was left running"
    assert fd_count() == before


# --------------------------------------------------------------------------- errors and leaks


@pytest.mark.parametrize(
    ("stdout", "stderr"),
    [
        ("binary:///usr/bin/logger?tag=x", "binary:///usr/bin/logger?tag=x"),
        ("fifo:///x", ""),
    ],
)
def test_unsupported_scheme(stdout: str, stderr: str) -> None:
    before = fd_count()
    with pytest.raises(InvalidArgument, match="unsupported stdio URI scheme"):
        ProcessIO("", stdout, stderr)
    assert fd_count() == before


def test_unsupported_scheme_on_stderr_only_leaks_nothing() -> None:
    before = fd_count()
    with pytest.raises(InvalidArgument, match="binary"):
        ProcessIO("", "", "binary:///usr/bin/logger")
    assert fd_count() == before


def test_no_fd_or_thread_leak_over_a_lifecycle(tmp_path: Path, children: Children) -> None:
    inp, out, err = fifo(tmp_path, "in"), fifo(tmp_path, "out"), fifo(tmp_path, "err")

    async def body() -> None:
        rout, rerr = open_reader(out), open_reader(err)
        with closing_fds(rout, rerr):
            for _ in range(3):
                io = ProcessIO(inp, out, err)
                try:
                    pid = children.spawn(["sh", "-c", "cat; echo done >&2"], io)
                    io.started(asyncio.get_running_loop())
                    w = await open_writer(inp)
                    with closing_fds(w):
                        os.write(w, b"ping\n")
                        assert await read_until(rout, b"ping\n") == b"ping\n"
                        io.close_stdin()
                    assert await children.wait(pid) == 0
                    assert await read_until(rerr, b"done\n") == b"done\n"
                    assert await io.wait_output(2.0)
                finally:
                    io.close()

    threads = threading.active_count()
    before = fd_count()
    run(body())
    wait_threads(threads)
    assert threading.active_count() <= threads, "a thread of this test was left running"
    assert fd_count() == before


# --------------------------------------------------------------------------- known bugs


def _release_stdin_copier(path: str) -> None:
    """Let a copier blocked in open(path, O_RDONLY) return: a writer comes and goes."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            return
        except OSError:
            time.sleep(0.01)


def test_close_stdin_before_the_copier_opened_the_fifo(
    tmp_path: Path, children: Children, monkeypatch: pytest.MonkeyPatch
) -> None:
    inp = fifo(tmp_path, "in")
    copy_stdin = ProcessIO._copy_stdin

    def scheduled_late(self: ProcessIO, *args: int) -> None:
        time.sleep(0.2)  # the thread runs only after close_stdin()
        copy_stdin(self, *args)

    monkeypatch.setattr(ProcessIO, "_copy_stdin", scheduled_late)

    async def body() -> None:
        io = ProcessIO(inp, "", "")
        try:
            pid = children.spawn(["cat"], io)
            io.started(asyncio.get_running_loop())
            io.close_stdin()
            try:
                code = await asyncio.wait_for(children.wait(pid), 0.6)
            except TimeoutError:
                code = -1
            assert code == 0, "cat never saw EOF on stdin"
        finally:
            children.cleanup()
            _release_stdin_copier(inp)
            io.close()

    threads = threading.active_count()
    run(body())
    wait_threads(threads)


def test_close_during_copy_never_writes_to_a_reused_fd(tmp_path: Path, children: Children) -> None:
    """close() while output is still open stops the copiers; they close their own fds."""
    out = fifo(tmp_path, "out")
    victim_path = tmp_path / "victim"

    async def body() -> None:
        io = ProcessIO("", out, "")
        threads = threading.active_count()
        try:
            pid = children.spawn(["sh", "-c", "sleep 0.2; echo one; sleep 0.1; echo two"], io)
            io.started(asyncio.get_running_loop())
            await asyncio.sleep(0.05)  # the copier waits for output
            io.close()  # output still open: what delete does after wait_output times out
            wait_threads(threads)  # the copiers end promptly and closed what they owned
            # The next open() may reuse a number a copier held: nothing lands in it.
            victim = os.open(victim_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with closing_fds(victim):
                # The child's output has nowhere to go now: EPIPE (SIGPIPE, 141).
                assert await children.wait(pid) in (0, 141)
        finally:
            io.close()

    threads = threading.active_count()
    run(body())
    wait_threads(threads)
    assert victim_path.read_bytes() == b""
