"""A container as the shim sees it: its bundle, rootfs mounts and processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from runtime import mount as mounts
from runtime.errors import InvalidArgument, NotFound, NotImplementedRPC, StasisError
from runtime.runc import CreateOpts, Runc
from shim.process import Exit, InitProcess
from shim.reaper import Reaper
from shim.stdio import ProcessIO

log = logging.getLogger("stasis.container")

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
    options: RuncOptions = field(default_factory=RuncOptions)


ExitCallback = Callable[["Container", InitProcess, Exit], None]


class Container:
    """One container: its init process (and, later, exec processes)."""

    def __init__(self, cfg: CreateConfig, runc: Runc, init: InitProcess, rootfs: str | None):
        self.id = cfg.id
        self.bundle = cfg.bundle
        self.config = cfg
        self.runc = runc
        self.init = init
        self.rootfs = rootfs  # where we mounted the rootfs, to unmount on delete

    @classmethod
    async def create(
        cls,
        cfg: CreateConfig,
        *,
        namespace: str,
        reaper: Reaper,
        on_exit: ExitCallback,
    ) -> Container:
        """Mount the rootfs and ``runc create`` the container; undo everything on failure."""
        if not _ID.match(cfg.id):
            raise InvalidArgument(f"invalid container id {cfg.id!r}")
        if not os.path.isfile(os.path.join(cfg.bundle, "config.json")):
            raise InvalidArgument(f"bundle {cfg.bundle} has no config.json")
        if cfg.terminal:
            raise NotImplementedRPC("terminal containers are not supported yet")
        if cfg.checkpoint:
            raise NotImplementedRPC("restoring through Create is not supported yet")
        opts = cfg.options
        runc = Runc(
            spawner=reaper,
            root=os.path.join(opts.root or "/run/containerd/runc", namespace),
            binary=opts.binary_name or "runc",
            log=os.path.join(cfg.bundle, "log.json"),
            systemd_cgroup=opts.systemd_cgroup,
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
            io = ProcessIO(cfg.stdin, cfg.stdout, cfg.stderr)
            init = InitProcess(
                cfg.id, cfg.bundle, runc, io, (cfg.stdin, cfg.stdout, cfg.stderr), cfg.terminal
            )
            await init.create(
                CreateOpts(
                    pid_file=os.path.join(cfg.bundle, "init.pid"),
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
        io.started(asyncio.get_running_loop())
        container = cls(cfg, runc, init, rootfs)
        exited = reaper.watch(init.pid)
        exited.add_done_callback(
            lambda f: (
                on_exit(container, init, init.exited(f.result())) if not f.cancelled() else None
            )
        )
        return container

    def process(self, exec_id: str) -> InitProcess:
        """The init (empty ``exec_id``) or an exec process."""
        if exec_id:
            raise NotFound(f"exec {exec_id!r} not found in container {self.id}")
        return self.init

    async def delete(self, exec_id: str = "") -> InitProcess:
        """Delete a process; for the init, also unmount the rootfs."""
        proc = self.process(exec_id)
        await proc.delete()
        if not exec_id and self.rootfs is not None:
            try:
                mounts.unmount_all(self.rootfs)
            except OSError as e:
                log.warning("unmount %s: %s", self.rootfs, e)
        return proc

    async def pids(self) -> list[int]:
        """PIDs of every process in the container."""
        return await self.runc.ps(self.id)
