"""The Kubernetes test bed: pods on the default runtime (runc) and RuntimeClass `stasis`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from bed.containerd import unique_id
from bed.images import BUSYBOX_REF
from bed.kube import KubeCluster, KubeError

pytestmark = pytest.mark.integration


def pod_manifest(name: str, marker: str, runtime_class: str | None = None) -> str:
    """A busybox pod that prints marker, then sleeps (and stops at once on SIGTERM)."""
    spec: dict[str, object] = {
        "terminationGracePeriodSeconds": 2,
        "containers": [
            {
                "name": "main",
                "image": BUSYBOX_REF,
                "imagePullPolicy": "Never",
                "command": [
                    "sh", "-c",
                    f"echo {marker}; trap 'exit 0' TERM; while :; do sleep 1; done",
                ],
            }
        ],
    }  # fmt: skip
    if runtime_class is not None:
        spec["runtimeClassName"] = runtime_class
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


def apply(cluster: KubeCluster, manifest: str) -> None:
    cluster.kubectl("apply", "--validate=false", "-f", "-", input=manifest)


def delete(cluster: KubeCluster, name: str) -> None:
    """Starts deleting the pod; the cluster's stop() waits for every pod to be gone.
    (A kubelet 1.20 sometimes keeps a dead sandbox until its once-a-minute container
    GC, which holds the pod object that long.)"""
    cluster.kubectl("delete", "pod", name, "--wait=false")


def logs_show(cluster: KubeCluster, name: str, marker: str, timeout: float = 10) -> str:
    """`kubectl logs` until marker shows (the container may not have printed yet)."""
    deadline = time.monotonic() + timeout
    while True:
        out = cluster.kubectl("logs", name).stdout
        if marker in out or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


@pytest.fixture(scope="module")
def runc_pod(kube_cluster: KubeCluster) -> Iterator[str]:
    """A running busybox pod on the default runtime handler (runc)."""
    name = unique_id("bb-runc")
    apply(kube_cluster, pod_manifest(name, f"hello-{name}"))
    try:
        kube_cluster.wait_pod(name)
        yield name
    finally:
        delete(kube_cluster, name)


def test_default_runtime_pod_logs(kube_cluster: KubeCluster, runc_pod: str) -> None:
    pod = kube_cluster.pod(runc_pod)
    assert pod["status"]["phase"] == "Running"
    assert pod["spec"]["nodeName"] == kube_cluster.node_name
    assert pod["status"]["podIP"], "the CNI bridge gave the pod no address"
    assert f"hello-{runc_pod}" in logs_show(kube_cluster, runc_pod, f"hello-{runc_pod}")


def test_default_runtime_kubectl_exec(kube_cluster: KubeCluster, runc_pod: str) -> None:
    r = kube_cluster.kubectl("exec", runc_pod, "--", "sh", "-c", "echo exec-$((6 * 7)); hostname")
    assert r.stdout.split() == ["exec-42", runc_pod]
    r = kube_cluster.kubectl("exec", "-i", runc_pod, "--", "cat", input="via-stdin\n")
    assert r.stdout == "via-stdin\n"


def test_runtime_class_stasis_exists(kube_cluster: KubeCluster) -> None:
    rc = kube_cluster.api("GET", "/apis/node.k8s.io/v1/runtimeclasses/stasis")
    assert rc["handler"] == "stasis"


def test_stasis_runtime_pod_logs(kube_cluster: KubeCluster) -> None:
    name = unique_id("bb-stasis")
    marker = f"hello-{name}"
    apply(kube_cluster, pod_manifest(name, marker, runtime_class="stasis"))
    try:
        pod = kube_cluster.wait_pod(name, timeout=90)
        assert pod["spec"]["runtimeClassName"] == "stasis"
        assert marker in logs_show(kube_cluster, name, marker)
    except KubeError as e:
        pytest.fail(str(e), pytrace=False)
    finally:
        delete(kube_cluster, name)
