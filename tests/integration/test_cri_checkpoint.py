"""CRI CheckpointContainer (`crictl checkpoint --export FILE ID`) on containerd 2.1, for a
Stasis container and, as the reference, a runc one: the archive has what containerd's
own CRI restore reads, the checkpointed container keeps running, and a new container
created through CRI from the archive (its path as the image) goes on from the state it
had: its counter continues and a file written before the checkpoint is there.

containerd 2.1 passes runc's CheckpointOptions (exit=false, work_path) only to runtime
type io.containerd.runc.v2; for io.containerd.stasis.v2 the Task.Checkpoint request
carries no options and a temporary image path. The shim takes that as "leave the
container running" and, for a CRI container, puts CRIU's work files (dump.log,
stats-dump) where runc's work_path would have put them, so they reach the archive as
with runc (docs/architecture.md, "CRI CheckpointContainer (containerd 2.1)"). No extra
containerd configuration is needed.

containerd's restore pulls the base image (config.dump's rootfsImageRef) from its
registry even when it is local (ENVIRONMENT.md), so the image comes from a private
registry (tests/bed/registry.py) on loopback.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bed.containerd import STASIS_HANDLER, Containerd
from bed.cri import CriClient, Pods
from bed.registry import Registry
from bed.workload import task, wait_count
from conftest import REGISTRY_BASE

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COUNTER = (
    "echo data > /written; i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"
)
BASE = REGISTRY_BASE
CRI_TIMEOUT = 90.0  # a busy 2-core machine; the restore pulls the base image
# CRI runtime handler -> the runtime type containerd records for its containers
HANDLERS = {STASIS_HANDLER: "io.containerd.stasis.v2", "runc": "io.containerd.runc.v2"}


@pytest.fixture(scope="module")
def containerd(cri_containerd_2_1: Containerd) -> Containerd:
    """The session's containerd 2.1 with CRI (tests/conftest.py)."""
    return cri_containerd_2_1


@dataclass(frozen=True)
class Checkpointed:
    handler: str
    pods: Pods
    original: str  # the checkpointed container, still running
    archive: Path
    count: int  # the counter's value when the checkpoint was asked for (it is at least this)
    image: str  # the base image, as the registry serves it


@pytest.fixture(scope="module", params=list(HANDLERS))
def checkpointed(
    request: pytest.FixtureRequest,
    containerd: Containerd,
    registry: Registry,
    cri: CriClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Checkpointed]:
    """A counter in a pod on the handler, checkpointed through CRI into an archive."""
    handler: str = request.param
    pods = Pods(cri, tmp_path_factory.mktemp(f"pod-logs-{handler}"), handler, CRI_TIMEOUT)
    try:
        sandbox, config = pods.run(f"orig-{handler}")
        image = registry.ref(BASE)
        cid = pods.container(sandbox, config, image, ["sh", "-c", COUNTER], own_pid_ns=True)
        count = wait_count(containerd, cid, 30)
        archive = tmp_path_factory.mktemp(f"cri-checkpoint-{handler}") / "counter.tar"
        cri.call("CheckpointContainer", container_id=cid, location=str(archive), timeout=120)
        yield Checkpointed(handler, pods, cid, archive, count, image)
    finally:
        pods.remove_all()


def _member_json(archive: Path, name: str) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        f = tar.extractfile(name)
        assert f is not None, name
        data: dict[str, Any] = json.loads(f.read())
        return data


def test_archive_has_what_cri_restore_reads(checkpointed: Checkpointed) -> None:
    with tarfile.open(checkpointed.archive) as tar:
        names = set(tar.getnames())
    assert {"config.dump", "spec.dump", "status.dump", "rootfs-diff.tar"} <= names
    assert "checkpoint/inventory.img" in names
    # CRIU's work files, where runc's work_path puts them (the shim does the same for a
    # CRI container when containerd sends it no options): older containerd 2.x fails
    # the checkpoint without stats-dump, checkpointctl reads it.
    assert {"stats-dump", "dump.log"} <= names
    config = _member_json(checkpointed.archive, "config.dump")
    assert config["id"] == checkpointed.original
    assert config["runtime"] == HANDLERS[checkpointed.handler]
    assert config["rootfsImageName"] == checkpointed.image
    repo = checkpointed.image.rsplit(":", 1)[0]
    assert config["rootfsImageRef"].startswith(f"{repo}@sha256:")  # what the restore pulls
    status = _member_json(checkpointed.archive, "status.dump")
    assert status["id"] == checkpointed.original


def test_checkpointed_container_keeps_running(
    containerd: Containerd, checkpointed: Checkpointed
) -> None:
    """CRI checkpoints leave the container running (and not paused)."""
    status = checkpointed.pods.cri.call(
        "ContainerStatus", container_id=checkpointed.original
    ).status
    assert status.state == checkpointed.pods.api.CONTAINER_RUNNING
    n = wait_count(containerd, checkpointed.original, checkpointed.count)
    wait_count(containerd, checkpointed.original, n)
    found = task(containerd, checkpointed.original)
    assert found is not None and found[1] == "RUNNING"


def test_cri_restores_checkpoint_archive(
    containerd: Containerd, checkpointed: Checkpointed
) -> None:
    pods = checkpointed.pods
    sandbox, config = pods.run(f"restored-{checkpointed.handler}")
    # The archive's path as the image: containerd 2.1 restores instead of creating.
    cid = pods.container(sandbox, config, str(checkpointed.archive), [], own_pid_ns=True)
    # A fresh start would count from 1; the restored counter goes on.
    assert wait_count(containerd, cid, 0, timeout=60) >= checkpointed.count
    pid = task(containerd, cid)[0]  # type: ignore[index]
    assert Path(f"/proc/{pid}/root/written").read_text() == "data\n"
    nspid = next(
        ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("NSpid:")
    )
    assert nspid.split()[-1] == "1"  # the restored counter leads its own PID namespace
    status = pods.cri.call("ContainerStatus", container_id=cid).status
    assert status.state == pods.api.CONTAINER_RUNNING
    assert status.annotations.get("restored") == "true"
    assert status.image.image == checkpointed.image  # the base image, not the archive
    n = wait_count(containerd, cid, 0)
    wait_count(containerd, cid, n)  # it keeps counting
    info = json.loads(containerd.ctr("containers", "info", cid).stdout)
    assert info["Runtime"]["Name"] == HANDLERS[checkpointed.handler]
