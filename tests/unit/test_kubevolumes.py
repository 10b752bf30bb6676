"""Tests for runtime.kube.volumes: the pure core (reading and building claims, volumes
and snapshots) and the two entry points against an in-memory fake of the API calls
they make (the real cluster is tests/integration/test_kube_volumes.py)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from runtime.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from runtime.kube import volumes as kv

NS = "shop"


def pvc(
    name: str = "data",
    volume: str | None = "pv-data",
    *,
    annotations: dict[str, str] | None = None,
    storage_class: str | None = "fast",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "1Gi"}},
        "volumeMode": "Filesystem",
    }
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    if volume:
        spec["volumeName"] = volume
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "resourceVersion": "42",
            "creationTimestamp": "2024-01-01T00:00:00Z",
            "finalizers": ["kubernetes.io/pvc-protection"],
            "labels": {"app": "shop"},
            "annotations": {
                "pv.kubernetes.io/bind-completed": "yes",
                "pv.kubernetes.io/bound-by-controller": "yes",
                "volume.beta.kubernetes.io/storage-provisioner": "csi.example.com",
                "team": "payments",
                **(annotations or {}),
            },
        },
        "spec": spec,
        "status": {"phase": "Bound" if volume else "Pending", "capacity": {"storage": "1Gi"}},
    }


def pv(
    name: str = "pv-data",
    claim: str | None = "data",
    *,
    policy: str = "Delete",
    driver: str | None = "csi.example.com",
    storage_class: str | None = "fast",
    phase: str = "Bound",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "capacity": {"storage": "1Gi"},
        "accessModes": ["ReadWriteOnce"],
        "persistentVolumeReclaimPolicy": policy,
    }
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    if driver:
        spec["csi"] = {"driver": driver, "volumeHandle": "vol-1"}
    else:
        spec["hostPath"] = {"path": "/srv/data"}
    if claim:
        spec["claimRef"] = {
            "kind": "PersistentVolumeClaim",
            "namespace": NS,
            "name": claim,
            "uid": f"uid-{claim}",
            "resourceVersion": "41",
        }
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "uid": "uid-pv",
            "resourceVersion": "7",
            "annotations": {"pv.kubernetes.io/provisioned-by": "csi.example.com"},
        },
        "spec": spec,
        "status": {"phase": phase},
    }


def pod(*claims: str, namespace: str | None = NS) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    volumes += [
        {"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}} for i, c in enumerate(claims)
    ]
    meta: dict[str, Any] = {"name": "web"}
    if namespace:
        meta["namespace"] = namespace
    return {"metadata": meta, "spec": {"containers": [], "volumes": volumes}}


def vclass(name: str, driver: str = "csi.example.com", default: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if default:
        meta["annotations"] = {kv.DEFAULT_CLASS_ANNOTATION: "true"}
    return {"metadata": meta, "driver": driver, "deletionPolicy": "Delete"}


# -- the pure core ----------------------------------------------------------------------


def test_claim_names_in_order_each_once() -> None:
    p = pod("a", "b", "a")
    p["spec"]["volumes"].append(
        {"name": "snake", "persistent_volume_claim": {"claim_name": "c"}}  # client to_dict()
    )
    assert kv.claim_names(p) == ["a", "b", "c"]
    assert kv.claim_names({"spec": {}}) == []
    assert kv.claim_names({"spec": {"volumes": None}}) == []


def test_claim_without_name_is_invalid() -> None:
    bad = {"spec": {"volumes": [{"name": "v", "persistentVolumeClaim": {}}]}}
    with pytest.raises(InvalidArgument, match="'v': claimName missing"):
        kv.claim_names(bad)


def test_pod_ref_wants_a_namespace() -> None:
    assert kv.pod_ref(pod()) == (NS, "web")
    with pytest.raises(InvalidArgument, match=r"pod web: metadata\.namespace missing"):
        kv.pod_ref(pod(namespace=None))


def test_sanitize_claim_keeps_what_recreating_needs() -> None:
    original = pvc()
    clean = kv.sanitize_claim(original)
    assert clean == {
        "metadata": {
            "name": "data",
            "namespace": NS,
            "labels": {"app": "shop"},
            "annotations": {"team": "payments"},
        },
        "spec": original["spec"],
    }
    clean["spec"]["resources"]["requests"]["storage"] = "2Gi"
    assert original["spec"]["resources"]["requests"]["storage"] == "1Gi"  # a copy


def test_sanitize_volume_reduces_the_claim_ref() -> None:
    clean = kv.sanitize_volume(pv())
    assert clean["metadata"] == {
        "name": "pv-data",
        "annotations": {"pv.kubernetes.io/provisioned-by": "csi.example.com"},
    }
    assert clean["spec"]["claimRef"] == {"namespace": NS, "name": "data"}
    assert "status" not in clean


def test_wants_snapshot() -> None:
    assert not kv.wants_snapshot(pvc())
    assert kv.wants_snapshot(pvc(), snapshot_all=True)
    assert kv.wants_snapshot(pvc(annotations={kv.SNAPSHOT_ANNOTATION: "true"}))
    assert kv.wants_snapshot(pvc(annotations={kv.SNAPSHOT_ANNOTATION: "True"}))
    assert not kv.wants_snapshot(pvc(annotations={kv.SNAPSHOT_ANNOTATION: "false"}))


def test_default_snapshot_class() -> None:
    classes = [
        vclass("plain"),
        vclass("default-a", default=True),
        vclass("default-b", driver="other.example.com", default=True),
    ]
    assert kv.default_snapshot_class(classes, "csi.example.com") == "default-a"
    assert kv.default_snapshot_class(classes, "other.example.com") == "default-b"
    assert kv.default_snapshot_class(classes, "third.example.com") is None
    assert kv.default_snapshot_class([vclass("plain")], None) is None
    assert kv.default_snapshot_class(classes[:2], None) == "default-a"
    with pytest.raises(FailedPrecondition, match="default-a, default-b"):
        kv.default_snapshot_class(classes, None)


def test_snapshot_name() -> None:
    assert kv.snapshot_name("data", "abcd") == "data-stasis-abcd"
    long = kv.snapshot_name("x" * 300)
    assert len(long) == 253 and long.startswith("x" * 200)
    assert kv.snapshot_name("data") != kv.snapshot_name("data")


def test_build_snapshot() -> None:
    vs = kv.build_snapshot("s1", NS, "data", "gold")
    assert vs == {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshot",
        "metadata": {"name": "s1", "namespace": NS, "labels": {"stasis.dev/claim": "data"}},
        "spec": {
            "source": {"persistentVolumeClaimName": "data"},
            "volumeSnapshotClassName": "gold",
        },
    }
    assert "volumeSnapshotClassName" not in kv.build_snapshot("s1", NS, "data", None)["spec"]


def test_snapshot_status() -> None:
    assert kv.snapshot_status({}) == (False, None)
    assert kv.snapshot_status({"status": {"readyToUse": True}}) == (True, None)
    err = {"status": {"readyToUse": False, "error": {"message": "quota"}}}
    assert kv.snapshot_status(err) == (False, "quota")


def test_record_is_json() -> None:
    vs = {
        "metadata": {"name": "s1", "namespace": NS},
        "spec": {"volumeSnapshotClassName": "gold"},
        "status": {"readyToUse": True, "restoreSize": "1Gi"},
    }
    record = kv.build_record(pvc(), pv(), "Delete", vs)
    assert json.loads(json.dumps(record)) == record
    assert record["volume"]["name"] == "pv-data"
    assert record["volume"]["originalReclaimPolicy"] == "Delete"
    assert record["snapshot"] == {
        "name": "s1",
        "namespace": NS,
        "className": "gold",
        "restoreSize": "1Gi",
    }
    assert kv.check_record(record) is record
    assert kv.build_record(pvc(volume=None), None, None, None)["volume"] is None


@pytest.mark.parametrize("bad", [None, [], {"version": 99}, {"version": 1, "claim": {}}])
def test_check_record_refuses_others(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="not a Stasis volume record"):
        kv.check_record(bad)


def test_restored_claim_binds_its_volume() -> None:
    record = kv.build_record(pvc(), pv(), "Delete", None)
    body = kv.build_restored_claim(record, "other", pv())
    assert body["metadata"] == {
        "name": "data",
        "namespace": "other",
        "labels": {"app": "shop"},
        "annotations": {"team": "payments"},
    }
    assert body["spec"]["volumeName"] == "pv-data"
    assert body["spec"]["storageClassName"] == "fast"
    # a volume without a class: "" (else a default class would be filled in)
    body = kv.build_restored_claim(record, NS, pv(storage_class=None))
    assert body["spec"]["storageClassName"] == ""


def test_restored_claim_without_volume_asks_its_class() -> None:
    record = kv.build_record(pvc(), pv(), "Delete", None)
    spec = kv.build_restored_claim(record, NS, None)["spec"]
    assert "volumeName" not in spec
    assert spec["storageClassName"] == "fast"
    assert spec["resources"] == {"requests": {"storage": "1Gi"}}


def test_restored_claim_from_snapshot() -> None:
    claim = pvc()
    claim["spec"]["dataSourceRef"] = {"kind": "PersistentVolumeClaim", "name": "seed"}
    vs = {"metadata": {"name": "s1", "namespace": NS}, "spec": {}}
    record = kv.build_record(claim, pv(), "Delete", vs)
    spec = kv.build_restored_claim(record, NS, None)["spec"]
    assert spec["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": "s1",
    }
    assert "volumeName" not in spec and "dataSourceRef" not in spec


def test_patches() -> None:
    assert kv.retain_patch() == [
        {"op": "add", "path": "/spec/persistentVolumeReclaimPolicy", "value": "Retain"}
    ]
    (op,) = kv.claim_ref_patch("other", "data")
    assert op["path"] == "/spec/claimRef"
    assert op["value"]["namespace"] == "other" and op["value"]["name"] == "data"
    assert "uid" not in op["value"] and "resourceVersion" not in op["value"]


def test_volume_in_use() -> None:
    assert kv.volume_in_use(pv(), "uid-data")
    assert not kv.volume_in_use(pv(), None)
    assert not kv.volume_in_use(pv(), "uid-other")
    assert not kv.volume_in_use(pv(claim=None), None)


# -- API errors -------------------------------------------------------------------------


def api_error(status: int, message: str | None = None, reason: str = "Reason") -> ApiException:
    e = ApiException(status=status, reason=reason)
    if message is not None:
        e.body = json.dumps({"kind": "Status", "message": message, "code": status})
    return e


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (404, NotFound),
        (409, AlreadyExists),
        (403, PermissionDenied),
        (422, InvalidArgument),
        (500, Unavailable),
        (503, Unavailable),
    ],
)
def test_api_errors_become_one_line(status: int, cls: type[Exception]) -> None:
    with pytest.raises(cls) as info, kv._api("reading PersistentVolume pv-1"):
        raise api_error(status, 'persistentvolumes "pv-1" is\nforbidden')
    assert str(info.value) == (
        f'reading PersistentVolume pv-1: persistentvolumes "pv-1" is forbidden (HTTP {status})'
    )
    assert isinstance(info.value.__cause__, ApiException)


def test_api_error_without_status_body() -> None:
    with pytest.raises(Unavailable, match=r"^x: Bad Gateway \(HTTP 502\)$"), kv._api("x"):
        raise api_error(502, None, "Bad Gateway")
    assert kv.api_message(None, None, b"<html>") == "no reason given"


def test_unreachable_apiserver() -> None:
    with pytest.raises(Unavailable, match=r"^listing: apiserver unreachable: "), kv._api("listing"):
        raise urllib3.exceptions.MaxRetryError(None, "/api", "refused")  # type: ignore[arg-type]


# -- the entry points, against a fake API -----------------------------------------------


class Raw:
    """What the client returns with _preload_content=False."""

    def __init__(self, obj: Any) -> None:
        self.data = json.dumps(obj).encode()


def not_found(kind: str, name: str) -> ApiException:
    return api_error(404, f'{kind} "{name}" not found', "Not Found")


class FakeCore:
    """The CoreV1Api calls kubevolumes makes, on dicts. `binder` plays the PV
    controller: a created claim naming a volume reserved for it becomes Bound."""

    def __init__(self, claims: list[dict[str, Any]], volumes: list[dict[str, Any]]) -> None:
        self.claims = {(c["metadata"]["namespace"], c["metadata"]["name"]): c for c in claims}
        self.volumes = {v["metadata"]["name"]: v for v in volumes}
        self.binder = True
        self.calls: list[str] = []

    def read_namespaced_persistent_volume_claim(self, name: str, ns: str, **kw: Any) -> Raw:
        assert kw == {"_preload_content": False}
        if (ns, name) not in self.claims:
            raise not_found("persistentvolumeclaims", name)
        return Raw(self.claims[ns, name])

    def read_persistent_volume(self, name: str, **kw: Any) -> Raw:
        if name not in self.volumes:
            raise not_found("persistentvolumes", name)
        return Raw(self.volumes[name])

    def patch_persistent_volume(self, name: str, patch: list[dict[str, Any]], **kw: Any) -> Raw:
        self.calls.append(f"patch {name} {patch[0]['path']}")
        volume = self.volumes[name]
        for op in patch:
            assert op["op"] == "add" and op["path"].startswith("/spec/")
            volume["spec"][op["path"].removeprefix("/spec/")] = copy.deepcopy(op["value"])
        return Raw(volume)

    def create_namespaced_persistent_volume_claim(
        self, ns: str, body: dict[str, Any], **kw: Any
    ) -> Raw:
        name = body["metadata"]["name"]
        self.calls.append(f"create {ns}/{name}")
        if (ns, name) in self.claims:
            raise api_error(409, f'persistentvolumeclaims "{name}" already exists')
        claim = copy.deepcopy(body)
        claim["metadata"]["uid"] = f"new-uid-{name}"
        claim["status"] = {"phase": "Pending"}
        volume = self.volumes.get(body["spec"].get("volumeName", ""))
        ref = (volume or {}).get("spec", {}).get("claimRef") or {}
        if self.binder and volume and (ref.get("namespace"), ref.get("name")) == (ns, name):
            claim["status"]["phase"] = "Bound"
            ref["uid"] = claim["metadata"]["uid"]
            volume["status"]["phase"] = "Bound"
        self.claims[ns, name] = claim
        return Raw(claim)

    def delete_namespaced_persistent_volume_claim(self, name: str, ns: str, **kw: Any) -> Raw:
        self.calls.append(f"delete {ns}/{name}")
        return Raw(self.claims.pop((ns, name)))


class FakeCustom:
    """The CustomObjectsApi calls for snapshots. `ready` says whether a created
    snapshot is readyToUse when next read."""

    def __init__(self, classes: list[dict[str, Any]] | None = None) -> None:
        self.classes = classes or []
        self.snapshots: dict[tuple[str, str], dict[str, Any]] = {}
        self.ready = True
        self.deleted: list[str] = []

    def list_cluster_custom_object(self, group: str, version: str, plural: str) -> Any:
        assert (group, version, plural) == (
            "snapshot.storage.k8s.io",
            "v1",
            "volumesnapshotclasses",
        )
        return {"items": copy.deepcopy(self.classes)}

    def create_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, body: dict[str, Any]
    ) -> Any:
        assert plural == "volumesnapshots" and body["metadata"]["namespace"] == ns
        vs = copy.deepcopy(body)
        self.snapshots[ns, body["metadata"]["name"]] = vs
        return copy.deepcopy(vs)

    def get_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, name: str
    ) -> Any:
        if (ns, name) not in self.snapshots:
            raise not_found("volumesnapshots", name)
        vs = self.snapshots[ns, name]
        if self.ready:
            vs["status"] = {"readyToUse": True, "restoreSize": "1Gi"}
        else:
            vs["status"] = {"readyToUse": False, "error": {"message": "driver\nbusy"}}
        return copy.deepcopy(vs)

    def delete_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, name: str
    ) -> Any:
        self.deleted.append(name)
        return self.snapshots.pop((ns, name))


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv, "_POLL", 0.01)


def test_record_retains_the_volume() -> None:
    core = FakeCore([pvc()], [pv()])
    records = kv.record_volumes(core, FakeCustom(), pod("data"))
    assert core.volumes["pv-data"]["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    (record,) = records
    assert record["volume"]["originalReclaimPolicy"] == "Delete"
    assert record["volume"]["object"]["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert record["snapshot"] is None
    assert json.loads(json.dumps(records)) == records


def test_record_leaves_a_retained_volume_alone() -> None:
    core = FakeCore([pvc()], [pv(policy="Retain")])
    (record,) = kv.record_volumes(core, FakeCustom(), pod("data"))
    assert core.calls == []
    assert record["volume"]["originalReclaimPolicy"] == "Retain"


def test_record_of_an_unbound_claim() -> None:
    core = FakeCore([pvc(volume=None)], [])
    (record,) = kv.record_volumes(core, FakeCustom(), pod("data"))
    assert record["volume"] is None


def test_record_missing_claim_names_the_pod() -> None:
    with pytest.raises(NotFound, match=f"^PersistentVolumeClaim {NS}/gone \\(used by pod web\\)"):
        kv.record_volumes(FakeCore([], []), FakeCustom(), pod("gone"))


def test_record_missing_volume() -> None:
    with pytest.raises(NotFound, match=r"^PersistentVolume pv-data \(bound to"):
        kv.record_volumes(FakeCore([pvc()], []), FakeCustom(), pod("data"))


def test_record_snapshots_annotated_claims_with_the_default_class() -> None:
    claims = [pvc(annotations={kv.SNAPSHOT_ANNOTATION: "true"}), pvc("logs", "pv-logs")]
    core = FakeCore(claims, [pv(), pv("pv-logs", "logs")])
    custom = FakeCustom([vclass("plain"), vclass("gold", default=True)])
    records = kv.record_volumes(core, custom, pod("data", "logs"))
    snap = records[0]["snapshot"]
    assert snap["name"].startswith("data-stasis-")
    assert (snap["namespace"], snap["className"], snap["restoreSize"]) == (NS, "gold", "1Gi")
    assert records[1]["snapshot"] is None
    (vs,) = custom.snapshots.values()
    assert vs["spec"]["source"] == {"persistentVolumeClaimName": "data"}


def test_record_snapshot_all_with_a_named_class() -> None:
    core = FakeCore([pvc(), pvc("logs", "pv-logs")], [pv(), pv("pv-logs", "logs")])
    custom = FakeCustom([vclass("gold", default=True)])
    records = kv.record_volumes(
        core, custom, pod("data", "logs"), snapshot_all=True, snapshot_class="silver"
    )
    assert [r["snapshot"]["className"] for r in records] == ["silver", "silver"]


def test_record_snapshot_without_a_default_class_names_none() -> None:
    core = FakeCore([pvc()], [pv()])
    records = kv.record_volumes(core, FakeCustom([vclass("plain")]), pod("data"), snapshot_all=True)
    assert records[0]["snapshot"]["className"] is None


def test_record_snapshot_timeout_names_it_and_takes_it_back() -> None:
    core = FakeCore([pvc()], [pv()])
    custom = FakeCustom()
    custom.ready = False
    with pytest.raises(DeadlineExceeded) as info:
        kv.record_volumes(core, custom, pod("data"), snapshot_all=True, timeout=0.05)
    msg = str(info.value)
    assert msg.startswith(f"VolumeSnapshot {NS}/data-stasis-"), msg
    assert "of data: not readyToUse after 0.05s, last error: driver busy" in msg
    assert "\n" not in msg
    assert custom.snapshots == {} and len(custom.deleted) == 1


def test_record_cannot_snapshot_an_unbound_claim() -> None:
    with pytest.raises(FailedPrecondition, match="not bound to a volume"):
        kv.record_volumes(
            FakeCore([pvc(volume=None)], []), FakeCustom(), pod("data"), snapshot_all=True
        )


def recorded(core: FakeCore, custom: FakeCustom, *claims: str, **kw: Any) -> list[dict[str, Any]]:
    records = kv.record_volumes(core, custom, pod(*claims), **kw)
    for name in claims:  # the pod and its claims are deleted: the volumes go Released
        del core.claims[NS, name]
    for volume in core.volumes.values():
        volume["status"]["phase"] = "Released"
    return records


def test_restore_rebinds_the_retained_volume() -> None:
    core, custom = FakeCore([pvc()], [pv()]), FakeCustom()
    records = recorded(core, custom, "data")
    assert kv.restore_volumes(core, custom, records, NS) == ["data"]
    assert core.calls[-2:] == ["patch pv-data /spec/claimRef", f"create {NS}/data"]
    claim = core.claims[NS, "data"]
    assert claim["spec"]["volumeName"] == "pv-data"
    assert claim["status"]["phase"] == "Bound"
    assert core.volumes["pv-data"]["spec"]["claimRef"]["uid"] == "new-uid-data"


def test_restore_into_another_namespace_points_the_volume_there() -> None:
    core, custom = FakeCore([pvc()], [pv()]), FakeCustom()
    records = recorded(core, custom, "data")
    assert kv.restore_volumes(core, custom, records, "staging") == ["data"]
    ref = core.volumes["pv-data"]["spec"]["claimRef"]
    assert (ref["namespace"], ref["name"]) == ("staging", "data")


def test_restore_leaves_an_existing_claim_alone() -> None:
    core, custom = FakeCore([pvc()], [pv()]), FakeCustom()
    records = kv.record_volumes(core, custom, pod("data"))
    assert kv.restore_volumes(core, custom, records, NS) == []
    assert core.calls == ["patch pv-data /spec/persistentVolumeReclaimPolicy"]


def test_restore_without_the_volume_asks_the_storage_class() -> None:
    core, custom = FakeCore([pvc()], [pv()]), FakeCustom()
    records = recorded(core, custom, "data")
    del core.volumes["pv-data"]
    assert kv.restore_volumes(core, custom, records, NS) == ["data"]
    spec = core.claims[NS, "data"]["spec"]
    assert "volumeName" not in spec and spec["storageClassName"] == "fast"


def test_restore_refuses_a_volume_a_live_claim_holds() -> None:
    core, custom = FakeCore([pvc()], [pv()]), FakeCustom()
    records = kv.record_volumes(core, custom, pod("data"))
    with pytest.raises(
        FailedPrecondition, match=f"^PersistentVolume pv-data: bound to .* {NS}/data"
    ):
        kv.restore_volumes(core, custom, records, "staging")
    assert ("staging", "data") not in core.claims


def test_restore_from_the_snapshot() -> None:
    core, custom = FakeCore([pvc()], [pv()]), FakeCustom()
    records = recorded(core, custom, "data", snapshot_all=True)
    assert kv.restore_volumes(core, custom, records, NS) == ["data"]
    spec = core.claims[NS, "data"]["spec"]
    assert spec["dataSource"] == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": records[0]["snapshot"]["name"],
    }
    assert "volumeName" not in spec
    assert "claimRef" in core.volumes["pv-data"]["spec"]  # the retained volume untouched
    assert not any("claimRef" in c for c in core.calls)


def test_restore_snapshot_gone_or_elsewhere() -> None:
    core, custom = FakeCore([pvc()], [pv()]), FakeCustom()
    records = recorded(core, custom, "data", snapshot_all=True)
    with pytest.raises(FailedPrecondition, match="must be in its own namespace"):
        kv.restore_volumes(core, custom, records, "staging")
    custom.snapshots.clear()
    with pytest.raises(NotFound, match=f"^VolumeSnapshot {NS}/data-stasis-.* not found$"):
        kv.restore_volumes(core, custom, records, NS)


def test_restore_that_fails_takes_its_claims_back() -> None:
    core = FakeCore([pvc(), pvc("logs", "pv-logs")], [pv(), pv("pv-logs", "logs")])
    custom = FakeCustom()
    records = recorded(core, custom, "data", "logs")
    core.binder = False  # nothing binds: the wait times out
    with pytest.raises(DeadlineExceeded) as info:
        kv.restore_volumes(core, custom, records, NS, timeout=0.05)
    assert str(info.value) == (
        f"PersistentVolumeClaim {NS}/data: not Bound to PersistentVolume pv-data after "
        "0.05s (claim Pending, volume Released)"
    )
    assert core.claims == {}
    assert core.calls[-2:] == [f"delete {NS}/data", f"delete {NS}/logs"]


def test_restore_refuses_what_is_not_a_record() -> None:
    with pytest.raises(InvalidArgument):
        kv.restore_volumes(FakeCore([], []), FakeCustom(), [{"claimName": "x"}], NS)


def test_restore_refused_by_check_volume_reserves_nothing() -> None:
    core, custom = FakeCore([pvc()], [pv()]), FakeCustom()
    records = recorded(core, custom, "data")
    calls = list(core.calls)
    seen: list[tuple[str, str]] = []

    def refuse(claim: str, volume: Mapping[str, Any]) -> None:
        seen.append((claim, volume["metadata"]["name"]))
        raise PermissionDenied(f"PersistentVolume {volume['metadata']['name']} refused")

    with pytest.raises(PermissionDenied, match="pv-data refused"):
        kv.restore_volumes(core, custom, records, NS, check_volume=refuse)
    assert seen == [("data", "pv-data")]
    assert core.calls == calls and (NS, "data") not in core.claims
