"""The control plane on the real Kubernetes 1.20 cluster (tests/bed/kube.py): the
stasis.dev CRDs applied from packaging/manifests, `stasis agent` and `stasis
controller` running against it with a kubeconfig, as a platform team uses them:

* a Checkpoint of a counting pod goes Succeeded with a ref, the pod is stopped, a
  Restore brings it back counting on from at least where it was;
* a CheckpointPolicy (every 10 s, keep 2) leaves exactly two Succeeded checkpoints of
  its pod, and the store holds no data of the deleted ones;
* an agent killed in the middle of a checkpoint leaves no Checkpoint Running: once
  it is back, the Checkpoint ends Succeeded or Failed;
* `stasis kube checkpoint` and `stasis kube restore` with only a kubeconfig.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bed.containerd import unique_id
from bed.counting import count, counting_pod, create, running, wait_count
from bed.kube import KubeCluster, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CRDS = sorted((REPO / "packaging" / "manifests").glob("0[5-7]-crd-*.yaml"))
GROUP = "stasis.dev/v1alpha1"


class Component:
    """`stasis agent` or `stasis controller`, this checkout's, ended by PID."""

    def __init__(self, name: str, args: list[str], log: Path) -> None:
        self.name, self.args, self.log = name, args, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runtime.cli", *self.args],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])


class Plane:
    def __init__(
        self, cluster: KubeCluster, agent: Component, controller: Component, ports: dict[str, int]
    ) -> None:
        self.cluster, self.agent, self.controller, self.ports = cluster, agent, controller, ports

    def metrics(self, component: str) -> str:
        url = f"http://127.0.0.1:{self.ports[component]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    def get(self, plural: str, name: str) -> dict[str, Any]:
        out = self.cluster.kubectl("get", f"{plural}.stasis.dev", name, "-o", "json")
        doc: dict[str, Any] = json.loads(out.stdout)
        return doc

    def wait(self, plural: str, name: str, done: Callable[[dict[str, Any]], bool],
             timeout: float = 180) -> dict[str, Any]:  # fmt: skip
        deadline = time.monotonic() + timeout
        obj: dict[str, Any] = {}
        while time.monotonic() < deadline:
            obj = self.get(plural, name)
            if done(obj):
                return obj
            time.sleep(0.5)
        raise AssertionError(
            f"{plural}/{name}: {obj.get('status')}\nagent:\n{self.agent.tail()}\n"
            f"controller:\n{self.controller.tail()}"
        )

    def phase(self, plural: str, name: str, *phases: str, timeout: float = 180) -> dict[str, Any]:
        obj = self.wait(plural, name, lambda o: (o.get("status") or {}).get("phase") in phases,
                        timeout)  # fmt: skip
        return obj

    def apply(self, doc: dict[str, Any]) -> None:
        create(self.cluster, doc)

    def stasis(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "runtime.cli", *args, f"--kubeconfig={self.cluster.kubeconfig}"],
            cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert done.returncode == 0, f"stasis {args}: {done.stderr}\n{self.agent.tail()}"
        return done


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("control-store")


@pytest.fixture(scope="module")
def plane(kube_cluster: KubeCluster, store: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Plane]:  # fmt: skip
    logs = tmp_path_factory.mktemp("control-logs")
    for crd in CRDS:
        kube_cluster.kubectl("apply", "--validate=false", "-f", str(crd))
    kube_cluster.kubectl(
        "wait", "--for=condition=established", "--timeout=60s",
        "crd/checkpoints.stasis.dev", "crd/restores.stasis.dev",
        "crd/checkpointpolicies.stasis.dev", timeout=90,
    )  # fmt: skip
    kubeconfig = f"--kubeconfig={kube_cluster.kubeconfig}"
    ports = {"agent": free_port(), "controller": free_port()}
    os.environ["STASIS_STORAGE_URL"] = f"file://{store}"  # the agent's default store
    agent = Component(
        "agent",
        ["--address", str(kube_cluster.containerd.address), "agent", "--node",
         kube_cluster.node_name, kubeconfig, "--metrics-port", str(ports["agent"]),
         "--metrics-address", "127.0.0.1"],
        logs / "agent.log",
    )  # fmt: skip
    controller = Component(
        "controller",
        ["controller", kubeconfig, "--lease-namespace", "default",
         "--metrics-port", str(ports["controller"]), "--metrics-address", "127.0.0.1"],
        logs / "controller.log",
    )  # fmt: skip
    agent.start()
    controller.start()
    try:
        yield Plane(kube_cluster, agent, controller, ports)
    finally:
        agent.kill(signal.SIGTERM)
        controller.kill(signal.SIGTERM)
        os.environ.pop("STASIS_STORAGE_URL", None)
        for plural in ("checkpointpolicies", "restores", "checkpoints"):
            out = kube_cluster.kubectl("get", f"{plural}.stasis.dev", "-o", "name", check=False)
            for name in out.stdout.split():
                kube_cluster.kubectl(
                    "patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":[]}}',
                    check=False,
                )  # fmt: skip
                kube_cluster.kubectl("delete", name, "--wait=false", check=False)
        kube_cluster.kubectl(
            "delete", "pod", "-l", "app=stasis-control", "--wait=false", check=False
        )


def control_pod(name: str) -> dict[str, Any]:
    pod = counting_pod(name, ("main",))
    pod["metadata"]["labels"] = {"app": "stasis-control", "pod": name}
    return pod


def pod_checkpoints(store: Path) -> set[str]:
    """The store's complete pod checkpoints (those holding pod.json)."""
    return {p.parent.name for p in store.glob("*/pod.json")}


def test_checkpoint_then_restore(plane: Plane, store: Path) -> None:
    name = unique_id("ctl")
    plane.apply(control_pod(name))
    running(plane.cluster, name)
    before = wait_count(plane.cluster, name, "main", 20)
    plane.apply({"apiVersion": GROUP, "kind": "Checkpoint", "metadata": {"name": name},
                 "spec": {"podName": name, "stopPod": True}})  # fmt: skip
    done = plane.phase("checkpoints", name, "Succeeded", "Failed")
    st = done["status"]
    assert st["phase"] == "Succeeded", st
    ref = st["ref"]
    assert ref.startswith(f"file://{store}/") and st["node"] == plane.cluster.node_name
    assert st["bytes"] > 0 and 0 < st["frozenSeconds"] <= st["totalSeconds"]
    assert "stasis.dev/checkpoint-data" in done["metadata"]["finalizers"]
    plane.cluster.kubectl("wait", "--for=delete", f"pod/{name}", "--timeout=90s", timeout=120)
    restore = f"{name}-r"
    plane.apply({"apiVersion": GROUP, "kind": "Restore", "metadata": {"name": restore},
                 "spec": {"checkpointName": name}})  # fmt: skip
    rst = plane.phase("restores", restore, "Succeeded", "Failed")["status"]
    assert rst["phase"] == "Succeeded" and rst["podName"] == name, rst
    after = wait_count(plane.cluster, name, "main", before)
    assert after > before
    events = plane.cluster.kubectl("get", "events", "-o", "json").stdout
    reasons = {e["reason"] for e in json.loads(events)["items"]}
    assert {"Checkpointed", "PodCreated", "Restored"} <= reasons
    # Deleting the Checkpoint removes its data (the pod's and its containers') first.
    plane.cluster.kubectl("delete", f"checkpoints.stasis.dev/{name}", "--timeout=60s")
    stored = ref.removeprefix(f"file://{store}/")
    assert [p.name for p in store.iterdir() if p.name.split(".")[0] == stored] == []
    # What Prometheus scrapes: the checkpoint and the restore counted and timed.
    agent, controller = plane.metrics("agent"), plane.metrics("controller")
    print(f"agent /metrics:\n{agent}\ncontroller /metrics:\n{controller}")
    assert 'stasis_checkpoints_total{outcome="succeeded"} 1.0' in agent
    assert "stasis_checkpoint_frozen_seconds_count 1.0" in agent
    assert 'stasis_restores_total{outcome="succeeded"} 1.0' in controller


def test_policy_keeps_two(plane: Plane, store: Path) -> None:
    name = unique_id("pol")
    plane.apply(control_pod(name))
    running(plane.cluster, name)
    plane.apply({"apiVersion": GROUP, "kind": "CheckpointPolicy", "metadata": {"name": name},
                 "spec": {"selector": {"matchLabels": {"pod": name}}, "intervalSeconds": 10,
                          "keep": 2}})  # fmt: skip
    time.sleep(60)

    def mine() -> list[dict[str, Any]]:
        out = plane.cluster.kubectl(
            "get", "checkpoints.stasis.dev", "-l", f"stasis.dev/policy={name}", "-o", "json"
        )
        return list(json.loads(out.stdout)["items"])

    deadline = time.monotonic() + 30
    while True:  # a deletion under way may still hold its finalizer a moment
        items = mine()
        done = [c for c in items if (c.get("status") or {}).get("phase") == "Succeeded"]
        if len(done) == 2 and not any(c["metadata"].get("deletionTimestamp") for c in done):
            break
        assert time.monotonic() < deadline, [
            (c["metadata"]["name"], c.get("status")) for c in items
        ]
        time.sleep(1)
    plane.cluster.kubectl("delete", f"checkpointpolicies.stasis.dev/{name}")
    kept = {c["status"]["ref"].removeprefix(f"file://{store}/") for c in done}
    # The store holds the kept ones, no other of this pod (deleted ones had their data
    # removed; one being taken right now may still come).
    theirs = {n for n in pod_checkpoints(store) if n.startswith(f"default-{name}-")}
    running_now = {r.removeprefix(f"file://{store}/") for c in mine()
                   if (r := (c.get("status") or {}).get("ref"))}  # fmt: skip
    assert kept <= theirs and theirs <= kept | running_now, (kept, theirs)


def test_agent_killed_mid_checkpoint(plane: Plane) -> None:
    name = unique_id("kill")
    plane.apply(control_pod(name))
    running(plane.cluster, name)
    plane.apply({"apiVersion": GROUP, "kind": "Checkpoint", "metadata": {"name": name},
                 "spec": {"podName": name}})  # fmt: skip
    plane.phase("checkpoints", name, "Running", "Succeeded", "Failed", timeout=120)
    plane.agent.kill(signal.SIGKILL)
    plane.agent.start()
    st = plane.phase("checkpoints", name, "Succeeded", "Failed", timeout=120)["status"]
    assert st["phase"] in ("Succeeded", "Failed") and st.get("message") is not None
    assert count(plane.cluster, name, "main") > 0  # the pod was left running


def test_cli_with_only_a_kubeconfig(plane: Plane, store: Path) -> None:
    name = unique_id("cli")
    plane.apply(control_pod(name))
    running(plane.cluster, name)
    before = wait_count(plane.cluster, name, "main", 20)
    out = plane.stasis("kube", "checkpoint", f"default/{name}", "--json")
    doc = json.loads(out.stdout)
    assert doc["phase"] == "Succeeded" and doc["ref"].startswith(f"file://{store}/")
    plane.cluster.kubectl("wait", "--for=delete", f"pod/{name}", "--timeout=90s", timeout=120)
    restored = plane.stasis("kube", "restore", doc["checkpoint"], "--namespace", "default")
    assert restored.stdout.strip() == name
    assert wait_count(plane.cluster, name, "main", before) > before
