"""A process's stdio: anonymous pipes the shim owns, copied to and from containerd's FIFOs.

CRIU can only checkpoint a container whose stdio are pipes it may treat as
external, so containers never get containerd's FIFOs (or files) directly.
Each stream is copied by a small daemon thread with ``os.splice`` (the data
never enters Python); a thread per stream keeps the event loop free of
blocking I/O. Once started, a copier owns its fds and is the only one to close
them, so an fd number can never be reused under a running copy; the shim stops
copiers through eventfds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import stat
import threading

from runtime.errors import InvalidArgument
from runtime.proc import Stdio

log = logging.getLogger("stasis.stdio")

_CHUNK = 1 << 20


def _open_output(path: str) -> int:
    """Open where a container's output goes: a FIFO, a ``file://`` URI or a plain file."""
    if not path:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    if "://" in path:
        scheme, _, rest = path.partition("://")
        if scheme != "file":
            raise InvalidArgument(f"unsupported stdio URI scheme {scheme!r} in {path!r}")
        # file:///abs/path; a query (containerd's log URI options) is not part of it.
        path = rest.partition("?")[0]
        if not path.startswith("/"):
            raise InvalidArgument(f"stdio URI {path!r} needs an absolute path")
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    try:
        is_fifo = stat.S_ISFIFO(os.stat(path).st_mode)
    except FileNotFoundError:
        is_fifo = False
    if is_fifo:
        # Read-write keeps a reader on the FIFO: writes never fail with EPIPE
        # while containerd (the real reader) restarts.
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _wait(fds: list[tuple[int, int]]) -> set[int]:
    """poll() until one of ``(fd, events)`` is ready; the set of ready fds."""
    poller = select.poll()
    for fd, events in fds:
        poller.register(fd, events)
    while True:
        try:
            return {fd for fd, _ in poller.poll()}
        except InterruptedError:
            continue


def _copy(src: int, dst: int, stop: int, *, buffered: bool = False) -> None:
    """Move bytes from ``src`` to ``dst`` until EOF or until ``stop`` fires.

    ``src`` is a pipe (moved with splice) or, with ``buffered``, anything
    readable such as a pty master (EIO there means the terminal closed: EOF).
    On a write error (the reader went away for good) it keeps draining into
    /dev/null, so the container never blocks on a full pipe. Closes nothing.
    """
    # splice(2) refuses a destination opened O_APPEND (EINVAL), and file
    # outputs are: copy to those through a buffer instead.
    buffered = buffered or bool(fcntl.fcntl(dst, fcntl.F_GETFL) & os.O_APPEND)
    null = -1
    try:
        while True:
            if stop in _wait([(src, select.POLLIN), (stop, select.POLLIN)]):
                return
            if buffered:
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
        if null >= 0:
            os.close(null)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class ProcessIO:
    """The three pipes of one container process and the threads that copy them.

    Lifecycle: ``ProcessIO(...)`` creates the pipes; ``child`` is handed to
    runc; ``started()`` closes the child's ends in the shim and hands every
    other fd to a copier thread; ``close_stdin()`` ends stdin; ``close()``
    stops the copiers. Guarded by ``_lock``: ``_fds`` (what the shim itself
    still owns), the closed flags and the count of running copiers, whose last
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
        self._outputs: list[tuple[int, int]] = []  # (pipe read end, destination)
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
            dests = []
            for path in (stdout, stderr):
                fd = _open_output(path)
                self._fds.append(fd)
                dests.append(fd)
            child_in = None
            if stdin:
                child_in, self._stdin_w = os.pipe()
                self._fds += [child_in, self._stdin_w]
            out_r, out_w = os.pipe()
            self._fds += [out_r, out_w]
            err_r, err_w = os.pipe()
            self._fds += [err_r, err_w]
            self._outputs = [(out_r, dests[0]), (err_r, dests[1])]
            self.child = Stdio(child_in, out_w, err_w)
        except BaseException:
            self.close()
            raise

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
            for src, dst in self._outputs:
                fut: asyncio.Future[None] = loop.create_future()
                self._output_done.append(fut)
                jobs.append((self._copy_output, (src, dst, loop, fut)))
                self._fds.remove(src)
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
        self, src: int, dst: int, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]
    ) -> None:
        try:
            _copy(src, dst, self._stop, buffered=self._buffered_output)
        finally:
            self._copier_done(src, dst)
            with contextlib.suppress(RuntimeError):  # loop already closed at exit
                loop.call_soon_threadsafe(_resolve, fut)

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
            self._dest = _open_output(stdout)
            self._fds.append(self._dest)
        except BaseException:
            self.close()
            raise

    def attach(self, master: int) -> None:
        """Take the pty master runc sent (the shim owns it from now on)."""
        with self._lock:
            self._fds.append(master)
            self._outputs = [(master, self._dest)]
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
