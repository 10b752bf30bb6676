"""Output of short-lived containers through ctr on containerd 1.7 and 2.1: none is lost.

`ctr run --rm` closes its FIFOs as soon as it sees the task's exit, so output
that the client has not read by then is gone. The shim reports an exit only
once what the process wrote has been read (shim/task/stdio.py), and opens an output
FIFO for writing only once a reader has it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from bed.containerd import Containerd, unique_id
from bed.workload import shim_pids

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.stasis.v2"
IMAGE = "docker.io/stasis/busybox:test"
PARALLEL = 50
ROUNDS = 10


def ctr_argv(c: Containerd, *args: str) -> list[str]:
    return [str(c.bin_dir / "ctr"), "--address", str(c.address), "--namespace", c.namespace, *args]


@pytest.fixture
def cpu_hogs() -> Iterator[None]:
    """Two busy-looping processes beside the test (a loaded machine); killed by PID."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


@pytest.mark.parametrize("round", range(1, ROUNDS + 1))
def test_parallel_short_lived_containers_lose_no_output(
    containerd: Containerd, cpu_hogs: None, round: int
) -> None:
    ids = [unique_id(f"out{i}") for i in range(PARALLEL)]

    def run(id: str) -> subprocess.CompletedProcess[str]:
        return containerd.ctr("run", "--runtime", RUNTIME, "--rm", IMAGE, id, "echo", f"line-{id}",
                              check=False, timeout=180)  # fmt: skip

    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(run, ids))
    failed = {id: r.stderr.strip() for id, r in zip(ids, results, strict=True) if r.returncode}
    assert not failed, f"ctr run failed: {failed}"
    lost = [id for id, r in zip(ids, results, strict=True) if r.stdout != f"line-{id}\n"]
    assert not lost, f"round {round}: {len(lost)}/{PARALLEL} containers lost their output: {lost}"
    left = containerd.ctr("containers", "ls", "-q").stdout.split()
    assert not set(ids) & set(left)
    deadline = time.monotonic() + 30
    while shim_pids(containerd) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not shim_pids(containerd), "shims left running"


def test_exit_waits_until_the_client_read_the_output(containerd: Containerd) -> None:
    """The ordering the stress test above depends on, made certain: the client is
    slow to read (ctr's own stdout is full for a second), so when the container
    exits its last ~64 KiB still wait in the pipes. Reported at once, the exit
    would make ctr close its FIFOs and drop them; the shim holds it until ctr has
    read them."""
    id = unique_id("slowreader")
    fg = subprocess.Popen(
        ctr_argv(containerd, "run", "--runtime", RUNTIME, "--rm", IMAGE, id, "seq", "1", "30000"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=containerd.env(),
    )
    try:
        time.sleep(1.0)  # seq has written everything it could and exited by now
        out, err = fg.communicate(timeout=60)
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.communicate()
    assert fg.returncode == 0, err
    lines = out.split()
    assert len(lines) == 30000 and lines[-1] == b"30000", f"{len(lines)} lines, ends {lines[-1:]}"
