"""Shared fixtures: private containerd instances (1.7 and 2.1) for integration tests.

Tests marked `integration` need root and the test bed (`bash tests/bed/setup.sh`).
Without the bed they FAIL, saying so; STASIS_SKIP_INTEGRATION=1 skips them instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# tests/ is not a package: make `bed` importable however pytest was started.
_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from bed.containerd import Containerd, bed_missing, images_dir  # noqa: E402

REPO = _TESTS.parent
VERSIONS = ("1.7", "2.1")
SKIP_INTEGRATION = os.environ.get("STASIS_SKIP_INTEGRATION") == "1"


def shim_path() -> list[Path]:
    """Directories holding containerd-shim-stasis-v2: the repo's venv and this interpreter's."""
    dirs = [REPO / ".venv" / "bin", Path(sys.prefix) / "bin"]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d not in dirs[:i]]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With STASIS_SKIP_INTEGRATION=1, skips every test marked `integration`."""
    if not SKIP_INTEGRATION:
        return
    skip = pytest.mark.skip(reason="STASIS_SKIP_INTEGRATION=1")
    for item in items:
        if item.get_closest_marker("integration"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _integration_bed(request: pytest.FixtureRequest) -> None:
    """Fails an integration test at once, with the remedy, when the bed is missing."""
    if request.node.get_closest_marker("integration") and (why := bed_missing()):
        pytest.fail(why, pytrace=False)


def _session_containerd(version: str) -> Iterator[Containerd]:
    # Session fixtures are set up before the autouse check above: check here too.
    if why := bed_missing([version]):
        pytest.fail(why, pytrace=False)
    instance = Containerd.in_run_dir(version, shim_path())
    try:
        instance.start()
        instance.import_image(images_dir() / "busybox.tar")
        yield instance
    finally:
        left = instance.stop()
    if left:
        pytest.fail(f"containerd {version} run left behind (now cleaned up): {left}")


@pytest.fixture(scope="session")
def containerd_1_7() -> Iterator[Containerd]:
    """A private containerd 1.7 for the session, busybox imported."""
    yield from _session_containerd("1.7")


@pytest.fixture(scope="session")
def containerd_2_1() -> Iterator[Containerd]:
    """A private containerd 2.1 for the session, busybox imported."""
    yield from _session_containerd("2.1")


@pytest.fixture(scope="session", params=VERSIONS, ids=[f"ctrd{v}" for v in VERSIONS])
def containerd(request: pytest.FixtureRequest) -> Containerd:
    """Each private containerd version in turn (tests are grouped by version)."""
    name = "containerd_" + request.param.replace(".", "_")
    instance: Containerd = request.getfixturevalue(name)
    return instance


# -- a single-node Kubernetes 1.20 on a private containerd 1.7 with CRI --------------

from bed.containerd import CRI_NAMESPACE  # noqa: E402
from bed.kube import KubeCluster, kube_bed_missing  # noqa: E402


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    """A Kubernetes 1.20 cluster for the session (tests/bed/kube.py): node Ready,
    RuntimeClass `stasis` created, busybox and pause imported into the CRI namespace of
    its containerd (`kube_cluster.containerd`, which finds the stasis shim in the venv).
    Use `kube_cluster.kubectl(...)`, `.api(...)`, `.wait_pod(...)`. Teardown deletes
    every pod and fails the session's last test when anything was left behind."""
    if why := kube_bed_missing():
        pytest.fail(why, pytrace=False)
    containerd = Containerd.in_run_dir("1.7", shim_path(), cri=True)
    cluster: KubeCluster | None = None
    leaks: list[str] = []
    try:
        containerd.start()
        for image in ("pause.tar", "busybox.tar"):
            containerd.import_image(images_dir() / image, namespace=CRI_NAMESPACE)
        cluster = KubeCluster.in_run_dir(containerd)
        cluster.start()
        yield cluster
    finally:
        if cluster is not None:
            leaks += cluster.stop()
        left = containerd.stop()
    if leaks or left:
        pytest.fail(f"the Kubernetes cluster left behind (now cleaned up): {leaks} {left}")
