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
import sys
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bed.containerd import CRI_NAMESPACE, STASIS_HANDLER, Containerd, cache_dir, images_dir
from bed.cri import CriClient, cri_missing
from bed.registry import Registry, registry_missing
from bed.workload import IMAGE, stasis, task, wait_count

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHECKPOINTCTL = cache_dir() / "checkpointctl-v1.1.0" / "checkpointctl"  # tests/bed/setup.sh
COUNTER = (
    "echo data > /written; i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"
)
BASE = "stasis/busybox:test"  # IMAGE's repository and tag, pushed to the registry
CRI_TIMEOUT = 90.0  # a busy 2-core machine; the restore pulls the base image


def _shim_path() -> list[Path]:
    dirs = [REPO / ".venv" / "bin", Path(sys.prefix) / "bin"]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d not in dirs[:i]]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    if why := registry_missing():
        pytest.fail(why, pytrace=False)
    reg = Registry(tmp_path_factory.mktemp("registry"))
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def containerd(registry: Registry) -> Iterator[Containerd]:
    """containerd 2.1 with CRI (namespace k8s.io, so ctr and stasis see CRI's
    containers), pause imported, busybox pushed to the registry."""
    c = Containerd.in_run_dir(
        "2.1",
        _shim_path(),
        namespace=CRI_NAMESPACE,
        cri=True,
        registry_config_path=registry.hosts_dir,
    )
    try:
        c.start()
        c.import_image(images_dir() / "pause.tar")
        c.import_image(images_dir() / "busybox.tar")
        c.ctr("images", "tag", IMAGE, registry.ref(BASE))
        c.ctr("images", "push", "--plain-http", registry.ref(BASE), timeout=120)
        yield c
    finally:
        left = c.stop()
    if left:
        pytest.fail(f"containerd 2.1 with CRI left behind (now cleaned up): {left}")


class Pods:
    """Pod sandboxes made through CRI; remove_all() stops and removes them (and so
    their containers)."""

    def __init__(self, cri: CriClient, logs: Path) -> None:
        self.cri = cri
        self.api = cri.api
        self.logs = logs
        self.ids: list[str] = []

    def run(self, name: str) -> tuple[str, Any]:
        """A new pod on the stasis handler: (sandbox id, its PodSandboxConfig)."""
        uid = uuid.uuid4().hex
        logs = self.logs / uid
        logs.mkdir(parents=True)
        config = self.api.PodSandboxConfig(
            metadata=self.api.PodSandboxMetadata(
                name=f"{name}-{uid[:6]}", uid=uid, namespace="default", attempt=0
            ),
            log_directory=str(logs),
            hostname=name,
        )
        reply = self.cri.call(
            "RunPodSandbox", config=config, runtime_handler=STASIS_HANDLER, timeout=CRI_TIMEOUT
        )
        self.ids.append(reply.pod_sandbox_id)
        return reply.pod_sandbox_id, config

    def container(self, sandbox: str, config: Any, image: str, command: list[str]) -> str:
        """Create and start a container named `counter` in the pod; its id."""
        spec = self.api.ContainerConfig(
            metadata=self.api.ContainerMetadata(name="counter", attempt=0),
            image=self.api.ImageSpec(image=image),
            command=command,
            log_path="counter.log",
        )
        cid = self.cri.call(
            "CreateContainer",
            pod_sandbox_id=sandbox,
            config=spec,
            sandbox_config=config,
            timeout=CRI_TIMEOUT,
        ).container_id
        self.cri.call("StartContainer", container_id=cid, timeout=CRI_TIMEOUT)
        return str(cid)

    def remove_all(self) -> None:
        for sandbox in reversed(self.ids):
            self.cri.call("StopPodSandbox", pod_sandbox_id=sandbox, timeout=CRI_TIMEOUT)
            self.cri.call("RemovePodSandbox", pod_sandbox_id=sandbox, timeout=CRI_TIMEOUT)
        self.ids.clear()


@pytest.fixture(scope="module")
def pods(containerd: Containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pods]:
    if why := cri_missing("v1"):
        pytest.fail(why, pytrace=False)
    with CriClient(containerd.address, tmp_path_factory.mktemp("cri")) as cri:
        made = Pods(cri, tmp_path_factory.mktemp("pod-logs"))
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
    cid = pods.container(sandbox, config, image, ["sh", "-c", COUNTER])
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
    cid = pods.container(sandbox, config, str(exported.archive), [])
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
        pytest.skip(
            f"checkpointctl not built ({CHECKPOINTCTL} missing): tests/bed/setup.sh builds it "
            "from its source tarball or a clone (CHECKPOINTCTL_GIT) and skips it offline"
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
