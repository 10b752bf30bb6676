"""containerd's own checkpoint flow with our runtime, as with the runc shim:
`ctr container checkpoint --task --rw` then `ctr container restore --live --rw`.
"""

from __future__ import annotations

import time

import pytest
from bed.containerd import Containerd, unique_id

pytestmark = pytest.mark.integration

IMAGE = "docker.io/stasis/busybox:test"
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"


def task_pid(c: Containerd, id: str) -> int | None:
    for line in c.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == id and fields[2] == "RUNNING":
            return int(fields[1])
    return None


def read(pid: int, path: str) -> str:
    with open(f"/proc/{pid}/root{path}", encoding="utf-8") as f:
        return f.read()


def wait_count(c: Containerd, id: str, above: int = 0) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pid = task_pid(c, id)
        if pid:
            try:
                n = int(read(pid, "/tmp/count") or 0)
            except (OSError, ValueError):
                n = 0
            if n > above:
                return n
        time.sleep(0.05)
    raise AssertionError(f"{id} never counted past {above}")


def remove(c: Containerd, id: str) -> None:
    c.ctr("task", "kill", "-s", "KILL", id, check=False)
    for _ in range(100):
        if c.ctr("task", "rm", "-f", id, check=False).returncode == 0:
            break
        if task_pid(c, id) is None and id not in c.ctr("task", "ls").stdout:
            break
        time.sleep(0.05)
    c.ctr("containers", "rm", id, check=False)


@pytest.mark.parametrize("runtime", ["io.containerd.stasis.v2", "io.containerd.runc.v2"])
def test_container_checkpoint_and_live_restore(containerd: Containerd, runtime: str) -> None:
    id = unique_id("ck")
    ref = f"stasis.test/{id}:1"
    containerd.ctr("run", "-d", "--runtime", runtime, IMAGE, id, "sh", "-c",
                   f"echo written > /root-file; {COUNTER}")  # fmt: skip
    try:
        before = wait_count(containerd, id, 40)
        containerd.ctr("containers", "checkpoint", "--task", "--rw", id, ref, timeout=120)
        wait_count(containerd, id, before)  # the task kept running
        remove(containerd, id)
        containerd.ctr("containers", "restore", "--live", "--rw", id, ref, timeout=120)
        pid = task_pid(containerd, id)
        assert pid, containerd.ctr("task", "ls").stdout
        # A fresh start would count from 1; the restored one goes on from `before`.
        assert wait_count(containerd, id) >= before
        assert read(pid, "/root-file") == "written\n"
    finally:
        remove(containerd, id)
        containerd.ctr("images", "rm", ref, check=False)
