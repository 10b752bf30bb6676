"""Transparent restore of pods on the real Kubernetes 1.20 cluster (tests/bed/kube.py):
`stasis kube checkpoint` freezes every container of a pod, dumps each and writes a pod
checkpoint; a new pod annotated `stasis.dev/restore-from: REF` on RuntimeClass stasis
(`stasis kube restore` creates it) gets each container restored by the shim.

Counting containers show it: each writes its start time once (/tmp/started) and then a
counter (/tmp/count). A restored container keeps both (its count goes on from the
checkpoint); a fresh one writes a new start time and counts from 1.

Pods are few (the machine is slow) and deleted without waiting; the module's teardown
waits (bounded) for them to go (kubelet 1.20 may hold a deleted pod up to a minute, see
test_kube_pods.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bed.containerd import unique_id
from bed.counting import COUNTER, WARM, count, counting_pod, create, read, running, wait_count
from bed.kube import KubeCluster
from bed.tamper import resign

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def stasis(
    cluster: KubeCluster, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`stasis ARGS` of this checkout against the cluster's containerd."""
    done = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "--address", str(cluster.containerd.address), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"stasis {' '.join(args)}: rc {done.returncode}: {done.stderr}")
    return done


def wait_event(cluster: KubeCluster, pod: str, *needles: str, timeout: float = 120) -> str:
    """The pod's events once one of them contains every needle."""
    deadline = time.monotonic() + timeout
    events = ""
    while time.monotonic() < deadline:
        events = cluster.events(pod)
        if any(all(n in line for n in needles) for line in events.splitlines()):
            return events
        time.sleep(1)
    raise AssertionError(f"no event of {pod} mentions {needles}; events:\n{events}")


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pods(kube_cluster: KubeCluster) -> Iterator[list[str]]:
    """Names of the pods the module created: deleted at the end (bounded wait)."""
    names: list[str] = []
    yield names
    if names:
        kube_cluster.kubectl(
            "delete", "pod", "--wait=false", "--ignore-not-found", *names, check=False
        )
        kube_cluster.kubectl(
            "wait", "--for=delete", "--timeout=75s", *[f"pod/{n}" for n in names],
            check=False, timeout=90,
        )  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kube-store")


@pytest.fixture(scope="module")
def two(kube_cluster: KubeCluster, pods: list[str], store: Path) -> dict[str, Any]:
    """A running two-container pod checkpointed with --leave-running: its REF, the
    counts and start times read before the checkpoint."""
    name = unique_id("two")
    pods.append(name)
    create(kube_cluster, counting_pod(name, ("a", "b")))
    running(kube_cluster, name)
    before = {c: wait_count(kube_cluster, name, c, WARM) for c in ("a", "b")}
    started = {c: read(kube_cluster, name, c, "/tmp/started") for c in ("a", "b")}
    out = stasis(
        kube_cluster, "kube", "checkpoint", "--on-node", f"default/{name}", "--to", str(store),
        "--leave-running", "--json", f"--kubeconfig={kube_cluster.kubeconfig}",
    ).stdout  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    return {"pod": name, "before": before, "started": started, **result}


# -- tests ----------------------------------------------------------------------------


def test_install_is_idempotent(kube_cluster: KubeCluster) -> None:
    for _ in range(2):
        r = stasis(kube_cluster, "kube", "install", f"--kubeconfig={kube_cluster.kubeconfig}")
        assert r.stdout.strip() == "stasis"
    rc = kube_cluster.api("GET", "/apis/node.k8s.io/v1/runtimeclasses/stasis")
    assert rc["handler"] == "stasis"


def test_counting_pod_checkpointed_deleted_and_restored(
    kube_cluster: KubeCluster, pods: list[str], store: Path
) -> None:
    name = unique_id("count")
    pods.append(name)
    create(kube_cluster, counting_pod(name, ("main",)))
    running(kube_cluster, name)
    before = wait_count(kube_cluster, name, "main", WARM)
    started = read(kube_cluster, name, "main", "/tmp/started")
    # Without --leave-running the pod is stopped: deleted, its containers killed.
    ref = stasis(
        kube_cluster, "kube", "checkpoint", "--on-node", f"default/{name}", "--to", str(store),
        f"--kubeconfig={kube_cluster.kubeconfig}",
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    assert ref.startswith("file://")
    pod_dir = Path(ref.removeprefix("file://"))
    record = json.loads((pod_dir / "pod.json").read_text())
    assert list(record["containers"]) == ["main"]
    assert record["volumes"] == []
    assert "status" not in record["pod"] and "uid" not in record["pod"]["metadata"]
    assert (store / record["containers"]["main"] / "manifest.json").is_file()
    gone = kube_cluster.api("GET", "/api/v1/namespaces/default/pods")["items"]
    mine = [p for p in gone if p["metadata"]["name"] == name]
    assert not mine or mine[0]["metadata"].get("deletionTimestamp"), "pod not stopped"

    new = unique_id("restored")
    pods.append(new)
    out = stasis(
        kube_cluster, "kube", "restore", "--on-node", ref, "--name", new,
        f"--kubeconfig={kube_cluster.kubeconfig}",
    ).stdout  # fmt: skip
    assert out.strip().splitlines()[-1] == new
    pod = kube_cluster.pod(new)
    assert pod["spec"]["runtimeClassName"] == "stasis"
    assert pod["metadata"]["annotations"]["stasis.dev/restore-from"] == ref
    after = count(kube_cluster, new, "main")
    assert after >= before, f"restored pod counts from {after}, checkpointed at >= {before}"
    assert read(kube_cluster, new, "main", "/tmp/started") == started
    assert wait_count(kube_cluster, new, "main", after) > after  # and it counts on


def test_two_container_pod_restored(
    kube_cluster: KubeCluster, pods: list[str], two: dict[str, Any]
) -> None:
    # --leave-running: the original runs on, not restarted.
    original = kube_cluster.pod(two["pod"])
    assert all(s["restartCount"] == 0 for s in original["status"]["containerStatuses"])
    assert wait_count(kube_cluster, two["pod"], "a", two["before"]["a"]) > two["before"]["a"]
    assert set(two["containers"]) == {"a", "b"}

    new = unique_id("two-restored")
    pods.append(new)
    stasis(
        kube_cluster, "kube", "restore", "--on-node", two["ref"], "--name", new,
        f"--kubeconfig={kube_cluster.kubeconfig}",
    )  # fmt: skip
    running(kube_cluster, new)
    for c in ("a", "b"):
        assert count(kube_cluster, new, c) >= two["before"][c]
        assert read(kube_cluster, new, c, "/tmp/started") == two["started"][c]


def test_failed_restores(
    kube_cluster: KubeCluster, pods: list[str], two: dict[str, Any], store: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Missing or corrupt checkpoint: policy fail -> an event naming the checkpoint and
    the reason, no container runs; policy fresh -> it starts fresh (the other
    container, whose checkpoint is sound, is still restored)."""
    missing_ref = f"file://{store}/no-such-checkpoint"
    missing = unique_id("missing")
    pods.append(missing)
    create(
        kube_cluster,
        counting_pod(missing, ("a",), **{"stasis.dev/restore-from": missing_ref}),
    )
    # A copy of the two-container checkpoint whose container `a` has a corrupt image.
    bad_store = tmp_path / "bad"
    shutil.copytree(store, bad_store, symlinks=True)
    pod_name = Path(two["ref"]).name
    member = bad_store / two["containers"]["a"]["name"] / "checkpoint"
    image = max((p for p in member.glob("pages-*.img")), key=lambda p: p.stat().st_size)
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))
    bad_ref = f"file://{bad_store}/{pod_name}"
    corrupt, fresh = unique_id("corrupt"), unique_id("fresh")
    pods += [corrupt, fresh]
    stasis(
        kube_cluster, "kube", "restore", "--on-node", bad_ref, "--name", corrupt, "--no-wait",
        f"--kubeconfig={kube_cluster.kubeconfig}",
    )  # fmt: skip
    r = stasis(
        kube_cluster, "kube", "restore", "--on-node", bad_ref, "--name", fresh, "--policy", "fresh",
        f"--kubeconfig={kube_cluster.kubeconfig}", check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr

    wait_event(kube_cluster, missing, "no-such-checkpoint", "restore from checkpoint")
    wait_event(kube_cluster, corrupt, bad_ref, image.name, "sha256 mismatch")
    for name in (missing, corrupt):
        statuses = kube_cluster.pod(name)["status"].get("containerStatuses") or []
        a = next(s for s in statuses if s["name"] == "a")
        assert "running" not in a["state"], a

    # fresh: `a` starts over (new start time, counts from 1), `b` is restored
    assert read(kube_cluster, fresh, "a", "/tmp/started") != two["started"]["a"]
    assert read(kube_cluster, fresh, "b", "/tmp/started") == two["started"]["b"]
    assert count(kube_cluster, fresh, "b") >= two["before"]["b"]


def test_pod_with_a_claim_comes_back_on_its_retained_volume(
    kube_cluster: KubeCluster, pods: list[str], store: Path, tmp_path: Path
) -> None:
    """The whole flow through `stasis kube`: the checkpoint records the claim and sets
    its hostPath volume to Retain; pod and claim are deleted; the restore recreates
    the claim, which re-binds the same volume, and the restored pod reads what was
    written before and counts on."""
    name = unique_id("pvc")
    host = tmp_path / "volume"
    host.mkdir()
    host.chmod(0o777)
    pv, claim, sc = f"pv-{name}", f"claim-{name}", f"manual-{name}"
    create(kube_cluster, {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
        "spec": {
            "capacity": {"storage": "1Mi"}, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete", "storageClassName": sc,
            "hostPath": {"path": str(host), "type": "Directory"},
        },
    })  # fmt: skip
    try:
        create(kube_cluster, {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": "default"},
            "spec": {
                "accessModes": ["ReadWriteOnce"], "storageClassName": sc,
                "resources": {"requests": {"storage": "1Mi"}},
            },
        })  # fmt: skip
        manifest = counting_pod(name, ("main",))
        spec = manifest["spec"]
        spec["volumes"] = [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]
        main = spec["containers"][0]
        main["volumeMounts"] = [{"name": "data", "mountPath": "/data"}]
        main["command"] = ["sh", "-c", "echo kept > /data/file; " + COUNTER]
        pods.append(name)
        create(kube_cluster, manifest)
        running(kube_cluster, name)
        before = wait_count(kube_cluster, name, "main", WARM)

        ref = stasis(
            kube_cluster, "kube", "checkpoint", "--on-node", f"default/{name}", "--to", str(store),
            f"--kubeconfig={kube_cluster.kubeconfig}",
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        volume = kube_cluster.api("GET", f"/api/v1/persistentvolumes/{pv}")
        assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
        record = json.loads((Path(ref.removeprefix("file://")) / "pod.json").read_text())
        assert [v["claimName"] for v in record["volumes"]] == [claim]

        kube_cluster.kubectl("delete", "pvc", claim, "--wait=false")
        kube_cluster.kubectl(
            "wait", "--for=delete", f"pod/{name}", f"pvc/{claim}", "--timeout=150s",
            check=False, timeout=170,
        )  # fmt: skip
        assert kube_cluster.kubectl("get", "pvc", claim, check=False).returncode != 0

        new = unique_id("pvc-restored")
        pods.append(new)
        stasis(
            kube_cluster, "kube", "restore", "--on-node", ref, "--name", new,
            f"--kubeconfig={kube_cluster.kubeconfig}",
        )  # fmt: skip
        restored = kube_cluster.api(
            "GET", f"/api/v1/namespaces/default/persistentvolumeclaims/{claim}"
        )
        assert restored["spec"]["volumeName"] == pv
        assert restored["status"]["phase"] == "Bound"
        assert read(kube_cluster, new, "main", "/data/file") == "kept"
        after = count(kube_cluster, new, "main")
        assert after >= before
        assert wait_count(kube_cluster, new, "main", after) > after
    finally:
        mine = [p for p in pods if p == name or p.startswith("pvc-restored")]
        kube_cluster.kubectl(
            "delete", "pod", "--wait=false", "--ignore-not-found", *mine, check=False
        )
        kube_cluster.kubectl(
            "delete", "pvc", claim, "--wait=false", "--ignore-not-found", check=False
        )
        kube_cluster.kubectl("delete", "pv", pv, "--wait=false", "--ignore-not-found", check=False)


def test_pod_json_asking_for_privileged_is_refused(
    kube_cluster: KubeCluster, pods: list[str], two: dict[str, Any], store: Path
) -> None:
    """Whoever can write a checkpoint edits pod.json (re-hashed into the manifest and
    re-signed, so the checkpoint verifies) to make container `a` privileged: `stasis kube restore`
    refuses it, naming the pod, the container and the field, and creates no pod."""
    source = Path(two["ref"].removeprefix("file://"))
    name = unique_id("evil")
    edited = store / name
    shutil.copytree(source, edited)
    record = json.loads((edited / "pod.json").read_text())
    a = next(c for c in record["pod"]["spec"]["containers"] if c["name"] == "a")
    a.setdefault("securityContext", {})["privileged"] = True
    data = json.dumps(record, indent=1).encode()
    (edited / "pod.json").write_bytes(data)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["name"] = name
    manifest["files"]["pod.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (edited / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    resign(edited)  # as a holder of a trusted key (or an import --trust) would

    new = unique_id("privileged")
    pods.append(new)
    r = stasis(
        kube_cluster, "kube", "restore", "--on-node", f"file://{edited}", "--name", new,
        "--no-wait", f"--kubeconfig={kube_cluster.kubeconfig}", check=False,
    )  # fmt: skip
    assert r.returncode != 0, f"restored: {r.stdout}"
    assert f"pod default/{new}: container a: securityContext.privileged: true" in r.stderr
    assert kube_cluster.kubectl("get", "pod", new, check=False).returncode != 0
