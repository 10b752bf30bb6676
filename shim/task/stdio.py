"""A process's stdio: anonymous pipes the shim owns, copied to and from containerd's FIFOs.

CRIU can only checkpoint a container whose stdio are pipes it may treat as
external, so containers never get containerd's FIFOs (or files) directly.
Each stream is copied by a small daemon thread with ``os.splice`` (the data
never enters Python); a thread per stream keeps the event loop free of
blocking I/O. Once started, a copier owns its fds and is the only one to close
them, so an fd number can never be reused under a running copy; the shim stops
copiers through eventfds.

Output FIFOs are opened as containerd's runc shim opens them: for writing only
once a reader (the client) has the FIFO open, plus a read end the shim keeps so
that writes never fail while the client is away (a containerd restart). Nothing
is written before a reader came, so output cannot be dropped by the kernel with
a FIFO that no one had open. ``delivered()`` says whether everything a process
wrote has been read from its FIFOs: its exit is reported only then (bounded),
since clients stop reading once they see the exit (``ctr run`` closes its FIFOs
on TaskExit).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import stat
import sys
import threading
from collections.abc import Callable

from runtime.errors import InvalidArgument
from runtime.linux.proc import Stdio

log = logging.getLogger("stasis.stdio")

_CHUNK = 1 << 20
# How long a copier sleeps at most between looks for the reader of an output FIFO.
_READER_POLL_MAX = 0.05
# How long an exit waits at most for its output to be read (a client that
# stopped reading must not hold it back for good).
DELIVERY_TIMEOUT = 2.0


def _output_path(path: str) -> str:
    """Where a container's output goes: a FIFO or a plain file path (``file://``
    URIs resolved, their directory made), or "" for none."""
    if "://" in path:
        scheme, _, rest = path.partition("://")
        if scheme != "file":
            raise InvalidArgument(f"unsupported stdio URI scheme {scheme!r} in {path!r}")
        # file:///abs/path; a query (containerd's log URI options) is not part of it.
        path = rest.partition("?")[0]
        if not path.startswith("/"):
            raise InvalidArgument(f"stdio URI {path!r} needs an absolute path")
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    return path


def _open_file_output(path: str) -> int:
    """Open a plain file (appended to, created when missing) or /dev/null for ""."""
    if not path:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _is_fifo(path: str) -> bool:
    if not path:
        return False
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def _open_fifo_output(path: str) -> tuple[int, int] | None:
    """``(write end, read end the shim keeps)`` of an output FIFO, or None while
    no reader has it open.

    A write end is opened only once a reader is there: bytes written to a FIFO
    that no one has open are lost when the last end closes, and a reader that
    opens afterwards waits for a writer that never comes back. The kept read
    end means a write never fails with EPIPE when the reader goes away for a
    while (a containerd restart).
    """
    try:
        w = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return None
        raise
    try:
        keep = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        # Blocking writes, like any other destination (splice asks for non-blocking).
        fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(w)
        raise
    return w, keep


def _unread(fd: int) -> int:
    """Bytes waiting to be read in a pipe, FIFO or terminal (FIONREAD)."""
    from termios import FIONREAD

    return int.from_bytes(fcntl.ioctl(fd, FIONREAD, bytes(4)), sys.byteorder)


def _wait(fds: list[tuple[int, int]], timeout: float | None = None) -> set[int]:
    """poll() until one of ``(fd, events)`` is ready (or ``timeout`` seconds
    passed: then the set is empty); the set of ready fds."""
    poller = select.poll()
    for fd, events in fds:
        poller.register(fd, events)
    ms = None if timeout is None else int(timeout * 1000)
    while True:
        try:
            return {fd for fd, _ in poller.poll(ms)}
        except InterruptedError:
            continue


def _copy(
    src: int, dst: int, stop: int, *, buffered: bool = False, moving: list[int] | None = None
) -> None:
    """Move bytes from ``src`` to ``dst`` until EOF or until ``stop`` fires.

    ``src`` is a pipe (moved with splice) or, with ``buffered``, anything
    readable such as a pty master (EIO there means the terminal closed: EOF).
    On a write error (the reader went away for good) it keeps draining into
    /dev/null, so the container never blocks on a full pipe. Closes nothing.
    A buffered copy marks bytes it holds (read, not yet written) in
    ``moving``: ``[holding, chunks moved]``.
    """
    moving = [0, 0] if moving is None else moving
    # splice(2) refuses a destination opened O_APPEND (EINVAL), and file
    # outputs are: copy to those through a buffer instead.
    buffered = buffered or bool(fcntl.fcntl(dst, fcntl.F_GETFL) & os.O_APPEND)
    null = -1
    try:
        while True:
            if stop in _wait([(src, select.POLLIN), (stop, select.POLLIN)]):
                return
            if buffered:
                moving[0] = 1
                try:
                    data = memoryview(os.read(src, _CHUNK))
                except OSError:
                    return
                if not data:
                    return
                try:
                    while data:
                        data = data[os.write(dst, data) :]
                except OSError as e:
                    if null < 0:
                        log.debug("stdio copy to fd %d stopped: %s; draining", dst, e)
                        null = dst = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                moving[1] += 1
                moving[0] = 0
                continue
            try:
                n = os.splice(src, dst, _CHUNK, flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                # The destination FIFO is full: wait until it drains (or stop).
                if stop in _wait([(dst, select.POLLOUT), (stop, select.POLLIN)]):
                    return
                continue
            except OSError as e:
                if null >= 0:
                    return
                log.debug("stdio copy to fd %d stopped: %s; draining", dst, e)
                null = dst = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
                continue
            if n == 0:
                return
    finally:
        moving[0] = 0
        if null >= 0:
            os.close(null)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class ProcessIO:
    """The three pipes of one container process and the threads that copy them.

    Lifecycle: ``ProcessIO(...)`` creates the pipes; ``child`` is handed to
    runc; ``started()`` closes the child's ends in the shim and hands every
    other fd to a copier thread; ``close_stdin()`` ends stdin;
    ``when_delivered()`` calls back once the clients have read what the
    process wrote (its exit is reported then); ``close()`` stops the copiers.
    Guarded by ``_lock``: ``_fds`` (what the shim itself still owns) and
    ``_probes``, the closed flags and the count of running copiers, whose last
    one closes the eventfds.
    """

    # Whether the output sources need read/write copies (a pty master) rather
    # than splice (pipes).
    _buffered_output = False

    def _init_common(self, stdin: str, stdout: str, stderr: str) -> None:
        self.paths = (stdin, stdout, stderr)
        self.child = Stdio()
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self._stdin_w = -1
        self._closed = False
        self._stdin_closed = False
        self._running = 0
        self._threads: list[threading.Thread] = []
        self._output_done: list[asyncio.Future[None]] = []
        # (source, destination or -1 until the FIFO at path has a reader, path)
        self._outputs: list[tuple[int, int, str]] = []
        # Output sources' duplicates and kept FIFO read ends: where delivered()
        # looks for unread bytes (also in _fds). Per buffered copier, _moving
        # holds [bytes in hand, chunks moved] (written by the copier only).
        self._probes: list[int] = []
        self._moving: list[list[int]] = []
        self._delivery_waits: set[asyncio.Task[bool]] = set()
        self._eventfds: list[int] = []  # closed once, when closed and no copier runs
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._eventfds.append(self._stop)
        try:
            self._stop_stdin = os.eventfd(0, os.EFD_CLOEXEC)
        except BaseException:
            os.close(self._stop)
            raise
        self._eventfds.append(self._stop_stdin)

    def __init__(self, stdin: str, stdout: str, stderr: str) -> None:
        self._init_common(stdin, stdout, stderr)
        try:
            # Open destinations first: a bad path fails before any process exists,
            # one at a time so that a failure closes what was opened.
            dests = [self._open_destination(path) for path in (stdout, stderr)]
            child_in = None
            if stdin:
                child_in, self._stdin_w = os.pipe()
                self._fds += [child_in, self._stdin_w]
            out_r, out_w = os.pipe()
            self._fds += [out_r, out_w]
            err_r, err_w = os.pipe()
            self._fds += [err_r, err_w]
            for src in (out_r, err_r):
                self._add_probe(os.dup(src))
            self._outputs = [(out_r, dests[0][0], dests[0][1]), (err_r, dests[1][0], dests[1][1])]
            self.child = Stdio(child_in, out_w, err_w)
        except BaseException:
            self.close()
            raise

    def _add_probe(self, fd: int) -> None:
        self._fds.append(fd)
        self._probes.append(fd)

    def _open_destination(self, path: str) -> tuple[int, str]:
        """``(fd, FIFO path)`` of where an output goes; fd -1 for a FIFO that no
        reader has open yet (its copier opens it once one has), path "" for a file."""
        path = _output_path(path)
        if not _is_fifo(path):
            fd = _open_file_output(path)
            self._fds.append(fd)
            return fd, ""
        ends = _open_fifo_output(path)
        if ends is None:
            return -1, path
        self._fds.append(ends[0])
        self._add_probe(ends[1])
        return ends[0], path

    def started(self, loop: asyncio.AbstractEventLoop) -> None:
        """The child holds its ends now: close ours and start copying."""
        with self._lock:
            if self._closed:
                return
            for fd in (self.child.stdin, self.child.stdout, self.child.stderr):
                if fd is not None:
                    self._fds.remove(fd)
                    os.close(fd)
            jobs: list[tuple[object, tuple[object, ...]]] = []
            for src, dst, path in self._outputs:
                fut: asyncio.Future[None] = loop.create_future()
                self._output_done.append(fut)
                moving = [0, 0]
                self._moving.append(moving)
                jobs.append((self._copy_output, (src, dst, path, moving, loop, fut)))
                self._fds.remove(src)
                if dst >= 0:
                    self._fds.remove(dst)
            if self._stdin_w >= 0 and not self._stdin_closed:
                jobs.append((self._copy_stdin, (self._stdin_w,)))
                self._fds.remove(self._stdin_w)
            self._running = len(jobs)
        for target, args in jobs:
            t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
            self._threads.append(t)
            t.start()

    def _copier_done(self, *fds: int) -> None:
        """A copier ends: it closes the fds it owned."""
        for fd in fds:
            os.close(fd)
        with self._lock:
            self._running -= 1
            self._release_eventfds()

    def _copy_output(
        self,
        src: int,
        dst: int,
        path: str,
        moving: list[int],
        loop: asyncio.AbstractEventLoop,
        fut: asyncio.Future[None],
    ) -> None:
        try:
            if dst < 0:
                dst = self._await_reader(path)
            if dst >= 0:
                _copy(src, dst, self._stop, buffered=self._buffered_output, moving=moving)
        finally:
            self._copier_done(*(fd for fd in (src, dst) if fd >= 0))
            with contextlib.suppress(RuntimeError):  # loop already closed at exit
                loop.call_soon_threadsafe(_resolve, fut)

    def _await_reader(self, path: str) -> int:
        """In a copier: wait until a reader has the output FIFO at ``path`` open,
        meanwhile the output waits in its pipe. The write end; -1 when stopped first."""
        delay = 0.001
        while True:
            try:
                ends = _open_fifo_output(path)
            except OSError as e:
                # The FIFO is gone (its client with it): keep the pipe drained.
                log.debug("output FIFO %s unusable: %s; discarding the output", path, e)
                return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            if ends is not None:
                with self._lock:
                    if not self._closed:
                        self._add_probe(ends[1])
                        return ends[0]
                for fd in ends:
                    os.close(fd)
                return -1
            if _wait([(self._stop, select.POLLIN)], delay):
                return -1
            delay = min(delay * 2, _READER_POLL_MAX)

    def _copy_stdin(self, dst: int) -> None:
        path = self.paths[0]
        src = -1
        try:
            # Non-blocking open never waits for a writer; poll() reports the
            # FIFO readable only once a writer has written or come and gone.
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            stops = {self._stop, self._stop_stdin}
            draining = False
            while True:
                if not draining:
                    ready = _wait([(src, select.POLLIN), *((s, select.POLLIN) for s in stops)])
                    if self._stop in ready:
                        return
                    # CloseIO: what the client wrote before it still goes in.
                    draining = self._stop_stdin in ready
                try:
                    data = os.read(src, _CHUNK)
                except BlockingIOError:
                    if draining:
                        return
                    continue
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(dst, view) :]
        except OSError as e:
            log.debug("stdin copy from %s stopped: %s", path, e)
        finally:
            self._copier_done(*(fd for fd in (src, dst) if fd >= 0))

    def close_stdin(self) -> None:
        """Close the container's stdin (CloseIO): it reads EOF."""
        with self._lock:
            if self._stdin_closed or self._closed:
                return
            self._stdin_closed = True
            if self._stdin_w in self._fds:  # no copier: the shim still owns it
                self._fds.remove(self._stdin_w)
                os.close(self._stdin_w)
            elif self._stdin_w >= 0:
                os.eventfd_write(self._stop_stdin, 1)
            self._stdin_w = -1

    def delivered(self) -> bool:
        """Whether everything the process wrote so far has been read by the
        clients from the FIFOs (or went to files): no bytes wait in its pipes,
        in a copier's hands or in a FIFO. True once closed."""
        with self._lock:
            if self._closed:
                return True
            # Chunks moved before and after the look: a buffered copier may take
            # bytes from a source after it was looked at and write them to a FIFO
            # before that was looked at.
            moved = [m[1] for m in self._moving]
            try:
                if any(_unread(fd) for fd in self._probes):
                    return False
            except OSError as e:
                log.debug("cannot tell whether output was read: %s", e)
                return True
            return not any(m[0] for m in self._moving) and moved == [m[1] for m in self._moving]

    async def wait_delivered(self, timeout: float) -> bool:
        """Wait until ``delivered()``; False on timeout (no client reads)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.001
        while not self.delivered():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True

    def when_delivered(
        self, callback: Callable[[], None], timeout: float = DELIVERY_TIMEOUT
    ) -> None:
        """Call ``callback`` on the event loop once ``delivered()`` (at once when
        it already is), or after ``timeout`` seconds at most."""
        if self.delivered():
            callback()
            return
        wait = asyncio.ensure_future(self.wait_delivered(timeout))
        self._delivery_waits.add(wait)

        def done(task: asyncio.Task[bool]) -> None:
            self._delivery_waits.discard(task)
            if not task.cancelled():
                callback()

        wait.add_done_callback(done)

    async def wait_output(self, timeout: float) -> bool:
        """Wait until stdout and stderr reached EOF; False on timeout."""
        if not self._output_done:
            return True
        _, pending = await asyncio.wait(self._output_done, timeout=timeout)
        return not pending

    def close(self) -> None:
        """Stop every copier and close every fd the shim still owns for this process."""
        self.close_stdin()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._running:
                os.eventfd_write(self._stop, 1)
            fds, self._fds = self._fds, []
            self._probes = []
            self._release_eventfds()
        for fd in fds:
            os.close(fd)

    def _release_eventfds(self) -> None:
        # Called with _lock held: copiers poll the eventfds until they end.
        if self._closed and self._running == 0:
            fds, self._eventfds = self._eventfds, []
            for fd in fds:
                os.close(fd)


class TerminalIO(ProcessIO):
    """A process with a terminal: the pty master (from runc's console socket)
    copied to the stdout FIFO, and the stdin FIFO copied into it.

    Each copier gets its own duplicate of the master, so the ownership rule of
    ``ProcessIO`` holds; a third duplicate stays here for resizing.
    """

    _buffered_output = True

    def __init__(self, stdin: str, stdout: str) -> None:
        self._init_common(stdin, stdout, "")
        self._resize_fd = -1
        try:
            self._dest = self._open_destination(stdout)
        except BaseException:
            self.close()
            raise

    def attach(self, master: int) -> None:
        """Take the pty master runc sent (the shim owns it from now on)."""
        with self._lock:
            self._fds.append(master)
            self._outputs = [(master, *self._dest)]
            self._add_probe(os.dup(master))
            self._resize_fd = os.dup(master)
            self._fds.append(self._resize_fd)
            if self.paths[0] and not self._stdin_closed:
                self._stdin_w = os.dup(master)
                self._fds.append(self._stdin_w)

    def resize(self, width: int, height: int) -> None:
        """Set the terminal's size (TIOCSWINSZ on the master)."""
        import struct
        import termios

        with self._lock:
            if self._resize_fd < 0 or self._closed:
                return
            fcntl.ioctl(
                self._resize_fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0)
            )

    def close(self) -> None:
        """Stop the copiers and close the master."""
        with self._lock:
            fd, self._resize_fd = self._resize_fd, -1
            if fd in self._fds:
                self._fds.remove(fd)
                os.close(fd)
        super().close()
