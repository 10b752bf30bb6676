"""`stasis export` archives are checkpoint archives that others accept: containerd 2.1's
CRI restores a new container from one (its path as the container's image), and
checkpointctl shows one.

A private CRI-enabled containerd 2.1 with the `stasis` runtime handler runs a counting
container in a pod; `stasis checkpoint` checkpoints it and `stasis export` writes the
archive. containerd's restore pulls the checkpoint's base image (config.dump's
rootfsImageRef) from its registry even when the image is local (ENVIRONMENT.md), so
the image comes from a private registry (tests/bed/registry.py) on loopback.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bed.containerd import STASIS_HANDLER, Containerd, cache_dir
from bed.cri import CriClient, Pods, cri_missing
from bed.registry import Registry
from bed.workload import stasis, task, wait_count
from conftest import REGISTRY_BASE

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHECKPOINTCTL = cache_dir() / "checkpointctl-1.3.0" / "checkpointctl"  # tests/bed/setup.sh
COUNTER = (
    "echo data > /written; i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"
)
BASE = REGISTRY_BASE
CRI_TIMEOUT = 90.0  # a busy 2-core machine; the restore pulls the base image


@pytest.fixture(scope="module")
def containerd(cri_containerd_2_1: Containerd) -> Containerd:
    """The session's containerd 2.1 with CRI (tests/conftest.py)."""
    return cri_containerd_2_1


@pytest.fixture(scope="module")
def pods(containerd: Containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pods]:
    if why := cri_missing("v1"):
        pytest.fail(why, pytrace=False)
    with CriClient(containerd.address, tmp_path_factory.mktemp("cri")) as cri:
        made = Pods(cri, tmp_path_factory.mktemp("pod-logs"), STASIS_HANDLER, CRI_TIMEOUT)
        try:
            yield made
        finally:
            made.remove_all()


@dataclass(frozen=True)
class Exported:
    archive: Path
    count: int  # the counter's value when the checkpoint was asked for (it is at least this)
    image: str  # the base image, as the registry serves it


@pytest.fixture(scope="module")
def exported(
    containerd: Containerd,
    registry: Registry,
    pods: Pods,
    tmp_path_factory: pytest.TempPathFactory,
) -> Exported:
    """A counter in a pod on the stasis handler, checkpointed (it exits) and exported."""
    sandbox, config = pods.run("orig")
    image = registry.ref(BASE)
    # A PID namespace of its own, as the kubelet asks: in the pod's shared one, the
    # restored PIDs can collide with the new pod's (CRIU: "Can't fork ... File exists").
    cid = pods.container(sandbox, config, image, ["sh", "-c", COUNTER], own_pid_ns=True)
    count = wait_count(containerd, cid, 30)
    store = tmp_path_factory.mktemp("store")
    args = ["checkpoint", cid, "--exit", "--to", str(store), "--name", "cnt", "--json"]
    out = stasis(containerd, *args)
    assert json.loads(out.stdout)["criu_size"] > 0
    archive = tmp_path_factory.mktemp("export") / "cnt.tar"
    stasis(containerd, "export", str(store / "cnt"), str(archive))
    return Exported(archive, count, image)


def _member_json(archive: Path, name: str) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        f = tar.extractfile(name)
        assert f is not None, name
        data: dict[str, Any] = json.loads(f.read())
        return data


def test_export_has_what_cri_restore_reads(exported: Exported) -> None:
    """config.dump names a base image containerd can pull; status.dump is there."""
    with tarfile.open(exported.archive) as tar:
        names = set(tar.getnames())
    assert {"spec.dump", "config.dump", "status.dump", "rootfs-diff.tar"} <= names
    assert "checkpoint/inventory.img" in names
    config = _member_json(exported.archive, "config.dump")
    assert config["rootfsImageName"] == exported.image
    assert config["rootfsImageRef"] == exported.image
    status = _member_json(exported.archive, "status.dump")
    assert status["image"] == {"image": exported.image}


def test_cri_restores_exported_archive(
    containerd: Containerd, pods: Pods, exported: Exported
) -> None:
    sandbox, config = pods.run("restored")
    # The archive's path as the image: containerd 2.1 restores instead of creating.
    cid = pods.container(sandbox, config, str(exported.archive), [], own_pid_ns=True)
    # A fresh start would count from 1; the restored counter goes on.
    assert wait_count(containerd, cid, 0, timeout=60) >= exported.count
    pid = task(containerd, cid)[0]  # type: ignore[index]
    assert Path(f"/proc/{pid}/root/written").read_text() == "data\n"
    status = pods.cri.call("ContainerStatus", container_id=cid).status
    assert status.state == pods.api.CONTAINER_RUNNING
    assert status.annotations.get("restored") == "true"
    assert status.image.image == exported.image  # the base image, not the archive
    # It keeps counting.
    n = wait_count(containerd, cid, 0)
    wait_count(containerd, cid, n)
    info = json.loads(containerd.ctr("containers", "info", cid).stdout)
    assert info["Runtime"]["Name"] == "io.containerd.stasis.v2"


def test_checkpointctl_shows_exported_archive(exported: Exported) -> None:
    if not CHECKPOINTCTL.is_file():
        pytest.fail(
            f"checkpointctl not built ({CHECKPOINTCTL} missing): run tests/bed/setup.sh, "
            "which builds it from Debian's golang-github-checkpoint-restore-checkpointctl "
            "source (its step 'checkpointctl' says why when it cannot)",
            pytrace=False,
        )
    done = subprocess.run(
        [str(CHECKPOINTCTL), "show", str(exported.archive)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"checkpointctl show failed:\n{done.stdout}\n{done.stderr}"
    assert "io.containerd.stasis.v2" in done.stdout  # config.dump's runtime
    assert exported.image in done.stdout
