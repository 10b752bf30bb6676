"""Tests for runtime.linux.mount: option parsing, and (as root) real tmpfs and bind mounts.

Every test that mounts undoes its mounts in ``finally``, so a failed assertion
never leaves anything stacked on a temporary directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.errors import InvalidArgument, Unavailable
from runtime.linux import mount as m
from runtime.linux.mount import Mount, is_mountpoint, mount, mount_all, parse_options, unmount_all

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


# --------------------------------------------------------------------------- parse_options


def test_parse_flags() -> None:
    flags, prop, data = parse_options(["ro", "nosuid", "nodev", "noexec", "relatime"])
    assert flags == m.MS_RDONLY | m.MS_NOSUID | m.MS_NODEV | m.MS_NOEXEC | m.MS_RELATIME
    assert prop == 0
    assert data == ""


def test_parse_bind_and_rbind() -> None:
    assert parse_options(["bind"])[0] == m.MS_BIND
    assert parse_options(["rbind"])[0] == m.MS_BIND | m.MS_REC


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["ro", "rw"], 0),
        (["rw", "ro"], m.MS_RDONLY),
        (["nosuid", "suid"], 0),
        (["nodev", "dev"], 0),
        (["noexec", "exec"], 0),
        (["noatime", "atime"], 0),
        (["sync", "async"], 0),
        (["mand", "nomand"], 0),
        (["relatime", "norelatime"], 0),
        (["strictatime", "nostrictatime"], 0),
        (["nodiratime", "diratime"], 0),
        (["defaults"], 0),
        (["rw"], 0),
        (["ro", "nosuid", "rw"], m.MS_NOSUID),
    ],
)
def test_clear_flags(options: list[str], expected: int) -> None:
    assert parse_options(options)[0] == expected


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("private", m.MS_PRIVATE),
        ("rprivate", m.MS_PRIVATE | m.MS_REC),
        ("shared", m.MS_SHARED),
        ("rshared", m.MS_SHARED | m.MS_REC),
        ("slave", m.MS_SLAVE),
        ("rslave", m.MS_SLAVE | m.MS_REC),
        ("unbindable", m.MS_UNBINDABLE),
        ("runbindable", m.MS_UNBINDABLE | m.MS_REC),
    ],
)
def test_propagation(option: str, expected: int) -> None:
    flags, prop, data = parse_options(["rbind", option])
    assert flags == m.MS_BIND | m.MS_REC
    assert prop == expected
    assert data == ""


def test_data_keeps_order_and_unknown_options() -> None:
    flags, prop, data = parse_options(
        ["lowerdir=/l1:/l2", "ro", "upperdir=/u", "workdir=/w", "index=off", "size=1m"]
    )
    assert flags == m.MS_RDONLY
    assert prop == 0
    assert data == "lowerdir=/l1:/l2,upperdir=/u,workdir=/w,index=off,size=1m"


def test_parse_empty() -> None:
    assert parse_options([]) == (0, 0, "")
    assert parse_options(()) == (0, 0, "")


# --------------------------------------------------------------------------- Mount


def test_upperdir() -> None:
    overlay = Mount(
        "overlay",
        "overlay",
        options=("index=off", "workdir=/s/1/work", "upperdir=/s/1/fs", "lowerdir=/s/0/fs"),
    )
    assert overlay.upperdir() == "/s/1/fs"
    assert Mount("overlay", "overlay", options=("lowerdir=/a:/b",)).upperdir() is None
    assert Mount("bind", "/src", options=("rbind", "upperdir=/x")).upperdir() is None
    assert Mount("tmpfs", "tmpfs").upperdir() is None


def test_options_over_page_size_are_refused(tmp_path: Path) -> None:
    big = Mount("tmpfs", "tmpfs", options=("x" * os.sysconf("SC_PAGESIZE"),))
    with pytest.raises(InvalidArgument, match="over the page size"):
        mount(big, str(tmp_path))
    assert not is_mountpoint(str(tmp_path))


# --------------------------------------------------------------------------- real mounts


@pytest.fixture
def scratch() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stasis-mount-", dir="/tmp"))
    try:
        yield d
    finally:
        for sub in d.iterdir():
            with contextlib.suppress(OSError):
                unmount_all(str(sub))
        shutil.rmtree(d, ignore_errors=True)


def _count_mounts(path: Path) -> int:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return sum(1 for line in f if line.split(" ")[4] == real)


@needs_root
def test_tmpfs_mount_and_unmount_all(scratch: Path) -> None:
    target = scratch / "target"
    target.mkdir()
    assert not is_mountpoint(str(target))
    try:
        mount(
            Mount("tmpfs", "tmpfs", options=("nosuid", "nodev", "size=1m", "mode=750")), str(target)
        )
        assert is_mountpoint(str(target))
        assert oct(os.stat(target).st_mode & 0o777) == oct(0o750)
        (target / "f").write_text("on tmpfs")
        # Stack a second one: unmount_all removes both.
        mount(Mount("tmpfs", "tmpfs", options=("size=1m",)), str(target))
        assert _count_mounts(target) == 2
        assert not (target / "f").exists()
    finally:
        unmount_all(str(target))
    assert not is_mountpoint(str(target))
    assert _count_mounts(target) == 0
    assert os.listdir(target) == []


@needs_root
def test_readonly_bind(scratch: Path) -> None:
    src = scratch / "src"
    target = scratch / "target"
    src.mkdir()
    target.mkdir()
    (src / "hello").write_text("from source")
    try:
        mount(Mount("bind", str(src), options=("rbind", "ro")), str(target))
        assert is_mountpoint(str(target))
        assert (target / "hello").read_text() == "from source"
        with pytest.raises(OSError) as info:
            (target / "new").write_text("x")
        assert info.value.errno == errno.EROFS
        # The source itself stays writable.
        (src / "new").write_text("y")
        assert (target / "new").read_text() == "y"
    finally:
        unmount_all(str(target))
    assert not is_mountpoint(str(target))
    assert not is_mountpoint(str(src))


@needs_root
def test_is_mountpoint_follows_symlinks_and_spaces(scratch: Path) -> None:
    target = scratch / "with space"
    target.mkdir()
    link = scratch / "link"
    link.symlink_to(target)
    try:
        mount(Mount("tmpfs", "tmpfs", options=("size=1m",)), str(target))
        assert is_mountpoint(str(target))  # mountinfo writes the space as \040
        assert is_mountpoint(str(link))
    finally:
        unmount_all(str(target))
    assert not is_mountpoint(str(target))


def test_is_mountpoint_plain_paths(tmp_path: Path) -> None:
    assert is_mountpoint("/")
    assert not is_mountpoint(str(tmp_path))
    assert not is_mountpoint(str(tmp_path / "missing"))


def test_unmount_all_without_mounts(tmp_path: Path) -> None:
    unmount_all(str(tmp_path))
    unmount_all(str(tmp_path / "missing"))
    m.unmount(str(tmp_path))  # EINVAL: not a mount point, not an error


@needs_root
def test_mount_failure_is_unavailable(scratch: Path) -> None:
    target = scratch / "target"
    target.mkdir()
    with pytest.raises(Unavailable, match="no-such-fs") as info:
        mount(Mount("no-such-fs", "none"), str(target))
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.ENODEV
    assert not is_mountpoint(str(target))


@needs_root
def test_mount_all_rolls_back(scratch: Path) -> None:
    target = scratch / "target"
    target.mkdir()
    mounts = [
        Mount("tmpfs", "tmpfs", options=("size=1m",)),
        Mount("tmpfs", "tmpfs", options=("size=1m",)),
        Mount("no-such-fs", "none"),
    ]
    try:
        with pytest.raises(Unavailable):
            mount_all(mounts, str(target))
        assert _count_mounts(target) == 0
        assert not is_mountpoint(str(target))
    finally:
        unmount_all(str(target))


@needs_root
def test_mount_all_success(scratch: Path) -> None:
    target = scratch / "target"
    target.mkdir()
    try:
        mount_all([Mount("tmpfs", "tmpfs", options=("size=1m",))], str(target))
        assert _count_mounts(target) == 1
    finally:
        unmount_all(str(target))
    assert _count_mounts(target) == 0
