"""What the integration tests do to containers again and again: run the stasis CLI
against a private containerd, find a task, read a counter, hold memory, find a
bundle, remove a container."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bed.containerd import Containerd, unique_id

RUNTIME = "io.containerd.stasis.v2"
IMAGE = "docker.io/stasis/busybox:test"
# busybox sh: counts in /tmp/count, 20 times a second
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"


def holding_memory(mib: int) -> str:
    """busybox sh: a `dd` holds `mib` MiB of random bytes in one buffer (blocked on its
    second read for ever, as in bench/checkpoint.py), next to COUNTER."""
    n = mib << 20
    return (
        f"(head -c {n} /dev/urandom; exec sleep 1000000) | "
        f"dd bs={n} count=2 iflag=fullblock of=/dev/null 2>/dev/null & {COUNTER}"
    )


def bundle(c: Containerd, id: str) -> Path:
    """The task's bundle directory (shim.pid, log, rootfs ...)."""
    return c.state / "io.containerd.runtime.v2.task" / c.namespace / id


def shim_pids(c: Containerd) -> list[int]:
    """PIDs of our shim daemons serving this containerd (by their environment)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if b"containerd-shim-stasis-v2" in cmdline and str(c.address).encode() in environ:
            found.append(int(entry))
    return found


def stasis_argv(c: Containerd) -> list[str]:
    """The stasis CLI of this checkout, aimed at ``c``."""
    return [sys.executable, "-m", "runtime.cli", "--address", str(c.address), "-n", c.namespace]


def stasis(
    c: Containerd, *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``stasis ARGS``; with ``check`` a failure raises with its stderr."""
    done = subprocess.run(
        [*stasis_argv(c), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"stasis {' '.join(args)} failed: {done.stderr}")
    return done


def task(c: Containerd, id: str) -> tuple[int, str] | None:
    """(init PID, status) of task ``id`` as `ctr task ls` shows it, or None."""
    for line in c.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == id:
            return int(fields[1]), fields[2]
    return None


def count(pid: int) -> int:
    """The counter a test container writes to /tmp/count."""
    with open(f"/proc/{pid}/root/tmp/count", encoding="ascii") as f:
        return int(f.read().strip() or 0)


def wait_count(c: Containerd, id: str, above: int, timeout: float = 20) -> int:
    """Wait until task ``id`` runs and has counted past ``above``; returns the count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = task(c, id)
        if t and t[1] == "RUNNING":
            try:
                n = count(t[0])
            except (OSError, ValueError):
                n = 0
            if n > above:
                return n
        time.sleep(0.05)
    raise AssertionError(f"{id} never counted past {above}")


def remove(c: Containerd, id: str) -> None:
    """Kill and delete the task and the container ``id`` (whatever state they are in)."""
    c.ctr("task", "kill", "-s", "KILL", id, check=False)
    for _ in range(100):
        if task(c, id) is None or c.ctr("task", "rm", "-f", id, check=False).returncode == 0:
            break
        time.sleep(0.05)
    c.ctr("containers", "rm", id, check=False)


def start_counter(c: Containerd, ids: list[str], prefix: str, script: str = COUNTER) -> str:
    """Run ``script`` (COUNTER) in a new container named after ``prefix``, recorded in
    ``ids`` for the test's clean-up; its id."""
    id = unique_id(prefix)
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", script)
    ids.append(id)
    return id


def run_restoring(
    c: Containerd, ids: list[str], ref: object, *flags: str
) -> tuple[str, subprocess.CompletedProcess[str]]:
    """``ctr run -d`` a new container restored from ``ref`` (with ``flags`` before the
    image), recorded in ``ids``; its id and ctr's result, failed or not."""
    new = unique_id("rst")
    ids.append(new)
    r = c.ctr("run", "-d", "--runtime", RUNTIME, *flags,
              "--annotation", f"stasis.dev/restore-from={ref}", IMAGE, new,
              check=False)  # fmt: skip
    return new, r
