"""Signed checkpoints and namespaces on real containerd, runc and CRIU (issue 17):
a checkpoint restores by name only in the containerd namespace it was taken in
(unless the config allows crossing), and an archive from an untrusted key is
imported only with --trust.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from bed.containerd import Containerd, CtrError, images_dir, unique_id
from bed.workload import IMAGE, RUNTIME, remove, stasis, stasis_argv, wait_count

pytestmark = pytest.mark.integration

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"
OTHER_NS = "stasis-test-b"


@contextlib.contextmanager
def config_with(extra: str) -> Iterator[None]:
    """The session config (what shims and the CLI read) with ``extra`` appended."""
    path = Path(os.environ["STASIS_CONFIG"])
    saved = path.read_text()
    path.write_text(saved + extra)
    try:
        yield
    finally:
        path.write_text(saved)


@pytest.fixture
def store(containerd: Containerd, tmp_path: Path) -> Iterator[Path]:
    """The configured store for this test (names resolve there), a temporary dir."""
    root = tmp_path / "store"
    path = Path(os.environ["STASIS_CONFIG"])
    saved = path.read_text()
    # storage.url goes into the [storage] table the session config starts with.
    path.write_text(saved.replace("[storage]\n", f'[storage]\nurl = "file://{root}"\n', 1))
    try:
        yield root
    finally:
        path.write_text(saved)


@pytest.fixture
def ids(containerd: Containerd) -> Iterator[list[tuple[str, str]]]:
    made: list[tuple[str, str]] = []
    yield made
    for ns, id in made:
        containerd.ctr("task", "kill", "-s", "KILL", id, namespace=ns, check=False)
        containerd.ctr("task", "rm", "-f", id, namespace=ns, check=False)
        containerd.ctr("containers", "rm", id, namespace=ns, check=False)


@pytest.fixture
def other_namespace(containerd: Containerd) -> Iterator[str]:
    containerd.import_image(images_dir() / "busybox.tar", namespace=OTHER_NS)
    yield OTHER_NS


def checkpoint_counter(c: Containerd, ids: list[tuple[str, str]]) -> str:
    """A counter in the default namespace, checkpointed (--exit) by name; the name."""
    id = unique_id("nsa")
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", COUNTER)
    ids.append((c.namespace, id))
    wait_count(c, id, 5)
    name = f"{id}-ckpt"
    stasis(c, "checkpoint", id, "--exit", "--name", name)
    remove(c, id)
    return name


def restore_in(c: Containerd, ns: str, ref: str, ids: list[tuple[str, str]]) -> str:
    new = unique_id("nsb")
    ids.append((ns, new))
    c.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
          f"stasis.dev/restore-from={ref}", IMAGE, new, namespace=ns)  # fmt: skip
    return new


def test_name_ref_from_another_containerd_namespace_is_refused(
    containerd: Containerd, store: Path, other_namespace: str, ids: list[tuple[str, str]]
) -> None:
    name = checkpoint_counter(containerd, ids)
    with pytest.raises(CtrError) as e:
        restore_in(containerd, other_namespace, name, ids)
    assert f"containerd namespace '{containerd.namespace}', not '{other_namespace}'" in str(
        e.value.stderr
    ), e.value.stderr
    # Its own namespace restores it; with restore.cross_namespace, the other one too.
    own = restore_in(containerd, containerd.namespace, name, ids)
    assert wait_count(containerd, own, 0) > 0
    with config_with("[restore]\ncross_namespace = true\n"):
        restore_in(containerd, other_namespace, name, ids)


def test_untrusted_archive_needs_trust(
    containerd: Containerd, store: Path, tmp_path: Path, ids: list[tuple[str, str]]
) -> None:
    name = checkpoint_counter(containerd, ids)
    archive = tmp_path / "c.tar"
    stasis(containerd, "export", name, str(archive))
    # Another node: its own key, which does not trust ours.
    other_key = tmp_path / "other" / "signing.key"
    env = {**os.environ, "STASIS_SIGNING_KEY_FILE": str(other_key)}

    def other_node(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*stasis_argv(containerd), *args], capture_output=True, text=True, env=env, timeout=120
        )

    refused = other_node("import", str(archive), "--name", "imported")
    assert refused.returncode == 1
    assert "not trusted here" in refused.stderr and "--trust" in refused.stderr
    assert not (store / "imported").exists()
    trusted = other_node("import", str(archive), "--name", "imported", "--trust")
    assert trusted.returncode == 0, trusted.stderr
    assert "--trust" in trusted.stderr  # the import is logged
    # Signed by the other node now: this node (which does not trust it) refuses it.
    with pytest.raises(CtrError) as e:
        restore_in(containerd, containerd.namespace, "imported", ids)
    assert "not trusted here" in str(e.value.stderr), e.value.stderr
    # Once this node trusts the other key, it restores it.
    path = Path(os.environ["STASIS_CONFIG"])
    saved = path.read_text()
    path.write_text(
        saved.replace("[signing]\n", f'[signing]\ntrusted_keys = ["{other_key}.pub"]\n')
    )
    try:
        new = restore_in(containerd, containerd.namespace, "imported", ids)
        assert wait_count(containerd, new, 0) > 0
    finally:
        path.write_text(saved)
