"""The volumes of a pod checkpoint (runtime/kube/volumes.py) on the real Kubernetes 1.20
cluster (tests/bed/kube.py): record_volumes and restore_volumes around plain pod and
claim deletion.

1. A claim on a static hostPath PersistentVolume: recording sets the volume's reclaim
   policy to Retain; the pod and the claim are deleted (the volume goes Released); the
   restored claim binds the same volume again and a new pod reads the data.
2. The volume deleted too: the restored claim names no volume and asks its storage
   class (no dynamic provisioner runs in the bed: it stays Pending, as expected).
3. With the snapshot.storage.k8s.io CRDs (vendored under tests/bed/crds/) and a TEST
   STAND-IN for the CSI snapshot controller (tests/bed/snapshot_standin.py): an
   annotated claim gets a VolumeSnapshot of the default class, record_volumes waits
   until it is readyToUse (and names it when it never is), and the restored claim's
   dataSource is the snapshot.

Tests 2 and 3 need no running pod (the functions read only the pod's spec). Deleting
a pod takes up to a minute on kubelet 1.20 (see tests/integration/test_kube_pods.py);
the claim of test 1 waits for it (pvc-protection finalizer).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from bed.containerd import unique_id
from bed.images import BUSYBOX_REF
from bed.kube import KubeCluster
from bed.snapshot_standin import (
    GROUP,
    STANDIN_DRIVER,
    VERSION,
    SnapshotControllerStandIn,
    install_snapshot_crds,
    remove_crds,
)
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from runtime.errors import DeadlineExceeded
from runtime.kube.volumes import (
    DEFAULT_CLASS_ANNOTATION,
    SNAPSHOT_ANNOTATION,
    record_volumes,
    restore_volumes,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")
NS = "default"


def wait_for(pred: Callable[[], T | None], timeout: float, what: str, interval: float = 0.3) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- clients and cleanup ----------------------------------------------------------------


def api_client_for(cluster: KubeCluster) -> client.ApiClient:
    """A kubernetes client for the cluster, verifying the apiserver's self-made
    certificate (whose chain it writes into its --cert-dir)."""
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
    cfg.verify_ssl = True  # an unverified client warns, and warnings are errors here
    cfg.ssl_ca_cert = str(cluster.pki / "apiserver" / "apiserver.crt")
    return client.ApiClient(cfg)


@pytest.fixture(scope="module")
def api(kube_cluster: KubeCluster) -> Iterator[client.ApiClient]:
    with api_client_for(kube_cluster) as api_client:
        yield api_client


@pytest.fixture(scope="module")
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture(scope="module")
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


class Cleanup:
    """What a test created, deleted (404s ignored) in reverse order at its end; then
    waits (bounded) for the pods to go before removing the host directories."""

    def __init__(self, core: client.CoreV1Api, custom: client.CustomObjectsApi) -> None:
        self.core, self.custom = core, custom
        self.actions: list[Callable[[], Any]] = []
        self.pods: list[str] = []
        self.dirs: list[Path] = []

    def pod(self, name: str) -> None:
        self.pods.append(name)
        self.actions.append(
            lambda: self.core.delete_namespaced_pod(name, NS, grace_period_seconds=1)
        )

    def claim(self, name: str) -> None:
        self.actions.append(lambda: self.core.delete_namespaced_persistent_volume_claim(name, NS))

    def volume(self, name: str) -> None:
        self.actions.append(lambda: self.core.delete_persistent_volume(name))

    def snapshots_of(self, claim: str) -> None:
        def delete() -> None:
            items = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, NS, "volumesnapshots", label_selector=f"stasis.dev/claim={claim}"
            )["items"]
            for vs in items:
                self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, NS, "volumesnapshots", vs["metadata"]["name"]
                )

        self.actions.append(delete)

    def snapshot_class(self, name: str) -> None:
        self.actions.append(
            lambda: self.custom.delete_cluster_custom_object(
                GROUP, VERSION, "volumesnapshotclasses", name
            )
        )

    def directory(self) -> Path:
        d = Path(tempfile.mkdtemp(prefix="stasis-kubevol-"))
        d.chmod(0o777)
        self.dirs.append(d)
        return d

    def run(self) -> list[str]:
        problems = []
        for action in reversed(self.actions):
            try:
                action()
            except ApiException as e:
                if e.status != 404:
                    problems.append(f"{e.status} {e.reason}")
        deadline = time.monotonic() + 90  # kubelet 1.20's pod-deletion lag
        for name in self.pods:
            while time.monotonic() < deadline:
                try:
                    self.core.read_namespaced_pod(name, NS)
                except ApiException as e:
                    if e.status == 404:
                        break
                time.sleep(1)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        return problems


@pytest.fixture
def cleanup(core: client.CoreV1Api, custom: client.CustomObjectsApi) -> Iterator[Cleanup]:
    c = Cleanup(core, custom)
    try:
        yield c
    finally:
        problems = c.run()
    assert not problems, f"cleanup failed: {problems}"


# -- manifests --------------------------------------------------------------------------


def hostpath_volume(name: str, path: Path, storage_class: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name, "labels": {"test": "kubevolumes"}},
        "spec": {
            "capacity": {"storage": "16Mi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",  # record_volumes makes it Retain
            "storageClassName": storage_class,
            "hostPath": {"path": str(path), "type": "Directory"},
        },
    }


def claim(name: str, storage_class: str, annotations: dict[str, str] | None = None) -> Any:
    meta: dict[str, Any] = {"name": name, "labels": {"app": name}}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta,
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": storage_class,
            "resources": {"requests": {"storage": "8Mi"}},
        },
    }


def pod_with(name: str, claim_name: str, script: str, restart: str = "Always") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "restartPolicy": restart,
            "containers": [
                {
                    "name": "main",
                    "image": BUSYBOX_REF,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", script],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim_name}}],
        },
    }


def read_claim(core: client.CoreV1Api, name: str) -> Any:
    return core.api_client.sanitize_for_serialization(
        core.read_namespaced_persistent_volume_claim(name, NS)
    )


def bound_claim(core: client.CoreV1Api, name: str) -> Any:
    def bound() -> Any:
        pvc = read_claim(core, name)
        return pvc if pvc.get("status", {}).get("phase") == "Bound" else None

    return wait_for(bound, 60, f"PersistentVolumeClaim {name} Bound")


def volume_phase(core: client.CoreV1Api, name: str) -> str:
    return str(core.read_persistent_volume(name).status.phase)


def gone(read: Callable[[], Any]) -> bool:
    try:
        read()
    except ApiException as e:
        if e.status == 404:
            return True
        raise
    return False


def static_claim(
    core: client.CoreV1Api, cleanup: Cleanup, prefix: str, annotations: dict[str, str] | None = None
) -> tuple[str, str, Path]:
    """A hostPath volume and a claim bound to it: (claim, volume, host directory)."""
    name = unique_id(prefix)
    storage_class = f"manual-{name}"  # only this test's claim may bind this volume
    host_dir = cleanup.directory()
    core.create_persistent_volume(hostpath_volume(f"{name}-pv", host_dir, storage_class))
    cleanup.volume(f"{name}-pv")
    core.create_namespaced_persistent_volume_claim(NS, claim(name, storage_class, annotations))
    cleanup.claim(name)
    pvc = bound_claim(core, name)
    assert pvc["spec"]["volumeName"] == f"{name}-pv"
    return name, f"{name}-pv", host_dir


# -- 1. the same volume, bound again ----------------------------------------------------


def test_claim_rebinds_its_retained_volume(
    kube_cluster: KubeCluster,
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    cleanup: Cleanup,
) -> None:
    name, volume, host_dir = static_claim(core, cleanup, "kv-rebind")
    secret = f"written-before-{unique_id('data')}"
    writer = f"{name}-writer"
    cleanup.pod(writer)
    script = f"echo {secret} > /data/file && sync; trap 'exit 0' TERM; while :; do sleep 1; done"
    core.create_namespaced_pod(NS, pod_with(writer, name, script))
    pod = kube_cluster.wait_pod(writer, timeout=90)
    wait_for(lambda: (host_dir / "file").exists(), 10, "the pod's write")

    records = record_volumes(core, custom, pod)

    assert json.loads(json.dumps(records)) == records
    (record,) = records
    assert record["claimName"] == name and record["namespace"] == NS
    assert record["volume"]["name"] == volume
    assert record["volume"]["originalReclaimPolicy"] == "Delete"
    assert record["snapshot"] is None
    assert "status" not in record["claim"] and "uid" not in record["claim"]["metadata"]
    assert core.read_persistent_volume(volume).spec.persistent_volume_reclaim_policy == "Retain"

    core.delete_namespaced_pod(writer, NS, grace_period_seconds=1)
    core.delete_namespaced_persistent_volume_claim(name, NS)
    # the claim goes only once the pod has (kubelet 1.20 may hold it a minute)
    wait_for(
        lambda: gone(lambda: core.read_namespaced_persistent_volume_claim(name, NS)),
        120,
        f"claim {name} deleted",
        interval=1,
    )
    wait_for(lambda: volume_phase(core, volume) == "Released", 30, f"{volume} Released")
    assert (host_dir / "file").read_text().strip() == secret  # Retain kept the data

    assert restore_volumes(core, custom, records, NS) == [name]

    pvc = bound_claim(core, name)
    assert pvc["spec"]["volumeName"] == volume
    pv = core.read_persistent_volume(volume)
    assert (pv.status.phase, pv.spec.claim_ref.uid) == ("Bound", pvc["metadata"]["uid"])
    assert pvc["metadata"]["labels"] == {"app": name}

    reader = f"{name}-reader"
    cleanup.pod(reader)
    core.create_namespaced_pod(NS, pod_with(reader, name, "cat /data/file", restart="Never"))
    kube_cluster.wait_pod(reader, "Succeeded", timeout=90)
    assert kube_cluster.kubectl("logs", reader).stdout.strip() == secret

    # restoring again leaves the existing claim alone
    assert restore_volumes(core, custom, records, NS) == []


# -- 2. the volume gone too -------------------------------------------------------------


def test_claim_without_its_volume_asks_the_storage_class(
    core: client.CoreV1Api, custom: client.CustomObjectsApi, cleanup: Cleanup
) -> None:
    name, volume, _ = static_claim(core, cleanup, "kv-gone")
    pod = pod_with(f"{name}-never-created", name, "true")  # only its spec is read
    records = record_volumes(core, custom, pod)
    assert records[0]["volume"]["name"] == volume

    core.delete_namespaced_persistent_volume_claim(name, NS)
    wait_for(
        lambda: gone(lambda: core.read_namespaced_persistent_volume_claim(name, NS)),
        60,
        f"claim {name} deleted",
    )
    core.delete_persistent_volume(volume)
    wait_for(lambda: gone(lambda: core.read_persistent_volume(volume)), 60, f"{volume} deleted")

    assert restore_volumes(core, custom, records, NS) == [name]

    pvc = read_claim(core, name)
    spec = pvc["spec"]
    assert "volumeName" not in spec, spec
    assert "dataSource" not in spec, spec
    assert spec["storageClassName"] == f"manual-{name}"
    assert spec["resources"]["requests"]["storage"] == "8Mi"
    time.sleep(2)  # nothing provisions for class manual-*: it stays Pending
    assert read_claim(core, name)["status"]["phase"] == "Pending"


# -- 3. VolumeSnapshots -----------------------------------------------------------------


@pytest.fixture(scope="session")
def snapshot_crds(kube_cluster: KubeCluster) -> Iterator[None]:
    """The snapshot.storage.k8s.io/v1 CRDs, installed for the session when missing
    (removed at its end if this fixture created them)."""
    with api_client_for(kube_cluster) as api_client:
        ext = client.ApiextensionsV1Api(api_client)
        created = install_snapshot_crds(ext)
        try:
            yield
        finally:
            remove_crds(ext, created)


@pytest.fixture
def standin(snapshot_crds: None, api: client.ApiClient) -> Iterator[SnapshotControllerStandIn]:
    """The TEST STAND-IN for the CSI snapshot controller (marks snapshots ready)."""
    with SnapshotControllerStandIn(api) as s:
        yield s
    assert not s.errors, s.errors


def snapshot_class(
    custom: client.CustomObjectsApi, cleanup: Cleanup, name: str, default: bool
) -> None:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VolumeSnapshotClass",
        "metadata": {"name": name},
        "driver": STANDIN_DRIVER,
        "deletionPolicy": "Delete",
    }
    if default:
        body["metadata"]["annotations"] = {DEFAULT_CLASS_ANNOTATION: "true"}
    custom.create_cluster_custom_object(GROUP, VERSION, "volumesnapshotclasses", body)
    cleanup.snapshot_class(name)


def test_snapshot_is_the_restored_claims_data_source(
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    cleanup: Cleanup,
    standin: SnapshotControllerStandIn,
) -> None:
    name, volume, _ = static_claim(core, cleanup, "kv-snap", {SNAPSHOT_ANNOTATION: "true"})
    cleanup.snapshots_of(name)
    plain, _, _ = static_claim(core, cleanup, "kv-plain")  # not annotated: no snapshot
    snapshot_class(custom, cleanup, f"{name}-other", default=False)
    snapshot_class(custom, cleanup, f"{name}-default", default=True)
    pod = pod_with(f"{name}-never-created", name, "true")
    pod["spec"]["volumes"].append({"name": "b", "persistentVolumeClaim": {"claimName": plain}})

    records = record_volumes(core, custom, pod, timeout=60)

    assert [r["claimName"] for r in records] == [name, plain]
    snap = records[0]["snapshot"]
    assert records[1]["snapshot"] is None
    assert snap["namespace"] == NS and snap["className"] == f"{name}-default"
    vs = custom.get_namespaced_custom_object(GROUP, VERSION, NS, "volumesnapshots", snap["name"])
    assert vs["spec"] == {
        "source": {"persistentVolumeClaimName": name},
        "volumeSnapshotClassName": f"{name}-default",
    }
    assert vs["status"]["readyToUse"] is True  # record_volumes waited for it
    assert snap["restoreSize"] == vs["status"]["restoreSize"] == "16Mi"

    for c in (name, plain):
        core.delete_namespaced_persistent_volume_claim(c, NS)
    for c in (name, plain):
        wait_for(
            lambda c=c: gone(lambda: core.read_namespaced_persistent_volume_claim(c, NS)),
            60,
            f"claim {c} deleted",
        )

    assert restore_volumes(core, custom, records, NS) == [name, plain]

    spec = read_claim(core, name)["spec"]
    assert spec["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": snap["name"],
    }
    assert "volumeName" not in spec, spec
    assert spec["storageClassName"] == f"manual-{name}"
    assert read_claim(core, plain)["spec"]["volumeName"] == f"{plain}-pv"
    assert volume_phase(core, volume) == "Released"  # retained, not reused: the snapshot is


def test_record_names_the_snapshot_that_never_gets_ready(
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    cleanup: Cleanup,
    standin: SnapshotControllerStandIn,
) -> None:
    name, _, _ = static_claim(core, cleanup, "kv-slow")
    cleanup.snapshots_of(name)
    snapshot_class(custom, cleanup, f"{name}-class", default=False)
    pod = pod_with(f"{name}-never-created", name, "true")
    standin.hold()
    with pytest.raises(DeadlineExceeded) as info:
        record_volumes(
            core, custom, pod, snapshot_all=True, snapshot_class=f"{name}-class", timeout=2
        )
    message = str(info.value)
    assert "\n" not in message
    assert f"VolumeSnapshot {NS}/{name}-stasis-" in message, message
    assert "not readyToUse after 2s" in message, message
    # the failed call took its snapshot back
    left = custom.list_namespaced_custom_object(
        GROUP, VERSION, NS, "volumesnapshots", label_selector=f"stasis.dev/claim={name}"
    )["items"]
    assert left == []
    standin.release()
