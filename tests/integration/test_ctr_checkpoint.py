"""containerd's own checkpoint flow with our runtime, as with the runc shim:
`ctr container checkpoint --task --rw` then `ctr container restore --live --rw`.
"""

from __future__ import annotations

import pytest
from bed.containerd import Containerd, unique_id
from bed.workload import IMAGE, remove, task, wait_count

pytestmark = pytest.mark.integration

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"


def read(pid: int, path: str) -> str:
    with open(f"/proc/{pid}/root{path}", encoding="utf-8") as f:
        return f.read()


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
        t = task(containerd, id)
        assert t and t[1] == "RUNNING", containerd.ctr("task", "ls").stdout
        pid = t[0]
        # A fresh start would count from 1; the restored one goes on from `before`.
        assert wait_count(containerd, id, 0) >= before
        assert read(pid, "/root-file") == "written\n"
    finally:
        remove(containerd, id)
        containerd.ctr("images", "rm", ref, check=False)
