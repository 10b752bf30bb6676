"""Pod checkpoints without a cluster: runtime/kube/pods.py's pure logic, the freeze/dump
order against a recording fake of the shims, and the shim's restore side
(shim/checkpoint/take.py) choosing a pod member by CRI container name."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from runtime.config import Config, SigningConfig, StorageConfig
from runtime.errors import DataLoss, FailedPrecondition, InvalidArgument, StasisError
from runtime.kube import pods as kube
from runtime.store.local import LocalStore
from runtime.store.signing import Signing
from shim.checkpoint import take as checkpointing

TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount"


def api_pod() -> dict[str, Any]:
    """A pod as the API server returns it (camelCase JSON)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "uid": "1234",
            "resourceVersion": "99",
            "labels": {"app": "web"},
            "annotations": {
                "stasis.dev/restore-from": "old",
                "kubectl.kubernetes.io/last-applied-configuration": "{}",
                "team": "a",
            },
            "ownerReferences": [{"kind": "ReplicaSet", "name": "web-1"}],
        },
        "spec": {
            "nodeName": "node-1",
            "priority": 0,
            "containers": [
                {
                    "name": "app",
                    "image": "busybox",
                    "volumeMounts": [
                        {"name": "data", "mountPath": "/data"},
                        {"name": "default-token-x", "mountPath": TOKEN},
                    ],
                },
                {
                    "name": "side",
                    "image": "busybox",
                    "volumeMounts": [{"name": "default-token-x", "mountPath": TOKEN}],
                },
            ],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                {"name": "default-token-x", "secret": {"secretName": "default-token-x"}},
            ],
        },
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": "app", "containerID": "containerd://aaa", "state": {"running": {}}},
                {"name": "side", "containerID": "containerd://bbb", "state": {"running": {}}},
                {"name": "done", "containerID": "containerd://ccc", "state": {"terminated": {}}},
            ],
        },
    }


def test_split_pod() -> None:
    assert kube.split_pod("shop/web") == ("shop", "web")
    assert kube.split_pod("web") == ("default", "web")
    for bad in ("a/b/c", "shop/"):
        with pytest.raises(InvalidArgument):
            kube.split_pod(bad)


def test_running_containers() -> None:
    assert kube.running_containers(api_pod()) == {"app": "aaa", "side": "bbb"}
    pod = api_pod()
    pod["status"]["containerStatuses"][0]["containerID"] = "docker://aaa"
    with pytest.raises(FailedPrecondition, match="not a containerd container"):
        kube.running_containers(pod)


def test_sanitize_pod_drops_status_identity_node_and_injected_token() -> None:
    clean = kube.sanitize_pod(api_pod())
    assert clean["metadata"] == {
        "name": "web",
        "namespace": "shop",
        "labels": {"app": "web"},
        "annotations": {"team": "a"},
    }
    assert "status" not in clean
    spec = clean["spec"]
    assert "nodeName" not in spec and "priority" not in spec
    assert spec["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
    assert spec["containers"][0]["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert "volumeMounts" not in spec["containers"][1]


def test_pod_record_and_restore_manifest() -> None:
    record = kube.pod_record(api_pod(), {"app": "web.app"}, [{"claim": "data"}])
    assert record["node"] == "node-1"
    assert record["containers"] == {"app": "web.app"}
    assert record["volumes"] == [{"claim": "data"}]
    json.dumps(record)  # JSON-able
    m = kube.restore_manifest(record, "file:///s/web", name="web2", node="node-2")
    assert m["metadata"]["name"] == "web2"
    assert m["metadata"]["namespace"] == "shop"
    assert m["metadata"]["annotations"] == {
        "team": "a",
        "stasis.dev/restore-from": "file:///s/web",
        "stasis.dev/restore-policy": "fail",
    }
    assert m["spec"]["runtimeClassName"] == "stasis"
    assert m["spec"]["nodeName"] == "node-2"
    assert record["pod"]["metadata"]["name"] == "web"  # not modified
    m = kube.restore_manifest(record, "r", namespace="other", policy="fresh")
    assert (m["metadata"]["name"], m["metadata"]["namespace"]) == ("web", "other")
    assert "nodeName" not in m["spec"]
    with pytest.raises(InvalidArgument):
        kube.restore_manifest(record, "r", policy="later")


# -- freeze, dump, thaw order --------------------------------------------------------


class FakeShims:
    """Records every call; fails the method named in ``fail``."""

    calls: list[tuple[str, str]] = []
    fail: str = ""

    def __init__(self) -> None:
        pass

    async def call(self, t: Any, service: str, method: str, payload: bytes) -> bytes:
        FakeShims.calls.append((method, t.name))
        if method == FakeShims.fail:
            raise StasisError(f"{method} failed")
        if method == "Checkpoint":
            from protos.stasis.v1 import checkpoint_pb2 as pb

            req = pb.CheckpointRequest.FromString(payload)
            return pb.CheckpointResponse(
                ref=f"file:///s/{req.name}", name=req.name
            ).SerializeToString()
        return b""

    async def close(self) -> None:
        pass


TARGETS = [kube._Target("a", "ida", "/sock", "img"), kube._Target("b", "idb", "/sock", "img")]


def run_freeze(monkeypatch: pytest.MonkeyPatch, leave_running: bool, fail: str = "") -> Any:
    import asyncio

    monkeypatch.setattr(kube, "_Shims", FakeShims)
    FakeShims.calls = []
    FakeShims.fail = fail
    events: list[str] = []

    def after() -> list[str]:
        events.append(f"volumes after {len(FakeShims.calls)} calls")
        return ["v"]

    def stop() -> None:
        FakeShims.calls.append(("DeletePod", ""))

    return asyncio.run(kube._freeze_dump(TARGETS, "/s", "p", after, leave_running, stop)), events


def test_all_paused_before_any_dump_then_resumed(monkeypatch: pytest.MonkeyPatch) -> None:
    (results, extra, _), events = run_freeze(monkeypatch, leave_running=True)
    assert FakeShims.calls == [
        ("Pause", "a"), ("Pause", "b"), ("Checkpoint", "a"), ("Checkpoint", "b"),
        ("Resume", "a"), ("Resume", "b"),
    ]  # fmt: skip
    assert events == ["volumes after 4 calls"]  # recorded while still frozen
    assert results["a"]["name"] == "p.a" and extra == ["v"]


def test_stop_deletes_the_pod_and_kills_before_thawing(monkeypatch: pytest.MonkeyPatch) -> None:
    run_freeze(monkeypatch, leave_running=False)
    assert FakeShims.calls[4:] == [
        ("DeletePod", ""), ("Kill", "a"), ("Kill", "b"), ("Resume", "a"), ("Resume", "b"),
    ]  # fmt: skip


def test_a_failed_dump_resumes_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(kube._Partial) as e:
        run_freeze(monkeypatch, leave_running=False, fail="Checkpoint")
    assert FakeShims.calls == [
        ("Pause", "a"), ("Pause", "b"), ("Checkpoint", "a"), ("Resume", "a"), ("Resume", "b"),
    ]  # fmt: skip
    assert e.value.written == {}


# -- the shim's side: a pod checkpoint's member by container name --------------------


def write(store: LocalStore, name: str, files: dict[str, bytes]) -> str:
    with store.begin(name) as w:
        for rel, data in files.items():
            w.write_bytes(rel, data)
        return w.commit({}).ref


def signing_key(store: str) -> str:
    """The signing key a test store beside ``store`` uses (created on first use)."""
    return os.path.join(os.path.dirname(store), "keys", "signing.key")


@pytest.fixture
def pod_ref(tmp_path: Path) -> str:
    root = str(tmp_path / "store")
    store = LocalStore(root, signing=Signing(signing_key(root)))
    write(store, "p.a", {"checkpoint/pages-1.img": b"x" * 100, "stasis.json": b"{}"})
    doc = {"format": 1, "containers": {"a": "p.a"}, "volumes": []}
    return write(store, "p", {"pod.json": json.dumps(doc).encode()})


def config(ref: str) -> Config:
    """A config whose restores may read the store holding ``ref``."""
    store = ref.removeprefix("file://").rsplit("/", 1)[0]
    return Config(
        StorageConfig(url="/nonexistent", restore_sources=(f"file://{store}",)),
        signing=SigningConfig(key_file=signing_key(store)),
    )


def test_restore_request_skips_the_sandbox() -> None:
    ann = {"stasis.dev/restore-from": "p"}
    assert checkpointing.restore_request(ann) == ("p", "fail")
    sandbox = {**ann, "io.kubernetes.cri.container-type": "sandbox"}
    assert checkpointing.restore_request(sandbox) is None


def test_pod_checkpoint_member_by_container_name(pod_ref: str) -> None:
    plan = checkpointing.prepare_restore(pod_ref, None, config(pod_ref), container_name="a")
    assert plan is not None
    try:
        assert plan.reader.name == "p.a"
        assert plan.ref == pod_ref
        assert plan.images.endswith("p.a/checkpoint")
    finally:
        plan.reader.close()
    # a container the pod checkpoint does not have starts fresh
    assert (
        checkpointing.prepare_restore(pod_ref, None, config(pod_ref), container_name="new") is None
    )
    with pytest.raises(InvalidArgument, match="pod checkpoint"):
        checkpointing.prepare_restore(pod_ref, None, config(pod_ref))


def test_corrupt_or_missing_pod_checkpoint_names_it(pod_ref: str) -> None:
    path = Path(pod_ref.removeprefix("file://"))
    (path / "pod.json").write_text('{"containers": {"a": "p.b"}}  ')
    with pytest.raises(DataLoss, match=f"restore from checkpoint '{pod_ref}'.*pod.json"):
        checkpointing.prepare_restore(pod_ref, None, config(pod_ref), container_name="a")
    member = path.parent / "p.a" / "checkpoint" / "pages-1.img"
    (path / "pod.json").unlink()
    missing = f"{pod_ref}-gone"
    with pytest.raises(StasisError, match=f"restore from checkpoint '{missing}'"):
        checkpointing.prepare_restore(missing, None, config(pod_ref), container_name="a")
    assert member.exists()


def test_pod_checkpoint_outside_the_restore_sources_is_refused(pod_ref: str) -> None:
    from runtime.errors import PermissionDenied

    with pytest.raises(PermissionDenied, match="restore_sources"):
        checkpointing.prepare_restore(
            pod_ref, None, Config(StorageConfig(url="/nonexistent")), container_name="a"
        )
