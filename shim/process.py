"""Container processes and their state machine.

Like containerd's runc shim, every state is its own class (``_Created``,
``_Running``, ``_Paused``, ``_Stopped``, ``_Deleted``); a process's public
methods take its lock and delegate to the current state, and only the
transitions listed in ``_ALLOWED`` can happen. A restore is a state of its own
(``created-from-checkpoint``), added by the checkpoint work, not a flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, ClassVar

from runtime.errors import FailedPrecondition, NotFound
from runtime.runc import CreateOpts, Runc

if TYPE_CHECKING:
    from shim.stdio import ProcessIO

log = logging.getLogger("stasis.process")


class Status(IntEnum):
    """Task status as containerd reports it (containerd.v1.types.Status)."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


@dataclass(frozen=True)
class Exit:
    """How a process ended: exit code (128+N for signal N) and when (ns since the epoch)."""

    status: int
    at_ns: int


class _State:
    """Behaviour of a process in one state; the default refuses everything."""

    status: ClassVar[Status] = Status.UNKNOWN

    def __init__(self, proc: InitProcess) -> None:
        self.p = proc

    def _refuse(self, op: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"cannot {op} process {self.p.describe()} in state {self.status.name.lower()}"
        )

    async def start(self) -> None:
        raise self._refuse("start")

    async def kill(self, sig: int, all: bool) -> None:
        raise self._refuse("kill")

    async def pause(self) -> None:
        raise self._refuse("pause")

    async def resume(self) -> None:
        raise self._refuse("resume")

    async def delete(self) -> None:
        raise self._refuse("delete")

    def exited(self, e: Exit) -> None:
        self.p._exit = e
        self.p._transition(_Stopped)


class _Created(_State):
    status = Status.CREATED

    async def start(self) -> None:
        await self.p.runc.start(self.p.container_id)
        # A fast process may have exited (and moved to stopped) meanwhile.
        if self.p._state is self:
            self.p._transition(_Running)

    async def kill(self, sig: int, all: bool) -> None:
        await self.p.runc.kill(self.p.container_id, sig, all=all)

    async def delete(self) -> None:
        await self.p._destroy()


class _Running(_State):
    status = Status.RUNNING

    async def kill(self, sig: int, all: bool) -> None:
        await self.p.runc.kill(self.p.container_id, sig, all=all)

    async def pause(self) -> None:
        await self.p.runc.pause(self.p.container_id)
        if self.p._state is self:  # not if it exited meanwhile
            self.p._transition(_Paused)


class _Paused(_State):
    status = Status.PAUSED

    async def kill(self, sig: int, all: bool) -> None:
        await self.p.runc.kill(self.p.container_id, sig, all=all)

    async def resume(self) -> None:
        await self.p.runc.resume(self.p.container_id)
        if self.p._state is self:  # not if it exited meanwhile
            self.p._transition(_Running)


class _Stopped(_State):
    status = Status.STOPPED

    async def kill(self, sig: int, all: bool) -> None:
        raise NotFound(f"process {self.p.describe()} already finished")

    async def delete(self) -> None:
        await self.p._destroy()

    def exited(self, e: Exit) -> None:
        pass  # an exit is recorded once


class _Deleted(_State):
    status = Status.STOPPED

    async def kill(self, sig: int, all: bool) -> None:
        raise NotFound(f"process {self.p.describe()} was deleted")

    async def delete(self) -> None:
        raise NotFound(f"process {self.p.describe()} was deleted")

    def exited(self, e: Exit) -> None:
        # A created process deleted (killed) before it ran exits afterwards.
        if self.p._exit is None:
            self.p._exit = e


_ALLOWED: dict[type[_State], frozenset[type[_State]]] = {
    _Created: frozenset({_Running, _Stopped, _Deleted}),
    _Running: frozenset({_Paused, _Stopped}),
    _Paused: frozenset({_Running, _Stopped}),
    _Stopped: frozenset({_Deleted}),
    _Deleted: frozenset(),
}


class InitProcess:
    """A container's init process, driven through runc.

    Invariant: ``_state`` changes only through ``_transition`` and, apart from
    ``exited`` (called from the reaper on the loop thread), only while
    ``_lock`` is held.
    """

    def __init__(
        self,
        container_id: str,
        bundle: str,
        runc: Runc,
        io: ProcessIO,
        paths: tuple[str, str, str],
        terminal: bool = False,
    ) -> None:
        self.container_id = container_id
        self.id = ""  # exec id; empty for init
        self.bundle = bundle
        self.runc = runc
        self.io = io
        self.stdio_paths = paths
        self.terminal = terminal
        self.pid = 0
        self._exit: Exit | None = None
        self._exited = asyncio.Event()
        self._lock = asyncio.Lock()
        self._state: _State = _Created(self)

    def describe(self) -> str:
        """How errors name this process."""
        return self.container_id if not self.id else f"{self.container_id}/{self.id}"

    @property
    def status(self) -> Status:
        """The current state, as containerd names it."""
        return self._state.status

    @property
    def exit(self) -> Exit | None:
        """The exit, once the process ended."""
        return self._exit

    def _transition(self, to: type[_State]) -> None:
        here = type(self._state)
        if to not in _ALLOWED[here]:
            raise FailedPrecondition(
                f"process {self.describe()}: no transition from {here.__name__} to {to.__name__}"
            )
        self._state = to(self)

    async def create(self, opts: CreateOpts) -> None:
        """``runc create`` with the process's pipes as stdio; reads the init PID."""
        await self.runc.create(self.container_id, self.bundle, opts, self.io.child)
        with open(opts.pid_file, encoding="ascii") as f:
            self.pid = int(f.read().strip())

    async def start(self) -> None:
        """Start the user process (``runc start``)."""
        async with self._lock:
            await self._state.start()

    async def kill(self, sig: int = signal.SIGTERM, all: bool = False) -> None:
        """Send ``sig`` to the init (or, with ``all``, to every process)."""
        async with self._lock:
            await self._state.kill(sig, all)

    async def pause(self) -> None:
        """Freeze the container."""
        async with self._lock:
            await self._state.pause()

    async def resume(self) -> None:
        """Thaw the container."""
        async with self._lock:
            await self._state.resume()

    async def delete(self) -> None:
        """Remove the container from runc once it is created or stopped."""
        async with self._lock:
            await self._state.delete()

    def exited(self, status: int) -> Exit:
        """Record the exit (called once by the reaper); returns it."""
        e = Exit(status, time.time_ns())
        self._state.exited(e)
        self._exited.set()
        return self._exit or e

    async def wait(self) -> Exit:
        """Block until the process has exited."""
        await self._exited.wait()
        assert self._exit is not None
        return self._exit

    async def _destroy(self) -> None:
        # Output may still be in flight in the pipes: let it drain first, as
        # the runc shim does, so a client reading the FIFOs sees everything.
        if not await self.io.wait_output(timeout=2.0):
            log.warning("output of %s still open after its exit", self.describe())
        self.io.close()
        with contextlib.suppress(NotFound):  # already gone from runc: idempotent
            await self.runc.delete(self.container_id, force=self._exit is None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.bundle, "init.pid"))
        self._transition(_Deleted)
