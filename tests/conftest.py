"""Shared fixtures: private containerd instances (1.7 and 2.1) for integration tests.

Tests marked `integration` need root and the test bed (`bash tests/bed/setup.sh`).
Without the bed they FAIL, saying so; STASIS_SKIP_INTEGRATION=1 skips them instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
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


# Tests keep checkpoints in temporary directories (and the S3 fixture's bucket):
# restores may read from there (storage.restore_sources).
RESTORE_SOURCES = ("file:///tmp", "file:///var/tmp", "file:///run/stasis-test")


def storage_table(*extra: str) -> str:
    """The session config's [storage] table."""
    listed = ", ".join(f'"{s}"' for s in (*RESTORE_SOURCES, *extra))
    return f"[storage]\nrestore_sources = [{listed}]\n"


def signing_table() -> str:
    """The session config's [signing] table: a key of the session's own (created on
    first use), never the machine's /etc/stasis/signing.key."""
    return f'[signing]\nkey_file = "{os.environ["STASIS_TEST_SIGNING_KEY"]}"\n'


def pytest_configure(config: pytest.Config) -> None:
    """Give shims and the CLI a Stasis config file of this session's own.

    Shims inherit it through the private containerd's environment; the S3
    fixture writes its endpoint and credentials into it. The machine's
    /etc/stasis/config.toml is never read by tests.
    """
    import tempfile

    criu_roots = set(glob.glob(CRIU_MNTNS))
    config.add_cleanup(lambda: _remove_criu_roots(criu_roots))
    directory = tempfile.mkdtemp(prefix="stasis-test-config-")
    config.add_cleanup(lambda: _forget_config(directory))
    os.environ["STASIS_TEST_SIGNING_KEY"] = str(Path(directory) / "signing" / "signing.key")
    # What a Config() built in a test signs with: never the machine's key.
    from runtime.store import signing

    signing.DEFAULT_KEY_FILE = os.environ["STASIS_TEST_SIGNING_KEY"]
    # And what every process the tests start signs with, whatever config it reads
    # (install.sh, shims under a test's own config): never the machine's key.
    os.environ["STASIS_SIGNING_KEY_FILE"] = os.environ["STASIS_TEST_SIGNING_KEY"]
    if "STASIS_CONFIG" in os.environ:
        return
    path = Path(directory) / "config.toml"
    path.write_text("# written by the test session\n" + storage_table() + signing_table())
    path.chmod(0o600)
    os.environ["STASIS_CONFIG"] = str(path)
    config.add_cleanup(lambda: os.environ.pop("STASIS_CONFIG", None))


# A CRIU killed mid-restore (a restore timeout, a tree refused at pre-resume)
# leaves its empty mount-namespace root here, under a random name it never logs.
CRIU_MNTNS = "/tmp/.criu.mntns.*"


def _remove_criu_roots(before: set[str]) -> None:
    """rmdir the empty CRIU roots the session's killed restores left (rmdir only:
    one in use, or not empty, stays)."""
    for path in set(glob.glob(CRIU_MNTNS)) - before:
        with contextlib.suppress(OSError):
            os.rmdir(path)


def _forget_config(directory: str) -> None:
    import shutil

    os.environ.pop("STASIS_TEST_SIGNING_KEY", None)
    os.environ.pop("STASIS_SIGNING_KEY_FILE", None)
    shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class S3Server:
    """A real S3-compatible server (moto_server) for the session, with one bucket."""

    endpoint: str
    bucket: str
    access_key_id: str
    secret_access_key: str


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto_server on a free local port; the session config points S3 at it."""
    import socket
    import subprocess
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    binary = Path(sys.prefix) / "bin" / "moto_server"
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        server = S3Server(f"http://127.0.0.1:{port}", "stasis-test", "stasis-key", "stasis-secret")
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            aws_access_key_id=server.access_key_id,
            aws_secret_access_key=server.secret_access_key,
            region_name="us-east-1",
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                client.create_bucket(Bucket=server.bucket)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        Path(os.environ["STASIS_CONFIG"]).write_text(
            storage_table(f"s3://{server.bucket}") + signing_table() + "[storage.s3]\n"
            f'access_key_id = "{server.access_key_id}"\n'
            f'secret_access_key = "{server.secret_access_key}"\n'
            'region = "us-east-1"\n'
            f'endpoint = "{server.endpoint}"\n'
        )
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
from bed.cri import CriClient, cri_missing  # noqa: E402
from bed.kube import KubeCluster, kube_bed_missing  # noqa: E402
from bed.registry import Registry, registry_missing  # noqa: E402
from bed.workload import IMAGE  # noqa: E402


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


# -- containerd 2.1 with CRI, and a registry on loopback --------------------------------

REGISTRY_BASE = "stasis/busybox:test"  # the busybox image's repository and tag, pushed


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Debian's docker-registry on loopback (containerd's CRI restore pulls the
    checkpoint's base image from a registry even when it is local: ENVIRONMENT.md)."""
    if why := registry_missing():
        pytest.fail(why, pytrace=False)
    reg = Registry(tmp_path_factory.mktemp("registry"))
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def cri_containerd_2_1(registry: Registry) -> Iterator[Containerd]:
    """containerd 2.1 with CRI (namespace k8s.io, so ctr and stasis see CRI's
    containers), pause imported, busybox pushed to the registry as
    ``registry.ref(REGISTRY_BASE)``."""
    c = Containerd.in_run_dir(
        "2.1", shim_path(), namespace=CRI_NAMESPACE, cri=True,
        registry_config_path=registry.hosts_dir,
    )  # fmt: skip
    try:
        c.start()
        c.import_image(images_dir() / "pause.tar")
        c.import_image(images_dir() / "busybox.tar")
        c.ctr("images", "tag", IMAGE, registry.ref(REGISTRY_BASE))
        c.ctr("images", "push", "--plain-http", registry.ref(REGISTRY_BASE), timeout=120)
        yield c
    finally:
        left = c.stop()
    if left:
        pytest.fail(f"containerd 2.1 with CRI left behind (now cleaned up): {left}")


@pytest.fixture(scope="session")
def cri(
    cri_containerd_2_1: Containerd, registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CriClient]:
    """A CRI v1 client of the session's containerd 2.1, the base image pulled through CRI.

    Pulled through CRI, the image has a repo digest: CRI records it as the container's
    image_ref (config.dump's rootfsImageRef), which a CRI restore pulls. An image only
    imported and tagged has none, and its ID is no reference.
    """
    if why := cri_missing("v1"):
        pytest.fail(why, pytrace=False)
    with CriClient(cri_containerd_2_1.address, tmp_path_factory.mktemp("cri")) as client:
        image = client.api.ImageSpec(image=registry.ref(REGISTRY_BASE))
        client.image_call("PullImage", image=image, timeout=120)
        yield client


@pytest.fixture
def ids(containerd: Containerd) -> Iterator[list[str]]:
    """Containers a test made on ``containerd``: killed and removed afterwards."""
    from bed.workload import remove

    made: list[str] = []
    yield made
    for id in made:
        remove(containerd, id)


@pytest.fixture
def sock_path() -> Iterator[str]:
    """A unix socket path in a fresh directory under /tmp (tmp_path can exceed the
    108-byte sun_path limit with long test names); the directory goes afterwards."""
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="stasis-sock-", dir="/tmp")
    try:
        yield os.path.join(directory, "s.sock")
    finally:
        shutil.rmtree(directory)
