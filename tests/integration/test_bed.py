"""The test bed itself, with containerd's own runc shim on both containerd versions."""

from __future__ import annotations

import time

import pytest
from bed.containerd import Containerd, images_dir, leftovers, unique_id
from bed.images import BUSYBOX_REF, PAUSE_REF

pytestmark = pytest.mark.integration

RUNC_SHIM = "io.containerd.runc.v2"


def run(containerd: Containerd, name: str, *cmd: str, input: str | None = None) -> tuple[int, str]:
    """`ctr run --rm` with the runc shim; returns (exit status, stdout)."""
    r = containerd.ctr(
        "run", "--rm", "--runtime", RUNC_SHIM, BUSYBOX_REF, unique_id(name), *cmd,
        input=input, check=False,
    )  # fmt: skip
    assert not r.stderr, r.stderr
    return r.returncode, r.stdout


def test_exit_status_and_stdout(containerd: Containerd) -> None:
    assert run(containerd, "t-echo", "sh", "-c", "echo hello; exit 7") == (7, "hello\n")


def test_stdin(containerd: Containerd) -> None:
    status, out = run(containerd, "t-stdin", "sh", "-c", "read x; echo got-$x", input="abc\n")
    assert (status, out) == (0, "got-abc\n")


def test_nothing_left_after_rm(containerd: Containerd) -> None:
    run(containerd, "t-rm", "true")
    assert containerd.ctr("containers", "ls", "-q").stdout == ""
    assert not leftovers(containerd.workdir).mounts
    assert not leftovers(containerd.workdir).runc_states


def _task_status(containerd: Containerd, cid: str) -> str:
    for line in containerd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == cid:
            return fields[2]
    return "ABSENT"


def test_restart_keeps_running_task(containerd: Containerd) -> None:
    cid = unique_id("t-restart")
    containerd.ctr("run", "-d", "--runtime", RUNC_SHIM, BUSYBOX_REF, cid, "sleep", "600")
    try:
        old_pid = containerd.pid
        containerd.restart()
        assert containerd.pid != old_pid
        assert _task_status(containerd, cid) == "RUNNING"
    finally:
        containerd.ctr("tasks", "delete", "--force", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)


def test_pause_image_stops_on_sigterm(containerd: Containerd) -> None:
    containerd.import_image(images_dir() / "pause.tar")
    cid = unique_id("t-pause")
    containerd.ctr("run", "-d", "--runtime", RUNC_SHIM, PAUSE_REF, cid)
    try:
        assert _task_status(containerd, cid) == "RUNNING"
        containerd.ctr("tasks", "kill", "--signal", "SIGTERM", cid)
        deadline = time.monotonic() + 5
        while _task_status(containerd, cid) != "STOPPED":
            assert time.monotonic() < deadline, "pause ignored SIGTERM"
            time.sleep(0.05)
    finally:
        containerd.ctr("tasks", "delete", "--force", cid, check=False)
        containerd.ctr("containers", "delete", cid, check=False)
