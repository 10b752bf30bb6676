"""Tests for runtime/control/resources.py: the stasis.dev specs parsed, selectors
matched, retention and due times chosen, and the CRD files saying the same."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime.control import resources as r
from runtime.errors import InvalidArgument

MANIFESTS = Path(__file__).resolve().parents[2] / "packaging" / "manifests"


def obj(kind: str, spec: Any, name: str = "x", **status: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {"namespace": "ns", "name": name, "uid": "1234abcd-ffff"},
        "spec": spec,
        "status": status,
    }


def test_checkpoint_spec() -> None:
    spec = r.CheckpointSpec.parse(obj("Checkpoint", {"podName": "web-0", "stopPod": True}))
    assert spec == r.CheckpointSpec("web-0", "", True)
    spec = r.CheckpointSpec.parse(obj("Checkpoint", {"podName": "a", "store": "s3://b/p"}))
    assert spec.store == "s3://b/p" and not spec.stop_pod


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({}, "spec.podName"),
        ({"podName": "Web"}, "spec.podName"),
        ({"podName": "a" * 300}, "spec.podName"),
        ({"podName": "a", "store": "/tmp/x"}, "spec.store"),
        ({"podName": "a", "store": "file:///x y"}, "spec.store"),
        ({"podName": "a", "stopPod": "yes"}, "spec.stopPod"),
        (None, "spec must be an object"),
    ],
)
def test_bad_checkpoint_specs_name_the_field(spec: Any, needle: str) -> None:
    with pytest.raises(InvalidArgument, match="Checkpoint ns/x") as e:
        r.CheckpointSpec.parse(obj("Checkpoint", spec))
    assert needle in str(e.value)


def test_restore_spec_takes_one_source() -> None:
    assert r.RestoreSpec.parse(obj("Restore", {"checkpointName": "c"})).checkpoint == "c"
    got = r.RestoreSpec.parse(obj("Restore", {"ref": "file:///s/p", "podName": "p2"}))
    assert (got.ref, got.pod) == ("file:///s/p", "p2")
    for spec in ({}, {"checkpointName": "c", "ref": "file:///s/p"}):
        with pytest.raises(InvalidArgument, match="exactly one"):
            r.RestoreSpec.parse(obj("Restore", spec))
    with pytest.raises(InvalidArgument, match=r"spec\.nodeName"):
        r.RestoreSpec.parse(obj("Restore", {"checkpointName": "c", "nodeName": "-x"}))


def test_selector() -> None:
    sel = r.Selector.parse(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "skip", "operator": "DoesNotExist"},
            ],
        },
        "sel",
    )
    assert sel.matches({"app": "web", "tier": "a"})
    assert not sel.matches({"app": "web", "tier": "c"})
    assert not sel.matches({"app": "web", "tier": "a", "skip": ""})
    assert not sel.matches(None)
    assert r.Selector.parse({}, "sel").matches(None)
    not_in = r.Selector.parse(
        {"matchExpressions": [{"key": "k", "operator": "NotIn", "values": ["x"]}]}, "s"
    )
    assert not_in.matches({}) and not not_in.matches({"k": "x"})
    for bad in (
        {"matchLabels": {"a": 1}},
        {"matchExpressions": [{"key": "k", "operator": "Near"}]},
        {"matchExpressions": [{"key": "k", "operator": "In"}]},
        {"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["v"]}]},
        "app=web",
    ):
        with pytest.raises(InvalidArgument):
            r.Selector.parse(bad, "sel")


def test_policy_spec_bounds() -> None:
    spec = r.PolicySpec.parse(
        obj("CheckpointPolicy", {"selector": {}, "intervalSeconds": 10, "keep": 2})
    )
    assert (spec.interval, spec.keep, spec.on_node_drain) == (10, 2, False)
    for bad in ({"intervalSeconds": 9}, {"keep": 0}, {"keep": True}, {"onNodeDrain": 1}):
        with pytest.raises(InvalidArgument, match="CheckpointPolicy ns/x"):
            r.PolicySpec.parse(obj("CheckpointPolicy", {"selector": {}, **bad}))


def test_retention_keeps_the_newest_succeeded() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)

    def at(name: str, phase: str, minutes: int) -> dict[str, Any]:
        when = (t0 + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return obj("Checkpoint", {}, name, phase=phase, completionTime=when)

    items = [
        at("s1", r.SUCCEEDED, 1), at("s3", r.SUCCEEDED, 3), at("s2", r.SUCCEEDED, 2),
        at("f0", r.FAILED, 0), at("f9", r.FAILED, 9), at("run", r.RUNNING, 0),
    ]  # fmt: skip
    doomed = {c["metadata"]["name"] for c in r.retention(items, 2)}
    assert doomed == {"s1", "f0"}
    assert r.retention(items[3:], 2) == []  # no Succeeded one: nothing goes


def test_due_and_names() -> None:
    now = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
    assert r.due(None, 10, now)
    assert r.due("2026-01-01T00:00:50Z", 10, now)
    assert not r.due("2026-01-01T00:00:55Z", 10, now)
    assert r.checkpoint_name(obj("Checkpoint", {})) == "ns-x-1234abcd"
    assert r.message("first\nsecond") == "first" and len(r.message("x" * 5000)) == 1024


def test_the_crds_say_what_the_parser_accepts() -> None:
    docs = {
        d["spec"]["names"]["kind"]: d
        for f in sorted(MANIFESTS.glob("0[5-7]-crd-*.yaml"))
        for d in [yaml.safe_load(f.read_text())]
    }
    assert set(docs) == {"Checkpoint", "Restore", "CheckpointPolicy"}
    for kind, plural in (("Checkpoint", r.CHECKPOINTS), ("Restore", r.RESTORES),
                         ("CheckpointPolicy", r.POLICIES)):  # fmt: skip
        crd = docs[kind]
        assert crd["spec"]["group"] == r.GROUP and crd["spec"]["names"]["plural"] == plural
        (version,) = crd["spec"]["versions"]
        assert version["name"] == r.VERSION and version["subresources"] == {"status": {}}
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
        if "phase" in status:
            assert status["phase"]["enum"] == [r.PENDING, r.RUNNING, r.SUCCEEDED, r.FAILED]
    policy = docs["CheckpointPolicy"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = policy["properties"]["spec"]["properties"]
    assert (spec["intervalSeconds"]["minimum"], spec["keep"]["minimum"]) == (10, 1)
