"""The shim core through ctr on containerd 1.7 and 2.1: what `ctr run` users see.

Each behaviour is checked against our runtime; the runc shim's behaviour is the
reference (tests/integration/test_bed.py proves the bed with it).
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bed.containerd import Containerd, unique_id
from bed.workload import shim_pids

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.stasis.v2"
IMAGE = "docker.io/stasis/busybox:test"


def run(c: Containerd, id: str, *cmd: str, input: str | None = None, timeout: float = 60):
    return c.ctr(
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        IMAGE,
        id,
        *cmd,
        check=False,
        input=input,
        timeout=timeout,
    )


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def task_status(c: Containerd, id: str) -> str | None:
    out = c.ctr("task", "ls", check=False).stdout
    for line in out.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == id:
            return fields[2]
    return None


def test_echo_and_exit_code(containerd: Containerd) -> None:
    r = run(containerd, unique_id("echo"), "sh", "-c", "echo hello; exit 7")
    assert r.stdout == "hello\n", r.stderr
    assert r.returncode == 7


def test_stdin_reaches_the_container(containerd: Containerd) -> None:
    r = run(containerd, unique_id("stdin"), "sh", "-c", "read x; echo got-$x", input="abc\n")
    assert r.stdout == "got-abc\n", r.stderr
    assert r.returncode == 0


def test_stderr_and_large_output(containerd: Containerd) -> None:
    r = run(containerd, unique_id("out"), "sh", "-c", "seq 1 200000; echo oops >&2")
    lines = r.stdout.splitlines()
    assert len(lines) == 200000 and lines[-1] == "200000"
    assert "oops" in r.stderr


def test_foreground_run_ends_137_when_killed(containerd: Containerd) -> None:
    id = unique_id("kill")
    cmd = [
        str(containerd.bin_dir / "ctr"),
        "--address",
        str(containerd.address),
        "--namespace",
        containerd.namespace,
        "run",
        "--runtime",
        RUNTIME,
        "--rm",
        IMAGE,
        id,
        "sleep",
        "1000",
    ]
    fg = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=containerd.env(),
    )
    try:
        wait_for(lambda: task_status(containerd, id) == "RUNNING", what=f"{id} running")
        containerd.ctr("task", "kill", "-s", "KILL", id)
        assert fg.wait(timeout=30) == 137
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait()
        fg.stdout.close()  # type: ignore[union-attr]
        fg.stderr.close()  # type: ignore[union-attr]
    wait_for(lambda: task_status(containerd, id) is None, what=f"{id} removed")


def test_ten_containers_in_parallel(containerd: Containerd) -> None:
    ids = [unique_id(f"par{i}") for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        results = list(
            pool.map(lambda i: run(containerd, i, "sh", "-c", f"sleep 0.5; echo ok-{i}"), ids)
        )
    for id, r in zip(ids, results, strict=True):
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"ok-{id}\n"
    left = containerd.ctr("containers", "ls", "-q").stdout.split()
    assert not set(ids) & set(left)
    wait_for(lambda: not shim_pids(containerd), what="shims to exit")


def test_containerd_restart_reconnects(containerd: Containerd) -> None:
    id = unique_id("restart")
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "1000")
    try:
        assert task_status(containerd, id) == "RUNNING"
        shims = shim_pids(containerd)
        assert len(shims) == 1
        containerd.restart()
        assert task_status(containerd, id) == "RUNNING"
        assert shim_pids(containerd) == shims, "the shim survives containerd's restart"
        containerd.ctr("task", "kill", "-s", "KILL", id)
        wait_for(lambda: task_status(containerd, id) == "STOPPED", what=f"{id} stopped")
    finally:
        containerd.ctr("task", "rm", "-f", id, check=False)
        containerd.ctr("containers", "rm", id, check=False)
    wait_for(lambda: not shim_pids(containerd), what="the shim to exit")


def test_shim_socket_and_bundle_files(containerd: Containerd) -> None:
    id = unique_id("sock")
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "1000")
    try:
        bundle = containerd.state / "io.containerd.runtime.v2.task" / containerd.namespace / id
        address = (bundle / "address").read_text()
        assert address.startswith("unix:///run/containerd/s/")
        mode = os.stat(address.removeprefix("unix://")).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert os.path.ismount(bundle / "rootfs")
    finally:
        containerd.ctr("task", "kill", "-s", "KILL", id, check=False)
        wait_for(lambda: task_status(containerd, id) in ("STOPPED", None), what="stopped")
        containerd.ctr("task", "rm", "-f", id, check=False)
        containerd.ctr("containers", "rm", id, check=False)
    assert not os.path.exists(bundle / "rootfs") or not os.path.ismount(bundle / "rootfs")


def test_events_in_order(containerd: Containerd) -> None:
    id = unique_id("ev")
    cmd = [str(containerd.bin_dir / "ctr"), "--address", str(containerd.address), "events"]
    watcher = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=containerd.env()
    )
    try:
        time.sleep(0.3)
        r = run(containerd, id, "true")
        assert r.returncode == 0, r.stderr
        time.sleep(0.5)
    finally:
        watcher.terminate()
        out, _ = watcher.communicate(timeout=10)
    topics = [
        w
        for line in out.splitlines()
        if id in line
        for w in line.split()
        if w.startswith("/tasks/")
    ]
    assert topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], out


def test_unknown_task_is_not_found(containerd: Containerd) -> None:
    r = containerd.ctr("task", "kill", unique_id("nope"), check=False)
    assert r.returncode != 0
    assert "not found" in r.stderr


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rsplit(b")", 1)[1].split()


def _is_zygote(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().split(b"\0")[1:2] == [b"zygote"]
    except OSError:
        return False


def test_shims_come_from_the_zygote_looking_as_start_made_them(containerd: Containerd) -> None:
    """The second shim on a node is forked by the zygote the first start launched; /proc
    shows it as containerd's `start` would have left it (cmdline, environment, cgroup)."""
    ids = [unique_id("zyg"), unique_id("zyg")]
    try:
        for id in ids:
            containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "1000")
        bundle = containerd.state / "io.containerd.runtime.v2.task" / containerd.namespace / ids[1]
        pid = int((bundle / "shim.pid").read_text())
        parent = int(_stat_fields(pid)[1])
        assert _is_zygote(parent), f"shim {pid}'s parent {parent} is not the zygote"
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"start" in argv and ids[1].encode() in argv
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"TTRPC_ADDRESS={containerd.address}.ttrpc".encode() in environ
        containerd_pid = containerd.pid
        assert containerd_pid is not None
        cgroup = Path(f"/proc/{containerd_pid}/cgroup").read_text()
        assert Path(f"/proc/{pid}/cgroup").read_text() == cgroup
        assert int(_stat_fields(pid)[3]) == pid  # session leader, as after start's setsid
        assert ids[1] in containerd.ctr("task", "ls").stdout
        assert (
            containerd.ctr("task", "exec", "--exec-id", "e1", ids[1], "echo", "hi").stdout == "hi\n"
        )
    finally:
        for id in ids:
            containerd.ctr("task", "kill", "-s", "KILL", id, check=False)
            wait_for(lambda id=id: task_status(containerd, id) in ("STOPPED", None), what="stopped")
            containerd.ctr("task", "rm", "-f", id, check=False)
            containerd.ctr("containers", "rm", id, check=False)
