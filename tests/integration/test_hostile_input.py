"""Hostile input against a real shim on real containerd, runc and CRIU: a flood of idle
connections on the shim's socket, and a checkpoint whose deleted.files lists more
paths than any restore reads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from bed.containerd import Containerd, unique_id
from bed.tamper import rewrite
from bed.workload import (
    COUNTER,
    IMAGE,
    RUNTIME,
    bundle,
    remove,
    run_restoring,
    start_counter,
    stasis,
    task,
    wait_count,
)

pytestmark = pytest.mark.integration

FLOOD = 400  # idle connections, well past the shim's cap (128)


def counter(c: Containerd, ids: list[str]) -> str:
    id = start_counter(c, ids, "hst")
    wait_count(c, id, 2)
    return id


def checkpointed(c: Containerd, ids: list[str], tmp_path: Path) -> Path:
    """A counter checkpointed (--exit) as checkpoint ``k`` of the store it returns."""
    id = counter(c, ids)
    store = tmp_path / "store"
    stasis(c, "checkpoint", id, "--exit", "--to", str(store), "--name", "k")
    remove(c, id)
    return store


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_connection_flood_leaves_the_shim_serving(
    containerd: Containerd, ids: list[str]
) -> None:
    id = counter(containerd, ids)
    b = bundle(containerd, id)
    address = (b / "address").read_text().strip().removeprefix("unix://")
    shim = int((b / "shim.pid").read_text())
    before = open_fds(shim)
    flood: list[socket.socket] = []
    try:
        refused = 0
        for _ in range(FLOOD):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            flood.append(s)
            s.setblocking(False)
            try:
                s.connect(address)
            except BlockingIOError:  # the backlog is full: the shim is not accepting
                refused += 1
        time.sleep(1.0)  # let the shim accept (and refuse) them all
        # The shim holds no more than its cap of them, and still serves containerd.
        assert open_fds(shim) - before <= 130, (before, open_fds(shim))
        out = containerd.ctr("task", "exec", "--exec-id", "e1", id, "cat", "/proc/1/comm")
        assert out.stdout.strip() == "sh"
    finally:
        for s in flood:
            s.close()
    assert task(containerd, id) is not None


def test_deleted_files_beyond_any_restore_is_refused_early(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    store = checkpointed(containerd, ids, tmp_path)
    # 600,000 paths (~9 MB): read whole, the shim once spent 20 s and 150 MB on 8 MB.
    paths = [f"/d/{i:07d}" for i in range(600_000)]
    rewrite(store / "k", "deleted.files", json.dumps(paths).encode())

    began = time.monotonic()
    new, r = run_restoring(containerd, ids, store / "k")
    assert r.returncode != 0
    assert "deleted.files" in r.stderr and "524288" in r.stderr, r.stderr
    assert time.monotonic() - began < 30
    assert task(containerd, new) is None or task(containerd, new)[1] != "RUNNING"  # type: ignore[index]


def sparse_tar(path: Path, size: int) -> None:
    """A tar whose one member ``big`` is ``size`` bytes of GNU sparse file: a few KB of
    archive (Python's tarfile reads sparse members but cannot write them)."""
    work = path.parent / "sparse"
    work.mkdir()
    with open(work / "big", "wb") as f:
        f.truncate(size)
    subprocess.run(
        ["tar", "--sparse", "--format=gnu", "-cf", str(path), "-C", str(work), "big"], check=True
    )
    (work / "big").unlink()
    work.rmdir()


def test_a_diff_expanding_past_the_limit_is_refused_before_writing(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    store = checkpointed(containerd, ids, tmp_path)
    # 70 GiB of holes in a few KB: past the default limits.max_diff_bytes (64 GiB).
    sparse_tar(tmp_path / "bomb.tar", 70 << 30)
    assert (tmp_path / "bomb.tar").stat().st_size < 1 << 20
    rewrite(store / "k", "rootfs-diff.tar", (tmp_path / "bomb.tar").read_bytes())

    new, r = run_restoring(containerd, ids, store / "k")
    assert r.returncode != 0
    assert "max_diff_bytes" in r.stderr, r.stderr
    assert task(containerd, new) is None or task(containerd, new)[1] != "RUNNING"  # type: ignore[index]


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("policy", ["fail", "fresh"])
def test_deeply_nested_metadata_is_an_error_not_a_crash(
    containerd: Containerd, ids: list[str], tmp_path: Path, policy: str
) -> None:
    store = checkpointed(containerd, ids, tmp_path)
    rewrite(store / "k", "stasis.json", DEEP.encode())

    new = unique_id("rst")
    ids.append(new)
    r = containerd.ctr(
        "run", "-d", "--runtime", RUNTIME,
        "--annotation", f"stasis.dev/restore-from={store / 'k'}",
        "--annotation", f"stasis.dev/restore-policy={policy}",
        IMAGE, new, "sh", "-c", COUNTER, check=False,
    )  # fmt: skip
    if policy == "fail":
        assert r.returncode != 0
        assert "stasis.json" in r.stderr and "RecursionError" not in r.stderr, r.stderr
    else:  # a fresh start: counting from 1 again
        assert r.returncode == 0, r.stderr
        assert wait_count(containerd, new, 0) >= 1
    # `stasis list` of that store skips the broken entry, with a warning
    listed = stasis(containerd, "list", "--store", str(store), check=False)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
