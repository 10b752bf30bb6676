"""A container as the shim sees it: its bundle, rootfs mounts and processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.config import DEFAULT_RESTORE_TIMEOUT_S
from runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StasisError,
)
from runtime.linux import cgroups
from runtime.linux import mount as mounts
from runtime.linux.proc import ns_pid
from runtime.linux.procevents import ExitCodes
from runtime.linux.runc import CheckpointOpts, CreateOpts, RestoreOpts, Runc
from shim.task.process import ExecProcess, Exit, InitProcess, Process, Status
from shim.task.reaper import Reaper
from shim.task.restoring import RestoreJob
from shim.task.stdio import ProcessIO, TerminalIO

log = logging.getLogger("stasis.container")

SHEPHERD_NAME = "stasis-exec-shepherd"


def find_shepherd() -> str | None:
    """The exec shepherd next to the shim's interpreter (``python -m
    shim.bootstrap.launcher`` builds it there), or ``$STASIS_EXEC_SHEPHERD`` (empty:
    none); None when there is none, and execs then stay out of checkpoints."""
    path = os.environ.get("STASIS_EXEC_SHEPHERD")
    if path is None:
        path = os.path.join(os.path.dirname(sys.executable), SHEPHERD_NAME)
    return path if path and os.access(path, os.X_OK) else None


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$")


@dataclass(frozen=True)
class RuncOptions:
    """The runc shim's options (containerd.runc.v1.Options) that Stasis honours."""

    root: str = ""
    binary_name: str = ""
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False


@dataclass(frozen=True)
class CreateConfig:
    """A Create request, decoded."""

    id: str
    bundle: str
    rootfs: Sequence[mounts.Mount] = ()
    terminal: bool = False
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    checkpoint: str = ""
    restore_tcp_established: bool = False
    # How long runc restore may run (the config's restore.timeout_seconds), and the
    # checkpoint reference errors name (the images' directory when empty).
    restore_timeout: float = DEFAULT_RESTORE_TIMEOUT_S
    restore_ref: str = ""
    # The bundle's config.json, read once per Create (see read_spec).
    spec: dict[str, Any] = field(default_factory=dict)
    options: RuncOptions = field(default_factory=RuncOptions)


def read_spec(bundle: str) -> dict[str, Any]:
    """The bundle's OCI spec (config.json); InvalidArgument when missing or unreadable."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise InvalidArgument(f"bundle {bundle} has no config.json") from None
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"bundle {bundle}: unreadable config.json: {e}") from e
    if not isinstance(spec, dict):
        raise InvalidArgument(f"bundle {bundle}: config.json is not a JSON object")
    return spec


ExitCallback = Callable[["Container", Process, Exit], None]
OOMCallback = Callable[["Container"], None]


def _new_io(stdin: str, stdout: str, stderr: str, terminal: bool) -> ProcessIO:
    return TerminalIO(stdin, stdout) if terminal else ProcessIO(stdin, stdout, stderr)


class Container:
    """One container: its init process, its exec processes, its rootfs and cgroup watch.

    ``execs`` changes only on the event loop thread, between awaits of the
    service's lifecycle lock.
    """

    def __init__(
        self,
        cfg: CreateConfig,
        runc: Runc,
        init: InitProcess,
        rootfs: str | None,
        reaper: Reaper,
        on_exit: ExitCallback,
    ) -> None:
        self.id = cfg.id
        self.bundle = cfg.bundle
        self.config = cfg
        self.runc = runc
        self.init = init
        self.rootfs = rootfs  # where we mounted the rootfs, to unmount on delete
        self.execs: dict[str, ExecProcess] = {}
        self._reaper = reaper
        self._on_exit = on_exit
        self._oom: cgroups.OOMWatcher | None = None
        self.shepherd = find_shepherd()
        self._exit_codes: ExitCodes | None = None  # for adopted execs
        # A restore's job, closed once Start has restored (or failed to), which
        # frees a remote store's copies.
        self.restore: RestoreJob | None = None
        # The end of an init in a shared PID namespace, in progress (_init_ended).
        self._ending: set[asyncio.Task[None]] = set()

    @classmethod
    async def create(
        cls,
        cfg: CreateConfig,
        *,
        namespace: str,
        reaper: Reaper,
        on_exit: ExitCallback,
        restore: RestoreJob | None = None,
    ) -> Container:
        """Mount the rootfs and ``runc create`` the container, or (``cfg.checkpoint``)
        prepare its restore at Start, by ``restore`` when the checkpoint layer has a
        part in it; undo everything on failure."""
        if not _ID.match(cfg.id):
            raise InvalidArgument(f"invalid container id {cfg.id!r}")
        if not cfg.spec:
            raise InvalidArgument(f"bundle {cfg.bundle} has no config.json")
        opts = cfg.options
        runc = Runc(
            spawner=reaper,
            root=os.path.join(opts.root or "/run/containerd/runc", namespace),
            binary=opts.binary_name or "runc",
            log=os.path.join(cfg.bundle, "log.json"),
            systemd_cgroup=opts.systemd_cgroup,
            die_with_parent=True,
        )
        rootfs: str | None = None
        io: ProcessIO | None = None
        if opts.root or opts.binary_name:
            # `shim delete` runs without the daemon and must find runc's state.
            with open(os.path.join(cfg.bundle, "options.json"), "w", encoding="utf-8") as fh:
                json.dump({"root": opts.root, "binary_name": opts.binary_name}, fh)
        try:
            if cfg.rootfs:
                rootfs = os.path.join(cfg.bundle, "rootfs")
                os.makedirs(rootfs, mode=0o711, exist_ok=True)
                mounts.mount_all(cfg.rootfs, rootfs)
            io = _new_io(cfg.stdin, cfg.stdout, cfg.stderr, cfg.terminal)
            init = InitProcess(
                cfg.id, cfg.bundle, runc, io, (cfg.stdin, cfg.stdout, cfg.stderr), cfg.terminal
            )
            init.cgroups_path = str((cfg.spec.get("linux") or {}).get("cgroupsPath") or "")
            pid_file = os.path.join(cfg.bundle, "init.pid")
            if cfg.checkpoint:
                # Nothing runs until Start: then runc restore creates and starts it.
                init.prepare_restore(
                    RestoreOpts(
                        CheckpointOpts(
                            image_path=cfg.checkpoint,
                            work_path=os.path.join(cfg.bundle, "criu-restore"),
                            shell_job=cfg.terminal,
                            tcp_established=cfg.restore_tcp_established,
                        ),
                        pid_file=pid_file,
                        no_pivot=opts.no_pivot_root,
                    ),
                    timeout=cfg.restore_timeout,
                    source=cfg.restore_ref,
                    job=restore,
                )
            else:
                await init.create(
                    CreateOpts(
                        pid_file=pid_file,
                        no_pivot=opts.no_pivot_root,
                        no_new_keyring=opts.no_new_keyring,
                    )
                )
        except BaseException:
            if io is not None:
                io.close()
            with contextlib.suppress(StasisError):
                await runc.delete(cfg.id, force=True)
            if rootfs is not None:
                with contextlib.suppress(OSError):
                    mounts.unmount_all(rootfs)
            raise
        container = cls(cfg, runc, init, rootfs, reaper, on_exit)
        if cfg.checkpoint:
            container.restore = restore
            init.on_restored = container._restored
            init.on_lost_exit = container._lost_exit
        else:
            io.started(asyncio.get_running_loop())
            container._watch(init)
        return container

    def _lost_exit(self, init: InitProcess, e: Exit) -> None:
        """Report an exit the reaper never saw (a restore ended before it restored)."""
        self._on_exit(self, init, e)

    def _restored(self, init: InitProcess) -> None:
        init.io.started(asyncio.get_running_loop())
        self._watch(init)
        self.adopt_restored(self.restore.execs() if self.restore is not None else [])

    async def start(self, exec_id: str = "") -> Process:
        """Start a process. A restore's init starts through its job, whose verdict
        decides whether the restored tree may run: a tree it refuses is killed and
        Start fails with the reason. An exec waits for a checkpoint in progress."""
        proc = self.process(exec_id)
        job = self.restore if proc is self.init else None
        if job is None:
            if exec_id:
                await self.init.settled()
            await proc.start()
            return proc
        try:
            try:
                await self.init.start()
            except StasisError as e:
                bad = await job.verdict(0)
                if bad is not None:
                    raise bad from e
                raise
            bad = await job.verdict(self.init.pid)
            if bad is not None:  # CRIU resumed it anyway: never leave it running
                log.error("restore gate of %s was not honoured; killing it", self.id)
                with contextlib.suppress(StasisError):
                    await self.init.kill(signal.SIGKILL, all=True)
                raise bad
        finally:
            await self.release_restore()
        return proc

    def adopt_restored(self, records: list[dict[str, Any]]) -> None:
        """Track the exec processes a checkpoint recorded, now restored as children
        of the restored init (matched by their PID inside the container)."""
        if not records:
            return
        by_ns_pid = ns_pids(self.init.pid)
        for rec in records:
            # Checked before the restore (runtime.store.metadata); still, a bad record
            # costs only its exec, never the restore.
            id = str(rec.get("id", "")) if isinstance(rec, dict) else ""
            ns = rec.get("pid") if isinstance(rec, dict) else None
            pid = by_ns_pid.get(ns, 0) if isinstance(ns, int) else 0
            if not pid or not _ID.match(id) or id in self.execs:
                log.warning("exec %r of the checkpoint was not restored in %s", id, self.id)
                continue
            io = ProcessIO("", "", "")
            proc = ExecProcess.adopt(self.id, id, self.bundle, self.runc, io, pid)
            self.execs[id] = proc
            self._watch_adopted(proc)
            log.info("restored exec %s of %s as PID %d", id, self.id, pid)

    async def detach_execs(self) -> list[dict[str, Any]]:
        """Before a checkpoint: hand every shepherded exec to the container's init,
        so that CRIU dumps it with the init's tree; returns what the checkpoint
        records of each exec it will contain."""
        loop = asyncio.get_running_loop()
        frozen = self.init.status == Status.PAUSED  # shepherds cannot act
        for proc in self.running_execs():
            if frozen or not proc.detachable():
                if proc.adopted:
                    continue
                why = (
                    "the container is paused"
                    if frozen
                    else "it has a terminal"
                    if proc.terminal
                    else "it was not shepherded"
                )
                log.warning("exec %s stays out of the checkpoint of %s: %s", proc.id, self.id, why)
                continue
            gone = proc.reaped
            assert gone is not None
            self._exit_codes_for(loop).watch(proc.pid)
            proc.begin_detach()
            try:
                await asyncio.wait_for(asyncio.shield(gone), 10)
            except TimeoutError:
                raise FailedPrecondition(
                    f"exec {proc.id} of {self.id}: its shepherd did not hand it over"
                ) from None
            proc.close_control()
            self._watch_adopted(proc)
        return [
            {"id": p.id, "pid": ns_pid(p.pid), "args": list(p.spec.get("args") or [])}
            for p in self.running_execs()
            if p.adopted
        ]

    def _exit_codes_for(self, loop: asyncio.AbstractEventLoop) -> ExitCodes:
        if self._exit_codes is None:
            self._exit_codes = ExitCodes(loop)
        return self._exit_codes

    def _watch_adopted(self, proc: ExecProcess) -> None:
        """Report an adopted exec's end, seen through its pidfd."""
        loop = asyncio.get_running_loop()
        codes = self._exit_codes_for(loop)
        codes.watch(proc.pid)
        fd = proc.pidfd

        def ended() -> None:
            loop.remove_reader(fd)
            code = codes.code(proc.pid)
            if code is None:
                log.warning("exit code of adopted exec %s of %s unknown", proc.id, self.id)
                code = 255
            if proc.exit is None:
                self._on_exit(self, proc, proc.exited(code))

        loop.add_reader(fd, ended)

    async def checkpoint(self, opts: CheckpointOpts) -> None:
        """containerd's checkpoint (Task.Checkpoint): CRIU into ``opts.image_path``,
        in the init's checkpointing state (containerd's client pauses the task
        first; CRIU freezes a running one itself)."""
        async with self.init.checkpointing() as ck:
            await ck.dump(opts)

    def _watch(self, proc: Process) -> None:
        pid = proc.wait_pid if isinstance(proc, ExecProcess) else proc.pid
        exited = self._reaper.watch(pid)
        if isinstance(proc, ExecProcess):
            proc.reaped = exited

        def done(f: asyncio.Future[int]) -> None:
            if f.cancelled() or (isinstance(proc, ExecProcess) and proc.adopted):
                return  # an adopted exec's end is seen through its pidfd
            code = f.result()
            if proc is self.init and self.shares_pid_namespace:
                task = asyncio.get_running_loop().create_task(self._init_ended(code))
                self._ending.add(task)
                task.add_done_callback(self._ending.discard)
                return
            self._exited_once_delivered(proc, code)

        exited.add_done_callback(done)

    @property
    def shares_pid_namespace(self) -> bool:
        """True when the container has no PID namespace of its own (the pod's, the
        host's): its init's end does not end the processes it started."""
        linux = self.config.spec.get("linux") or {}
        for ns in linux.get("namespaces") or []:
            if isinstance(ns, dict) and ns.get("type") == "pid":
                return bool(ns.get("path"))
        return True

    async def _init_ended(self, code: int) -> None:
        # As containerd's runc shim does: kill what the init left in the container
        # before its exit is recorded, so Wait and the exit event mean the container
        # has ended; a survivor would also hold its stdout open for ever.
        try:
            await self.runc.kill(self.id, signal.SIGKILL, all=True)
        except StasisError as e:
            log.warning("killing what the init of %s left: %s", self.id, e)
        self._exited_once_delivered(self.init, code)

    def _exited_once_delivered(self, proc: Process, code: int) -> None:
        # Clients stop reading output once they see the exit (ctr run closes
        # its FIFOs): the exit counts once what the process wrote was read.
        proc.io.when_delivered(lambda: self._on_exit(self, proc, proc.exited(code)))

    def watch_oom(self, on_oom: OOMCallback) -> None:
        """Call ``on_oom`` whenever the kernel OOM-kills inside this container's cgroup."""
        linux = self.config.spec.get("linux") or {}
        try:
            directory = cgroups.memory_dir(str(linux.get("cgroupsPath", "")))
            if directory is None or not os.path.isdir(directory):
                return
            watcher = cgroups.OOMWatcher(directory)
        except (OSError, ValueError) as e:
            log.warning("no OOM events for %s: %s", self.id, e)
            return
        self._oom = watcher
        loop = asyncio.get_running_loop()

        def readable() -> None:
            if watcher.check():
                on_oom(self)

        loop.add_reader(watcher.fd, readable)

    async def release_restore(self) -> None:
        """Close a restore's job, if any."""
        job, self.restore = self.restore, None
        if job is not None:
            try:
                await job.close()
            except (OSError, StasisError) as e:
                log.warning("closing checkpoint of %s: %s", self.id, e)

    def _stop_oom_watch(self) -> None:
        if self._oom is not None:
            asyncio.get_running_loop().remove_reader(self._oom.fd)
            self._oom.close()
            self._oom = None

    def process(self, exec_id: str) -> Process:
        """The init (empty ``exec_id``) or an exec process."""
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise NotFound(f"exec {exec_id!r} not found in container {self.id}")
        return proc

    def exec(
        self,
        exec_id: str,
        spec: dict[str, Any],
        stdio: tuple[str, str, str],
        terminal: bool,
    ) -> ExecProcess:
        """Register an exec process (started later by ``Start``)."""
        if not _ID.match(exec_id):
            raise InvalidArgument(f"invalid exec id {exec_id!r}")
        if exec_id in self.execs:
            raise AlreadyExists(f"exec {exec_id!r} already exists in container {self.id}")
        if self.init.status not in (Status.RUNNING, Status.PAUSED):
            raise FailedPrecondition(f"container {self.id} is not running")
        io = _new_io(*stdio, terminal)
        proc = ExecProcess(
            self.id, exec_id, self.bundle, self.runc, io, stdio, spec, terminal, self.shepherd
        )
        proc.on_pid = self._exec_started
        self.execs[exec_id] = proc
        return proc

    def _exec_started(self, proc: ExecProcess) -> None:
        proc.io.started(asyncio.get_running_loop())
        self._watch(proc)

    def running_execs(self) -> list[ExecProcess]:
        """Exec processes that have started and not yet exited."""
        return [p for p in self.execs.values() if p.pid and p.exit is None]

    async def delete(self, exec_id: str = "") -> Process:
        """Delete a process; for the init, also unmount the rootfs."""
        proc = self.process(exec_id)
        await proc.delete()
        if exec_id:
            del self.execs[exec_id]
            return proc
        self._stop_oom_watch()
        if self._exit_codes is not None:
            self._exit_codes.close()
        await self.release_restore()
        if self.rootfs is not None:
            try:
                mounts.unmount_all(self.rootfs)
            except OSError as e:
                log.warning("unmount %s: %s", self.rootfs, e)
        return proc

    async def pids(self) -> list[tuple[int, str]]:
        """(PID, exec id or "") of every process in the container."""
        by_pid = {p.pid: p.id for p in self.execs.values() if p.pid}
        return [(pid, by_pid.get(pid, "")) for pid in await self.runc.ps(self.id)]

    async def update(self, resources: bytes) -> None:
        """Apply new LinuxResources (JSON) to the running container (after a
        checkpoint in progress)."""
        await self.init.settled()
        if self.init.status not in (Status.RUNNING, Status.PAUSED, Status.CREATED):
            raise FailedPrecondition(f"container {self.id} is not running")
        await self.runc.update(self.id, resources)

    async def stats(self) -> dict[str, Any]:
        """runc's cgroup statistics for the container."""
        return await self.runc.stats(self.id)


def ns_pids(init_pid: int) -> dict[int, int]:
    """{PID inside the container: host PID} of the processes in ``init_pid``'s pid namespace."""
    try:
        ns = os.readlink(f"/proc/{init_pid}/ns/pid")
    except OSError:
        return {}
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                continue
        except OSError:
            continue
        inner = ns_pid(int(entry))
        if inner:
            found[inner] = int(entry)
    return found
