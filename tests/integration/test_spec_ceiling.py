"""A restore never grants more than the new container's spec, on real containerd,
runc and CRIU: a privileged checkpoint restored into a default container is refused
(before CRIU runs when the checkpoint's recorded profile says so; by the kernel's
view of the restored tree, held by CRIU before its first instruction, when the
recorded profile or the images lie), and a privileged checkpoint restores into an
equally privileged container."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from bed import criu_images
from bed.containerd import Containerd, unique_id
from bed.tamper import edit_metadata, rehash
from bed.workload import (
    COUNTER,
    IMAGE,
    RUNTIME,
    remove,
    run_restoring,
    stasis,
    stasis_argv,
    task,
    wait_count,
)

pytestmark = pytest.mark.integration


def host_bounding() -> int:
    """This host's bounding set: what CRIU (as root) can give a restored process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapBnd in /proc/self/status")


def checkpoint(c: Containerd, ids: list[str], store: Path, *flags: str) -> Path:
    """A counter run with ``flags``, checkpointed (--exit) into ``store``; its path."""
    id = unique_id("src")
    c.ctr("run", "-d", "--runtime", RUNTIME, *flags, IMAGE, id, "sh", "-c", COUNTER)
    ids.append(id)
    wait_count(c, id, 5)
    stasis(c, "checkpoint", id, "--exit", "--to", str(store), "--name", "ck")
    remove(c, id)
    return store / "ck"


def restore(c: Containerd, ids: list[str], ref: Path, *flags: str) -> tuple[str, str, int]:
    """``ctr run`` restoring ``ref`` with ``flags``: (id, stderr, exit code)."""
    new, r = run_restoring(c, ids, ref, *flags)
    return new, r.stderr, r.returncode


def assert_nothing_ran(c: Containerd, id: str) -> None:
    """The refused restore left no task running (and it can be removed)."""
    t = task(c, id)
    assert t is None or t[1] in ("STOPPED", "CREATED"), t
    remove(c, id)
    assert task(c, id) is None


def test_privileged_checkpoint_into_default_container_is_refused_early(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    ckpt = checkpoint(containerd, ids, tmp_path / "store", "--privileged")
    meta = json.loads(stasis(containerd, "inspect", str(ckpt)).stdout)
    assert "CAP_SYS_ADMIN" in meta["security"]["process"]["capabilities"]["bounding"]

    new, err, rc = restore(containerd, ids, ckpt, "--seccomp")
    assert rc != 0
    assert "bounding capabilities include" in err and "CAP_SYS_ADMIN" in err, err
    assert "seccomp" in err, err
    assert_nothing_ran(containerd, new)


def test_kernel_view_refuses_what_the_recorded_profile_hides(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    # A checkpoint whose profile says nothing (older, or edited): the restored tree
    # itself is read at CRIU's pre-resume stage and killed before it runs.
    ckpt = checkpoint(containerd, ids, tmp_path / "store", "--privileged")
    edit_metadata(ckpt, lambda m: m.pop("security"))

    new, err, rc = restore(containerd, ids, ckpt, "--seccomp")
    assert rc != 0
    assert "CapBnd" in err and "CAP_SYS_ADMIN" in err, err
    assert "Seccomp 0" in err, err
    assert "killed before they ran" in err, err
    assert_nothing_ran(containerd, new)


def test_creds_edited_archive_is_untrusted_and_then_refused_by_the_kernel_view(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    # An unprivileged checkpoint, exported; its core image edited to every
    # capability (nothing privileged needed), the manifest made to agree, the
    # signature gone: the archive is refused as untrusted. Imported on the user's
    # word (--trust) it is signed by this node, and restored into the very spec it
    # was taken with only the kernel's view of the restored process can tell.
    ckpt = checkpoint(containerd, ids, tmp_path / "store")
    archive = tmp_path / "ck.tar"
    stasis(containerd, "export", str(ckpt), str(archive))
    work = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    full = host_bounding()

    def escalate(entry: object) -> None:
        creds = entry.thread_core.creds  # type: ignore[attr-defined]
        for caps in (creds.cap_bnd, creds.cap_prm, creds.cap_eff):
            caps[:] = [full & 0xFFFFFFFF, full >> 32]

    cores = sorted((work / "checkpoint").glob("core-*.img"))
    assert cores
    for core in cores:
        criu_images.edit_core(core, tmp_path / "pb", escalate)
        rehash(work, f"checkpoint/{core.name}")
    (work / "manifest.sig").unlink()
    edited = tmp_path / "edited.tar"
    with tarfile.open(edited, "w") as tar:
        for rel in (
            "manifest.json",
            *sorted(json.loads((work / "manifest.json").read_text())["files"]),
        ):
            tar.add(work / rel, arcname=rel)

    store = tmp_path / "imported"
    env = {**os.environ, "STASIS_STORAGE_URL": f"file://{store}"}

    def import_(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*stasis_argv(containerd), "import", str(edited), "--name", "edited", *flags],
            capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    refused = import_()
    assert refused.returncode != 0 and "--trust" in refused.stderr, refused.stderr
    assert not (store / "edited").exists()
    trusted = import_("--trust")
    assert trusted.returncode == 0, trusted.stderr

    new, err, rc = restore(containerd, ids, store / "edited")
    assert rc != 0
    assert "CapBnd" in err and "CAP_SYS_ADMIN" in err and "killed before they ran" in err, err
    assert_nothing_ran(containerd, new)


def test_privileged_checkpoint_restores_into_privileged_container(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    ckpt = checkpoint(containerd, ids, tmp_path / "store", "--privileged")
    new, err, rc = restore(containerd, ids, ckpt, "--privileged")
    assert rc == 0, err
    before = wait_count(containerd, new, 0)
    time.sleep(0.3)
    assert wait_count(containerd, new, before) > before
    status = Path(f"/proc/{task(containerd, new)[0]}/status").read_text()  # type: ignore[index]
    assert "CapBnd:\t000001" in status, status
