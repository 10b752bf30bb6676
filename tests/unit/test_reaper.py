"""Tests for runtime.linux.proc (spawning, exit codes, ForkSpawner) and shim.task.reaper.

The Reaper calls ``waitpid(-1)``, so each test installs it on its own loop
(``asyncio.run``) and uninstalls it before returning. ``set_subreaper`` is only
ever called in a child process: it would change the pytest process itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest

from runtime.linux.proc import Completed, ForkSpawner, Spawner, Stdio, exit_code, spawn
from shim.task.reaper import Reaper


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run a test body on a fresh loop, bounded so that a hang fails fast."""

    async def guarded() -> None:
        async with asyncio.timeout(5):
            await coro

    asyncio.run(guarded())


@asynccontextmanager
async def installed() -> AsyncIterator[Reaper]:
    reaper = Reaper()
    reaper.install(asyncio.get_running_loop())
    try:
        yield reaper
    finally:
        reaper.uninstall()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


SpawnerFactory = Callable[[], Any]


@asynccontextmanager
async def reaper_spawner() -> AsyncIterator[Spawner]:
    async with installed() as reaper:
        yield reaper


@asynccontextmanager
async def fork_spawner() -> AsyncIterator[Spawner]:
    yield ForkSpawner()


SPAWNERS = pytest.mark.parametrize("make", [reaper_spawner, fork_spawner], ids=["reaper", "fork"])


# --------------------------------------------------------------------------- exit_code


def test_exit_code_conversion() -> None:
    assert exit_code(0) == 0
    assert exit_code(3 << 8) == 3
    assert exit_code(255 << 8) == 255
    assert exit_code(signal.SIGKILL) == 128 + 9
    assert exit_code(signal.SIGTERM | 0x80) == 128 + 15  # core dumped


# --------------------------------------------------------------------------- both spawners


@SPAWNERS
def test_capture_and_input(make: SpawnerFactory) -> None:
    async def body() -> None:
        async with make() as sp:
            done = await sp.run(["cat"], capture=True, input=b"hello\n")
            assert done == Completed(("cat",), 0, b"hello\n")

    run(body())


@SPAWNERS
def test_large_input_and_output_do_not_deadlock(make: SpawnerFactory) -> None:
    # Far beyond a pipe's 64 KiB: input must be written while output is read.
    data = os.urandom(1 << 20) * 3

    async def body() -> None:
        async with make() as sp:
            done = await sp.run(["cat"], capture=True, input=data)
            assert done.status == 0
            assert done.stdout == data

    run(body())


@SPAWNERS
def test_exit_status(make: SpawnerFactory) -> None:
    async def body() -> None:
        async with make() as sp:
            assert (await sp.run(["sh", "-c", "exit 3"])).status == 3
            assert (await sp.run(["true"])).status == 0
            assert (await sp.run(["false"])).status == 1

    run(body())


@SPAWNERS
def test_killed_by_signal_is_128_plus_n(make: SpawnerFactory) -> None:
    async def body() -> None:
        async with make() as sp:
            assert (await sp.run(["sh", "-c", "kill -9 $$"])).status == 137
            assert (await sp.run(["sh", "-c", "kill -TERM $$"])).status == 143

    run(body())


@SPAWNERS
def test_input_to_a_process_that_does_not_read(make: SpawnerFactory) -> None:
    # The writer sees EPIPE once the child is gone; that is not an error.
    async def body() -> None:
        async with make() as sp:
            done = await sp.run(["true"], input=b"x" * (1 << 20))
            assert done.status == 0

    run(body())


@SPAWNERS
def test_env_and_stdio(make: SpawnerFactory, tmp_path: Any) -> None:
    out = tmp_path / "out"

    async def body() -> None:
        async with make() as sp:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                done = await sp.run(
                    ["sh", "-c", 'echo "$STASIS_X"; echo err >&2'],
                    stdio=Stdio(stdout=fd, stderr=fd),
                    env={"STASIS_X": "value", "PATH": os.environ["PATH"]},
                )
            finally:
                os.close(fd)
            assert done == Completed(("sh", "-c", 'echo "$STASIS_X"; echo err >&2'), 0, b"")

    run(body())
    assert out.read_text() == "value\nerr\n"


@SPAWNERS
def test_child_signals_are_default(make: SpawnerFactory) -> None:
    # Python ignores SIGPIPE and SIGXFSZ; children must not inherit that.
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN

    async def body() -> None:
        async with make() as sp:
            done = await sp.run(["cat", "/proc/self/status"], capture=True)
            fields = dict(
                line.split(":\t", 1) for line in done.stdout.decode().splitlines() if ":\t" in line
            )
            ignored = int(fields["SigIgn"], 16)
            blocked = int(fields["SigBlk"], 16)
            assert not ignored & (1 << (signal.SIGPIPE - 1))
            assert not ignored & (1 << (signal.SIGXFSZ - 1))
            assert blocked == 0

            # And so a pipeline ends when its reader goes away.
            t0 = time.monotonic()
            piped = await sp.run(["sh", "-c", "trap - PIPE; yes | head -1"], capture=True)
            assert piped.status == 0
            assert piped.stdout == b"y\n"
            assert time.monotonic() - t0 < 3

    run(body())


@SPAWNERS
def test_missing_binary_raises_and_leaks_nothing(make: SpawnerFactory) -> None:
    async def body() -> None:
        async with make() as sp:
            before = fd_count()
            with pytest.raises(FileNotFoundError):
                await sp.run(["/nonexistent/stasis-tool"], capture=True, input=b"x")
            assert fd_count() == before

    run(body())


@SPAWNERS
def test_no_fd_leak(make: SpawnerFactory) -> None:
    async def body() -> None:
        async with make() as sp:
            await sp.run(["true"], capture=True, input=b"")  # warm up lazily opened fds
            before = fd_count()
            for _ in range(5):
                await sp.run(["cat"], capture=True, input=b"abc")
                await sp.run(["true"])
            assert fd_count() == before

    run(body())


@SPAWNERS
def test_concurrent_runs(make: SpawnerFactory) -> None:
    async def body() -> None:
        async with make() as sp:
            results = await asyncio.gather(
                *(sp.run(["sh", "-c", f"sleep 0.0{i}; exit {i}"]) for i in range(8))
            )
            assert [r.status for r in results] == list(range(8))

    run(body())


# --------------------------------------------------------------------------- reaper only


def test_watch_after_exit_uses_unclaimed() -> None:
    async def body() -> None:
        async with installed() as reaper:
            seen = asyncio.Event()
            unclaimed: list[tuple[int, int]] = []

            def on_unclaimed(pid: int, code: int) -> None:
                unclaimed.append((pid, code))
                seen.set()

            reaper.on_unclaimed = on_unclaimed
            pid = spawn(["sh", "-c", "exit 7"], Stdio())
            await seen.wait()
            assert unclaimed == [(pid, 7)]
            fut = reaper.watch(pid)
            assert fut.done()
            assert fut.result() == 7
            # Claimed once: a second watch waits for a new exit of that PID.
            again = reaper.watch(pid)
            assert not again.done()
            reaper.forget(pid)

    run(body())


def test_watch_before_exit() -> None:
    async def body() -> None:
        async with installed() as reaper:
            r, w = os.pipe()
            try:
                pid = spawn(["sh", "-c", "read x; exit 5"], Stdio(stdin=r))
                fut = reaper.watch(pid)
                await asyncio.sleep(0.05)
                assert not fut.done()
            finally:
                os.close(r)
                os.close(w)  # EOF: the child's read returns and it exits
            assert await fut == 5

    run(body())


def test_exit_before_install_is_reaped_on_install() -> None:
    async def body() -> None:
        pid = spawn(["true"], Stdio())
        # Wait for it to become a zombie without reaping it.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            await asyncio.sleep(0.01)
        async with installed() as reaper:
            assert (await reaper.watch(pid)) == 0

    run(body())


def test_forget_makes_the_exit_unclaimed() -> None:
    async def body() -> None:
        async with installed() as reaper:
            seen: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
            reaper.on_unclaimed = lambda pid, code: seen.set_result((pid, code))
            r, w = os.pipe()
            pid = spawn(["sh", "-c", "read x; exit 4"], Stdio(stdin=r))
            os.close(r)
            fut = reaper.watch(pid)
            reaper.forget(pid)
            os.close(w)
            assert await seen == (pid, 4)
            assert not fut.done()
            fut.cancel()

    run(body())


def test_uninstall_restores_sigchld() -> None:
    async def body() -> None:
        async with installed():
            pass

    run(body())
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL


def test_subreaper_reaps_orphans_in_a_child_process() -> None:
    # set_subreaper changes the calling process, so it runs in a fresh Python:
    # a grandchild orphaned there is re-parented to it and reaped as unclaimed.
    script = textwrap.dedent(
        """
        import asyncio, os, sys
        from runtime.linux.proc import Stdio
        from shim.task.reaper import Reaper, set_subreaper

        async def main():
            set_subreaper()
            reaper = Reaper()
            reaper.install(asyncio.get_running_loop())
            got = asyncio.get_running_loop().create_future()
            reaper.on_unclaimed = lambda pid, code: got.done() or got.set_result((pid, code))
            # sh starts a background sleeper that prints its PID, then exits:
            # the sleeper becomes our child once sh is gone.
            done = await reaper.run(
                ["sh", "-c", "(sleep 0.2; exit 9) >/dev/null & echo $!"], capture=True
            )
            orphan = int(done.stdout)
            pid, code = await asyncio.wait_for(got, 4)
            reaper.uninstall()
            print(pid == orphan, code)

        asyncio.run(main())
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        timeout=8,
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode().split() == ["True", "9"]
