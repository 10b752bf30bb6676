"""Tests for runtime.linux.netns: loopback repair in a real network namespace of its own
(`unshare --net`), as CRIU leaves a restored one (lo down, no addresses)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from collections.abc import Iterator

import pytest

from runtime.linux import netns
from runtime.linux.proc import Completed, ForkSpawner


@pytest.fixture
def fresh_netns() -> Iterator[int]:
    """The pid of a process in a network namespace of its own, lo still down."""
    child = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        mine = os.readlink("/proc/self/ns/net")
        for _ in range(500):
            if os.readlink(f"/proc/{child.pid}/ns/net") != mine:
                break
            threading.Event().wait(0.01)
        else:
            raise AssertionError("unshare --net did not take")
        yield child.pid
    finally:
        child.kill()
        child.wait()


def _lo(pid: int) -> str:
    return subprocess.run(
        ["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-br", "addr", "show", "lo"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def test_loopback_comes_up_with_its_addresses(fresh_netns: int) -> None:
    assert "127.0.0.1" not in _lo(fresh_netns)
    mine = os.readlink("/proc/self/ns/net")
    assert netns.loopback_up(fresh_netns) is True
    lo = _lo(fresh_netns)
    assert "127.0.0.1/8" in lo and "DOWN" not in lo, lo
    # Nothing of this process changed namespace.
    assert os.readlink("/proc/self/ns/net") == mine
    assert os.readlink("/proc/thread-self/ns/net") == mine
    assert netns.loopback_up(fresh_netns) is True  # already up: nothing to do


class _Recording(ForkSpawner):
    """Runs commands for real, and records them."""

    def __init__(self) -> None:
        self.argvs: list[list[str]] = []

    async def run(self, argv, **kw):  # type: ignore[no-untyped-def,override]
        self.argvs.append(list(argv))
        result: Completed = await super().run(argv, **kw)
        return result


def test_ensure_loopback_repairs_without_a_process(fresh_netns: int) -> None:
    spawner = _Recording()
    asyncio.run(netns.ensure_loopback(spawner, fresh_netns))
    assert "127.0.0.1/8" in _lo(fresh_netns)
    assert spawner.argvs == []


def test_ensure_loopback_falls_back_on_ip(
    fresh_netns: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the in-process way fails (setns refused, say), the ip commands repair it."""

    def refused(pid: int) -> bool:
        raise PermissionError(1, f"setns into the network namespace of {pid}")

    monkeypatch.setattr(netns, "loopback_up", refused)
    spawner = _Recording()
    asyncio.run(netns.ensure_loopback(spawner, fresh_netns))
    assert "127.0.0.1/8" in _lo(fresh_netns)
    assert [a[3:5] for a in spawner.argvs] == [["link", "set"], ["addr", "replace"], ["-6", "addr"]]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_vanished_process_is_an_os_error() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(OSError):
        netns.loopback_up(child.pid)
