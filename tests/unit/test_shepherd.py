"""The exec shepherd (shim/bootstrap/shepherd.c) run directly, without a container, the way
runc runs it: as /proc/self/fd/3 with the control socket as fd 4; and the
process events connector that reports the exit codes of processes handed over.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.linux import procevents
from runtime.linux.proc import Stdio, exit_code, spawn
from shim.bootstrap import launcher

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="module")
def shepherd(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = launcher.build_shepherd(str(tmp_path_factory.mktemp("bin")))
    assert path is not None
    return path


class Run:
    """A shepherd started like runc starts it, with our end of its control socket."""

    def __init__(self, shepherd: str, *argv: str) -> None:
        binary = os.open(shepherd, os.O_RDONLY | os.O_CLOEXEC)
        self.ctl, theirs = socket.socketpair()
        try:
            self.pid = spawn(
                ["/proc/self/fd/3", "4", "--", *argv],
                Stdio(extra=(binary, theirs.fileno())),
            )
        finally:
            os.close(binary)
            theirs.close()
        self.ctl.settimeout(10)

    def reply(self) -> str:
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.ctl.recv(64)
            if not chunk:
                break
            data += chunk
        return data.decode().strip()

    def child(self) -> int:
        text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        assert len(text) == 1, text
        return int(text[0])

    def wait(self) -> int:
        try:
            return exit_code(os.waitpid(self.pid, 0)[1])
        finally:
            self.ctl.close()


def test_exits_with_the_commands_status(shepherd: str) -> None:
    run = Run(shepherd, "sh", "-c", "exit 5")
    assert run.reply() == "ok"
    assert run.wait() == 5


def test_a_killed_command_gives_128_plus_the_signal(shepherd: str) -> None:
    run = Run(shepherd, "sleep", "30")
    assert run.reply() == "ok"
    os.kill(run.child(), signal.SIGKILL)
    assert run.wait() == 128 + signal.SIGKILL


def test_signals_to_the_shepherd_do_not_end_it(shepherd: str) -> None:
    run = Run(shepherd, "sh", "-c", "sleep 0.5; exit 3")
    assert run.reply() == "ok"
    os.kill(run.pid, signal.SIGTERM)
    assert run.wait() == 3


def test_a_missing_command_is_reported_not_run(shepherd: str) -> None:
    run = Run(shepherd, "no-such-command-here")
    assert run.reply() == f"err {2}"
    assert run.wait() == 127


def test_only_stdio_reaches_the_command(shepherd: str, tmp_path: Path) -> None:
    out = tmp_path / "fds"
    run = Run(shepherd, "sh", "-c", f"ls /proc/self/fd > {out}")
    assert run.reply() == "ok"
    assert run.wait() == 0
    # sh's own fds: 0-2 and the directory ls lists (3): nothing of ours.
    assert {int(fd) for fd in out.read_text().split()} <= {0, 1, 2, 3}


def test_the_shim_going_away_changes_nothing(shepherd: str) -> None:
    run = Run(shepherd, "sh", "-c", "sleep 0.3; exit 4")
    assert run.reply() == "ok"
    run.ctl.close()
    assert run.wait() == 4


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make this process the subreaper for the test, so orphans come back to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def test_detach_leaves_the_command_running_to_the_next_reaper(
    shepherd: str, subreaper: None
) -> None:
    run = Run(shepherd, "sh", "-c", "sleep 0.5; exit 6")
    assert run.reply() == "ok"
    child = run.child()
    run.ctl.send(b"d")
    assert run.wait() == 0  # the shepherd leaves at once
    assert Path(f"/proc/{child}").exists(), "the command outlives its shepherd"
    # The kernel re-parented it to us (the subreaper): we see its real status.
    assert exit_code(os.waitpid(child, 0)[1]) == 6


def test_process_events_give_the_exit_codes_of_other_processes() -> None:
    codes = procevents.ExitCodes()
    plain = subprocess.Popen(["sh", "-c", "sleep 0.2; exit 9"])
    killed = subprocess.Popen(["sh", "-c", "sleep 0.2; kill -9 $$"])
    codes.watch(plain.pid)
    codes.watch(killed.pid)
    plain.wait()
    killed.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        codes.drain()
        if len(codes._codes) == 2:
            break
        time.sleep(0.02)
    assert codes.code(plain.pid) == 9
    assert codes.code(killed.pid) == 128 + signal.SIGKILL
    assert codes.fd == -1, "unsubscribed once nothing is watched"


def _event(what: int, pid: int, tgid: int, status: int) -> bytes:
    body = struct.pack("=IIQ", what, 0, 0) + struct.pack("=IIII", pid, tgid, status, 17)
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(body), 0) + body
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


def test_parse_exits_keeps_process_exits_only() -> None:
    data = (
        _event(procevents.PROC_EVENT_EXIT, 10, 10, 3 << 8)
        + _event(procevents.PROC_EVENT_EXIT, 11, 10, 0)  # a thread, not the process
        + _event(0x00000002, 12, 12, 0)  # exec event
    )
    assert procevents.parse_exits(data) == [(10, 3 << 8)]
    assert procevents.parse_exits(data[:10]) == []
