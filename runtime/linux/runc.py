"""A thin, typed wrapper around the runc binary.

Each command's options are a dataclass that builds its own flags; failures
raise ``RuncError`` carrying runc's own last error line (from its JSON log),
which is what a person needs to act on.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import FailedPrecondition, NotFound, StasisError, Unavailable
from runtime.linux.proc import Completed, Spawner, Stdio

DEFAULT_ROOT = "/run/containerd/runc"
_DIE_WITH_PARENT = frozenset({"checkpoint", "restore"})


@functools.cache
def _setpriv() -> str | None:
    """util-linux's setpriv (for --pdeathsig), if installed."""
    return shutil.which("setpriv")


class RuncError(Unavailable):
    """runc exited non-zero; the message holds the command and runc's last error."""

    def __init__(self, command: str, status: int, detail: str) -> None:
        self.command = command
        self.status = status
        self.detail = detail
        super().__init__(f"runc {command} failed (exit {status}): {detail}")


# runc's own messages for a missing container and for a wrong state; anything
# else (e.g. "executable file not found" from the container's process) stays a
# plain RuncError.
_NOT_FOUND = re.compile(
    r"container\b[^:]*\b(does not exist|not found)|no such process|process already finished"
)
_WRONG_STATE = (
    "container not running",
    "container is not running",
    "container is paused",
    "container not paused",
    "cannot start an already running container",
    "cannot start a container that has stopped",
    "container is stopped",
)


def _classify(err: RuncError) -> StasisError:
    """Map the runc errors that have a precise meaning to their error class."""
    low = err.detail.lower()
    if _NOT_FOUND.search(low):
        return NotFound(str(err))
    if any(m in low for m in _WRONG_STATE):
        return FailedPrecondition(str(err))
    return err


@dataclass(frozen=True)
class CreateOpts:
    """Options of ``runc create`` / ``runc run``."""

    pid_file: str
    console_socket: str | None = None
    no_pivot: bool = False
    no_new_keyring: bool = False

    def args(self) -> list[str]:
        """The command-line flags."""
        out = ["--pid-file", self.pid_file]
        if self.console_socket:
            out += ["--console-socket", self.console_socket]
        if self.no_pivot:
            out.append("--no-pivot")
        if self.no_new_keyring:
            out.append("--no-new-keyring")
        return out


@dataclass(frozen=True)
class ExecOpts:
    """Options of ``runc exec --detach``."""

    process_json: str
    pid_file: str
    console_socket: str | None = None
    preserve_fds: int = 0  # fds 3.. of runc's stdio passed on to the process

    def args(self) -> list[str]:
        """The command-line flags."""
        out = ["--detach", "--process", self.process_json, "--pid-file", self.pid_file]
        if self.console_socket:
            out += ["--console-socket", self.console_socket]
        if self.preserve_fds:
            out += ["--preserve-fds", str(self.preserve_fds)]
        return out


@dataclass(frozen=True)
class CheckpointOpts:
    """Options of ``runc checkpoint`` (and the CRIU part of ``runc restore``)."""

    image_path: str
    work_path: str = ""
    parent_path: str = ""
    leave_running: bool = False
    tcp_established: bool = False
    ext_unix_sk: bool = False
    shell_job: bool = False
    file_locks: bool = False
    empty_ns: tuple[str, ...] = ()
    manage_cgroups_mode: str = ""

    def criu_args(self) -> list[str]:
        """Flags shared by checkpoint and restore."""
        out = ["--image-path", self.image_path]
        if self.work_path:
            out += ["--work-path", self.work_path]
        if self.tcp_established:
            out.append("--tcp-established")
        if self.ext_unix_sk:
            out.append("--ext-unix-sk")
        if self.shell_job:
            out.append("--shell-job")
        if self.file_locks:
            out.append("--file-locks")
        if self.manage_cgroups_mode:
            out += ["--manage-cgroups-mode", self.manage_cgroups_mode]
        for ns in self.empty_ns:
            out += ["--empty-ns", ns]
        return out

    def args(self) -> list[str]:
        """The flags of ``runc checkpoint``."""
        out = self.criu_args()
        if self.parent_path:
            out += ["--parent-path", self.parent_path]
        if self.leave_running:
            out.append("--leave-running")
        return out


@dataclass(frozen=True)
class RestoreOpts:
    """Options of ``runc restore --detach``."""

    criu: CheckpointOpts
    pid_file: str
    console_socket: str | None = None
    no_pivot: bool = False

    def args(self, bundle: str) -> list[str]:
        """The flags of ``runc restore``."""
        out = [*self.criu.criu_args(), "--bundle", bundle, "--detach", "--no-subreaper"]
        out += ["--pid-file", self.pid_file]
        if self.console_socket:
            out += ["--console-socket", self.console_socket]
        if self.no_pivot:
            out.append("--no-pivot")
        return out


@dataclass
class Runc:
    """One runc binary with its state root; every call goes through ``spawner``."""

    spawner: Spawner
    root: str = DEFAULT_ROOT
    binary: str = "runc"
    log: str | None = None
    systemd_cgroup: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    # The shim's own runc: checkpoint and restore die with the shim (see _argv).
    die_with_parent: bool = False

    def _argv(self, command: str, args: Sequence[str], log: str | None) -> list[str]:
        argv = [self.binary, "--root", self.root]
        if log:
            argv += ["--log", log, "--log-format", "json"]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        argv = [*argv, command, *args]
        if self.die_with_parent and command in _DIE_WITH_PARENT and (setpriv := _setpriv()):
            # A shim killed during a dump or a restore takes runc along; CRIU, its
            # RPC peer gone, then aborts: a dump thaws the container, a restore
            # kills what it restored. Nothing runs without a shim to account for it.
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        return argv

    async def _run(
        self,
        command: str,
        args: Sequence[str],
        *,
        stdio: Stdio = Stdio(),
        capture: bool = False,
        input: bytes | None = None,
        log: str | None = None,
        started: Callable[[int], None] | None = None,
    ) -> Completed:
        log = log or self.log
        env = None
        if self.extra_env:
            env = {**os.environ, **self.extra_env}
        # Only a caller that wants the PID passes ``started`` on (restore does).
        extra: dict[str, Any] = {"started": started} if started is not None else {}
        done = await self.spawner.run(
            self._argv(command, args, log),
            stdio=stdio,
            capture=capture,
            input=input,
            env=env,
            **extra,
        )
        if done.status != 0:
            raise _classify(RuncError(command, done.status, last_error(log)))
        return done

    async def create(self, id: str, bundle: str, opts: CreateOpts, stdio: Stdio) -> None:
        """``runc create``: set up the container; its init waits for ``start``."""
        await self._run("create", ["--bundle", bundle, *opts.args(), id], stdio=stdio)

    async def start(self, id: str) -> None:
        """``runc start``: let the created init exec the user process."""
        await self._run("start", [id])

    async def exec(self, id: str, opts: ExecOpts, stdio: Stdio) -> None:
        """``runc exec --detach``: start an extra process in a running container."""
        await self._run("exec", [*opts.args(), id], stdio=stdio)

    async def kill(self, id: str, sig: int = signal.SIGTERM, *, all: bool = False) -> None:
        """``runc kill``: signal the init (or, with ``all``, every process).

        A container whose init has already exited raises NotFound, as containerd's
        runc shim reports it ("process already finished"), not FailedPrecondition:
        containerd ignores that error when it stops or deletes a task. An init that
        exits between runc's state check and its signal ("unable to signal init: os:
        process already finished") is NotFound already (``_classify``).
        """
        args = ["--all"] if all else []
        try:
            await self._run("kill", [*args, id, str(sig)])
        except FailedPrecondition as e:
            if "not running" not in str(e):
                raise
            raise NotFound(f"process already finished: {e}") from e

    async def delete(self, id: str, *, force: bool = False) -> None:
        """``runc delete``: remove the container's state and cgroup."""
        args = ["--force"] if force else []
        await self._run("delete", [*args, id])

    async def state(self, id: str) -> dict[str, Any]:
        """``runc state``: the container's state as runc reports it."""
        done = await self._run("state", [id], capture=True)
        state: dict[str, Any] = json.loads(done.stdout)
        return state

    async def ps(self, id: str) -> list[int]:
        """``runc ps --format json``: PIDs of every process in the container."""
        done = await self._run("ps", ["--format", "json", id], capture=True)
        pids = json.loads(done.stdout or b"[]")
        return [int(p) for p in pids or []]

    async def pause(self, id: str) -> None:
        """``runc pause``: freeze every process of the container."""
        await self._run("pause", [id])

    async def resume(self, id: str) -> None:
        """``runc resume``: thaw a paused container."""
        await self._run("resume", [id])

    async def update(self, id: str, resources_json: bytes) -> None:
        """``runc update -r -``: apply new LinuxResources."""
        await self._run("update", ["--resources", "-", id], input=resources_json)

    async def checkpoint(self, id: str, opts: CheckpointOpts) -> None:
        """``runc checkpoint``: dump the container through CRIU into ``opts.image_path``."""
        await self._run("checkpoint", [*opts.args(), id])

    async def restore(
        self,
        id: str,
        bundle: str,
        opts: RestoreOpts,
        stdio: Stdio,
        started: Callable[[int], None] | None = None,
    ) -> None:
        """``runc restore --detach``: recreate the container from CRIU images;
        ``started`` gets runc's PID (CRIU is its child) as soon as it runs."""
        await self._run("restore", [*opts.args(bundle), id], stdio=stdio, started=started)

    async def stats(self, id: str) -> dict[str, Any]:
        """``runc events --stats``: the container's cgroup statistics (runc's JSON)."""
        done = await self._run("events", ["--stats", id], capture=True)
        event: dict[str, Any] = json.loads(done.stdout)
        data: dict[str, Any] = event.get("data") or {}
        return data

    async def version(self) -> str:
        """The first line of ``runc --version``."""
        done = await self.spawner.run([self.binary, "--version"], capture=True)
        return done.stdout.decode(errors="replace").splitlines()[0] if done.stdout else ""


def last_error(log: str | None) -> str:
    """The last error runc wrote to its JSON log (or a note that there is none)."""
    if not log:
        return "no runc log"
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            lines = f.read().splitlines()
    except OSError:
        return f"no runc log at {log}"
    for raw in reversed(lines):
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", raw.decode(errors="replace")))
    return f"see {log}"
