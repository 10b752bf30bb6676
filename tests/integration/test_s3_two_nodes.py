"""Checkpoints in an S3-compatible bucket, restored on another node: a counter
checkpointed on containerd 1.7 ("node A") into moto_server comes back on
containerd 2.1 ("node B") and goes on counting, its files with it.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import boto3
import pytest
from bed import workload
from bed.containerd import Containerd, unique_id
from bed.workload import IMAGE, RUNTIME, remove, task
from conftest import S3Server

pytestmark = pytest.mark.integration

# S3 round trips are slower than local ones: more time for each step.
stasis = partial(workload.stasis, timeout=180)
wait_count = partial(workload.wait_count, timeout=30)

# Shared objects that boto3/botocore (the XML parsers) or zstandard load:
# a shim that never imported them has none of them mapped (its upload worker did).
# (ssl is no marker: asyncio maps it in every shim.)
UPLOAD_LIBS = ("zstandard", "/pyexpat.", "/_elementtree.")

COUNTER = (
    "echo data > /written; i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"
)


def test_checkpoint_on_node_a_restore_on_node_b(
    containerd_1_7: Containerd, containerd_2_1: Containerd, s3_server: S3Server
) -> None:
    a, b = containerd_1_7, containerd_2_1
    id, new = unique_id("s3a"), unique_id("s3b")
    prefix = f"s3://{s3_server.bucket}/{unique_id('run')}"
    a.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", COUNTER)
    try:
        before = wait_count(a, id, 40)
        shim = int((a.state / "io.containerd.runtime.v2.task" / a.namespace / id / "shim.pid")
                   .read_text())  # fmt: skip
        out = stasis(a, "checkpoint", id, "--exit", "--to", prefix, "--json")
        ref = json.loads(out.stdout)["ref"]
        assert ref.startswith(prefix + "/")
        maps = Path(f"/proc/{shim}/maps").read_text()  # the shim outlives its exited task
        assert not [m for m in UPLOAD_LIBS if m in maps], "the shim imported boto3 or zstandard"
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
