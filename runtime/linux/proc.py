"""Running helper processes (runc, mount tools) and collecting their exit status.

The shim is a child subreaper and reaps every child itself (``shim.task.reaper``),
so it cannot let asyncio's child watcher call ``waitpid`` on the same PIDs.
Code that runs commands therefore goes through the small ``Spawner``
contract; the shim passes its reaper, one-shot tools (the CLI, ``shim delete``)
use ``ForkSpawner``, and unit tests pass a recording stand-in.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

# Signals Python itself ignores (SIGPIPE, SIGXFSZ) go back to their default in
# children, so a container never inherits the shim's dispositions.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)


@dataclass(frozen=True)
class Completed:
    """What a finished command left: its exit code (128+N for signal N) and captured output."""

    argv: tuple[str, ...]
    status: int
    stdout: bytes


@dataclass(frozen=True)
class Stdio:
    """File descriptors given to a child as fd 0, 1 and 2 (None: /dev/null), and
    ``extra`` ones as fd 3, 4, ... (what ``runc --preserve-fds`` passes on)."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None
    extra: tuple[int, ...] = ()


class Spawner(Protocol):
    """Runs a command to completion."""

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
        """Run ``argv``; with ``capture``, return its stdout instead of using ``stdio``.
        ``started`` is called with the PID as soon as it runs (to kill it early)."""
        ...


def exit_code(wait_status: int) -> int:
    """Convert a raw ``waitpid`` status into a shell-style exit code."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def spawn(
    argv: Sequence[str],
    stdio: Stdio,
    *,
    env: Mapping[str, str] | None = None,
) -> int:
    """Start ``argv`` with the given stdio and return its PID (the caller reaps it)."""
    null = -1
    actions: list[tuple[int, ...]] = []
    fds = (stdio.stdin, stdio.stdout, stdio.stderr)
    # Extra fds first move above the targets 0..2+len(extra), so that placing
    # one never overwrites the source of another.
    lowest = 3 + len(stdio.extra)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest) for fd in stdio.extra]
    if None in fds:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for target, fd in enumerate(fds):
            actions.append((os.POSIX_SPAWN_DUP2, null if fd is None else fd, target))
        for target, fd in enumerate(moved, start=3):
            actions.append((os.POSIX_SPAWN_DUP2, fd, target))
        return os.posix_spawnp(
            argv[0],
            list(argv),
            dict(os.environ if env is None else env),
            file_actions=actions,
            setsigdef=_DEFAULT_SIGNALS,
            setsigmask=(),
        )
    finally:
        if null >= 0:
            os.close(null)
        for fd in moved:
            os.close(fd)


async def read_all(fd: int) -> bytes:
    """Read a pipe until EOF without blocking the event loop; closes ``fd``."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        try:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                chunks.append(data)
        except BlockingIOError:
            return
        loop.remove_reader(fd)
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return b"".join(chunks)


async def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to a pipe without blocking the loop; closes ``fd``."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view:
            try:
                n = os.write(fd, view)
                view = view[n:]
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_writer(fd, ready.set_result, None)
                try:
                    await ready
                finally:
                    loop.remove_writer(fd)
            except BrokenPipeError:
                return
    finally:
        os.close(fd)


async def run_with(
    waiter: WaitFn,
    argv: Sequence[str],
    *,
    stdio: Stdio,
    capture: bool,
    input: bytes | None,
    env: Mapping[str, str] | None,
    started: Callable[[int], None] | None = None,
) -> Completed:
    """Spawn ``argv`` and wait through ``waiter``: the shared body of both spawners."""
    out_r = in_w = -1
    stdin, stdout = stdio.stdin, stdio.stdout
    to_close: list[int] = []
    if capture:
        out_r, stdout = os.pipe()
        to_close.append(stdout)
    if input is not None:
        stdin, in_w = os.pipe()
        to_close.append(stdin)
    try:
        pid, exited = waiter(
            lambda: spawn(argv, Stdio(stdin, stdout, stdio.stderr, stdio.extra), env=env)
        )
    except BaseException:
        for fd in (out_r, in_w, *to_close):
            if fd >= 0:
                os.close(fd)
        raise
    for fd in to_close:
        os.close(fd)
    if started is not None:
        started(pid)
    reader = asyncio.ensure_future(read_all(out_r)) if capture else None
    if input is not None:
        await write_all(in_w, input)
    status = await exited
    out = await reader if reader is not None else b""
    return Completed(tuple(argv), status, out)


class WaitFn(Protocol):
    """Starts a process through ``start`` and returns its PID and a future of its exit code."""

    def __call__(self, start: StartFn) -> tuple[int, asyncio.Future[int]]: ...


class StartFn(Protocol):
    """Starts a process and returns its PID."""

    def __call__(self) -> int: ...


class ForkSpawner:
    """A spawner for processes that are not the shim's daemon: waits on each PID in a thread."""

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
        """Run ``argv`` to completion (see ``Spawner.run``)."""
        loop = asyncio.get_running_loop()

        def waiter(start: StartFn) -> tuple[int, asyncio.Future[int]]:
            pid = start()
            fut = loop.run_in_executor(None, lambda: exit_code(os.waitpid(pid, 0)[1]))
            return pid, asyncio.ensure_future(fut)

        return await run_with(
            waiter, argv, stdio=stdio, capture=capture, input=input, env=env, started=started
        )


def descendants(pid: int) -> set[int]:
    """PIDs of every live descendant of ``pid`` (children of each of its threads, and
    theirs), as /proc shows them now. The caller makes sure ``pid`` still names the
    process it means (e.g. an unreaped child of its own)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", encoding="ascii") as f:
                    children = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            for child in children:
                if child not in found and child != pid:
                    found.add(child)
                    todo.append(child)
    return found


def ns_pid(pid: int) -> int:
    """``pid`` as its innermost pid namespace sees it (NSpid in /proc/PID/status), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        pass
    return 0


def parent_of(pid: int) -> int:
    """``pid``'s parent PID (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (or is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")
