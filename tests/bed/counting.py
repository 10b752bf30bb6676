"""Counting pods on the test bed's Kubernetes cluster: each container writes its start
time once (/tmp/started), then a counter (/tmp/count) ten times a second; a restored
container counts on from its checkpoint, a fresh one from 1."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from bed.images import BUSYBOX_REF
from bed.kube import KubeCluster, KubeError

COUNTER = (
    "date +%s%N > /tmp/started; i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
)
WARM = 30  # counts (~3 s) before a checkpoint: a fresh start is far below


def counting_pod(name: str, containers: tuple[str, ...], **annotations: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": {"app": "stasis-restore"}}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "runtimeClassName": "stasis",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": c,
                    "image": BUSYBOX_REF,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", COUNTER],
                }
                for c in containers
            ],
        },
    }


def read(cluster: KubeCluster, pod: str, container: str, path: str) -> str:
    r = cluster.kubectl("exec", pod, "-c", container, "--", "cat", path, check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def count(cluster: KubeCluster, pod: str, container: str) -> int:
    """The counter's value (0 if none). `echo $i > /tmp/count` leaves the file empty
    for an instant while it rewrites it: an empty read is tried again."""
    for _ in range(10):
        text = read(cluster, pod, container, "/tmp/count")
        if text.isdigit():
            return int(text)
        time.sleep(0.1)
    return 0


def wait_count(cluster: KubeCluster, pod: str, container: str, above: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (n := count(cluster, pod, container)) > above:
            return n
        time.sleep(0.3)
    raise AssertionError(f"{pod}/{container} never counted past {above}")


def running(cluster: KubeCluster, name: str) -> Any:
    try:
        return cluster.wait_pod(name, "Running", timeout=120)
    except KubeError as e:
        pytest.fail(str(e), pytrace=False)


def create(cluster: KubeCluster, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "--validate=false", "-f", "-", input=json.dumps(manifest))
