"""Container processes and their state machine.

Like containerd's runc shim, every state is its own class (``_Created``,
``_Running``, ``_Paused``, ``_Stopped``, ``_Deleted``); a process's public
methods take its lock and delegate to the current state, and only the
transitions listed in ``_ALLOWED`` can happen. The init process and exec
processes share the states and differ in the hooks the states call
(``_do_start``, ``_do_kill``, ...). A restore is a state of its own
(``created-from-checkpoint``, owning a ``RestoreJob``), not a flag; while
``runc restore`` runs (``_Restoring``) the process lock is free, so that a kill
or a delete ends a restore that hangs instead of waiting for it. A checkpoint
(freeze, dump, thaw) is a state too (``_Checkpointing``): Kill goes through,
Start and Delete are refused, Pause, Resume, Update, Exec and another checkpoint
wait for it to end; it ends with the container as it found it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar

from runtime.errors import FailedPrecondition, InvalidArgument, NotFound, StasisError
from runtime.linux import cgroups, netns
from runtime.linux.criu import criu_failure
from runtime.linux.proc import Stdio, ns_pid
from runtime.linux.runc import CheckpointOpts, CreateOpts, ExecOpts, RestoreOpts, Runc, RuncError
from shim.task.console import with_console
from shim.task.restoring import Outcome, RestoreJob, RestoreRun

if TYPE_CHECKING:
    from shim.task.stdio import ProcessIO

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

    def __init__(self, proc: Process) -> None:
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
        await self.p._do_start()
        # A fast process may have exited (and moved to stopped) meanwhile.
        if self.p._state is self:
            self.p._transition(_Running)

    async def kill(self, sig: int, all: bool) -> None:
        await self.p._do_kill_created(sig, all)

    async def delete(self) -> None:
        await self.p._destroy()


class _CreatedCheckpoint(_State):
    """Created from a checkpoint: nothing runs until Start restores it."""

    status = Status.CREATED

    async def start(self) -> None:
        self.p._transition(_Restoring)
        restoring = self.p._state
        try:
            await self.p._do_restore()
        except BaseException:
            if self.p._state is restoring:  # failed on its own: deletable, as before
                # A step after runc restore (adopting execs, GPU state, loopback) may
                # have failed with the restored tree running: a failed Start leaves
                # nothing running; its exit then moves this process to stopped.
                await self.p._kill_restored()
            if self.p._state is restoring:  # (its exit may have come meanwhile)
                self.p._transition(_CreatedCheckpoint)
            raise
        if self.p._state is restoring:  # not killed, deleted or exited meanwhile
            self.p._transition(_Running)

    async def kill(self, sig: int, all: bool) -> None:
        if not self.p.pid:
            raise self._refuse("kill")  # nothing restored, nothing runs
        await self.p._do_kill(sig, all)

    async def delete(self) -> None:
        await self.p._destroy()


class _Restoring(_State):
    """``runc restore`` runs, without the process lock (see ``InitProcess._do_restore``):
    a kill or a delete ends it at once rather than wait for a CRIU that may hang."""

    status = Status.CREATED

    async def kill(self, sig: int, all: bool) -> None:
        outcome = await self.p._abort_restore(f"killed (signal {sig})")
        if outcome is Outcome.RESTORED:  # it ran already: an ordinary kill
            await self.p._do_kill(sig, all)
        elif outcome is Outcome.ABORTED:
            # Like a created container killed before it started: it ends (SIGKILL).
            self.p._lost_exit(128 + signal.SIGKILL)
        else:
            raise FailedPrecondition(
                f"cannot kill process {self.p.describe()}: its restore failed; delete it"
            )

    async def delete(self) -> None:
        await self.p._abort_restore("deleted")
        await self.p._destroy()


class _Running(_State):
    status = Status.RUNNING

    async def kill(self, sig: int, all: bool) -> None:
        await self.p._do_kill(sig, all)

    async def pause(self) -> None:
        await self.p._do_pause()
        if self.p._state is self:  # not if it exited meanwhile
            self.p._transition(_Paused)


class _Paused(_State):
    status = Status.PAUSED

    async def kill(self, sig: int, all: bool) -> None:
        await self.p._do_kill(sig, all)

    async def resume(self) -> None:
        await self.p._do_resume()
        if self.p._state is self:  # not if it exited meanwhile
            self.p._transition(_Running)


class _Checkpointing(_State):
    """A checkpoint runs (``InitProcess.checkpointing``), without the process lock:
    Kill still ends the container; Pause, Resume and another checkpoint wait for it
    (``Process._settle``); Start and Delete are refused, naming the checkpoint."""

    status = Status.RUNNING  # as the process reports it: see Process.status

    def __init__(self, proc: Process) -> None:
        super().__init__(proc)
        self.before = proc._state  # (still the state it leaves: see _transition)

    def _refuse(self, op: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"cannot {op} process {self.p.describe()}: a checkpoint of it is in progress"
        )

    async def kill(self, sig: int, all: bool) -> None:
        await self.p._do_kill(sig, all)


class _Stopped(_State):
    status = Status.STOPPED

    async def kill(self, sig: int, all: bool) -> None:
        await self.p._kill_stopped(sig, all)

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
    _CreatedCheckpoint: frozenset({_Restoring, _Stopped, _Deleted}),
    _Restoring: frozenset({_Running, _CreatedCheckpoint, _Stopped, _Deleted}),
    _Running: frozenset({_Paused, _Checkpointing, _Stopped}),
    _Paused: frozenset({_Running, _Checkpointing, _Stopped}),
    _Checkpointing: frozenset({_Running, _Paused, _Stopped}),
    _Stopped: frozenset({_Deleted}),
    _Deleted: frozenset(),
}


class Process:
    """What init and exec processes share: identity, stdio, exit and the state machine.

    Invariant: ``_state`` changes only through ``_transition`` and, apart from
    ``exited`` (called from the reaper on the loop thread) and the end of a
    checkpoint (no lock holder changes a checkpointing process's state), only
    while ``_lock`` is held. ``_settled`` is clear exactly while a checkpoint runs.
    """

    def __init__(
        self,
        container_id: str,
        id: str,
        bundle: str,
        runc: Runc,
        io: ProcessIO,
        paths: tuple[str, str, str],
        terminal: bool = False,
    ) -> None:
        self.container_id = container_id
        self.id = id  # exec id; empty for init
        self.bundle = bundle
        self.runc = runc
        self.io = io
        self.stdio_paths = paths
        self.terminal = terminal
        self.pid = 0
        self._exit: Exit | None = None
        self._exited = asyncio.Event()
        self._lock = asyncio.Lock()
        self._settled = asyncio.Event()
        self._settled.set()
        self._frozen = False  # frozen by the running checkpoint
        self._state: _State = _Created(self)

    def describe(self) -> str:
        """How errors name this process."""
        return self.container_id if not self.id else f"{self.container_id}/{self.id}"

    @property
    def status(self) -> Status:
        """The current state, as containerd names it (a checkpoint's: paused while
        it holds the container frozen, else what it was before)."""
        if isinstance(self._state, _Checkpointing):
            return Status.PAUSED if self._frozen else self._state.before.status
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

    async def start(self) -> None:
        """Start the process."""
        async with self._lock:
            await self._state.start()

    async def kill(self, sig: int = signal.SIGTERM, all: bool = False) -> None:
        """Send ``sig`` to the process (for init with ``all``: to every process)."""
        async with self._lock:
            await self._state.kill(sig, all)

    async def pause(self) -> None:
        """Freeze the container (init only); waits for a checkpoint in progress."""
        async with self._lock:
            await self._settle()
            await self._state.pause()

    async def resume(self) -> None:
        """Thaw the container (init only); waits for a checkpoint in progress."""
        async with self._lock:
            await self._settle()
            await self._state.resume()

    async def delete(self) -> None:
        """Forget the process once it is created or stopped."""
        async with self._lock:
            await self._state.delete()

    async def settled(self) -> None:
        """Return once no checkpoint of this process runs (what Exec and Update
        wait for, as containerd's runc shim makes them wait on the init's lock)."""
        await self._settled.wait()

    async def _settle(self) -> None:
        """With ``_lock`` held: wait, the lock free meanwhile, until no checkpoint runs."""
        while not self._settled.is_set():
            async with self._unlocked():
                await self._settled.wait()

    @contextlib.asynccontextmanager
    async def _unlocked(self) -> AsyncIterator[None]:
        """Free ``_lock`` (held by the caller) for the body: for waits that other
        requests must be able to interrupt. The lock is held again afterwards, even
        when the body is cancelled (as ``asyncio.Condition.wait`` does)."""
        self._lock.release()
        try:
            yield
        finally:
            cancelled = False
            while True:
                try:
                    await self._lock.acquire()
                    break
                except asyncio.CancelledError:
                    cancelled = True
            if cancelled:
                raise asyncio.CancelledError

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

    def resize(self, width: int, height: int) -> None:
        """Resize the process's terminal."""
        resize = getattr(self.io, "resize", None)
        if not self.terminal or resize is None:
            raise FailedPrecondition(f"process {self.describe()} has no terminal")
        resize(width, height)

    async def _drain_and_close_io(self) -> None:
        # Output may still be in flight in the pipes: let it drain first, as
        # the runc shim does, so a client reading the FIFOs sees everything.
        if not await self.io.wait_output(timeout=2.0):
            log.warning("output of %s still open after its exit", self.describe())
        self.io.close()

    # Hooks the states call; each process kind fills in its own.
    async def _do_start(self) -> None:
        raise NotImplementedError

    async def _do_kill(self, sig: int, all: bool) -> None:
        raise NotImplementedError

    async def _do_kill_created(self, sig: int, all: bool) -> None:
        await self._do_kill(sig, all)

    async def _kill_stopped(self, sig: int, all: bool) -> None:
        raise NotFound(f"process {self.describe()} already finished")

    async def _do_restore(self) -> None:
        raise FailedPrecondition(f"cannot restore exec process {self.describe()}")

    async def _kill_restored(self) -> None:
        pass  # only an init is restored

    async def _abort_restore(self, why: str) -> Outcome:
        raise FailedPrecondition(f"exec process {self.describe()} has no restore")

    def _lost_exit(self, status: int) -> None:
        self.exited(status)

    async def _do_pause(self) -> None:
        raise FailedPrecondition(f"cannot pause exec process {self.describe()}")

    async def _do_resume(self) -> None:
        raise FailedPrecondition(f"cannot resume exec process {self.describe()}")

    async def _destroy(self) -> None:
        await self._drain_and_close_io()
        self._transition(_Deleted)


class InitProcess(Process):
    """A container's init process, driven through runc."""

    def __init__(
        self,
        container_id: str,
        bundle: str,
        runc: Runc,
        io: ProcessIO,
        paths: tuple[str, str, str],
        terminal: bool = False,
    ) -> None:
        super().__init__(container_id, "", bundle, runc, io, paths, terminal)
        self._restore: RestoreOpts | None = None
        self._restore_timeout = 0.0
        self._restore_source = ""
        self._run: RestoreRun | None = None  # the last restore (state _Restoring: this one)
        self._job: RestoreJob | None = None
        self.cgroups_path = ""  # set by the container: its spec's linux.cgroupsPath
        # Set by the container: called once a restore has returned, with the PID known.
        self.on_restored: Callable[[InitProcess], None] | None = None
        # Set by the container: called with an exit the reaper cannot see (a restore
        # killed before anything was restored).
        self.on_lost_exit: Callable[[InitProcess, Exit], None] | None = None

    def prepare_restore(
        self,
        opts: RestoreOpts,
        *,
        timeout: float,
        source: str = "",
        job: RestoreJob | None = None,
    ) -> None:
        """Make Start restore from a checkpoint instead of starting a created container;
        ``runc restore`` gets ``timeout`` seconds, then ``job`` its part. ``source``
        names the checkpoint in errors (default: the job's, else its images' directory)."""
        self._restore = opts
        self._restore_timeout = timeout
        self._job = job
        self._restore_source = source or (job.ref if job else "") or opts.criu.image_path
        self._state = _CreatedCheckpoint(self)

    async def _do_restore(self) -> None:
        opts = self._restore
        assert opts is not None
        what = f"restore of {self.container_id} from checkpoint {self._restore_source!r}"
        run = self._run = RestoreRun(
            self.container_id,
            what=what,
            runc_root=self.runc.root,
            cgroups_path=self.cgroups_path,
            work_path=opts.criu.work_path,
            timeout=self._restore_timeout,
        )
        try:
            # Unlocked: a kill or a delete meanwhile ends the restore (_Restoring).
            async with self._unlocked():
                await run.run(self._runc_restore(opts, run.started))
        except RuncError as e:
            raise criu_failure(what, e, opts.criu.work_path, "restore.log") from e
        with open(opts.pid_file, encoding="ascii") as f:
            self.pid = int(f.read().strip())
        if self.on_restored is not None:
            self.on_restored(self)
        if self._job is not None:
            await self._job.restored(self.pid)
        if netns.owns_netns(self.bundle):
            await netns.ensure_loopback(self.runc.spawner, self.pid)

    async def _kill_restored(self) -> None:
        """SIGKILL whatever a failed restore left of the container (no error if nothing)."""
        try:
            await self.runc.kill(self.container_id, signal.SIGKILL, all=True)
        except StasisError as e:
            log.debug("after the failed restore of %s: %s", self.container_id, e)
            if self.pid:
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGKILL)
        else:
            log.warning("restore of %s failed after runc restore: killed it", self.container_id)

    def _runc_restore(self, opts: RestoreOpts, started: Callable[[int], None]) -> Awaitable[None]:
        if not self.terminal:
            return self.runc.restore(
                self.container_id, self.bundle, opts, self.io.child, started=started
            )
        return with_console(
            self.io,  # type: ignore[arg-type]
            lambda path: self.runc.restore(
                self.container_id,
                self.bundle,
                replace(opts, console_socket=path),
                self.io.child,
                started=started,
            ),
        )

    async def _abort_restore(self, why: str) -> Outcome:
        run = self._run
        assert run is not None, "only a restoring process aborts its restore"
        return await run.abort(why)

    def _lost_exit(self, status: int) -> None:
        e = self.exited(status)
        if self.on_lost_exit is not None:
            self.on_lost_exit(self, e)

    @contextlib.asynccontextmanager
    async def checkpointing(self) -> AsyncIterator[Checkpoint]:
        """Hold the container in the checkpointing state for the body, which freezes,
        dumps and thaws it through the ``Checkpoint`` it gets. Waits for a checkpoint
        in progress; FailedPrecondition unless running or paused. However the body
        ends, the container is thawed if the checkpoint froze it, and goes back to
        the state it was in (stopped, if it exited meanwhile)."""
        async with self._lock:
            await self._settle()
            if not isinstance(self._state, (_Running, _Paused)):
                raise self._state._refuse("checkpoint")
            self._transition(_Checkpointing)
            ours = self._state
            assert isinstance(ours, _Checkpointing)
            self._settled.clear()
        try:
            yield Checkpoint(self, paused=isinstance(ours.before, _Paused))
        finally:
            try:
                if self._frozen and self._exit is None:
                    await self._do_resume()
            finally:
                self._frozen = False
                if self._state is ours:
                    self._transition(type(ours.before))
                self._settled.set()

    async def _dump(self, opts: CheckpointOpts) -> None:
        own_work = not opts.work_path
        if own_work:  # kept only when the dump fails (its dump.log is named in the error)
            opts = replace(opts, work_path=os.path.join(self.bundle, "criu-work"))
        os.makedirs(opts.work_path, mode=0o700, exist_ok=True)
        os.makedirs(opts.image_path, mode=0o700, exist_ok=True)
        try:
            await self.runc.checkpoint(self.container_id, opts)
        except RuncError as e:
            raise criu_failure(
                f"checkpoint of {self.container_id}", e, opts.work_path, "dump.log"
            ) from e
        if not opts.leave_running:
            self._frozen = False  # runc removed the container with its cgroup
        if own_work:
            shutil.rmtree(opts.work_path, ignore_errors=True)

    async def create(self, opts: CreateOpts) -> None:
        """``runc create`` with the process's pipes as stdio; reads the init PID."""
        if self.terminal:
            await with_console(
                self.io,  # type: ignore[arg-type]
                lambda path: self.runc.create(
                    self.container_id,
                    self.bundle,
                    replace(opts, console_socket=path),
                    self.io.child,
                ),
            )
        else:
            await self.runc.create(self.container_id, self.bundle, opts, self.io.child)
        with open(opts.pid_file, encoding="ascii") as f:
            self.pid = int(f.read().strip())

    async def _do_start(self) -> None:
        await self.runc.start(self.container_id)

    async def _do_kill(self, sig: int, all: bool) -> None:
        await self.runc.kill(self.container_id, sig, all=all)

    async def _kill_stopped(self, sig: int, all: bool) -> None:
        # As the runc shim does: runc kill --all still reaches what the init left
        # in a PID namespace it shared (runc answers NotFound for the init alone).
        await self.runc.kill(self.container_id, sig, all=all)

    async def _do_pause(self) -> None:
        if await self._freeze_directly():
            return
        # The cgroup v1 freezer can give up on a busy machine (processes stuck in
        # uninterruptible sleep): runc then says "unable to freeze" and leaves the
        # container thawed. Try again a few times before failing.
        for attempt in range(_FREEZE_ATTEMPTS):
            try:
                await self.runc.pause(self.container_id)
                return
            except RuncError as e:
                if "unable to freeze" not in e.detail or attempt + 1 == _FREEZE_ATTEMPTS:
                    raise
                log.warning("freezing %s: %s; trying again", self.container_id, e.detail)
                with contextlib.suppress(StasisError):
                    await self.runc.resume(self.container_id)
                await asyncio.sleep(0.2 * (attempt + 1))

    async def _do_resume(self) -> None:
        freezer = self._freezer()
        if freezer is not None:
            try:
                freezer.thaw()
                return
            except OSError as e:
                log.info("thawing %s directly: %s; runc resume does it", self.container_id, e)
        await self.runc.resume(self.container_id)

    def _freezer(self) -> cgroups.Freezer | None:
        if not self.cgroups_path or not self.pid:
            return None
        return cgroups.Freezer.of(self.pid, self.cgroups_path)

    async def _freeze_directly(self) -> bool:
        """Freeze the container's cgroup as ``runc pause`` does, without its process
        (~10-20 ms less, all of it inside a checkpoint's frozen time). False when
        that cannot be done here: runc then does it, or says why it cannot."""
        freezer = self._freezer()
        if freezer is None:
            return False
        deadline = time.monotonic() + _DIRECT_FREEZE_WAIT
        delay = 0.0002
        try:
            while not freezer.freeze_step():
                if time.monotonic() >= deadline:
                    freezer.thaw()
                    log.info("freezing %s took over %.1fs; runc tries", self.container_id,
                             _DIRECT_FREEZE_WAIT)  # fmt: skip
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.01)
        except OSError as e:
            with contextlib.suppress(OSError):
                freezer.thaw()
            log.info("freezing %s directly: %s; runc pause tries", self.container_id, e)
            return False
        return True

    async def _destroy(self) -> None:
        await self._drain_and_close_io()
        with contextlib.suppress(NotFound):  # already gone from runc: idempotent
            await self.runc.delete(self.container_id, force=self._exit is None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.bundle, "init.pid"))
        self._transition(_Deleted)


class Checkpoint:
    """What a checkpoint does to its container, while ``InitProcess.checkpointing``
    holds it in the checkpointing state."""

    def __init__(self, init: InitProcess, *, paused: bool) -> None:
        self._init = init
        self.paused = paused  # paused before the checkpoint: frozen throughout

    async def freeze(self) -> None:
        """Freeze a running container (a paused one is frozen already)."""
        if not self.paused and not self._init._frozen:
            await self._init._do_pause()
            self._init._frozen = True

    async def thaw(self) -> None:
        """Thaw what ``freeze`` froze (a paused container stays paused)."""
        if self._init._frozen:
            self._init._frozen = False
            if self._init.exit is None:
                await self._init._do_resume()

    async def dump(self, opts: CheckpointOpts) -> None:
        """``runc checkpoint`` into ``opts.image_path``; without ``work_path`` CRIU
        works in ``<bundle>/criu-work``, kept only when the dump fails."""
        await self._init._dump(opts)


class ExecProcess(Process):
    """An extra process in a running container (``runc exec --detach``).

    With a ``shepherd`` (``shim/bootstrap/shepherd.c``) and no terminal, runc execs the
    shepherd, which forks the command: ``pid`` is the command's PID, and the
    shepherd's exit carries the command's status. ``detach`` (before a
    checkpoint) makes the shepherd exit so that the kernel hands the command to
    the container's init, into the process tree CRIU dumps; from then on the
    process is *adopted*: its exit is seen through a pidfd (``adopted`` True).
    """

    def __init__(
        self,
        container_id: str,
        id: str,
        bundle: str,
        runc: Runc,
        io: ProcessIO,
        paths: tuple[str, str, str],
        spec: dict[str, Any],
        terminal: bool = False,
        shepherd: str | None = None,
    ) -> None:
        super().__init__(container_id, id, bundle, runc, io, paths, terminal)
        self.spec = spec
        self._spec_path = os.path.join(bundle, f".exec-{id}.json")
        self._pid_path = os.path.join(bundle, f".exec-{id}.pid")
        # Set by the container: called with the process once its PID is known.
        self.on_pid: Callable[[ExecProcess], None] | None = None
        self.shepherd = None if terminal else shepherd
        self.shepherd_pid = 0  # the shepherd's PID, whose exit is the exec's while shepherded
        self.pidfd = -1  # the command's pidfd, once known
        self.adopted = False
        self.reaped: asyncio.Future[int] | None = None  # wait_pid's exit, from the reaper
        self._ctl: socket.socket | None = None

    @classmethod
    def adopt(
        cls, container_id: str, id: str, bundle: str, runc: Runc, io: ProcessIO, pid: int
    ) -> ExecProcess:
        """An exec process that already runs as a child of the container's init
        (restored from a checkpoint); its stdio is not connected."""
        proc = cls(container_id, id, bundle, runc, io, ("", "", ""), {})
        proc.pid = pid
        proc.pidfd = os.pidfd_open(pid)
        proc.adopted = True
        proc._state = _Running(proc)
        return proc

    @property
    def wait_pid(self) -> int:
        """The PID whose exit (reaped by the shim) ends this exec."""
        return self.shepherd_pid or self.pid

    async def _do_start(self) -> None:
        if self.shepherd is not None:
            await self._start_shepherded(self.shepherd)
        else:
            await self._start_plain()
        if self.on_pid is not None:
            self.on_pid(self)

    async def _start_plain(self) -> None:
        try:
            await self._runc_exec(self.spec, self.io.child, 0)
            self.pid = self._read_pid()
        finally:
            self._remove_files()

    async def _start_shepherded(self, shepherd: str) -> None:
        args = list(self.spec.get("args") or [])
        if not args:
            raise InvalidArgument(f"exec {self.describe()} has no args")
        spec = {**self.spec, "args": ["/proc/self/fd/3", "4", "--", *args]}
        binary = os.open(shepherd, os.O_RDONLY | os.O_CLOEXEC)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                await self._runc_exec(
                    spec, replace(self.io.child, extra=(binary, theirs.fileno())), 2
                )
                self.shepherd_pid = self._read_pid()
            finally:
                self._remove_files()
                os.close(binary)
                theirs.close()
            reply = await _read_line(ours, _SHEPHERD_TIMEOUT)
        except BaseException:
            ours.close()
            raise
        if not reply.startswith("ok"):
            ours.close()
            raise RuncError("exec", 1, _exec_failure(args[0], reply))
        self._ctl = ours
        self.pid = _only_child(self.shepherd_pid) or self.shepherd_pid
        with contextlib.suppress(OSError):
            self.pidfd = os.pidfd_open(self.pid)

    async def _runc_exec(self, spec: dict[str, Any], stdio: Stdio, preserve: int) -> None:
        with open(self._spec_path, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        if self.terminal:
            await with_console(
                self.io,  # type: ignore[arg-type]
                lambda path: self.runc.exec(
                    self.container_id, ExecOpts(self._spec_path, self._pid_path, path), stdio
                ),
            )
        else:
            await self.runc.exec(
                self.container_id,
                ExecOpts(self._spec_path, self._pid_path, preserve_fds=preserve),
                stdio,
            )

    def _read_pid(self) -> int:
        with open(self._pid_path, encoding="ascii") as f:
            return int(f.read().strip())

    def _remove_files(self) -> None:
        for path in (self._spec_path, self._pid_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def detachable(self) -> bool:
        """Whether ``detach`` can hand this running exec to the container's init."""
        return (
            self._ctl is not None
            and not self.adopted
            and self.exit is None
            and self.pid != self.shepherd_pid
        )

    def begin_detach(self) -> None:
        """Tell the shepherd to exit and leave the command to the container's init;
        from now on the shepherd's exit is not this exec's (``adopted``)."""
        assert self._ctl is not None
        self.adopted = True
        self._ctl.send(b"d")

    def close_control(self) -> None:
        """Close the shepherd's control socket (the shepherd goes on shepherding)."""
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None

    def ns_pid(self) -> int:
        """The command's PID inside the container's pid namespace (0 if unknown)."""
        return ns_pid(self.pid)

    async def _do_kill_created(self, sig: int, all: bool) -> None:
        raise FailedPrecondition(f"exec {self.describe()} is not started")

    async def _do_kill(self, sig: int, all: bool) -> None:
        try:
            if self.pidfd >= 0:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError as e:
            raise NotFound(f"process {self.describe()} already finished") from e

    async def _destroy(self) -> None:
        await super()._destroy()
        self.close_control()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


_SHEPHERD_TIMEOUT = 30.0
_FREEZE_ATTEMPTS = 4
_DIRECT_FREEZE_WAIT = 1.0  # seconds before a direct freeze gives way to runc pause


async def _read_line(sock: socket.socket, timeout: float) -> str:
    """One line from the shepherd's control socket ("" at EOF)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    data = b""

    async def read() -> bytes:
        nonlocal data
        while b"\n" not in data:
            chunk = await loop.sock_recv(sock, 64)
            if not chunk:
                break
            data += chunk
        return data

    try:
        await asyncio.wait_for(read(), timeout)
    except TimeoutError:
        return ""
    return data.decode("ascii", "replace").partition("\n")[0]


def _exec_failure(arg0: str, reply: str) -> str:
    """runc's wording for a command the container cannot execute."""
    head = "exec failed: unable to start container process: exec: "
    code = reply.split()[1] if reply.startswith("err ") and len(reply.split()) > 1 else ""
    if not code.isdigit():
        return f"{head}{json.dumps(arg0)}: the exec shepherd ended before it ran the command"
    err = int(code)
    if err == errno.ENOENT and "/" not in arg0:
        return f"{head}{json.dumps(arg0)}: executable file not found in $PATH"
    return f"{head}{json.dumps(arg0)}: {os.strerror(err).lower()}"


def _only_child(pid: int) -> int:
    """The single child of ``pid`` (its command), 0 when it has none (already gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            children = f.read().split()
    except OSError:
        return 0
    return int(children[0]) if len(children) == 1 else 0
