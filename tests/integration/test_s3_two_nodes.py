"""Checkpoints in an S3-compatible bucket, restored on another node: a counter
checkpointed on containerd 1.7 ("node A") into moto_server comes back on
containerd 2.1 ("node B") and goes on counting, its files with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import boto3
import pytest
from bed.containerd import Containerd, unique_id
from conftest import S3Server

pytestmark = pytest.mark.integration

RUNTIME = "io.containerd.stasis.v2"
IMAGE = "docker.io/stasis/busybox:test"
COUNTER = (
    "echo data > /written; i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"
)


def stasis(c: Containerd, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "runtime.cli", "--address", str(c.address), "-n", c.namespace]
    done = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL
    )
    if check and done.returncode != 0:
        raise AssertionError(f"stasis {' '.join(args)} failed: {done.stderr}")
    return done


def task(c: Containerd, id: str) -> tuple[int, str] | None:
    for line in c.ctr("task", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields[0] == id:
            return int(fields[1]), fields[2]
    return None


def wait_count(c: Containerd, id: str, above: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        t = task(c, id)
        if t and t[1] == "RUNNING":
            try:
                with open(f"/proc/{t[0]}/root/tmp/count", encoding="ascii") as f:
                    n = int(f.read().strip() or 0)
            except (OSError, ValueError):
                n = 0
            if n > above:
                return n
        time.sleep(0.05)
    raise AssertionError(f"{id} never counted past {above}")


def remove(c: Containerd, id: str) -> None:
    c.ctr("task", "kill", "-s", "KILL", id, check=False)
    for _ in range(100):
        if task(c, id) is None or c.ctr("task", "rm", "-f", id, check=False).returncode == 0:
            break
        time.sleep(0.05)
    c.ctr("containers", "rm", id, check=False)


def test_checkpoint_on_node_a_restore_on_node_b(
    containerd_1_7: Containerd, containerd_2_1: Containerd, s3_server: S3Server
) -> None:
    a, b = containerd_1_7, containerd_2_1
    id, new = unique_id("s3a"), unique_id("s3b")
    prefix = f"s3://{s3_server.bucket}/{unique_id('run')}"
    a.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", COUNTER)
    try:
        before = wait_count(a, id, 40)
        out = stasis(a, "checkpoint", id, "--exit", "--to", prefix, "--json")
        ref = json.loads(out.stdout)["ref"]
        assert ref.startswith(prefix + "/")
        remove(a, id)
        # Only the manifest makes it a checkpoint: it is there, and listed.
        listed = stasis(a, "list", "--store", prefix, "--json").stdout
        assert ref.rsplit("/", 1)[1] in listed

        b.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
              f"stasis.dev/restore-from={ref}", IMAGE, new)  # fmt: skip
        assert wait_count(b, new, 0) >= before, "counting continued on node B"
        pid = task(b, new)[0]  # type: ignore[index]
        with open(f"/proc/{pid}/root/written", encoding="utf-8") as f:
            assert f.read() == "data\n"
    finally:
        remove(a, id)
        remove(b, new)


def test_wrong_secret_is_one_clear_line_and_the_container_keeps_running(
    containerd_1_7: Containerd, s3_server: S3Server, tmp_path: object
) -> None:
    c = containerd_1_7
    id = unique_id("s3w")
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", COUNTER)
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key_id,
        aws_secret_access_key=s3_server.secret_access_key,
        region_name="us-east-1",
    )
    try:
        wait_count(c, id, 5)
        # A bucket that does not exist stands in for refused access: moto accepts any key.
        r = stasis(c, "checkpoint", id, "--to", "s3://no-such-bucket-stasis/x", check=False)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "no-such-bucket-stasis" in lines[0], r.stderr
        assert s3_server.secret_access_key not in r.stderr + r.stdout
        n = wait_count(c, id, 0)
        wait_count(c, id, n)  # still running
        objects = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix="x/").get("KeyCount", 0)
        assert objects == 0
    finally:
        remove(c, id)
