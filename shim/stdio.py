"""A process's stdio: anonymous pipes the shim owns, copied to and from containerd's FIFOs.

CRIU can only checkpoint a container whose stdio are pipes it may treat as
external, so containers never get containerd's FIFOs (or files) directly.
Each stream is copied by a small daemon thread with ``os.splice`` (the data
never enters Python); a thread per stream keeps the event loop free of
blocking FIFO opens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import stat
import threading
from urllib.parse import urlparse

from runtime.errors import InvalidArgument
from runtime.proc import Stdio

log = logging.getLogger("stasis.stdio")

_CHUNK = 1 << 20


def _open_output(path: str) -> int:
    """Open where a container's output goes: a FIFO, a ``file://`` URI or a plain file."""
    if not path:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    if "://" in path:
        url = urlparse(path)
        if url.scheme != "file":
            raise InvalidArgument(f"unsupported stdio URI scheme {url.scheme!r} in {path!r}")
        path = url.path
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


def _pump(src: int, dst: int) -> int:
    """Move bytes from ``src`` (a pipe) to ``dst`` until EOF; returns the fd written last.

    On a write error (the reader went away for good) it keeps draining into
    /dev/null, so the container never blocks on a full pipe.
    """
    while True:
        try:
            n = os.splice(src, dst, _CHUNK)
        except OSError as e:
            log.debug("stdio copy to fd %d stopped: %s; draining", dst, e)
            try:
                os.read(src, _CHUNK)  # the failed chunk, if any, is dropped
            except OSError:
                return dst
            dst = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            continue
        if n == 0:
            return dst


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class ProcessIO:
    """The three pipes of one container process and the threads that copy them.

    Lifecycle: ``ProcessIO(...)`` creates the pipes; ``child`` is handed to
    runc; ``started()`` closes the child's ends in the shim and starts
    copying; ``close()`` tears everything down. Guarded by ``_lock``: the fd
    fields, which copier threads and RPC handlers both touch.
    """

    def __init__(self, stdin: str, stdout: str, stderr: str) -> None:
        self.paths = (stdin, stdout, stderr)
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self._stdin_w = -1
        self._stdin_wake = -1
        self._stdin_thread: threading.Thread | None = None
        self._stdin_closed = False
        self._outputs: list[tuple[int, int]] = []  # (pipe read end, destination)
        self._copiers: list[threading.Thread] = []
        self._output_done: list[asyncio.Future[None]] = []
        try:
            # Open destinations first: a bad path fails before any process exists.
            dests = [_open_output(stdout), _open_output(stderr)]
            self._fds += dests
            child_in = None
            if stdin:
                child_in, self._stdin_w = os.pipe()
                self._stdin_wake = os.eventfd(0, os.EFD_CLOEXEC)
                self._fds += [child_in]
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            self._fds += [out_w, err_w]
            self._outputs = [(out_r, dests[0]), (err_r, dests[1])]
            self.child = Stdio(child_in, out_w, err_w)
        except BaseException:
            self._close_all()
            raise

    def started(self, loop: asyncio.AbstractEventLoop) -> None:
        """The child holds its ends now: close ours and start copying."""
        for fd in (self.child.stdin, self.child.stdout, self.child.stderr):
            if fd is not None:
                self._discard(fd)
        for src, dst in self._outputs:
            fut: asyncio.Future[None] = loop.create_future()
            self._output_done.append(fut)
            t = threading.Thread(target=self._copy_output, args=(src, dst, loop, fut), daemon=True)
            self._copiers.append(t)
            t.start()
        if self._stdin_w >= 0:
            self._stdin_thread = threading.Thread(target=self._copy_stdin, daemon=True)
            self._stdin_thread.start()

    def _discard(self, fd: int) -> None:
        with self._lock:
            if fd in self._fds:
                self._fds.remove(fd)
                os.close(fd)

    def _copy_output(
        self, src: int, dst: int, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]
    ) -> None:
        last = dst
        try:
            last = _pump(src, dst)
        finally:
            os.close(src)
            if last != dst:
                os.close(last)
            self._discard(dst)
            with contextlib.suppress(RuntimeError):  # loop already closed at exit
                loop.call_soon_threadsafe(_resolve, fut)

    def _copy_stdin(self) -> None:
        # This thread owns the pipe's write end once started: only it closes
        # it, so the fd number can never be reused under a running splice.
        path, dst, wake = self.paths[0], self._stdin_w, self._stdin_wake
        src = -1
        try:
            # Blocks until containerd's client opens the FIFO for writing
            # (close_stdin opens it once itself to release this).
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            os.set_blocking(src, False)
            poller = select.poll()
            poller.register(src, select.POLLIN)
            poller.register(wake, select.POLLIN)
            while True:
                events = dict(poller.poll())
                if wake in events:
                    return
                try:
                    data = os.read(src, _CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    return
                os.write(dst, data)
        except OSError as e:
            log.debug("stdin copy from %s stopped: %s", path, e)
        finally:
            with self._lock:
                # From here close_stdin() must not touch the fds closed below.
                self._stdin_closed = True
                for fd in (src, dst, wake):
                    if fd >= 0:
                        os.close(fd)

    def close_stdin(self) -> None:
        """Close the container's stdin (CloseIO): it reads EOF."""
        with self._lock:
            if self._stdin_closed:
                return
            self._stdin_closed = True
            if self._stdin_thread is not None:
                os.eventfd_write(self._stdin_wake, 1)
                # A copier still blocked in open() returns once a writer appears.
                with contextlib.suppress(OSError):
                    os.close(os.open(self.paths[0], os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
            elif self._stdin_w >= 0:
                os.close(self._stdin_w)
                os.close(self._stdin_wake)

    async def wait_output(self, timeout: float) -> bool:
        """Wait until stdout and stderr reached EOF; False on timeout."""
        if not self._output_done:
            return True
        _, pending = await asyncio.wait(self._output_done, timeout=timeout)
        return not pending

    def close(self) -> None:
        """Close stdin and every fd the shim still holds for this process."""
        self.close_stdin()
        self._close_all()

    def _close_all(self) -> None:
        self.close_stdin()
        with self._lock:
            fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if not self._copiers:
            for src, _ in self._outputs:
                with contextlib.suppress(OSError):
                    os.close(src)
            self._outputs = []
