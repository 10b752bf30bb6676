"""install.sh on this machine's system containerd: idempotent, working, undoable.

This modifies the machine (/opt/stasis, /usr/local/bin, /etc/containerd, the system
containerd at /run/containerd/containerd.sock), so it runs only as root on Debian 12
(the project's machine kind, CI included) and not with STASIS_SKIP_SYSTEM_INSTALL=1.
It leaves the machine as it found it: installed (from this checkout) when it was.
install.sh runs from a copy of the sources taken at the start, so that edits made to
the checkout while the test runs do not count as a change between the two installs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from bed.containerd import images_dir
from bed.hostkey import new_signing_key_removed

REPO = Path(__file__).resolve().parents[2]
SOCK = "/run/containerd/containerd.sock"
CONFIG = Path("/etc/containerd/config.toml")
PREFIX = Path("/opt/stasis")
MANIFEST = PREFIX / "install" / "manifest"
# Everything install.sh may add or change when the machine already has its packages.
ROOTS = (
    PREFIX,
    Path("/etc/containerd"),
    Path("/usr/local/bin/stasis"),
    Path("/usr/local/bin/containerd-shim-stasis-v2"),
)


def _debian_12() -> bool:
    try:
        return Path("/etc/debian_version").read_text().startswith("12")
    except OSError:
        return False


pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0
        or not _debian_12()
        or os.environ.get("STASIS_SKIP_SYSTEM_INSTALL") == "1",
        reason="install.sh modifies the system: root on Debian 12 only "
        "(STASIS_SKIP_SYSTEM_INSTALL=1 skips it)",
    ),
]

Snapshot = dict[str, tuple[object, ...]]


def snapshot(roots: tuple[Path, ...] = ROOTS) -> Snapshot:
    """Every path under roots: kind, mode, and for files size, mtime, inode and sha256."""
    found: Snapshot = {}

    def one(path: Path) -> None:
        st = path.lstat()
        if path.is_symlink():
            found[str(path)] = ("link", os.readlink(path))
        elif path.is_dir():
            found[str(path)] = ("dir", st.st_mode)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path)] = ("file", st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, digest)

    for root in roots:
        if not root.exists() and not root.is_symlink():
            continue
        one(root)
        if root.is_dir() and not root.is_symlink():
            for dirpath, dirnames, filenames in os.walk(root):
                for name in dirnames + filenames:
                    one(Path(dirpath) / name)
    return found


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    """Paths added, removed or changed, for assertion messages (first 20)."""
    keys = sorted(set(before) | set(after))
    return [
        f"{k}: {before.get(k)} -> {after.get(k)}" for k in keys if before.get(k) != after.get(k)
    ][:20]


def install_sh(source: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Runs source/install.sh with args; fails the test with its output on error."""
    done = subprocess.run(
        ["bash", str(source / "install.sh"), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"install.sh {' '.join(args)}: {done.returncode}\n{done.stderr}"
    return done


def ctr(*args: str, namespace: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The system ctr against the system containerd."""
    return subprocess.run(
        ["ctr", "--address", SOCK, "--namespace", namespace, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def sources(tmp_path: Path) -> Iterator[Path]:
    """A copy of what install.sh installs from, frozen for the test."""
    copy = tmp_path / "src"
    copy.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("shim", "runtime", "protos", "packaging"):
        shutil.copytree(REPO / name, copy / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "install.sh"):
        shutil.copy2(REPO / name, copy / name)
    (copy / "tests" / "bed").mkdir(parents=True)
    shutil.copy2(REPO / "tests" / "bed" / "images.py", copy / "tests" / "bed" / "images.py")
    yield copy


@pytest.fixture
def machine() -> Iterator[bool]:
    """Yields whether Stasis was installed; afterwards installs it again from this
    checkout if it was (and leaves it uninstalled if it was not)."""
    was_installed = MANIFEST.exists()
    with new_signing_key_removed(keep=MANIFEST.exists):
        yield was_installed
        if was_installed and not MANIFEST.exists():
            install_sh(REPO, "--no-demo")
        elif not was_installed and MANIFEST.exists():
            install_sh(REPO, "--uninstall")


def test_install_twice_run_and_uninstall(sources: Path, machine: bool) -> None:
    if machine:  # start from a machine without Stasis, as a fresh one
        backup = PREFIX / "install" / "containerd-config.orig"
        original = backup.read_bytes() if backup.exists() else None
        install_sh(sources, "--uninstall")
        if original is not None:
            assert CONFIG.read_bytes() == original
    fresh = snapshot()
    fresh_config = CONFIG.read_bytes() if CONFIG.exists() else None
    assert not MANIFEST.exists()

    first = install_sh(sources, "--no-demo")
    installed = snapshot()
    assert (
        "containerd-shim-stasis-v2"
        in (Path("/usr/local/bin") / "containerd-shim-stasis-v2").resolve().name
    )
    second = install_sh(sources, "--no-demo")
    assert "up to date" in second.stderr, second.stderr
    assert "restarting containerd" not in second.stderr
    assert differences(installed, snapshot()) == [], "the second install.sh changed files"

    # The stasis CRI handler is in containerd's effective config.
    dump = subprocess.run(
        ["containerd", "--config", str(CONFIG), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert 'runtime_type = "io.containerd.stasis.v2"' in dump, first.stderr
    assert 'pod_annotations = ["stasis.dev/*"]' in dump
    assert 'runtime_type = "io.containerd.runc.v2"' in dump  # runc still there

    # A container on the stasis runtime through the system containerd.
    ns = f"stasis-install-{uuid.uuid4().hex[:8]}"
    cid = f"hello-{uuid.uuid4().hex[:8]}"
    try:
        done = ctr("images", "import", str(images_dir() / "busybox.tar"), namespace=ns)
        assert done.returncode == 0, done.stderr
        done = ctr(
            "run",
            "--rm",
            "--runtime",
            "io.containerd.stasis.v2",
            "docker.io/stasis/busybox:test",
            cid,
            "sh",
            "-c",
            "echo hello from stasis",
            namespace=ns,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "hello from stasis"
    finally:
        ctr("tasks", "rm", "-f", cid, namespace=ns)
        ctr("containers", "rm", cid, namespace=ns)
        ctr("images", "rm", "docker.io/stasis/busybox:test", namespace=ns)
        ctr("content", "prune", "references", namespace=ns)
        ctr("namespaces", "rm", ns, namespace="default")
        remove_namespace_cgroups(ns)

    install_sh(sources, "--uninstall")
    assert (CONFIG.read_bytes() if CONFIG.exists() else None) == fresh_config
    left = snapshot()
    assert sorted(set(left) - set(fresh)) == [], "--uninstall left files install.sh added"
    assert not MANIFEST.exists()


def remove_namespace_cgroups(ns: str) -> None:
    """rmdir the (empty) /<ns> cgroups runc made as the parents of the namespace's
    containers' (runc removes a container's own cgroup, not its parents)."""
    root = Path("/sys/fs/cgroup")
    for hierarchy in [root, *(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())]:
        with contextlib.suppress(OSError):
            (hierarchy / ns).rmdir()
