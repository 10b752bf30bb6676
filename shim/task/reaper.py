"""The shim's child reaper: it is a subreaper and collects every exit exactly once.

Container inits are re-parented to the shim when ``runc create`` exits, and
runc commands are the shim's own children; both are reaped here with
``waitpid(-1)`` on SIGCHLD. A PID is either waited for through a future
(``watch`` / ``run``) or its exit is kept briefly as *unclaimed*, because an
init can exit before the shim has read its PID from runc's pid file.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

from runtime.linux.proc import Completed, StartFn, Stdio, exit_code, run_with

log = logging.getLogger("stasis.reaper")

_PR_SET_CHILD_SUBREAPER = 36
_UNCLAIMED_MAX = 1024


def set_subreaper() -> None:
    """Make orphaned descendants (container inits) children of this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class Reaper:
    """Reaps children on SIGCHLD and hands each exit to whoever waits for it.

    All state is touched only from the event loop thread (the signal handler
    runs there through ``loop.add_signal_handler``), so no lock is needed.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[int, asyncio.Future[int]] = {}
        # pid -> (exit code, monotonic time); bounded, oldest dropped first.
        self._unclaimed: OrderedDict[int, tuple[int, float]] = OrderedDict()
        self.on_unclaimed: Callable[[int, int], None] | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start reaping on ``loop`` (call once, from the loop's thread)."""
        self._loop = loop
        loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # children that exited before the handler existed

    def uninstall(self) -> None:
        """Stop handling SIGCHLD."""
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def reap(self) -> None:
        """Collect every exited child now."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._exited(pid, exit_code(status))

    def _exited(self, pid: int, code: int) -> None:
        fut = self._waiters.pop(pid, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(code)
            return
        self._unclaimed[pid] = (code, time.monotonic())
        while len(self._unclaimed) > _UNCLAIMED_MAX:
            self._unclaimed.popitem(last=False)
        if self.on_unclaimed is not None:
            self.on_unclaimed(pid, code)

    def watch(self, pid: int) -> asyncio.Future[int]:
        """A future of ``pid``'s exit code; resolves at once if it already exited."""
        assert self._loop is not None, "reaper not installed"
        fut: asyncio.Future[int] = self._loop.create_future()
        early = self._unclaimed.pop(pid, None)
        if early is not None:
            fut.set_result(early[0])
        else:
            self._waiters[pid] = fut
        return fut

    def forget(self, pid: int) -> None:
        """Stop waiting for ``pid`` (its exit will count as unclaimed)."""
        self._waiters.pop(pid, None)

    def _start(self, start: StartFn) -> tuple[int, asyncio.Future[int]]:
        # Spawn and register without yielding to the loop, so SIGCHLD
        # processing cannot run between the two and lose the exit.
        pid = start()
        return pid, self.watch(pid)

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdio: Stdio = Stdio(),
        capture: bool = False,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        started: Callable[[int], None] | None = None,
    ) -> Completed:
        """Run a command to completion (the ``Spawner`` contract)."""
        return await run_with(
            self._start, argv, stdio=stdio, capture=capture, input=input, env=env, started=started
        )
