"""Tests for runtime.capture.rootfs: capturing an overlay upperdir and applying it to a fresh one.

The round trip and capture tests mount real overlays (root) under tmp_path and
unmount them in ``finally``. The hostile-input tests build tars by hand and
check that nothing appears outside the upperdir.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import stat
import struct
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.capture import rootfs
from runtime.capture.rootfs import DiffStats, apply, capture, upperdir_of
from runtime.errors import DataLoss, FailedPrecondition, InvalidArgument, Unavailable
from runtime.linux.mount import Mount, mount, unmount

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts need root")

# A valid VFS_CAP_REVISION_2 security.capability value: CAP_NET_BIND_SERVICE, effective.
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def overlay(lower: Path, upper: Path, work: Path, merged: Path) -> Iterator[Path]:
    """An overlay mounted on ``merged`` for the duration of the block."""
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    opts = (f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}")
    mount(Mount(type="overlay", source="overlay", options=opts), str(merged))
    try:
        yield merged
    finally:
        unmount(str(merged))


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Every entry under root (root itself excluded), with what a restore must keep."""
    out: dict[str, dict[str, Any]] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            e: dict[str, Any] = {
                "mode": st.st_mode,
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime_ns": st.st_mtime_ns,
            }
            if stat.S_ISREG(st.st_mode):
                e["data"] = Path(os.fsdecode(p)).read_bytes()
            if stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(p)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e["rdev"] = st.st_rdev
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                e["xattrs"] = {
                    n: os.getxattr(p, n) for n in sorted(os.listxattr(p)) if n != "security.selinux"
                }
            out[os.fsdecode(os.path.relpath(p, broot))] = e
    return out


def tar_members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path, encoding="utf-8", errors="surrogateescape") as tar:
        return {m.name.rstrip("/"): m for m in tar}


def write(path: Path, data: bytes | str = b"", mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)
    return path


def build_lower(lower: Path) -> None:
    write(lower / "etc/motd", "welcome\n")
    write(lower / "etc/old.conf", "old\n")
    write(lower / "etc/hostname", "box\n")
    write(lower / "etc/was-file", "a file, later a directory\n")
    write(lower / "var/cache/a", "a")
    write(lower / "var/cache/b/c", "c")
    write(lower / "opt/app/old1", "old1")
    write(lower / "opt/app/sub/old2", "old2")
    write(lower / "bin/tool", "#!/bin/sh\n", 0o755)
    write(lower / "usr/lib/libfoo.so", b"\x7fELF")
    os.symlink("libfoo.so", lower / "usr/lib/oldlink")
    os.symlink("libfoo.so", lower / "usr/lib/keeplink")
    write(lower / "home/user/file", "mine")
    write(lower / "srv/www/index.html", "<html/>")
    (lower / "tmp").mkdir()
    (lower / "tmp").chmod(0o1777)
    (lower / "dev").mkdir()


def change_container(m: Path) -> None:
    """What a container does to its rootfs, through the merged view."""
    write(m / "new.txt", "new file\n")
    write(m / "newdir/sub/file", b"\x00\x01binary")
    (m / "etc/motd").write_text("changed\n")
    (m / "etc/old.conf").unlink()
    (m / "var/cache/b/c").unlink()
    (m / "var/cache/b").rmdir()
    (m / "var/cache/a").unlink()
    (m / "var/cache").rmdir()
    for p in ("opt/app/sub/old2", "opt/app/old1"):
        (m / p).unlink()
    (m / "opt/app/sub").rmdir()
    (m / "opt/app").rmdir()
    write(m / "opt/app/new", "fresh")
    (m / "bin/tool").chmod(0o700)
    os.chown(m / "home/user/file", 1000, 1000)
    os.symlink("/etc/motd", m / "link-to-motd")
    os.symlink("../nowhere", m / "etc/dangling")
    (m / "usr/lib/oldlink").unlink()
    os.link(m / "new.txt", m / "hard.txt")
    os.mkfifo(m / "tmp/fifo", 0o640)
    os.setxattr(m / "new.txt", "user.test", b"hello")
    os.setxattr(m / "newdir", "user.dir", b"\xff\x00\x01")  # binary value
    write(m / "bin/suid", "#!/bin/sh\n", 0o4755)
    write(m / "bin/sgid", "#!/bin/sh\n", 0o2755)
    write(m / "bin/capped", "#!/bin/sh\n", 0o755)
    os.setxattr(m / "bin/capped", "security.capability", CAP_NET_BIND)
    os.mknod(m / "dev/null2", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (m / "etc/was-file").unlink()
    write(m / "etc/was-file/inside", "now a directory")
    (m / "srv/www/index.html").unlink()
    (m / "srv/www").rmdir()
    (m / "srv").rmdir()
    write(m / "srv", "now a file")
    write(m / os.fsdecode(b"odd-\xff-name"), "non-UTF-8 name")
    os.utime(m / "new.txt", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    os.utime(m / "etc/dangling", ns=(5, 1_600_000_000_987_654_321), follow_symlinks=False)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(m / "tmp/sock"))


# --------------------------------------------------------------------------- upperdir_of


def test_upperdir_of() -> None:
    opts = ["index=off", "lowerdir=/l1:/l2", "upperdir=/snap/12/fs", "workdir=/snap/12/work"]
    assert upperdir_of(opts) == "/snap/12/fs"
    assert upperdir_of(["lowerdir=/l1:/l2"]) is None  # a read-only view
    assert upperdir_of([]) is None
    assert upperdir_of(["upperdir="]) is None
    assert upperdir_of(["upperdir=/a", "upperdir=/b"]) == "/b"  # as the kernel: last wins


# --------------------------------------------------------------------------- round trip


@needs_root
def test_round_trip_through_real_overlays(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    build_lower(lower)
    upper, merged = tmp_path / "upper", tmp_path / "merged"
    with overlay(lower, upper, tmp_path / "work", merged) as m:
        change_container(m)
        before = snapshot(m)
    out = tmp_path / "out"
    out.mkdir()
    tar_path, deleted_path = out / rootfs.TAR_NAME, out / rootfs.DELETED_NAME

    stats = capture(str(upper), str(tar_path), str(deleted_path))

    assert sorted(os.listdir(out)) == [rootfs.DELETED_NAME, rootfs.TAR_NAME]  # no temp files
    assert json.loads(deleted_path.read_text()) == [
        "/etc/old.conf",
        "/etc/was-file",  # a file replaced by a directory: opaque
        "/opt/app",  # deleted and created again: opaque
        "/usr/lib/oldlink",
        "/var/cache",
    ]
    members = tar_members(tar_path)
    odd = os.fsdecode(b"odd-\xff-name")
    assert set(members) == {
        "bin",
        "bin/capped",
        "bin/sgid",
        "bin/suid",
        "bin/tool",
        "dev",
        "dev/null2",
        "etc",
        "etc/dangling",
        "etc/motd",
        "etc/was-file",
        "etc/was-file/inside",
        "hard.txt",
        "home",
        "home/user",
        "home/user/file",
        "link-to-motd",
        "new.txt",
        "newdir",
        "newdir/sub",
        "newdir/sub/file",
        odd,
        "opt",
        "opt/app",
        "opt/app/new",
        "srv",
        "tmp",
        "tmp/fifo",
        "usr",
        "usr/lib",
        "var",  # holds the whiteout of var/cache
    }
    # Lower files that were not touched never appear; nor do sockets or whiteouts.
    for untouched in ("etc/hostname", "usr/lib/libfoo.so", "usr/lib/keeplink", "tmp/sock"):
        assert untouched not in members
    # The walk is sorted: the first name of the inode carries the data, the later one links.
    assert members["new.txt"].islnk() and members["new.txt"].linkname == "hard.txt"
    assert members["hard.txt"].isreg()
    assert members["link-to-motd"].issym() and members["link-to-motd"].linkname == "/etc/motd"
    assert members["tmp/fifo"].isfifo()
    dev = members["dev/null2"]
    assert dev.ischr() and (dev.devmajor, dev.devminor) == (1, 3)
    assert members["bin/suid"].mode == 0o4755
    assert members["hard.txt"].pax_headers["SCHILY.xattr.user.test"] == "hello"
    assert members["hard.txt"].pax_headers["mtime"] == "1700000000.123456789"
    assert members["bin/capped"].pax_headers["SCHILY.xattr.security.capability"].encode(
        "utf-8", "surrogateescape"
    ) == (CAP_NET_BIND)
    for member in members.values():
        assert not any(k.startswith("SCHILY.xattr.trusted.overlay.") for k in member.pax_headers)
        assert member.uname == member.gname == ""
    assert stats == DiffStats(
        files=15,  # 12 regular files, a hardlink, a fifo, a device
        dirs=14,
        symlinks=2,
        deleted=5,
        bytes=sum(m.size for m in members.values() if m.isreg()),
    )
    assert stats.files == sum(1 for m in members.values() if not (m.isdir() or m.issym()))

    upper2 = tmp_path / "upper2"
    upper2.mkdir()
    applied = apply(str(tar_path), str(deleted_path), str(upper2))
    assert applied == stats
    assert os.getxattr(upper2 / "opt/app", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(upper2 / "etc/was-file", "trusted.overlay.opaque") == b"y"
    assert os.lstat(upper2 / "var/cache").st_rdev == 0  # a whiteout
    assert stat.S_ISCHR(os.lstat(upper2 / "var/cache").st_mode)

    with overlay(lower, upper2, tmp_path / "work2", tmp_path / "merged2") as m2:
        after = snapshot(m2)
        assert os.path.samefile(m2 / "new.txt", m2 / "hard.txt")
        assert os.listdir(m2 / "opt/app") == ["new"]  # opaque: none of the lower content
        assert sorted(os.listdir(m2 / "etc")) == [
            "dangling",
            "hostname",
            "motd",
            "was-file",
        ]
    del before["tmp/sock"]  # sockets are not captured
    assert after.keys() == before.keys()
    for path, entry in before.items():
        assert after[path] == entry, path
    assert after["bin/suid"]["mode"] == stat.S_IFREG | 0o4755
    assert after["bin/capped"]["xattrs"]["security.capability"] == CAP_NET_BIND
    assert after["newdir"]["xattrs"] == {"user.dir": b"\xff\x00\x01"}
    assert after["tmp"]["mode"] == stat.S_IFDIR | 0o1777
    assert after["srv"]["data"] == b"now a file"


@needs_root
def test_capture_of_an_untouched_container_is_empty(tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    build_lower(lower)
    upper = tmp_path / "upper"
    with overlay(lower, upper, tmp_path / "work", tmp_path / "merged") as m:
        (m / "etc/motd").read_text()  # reads copy nothing up
    stats = capture(str(upper), str(tmp_path / "t.tar"), str(tmp_path / "d.json"))
    assert stats == DiffStats(0, 0, 0, 0, 0)
    assert tar_members(tmp_path / "t.tar") == {}
    assert json.loads((tmp_path / "d.json").read_text()) == []
    upper2 = tmp_path / "upper2"
    upper2.mkdir()
    assert apply(str(tmp_path / "t.tar"), str(tmp_path / "d.json"), str(upper2)) == stats
    assert os.listdir(upper2) == []


@needs_root
def test_capture_streams_a_large_file(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    big = write(upper / "big", b"")
    with big.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(32 << 20)
        f.write(b"middle")
    stats = capture(str(upper), str(tmp_path / "t.tar"), str(tmp_path / "d.json"))
    assert stats.bytes == 64 << 20
    upper2 = tmp_path / "upper2"
    upper2.mkdir()
    apply(str(tmp_path / "t.tar"), str(tmp_path / "d.json"), str(upper2))
    with (upper2 / "big").open("rb") as f:
        f.seek(32 << 20)
        assert f.read(6) == b"middle"
    assert (upper2 / "big").stat().st_size == 64 << 20


# --------------------------------------------------------------------------- capture refusals


@needs_root
@pytest.mark.parametrize(
    ("xattr", "on_dir", "option"),
    [
        ("trusted.overlay.redirect", True, "redirect_dir=on"),
        ("trusted.overlay.metacopy", False, "metacopy=on"),
    ],
)
def test_capture_refuses_data_outside_the_upperdir(
    tmp_path: Path, xattr: str, on_dir: bool, option: str
) -> None:
    upper = tmp_path / "upper"
    if on_dir:
        target = upper / "d"
        target.mkdir(parents=True)
    else:
        target = write(upper / "f", "")
    os.setxattr(target, xattr, b"/elsewhere" if on_dir else b"")
    out = tmp_path / "out"
    out.mkdir()
    old = write(out / rootfs.TAR_NAME, "the previous checkpoint")
    with pytest.raises(FailedPrecondition, match=option):
        capture(str(upper), str(old), str(out / rootfs.DELETED_NAME))
    assert old.read_text() == "the previous checkpoint"  # replaced only when complete
    assert os.listdir(out) == [rootfs.TAR_NAME]  # no temporary left behind


def test_capture_needs_an_upperdir_and_an_output_directory(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="not a directory"):
        capture(str(tmp_path / "nope"), str(tmp_path / "t"), str(tmp_path / "d"))
    write(tmp_path / "upper/f", "x")
    with pytest.raises(Unavailable, match="No such file"):
        capture(str(tmp_path / "upper"), str(tmp_path / "no/t"), str(tmp_path / "no/d"))
    with pytest.raises(FailedPrecondition, match="not a directory"):
        apply(str(tmp_path / "t"), str(tmp_path / "d"), str(tmp_path / "nope"))


# --------------------------------------------------------------------------- performance


@needs_root
def test_capture_cost_follows_the_upperdir_not_the_image(tmp_path: Path) -> None:
    # The image on a tmpfs: making 10,000 files on a busy disk takes seconds. The
    # upperdir, all that capture reads, stays on the disk.
    lower = tmp_path / "lower"
    lower.mkdir()
    mount(Mount(type="tmpfs", source="tmpfs", options=("size=64m",)), str(lower))
    try:
        for d in range(100):
            sub = lower / f"d{d:03}"
            sub.mkdir()
            for f in range(100):
                (sub / f"f{f:03}").write_bytes(b"x" * 64)
        upper = tmp_path / "upper"
        with overlay(lower, upper, tmp_path / "work", tmp_path / "merged") as m:
            for i in range(5):
                (m / f"d{i:03}/f000").write_text("modified")
                write(m / f"new{i}", "added")
            # The least a walking differ (containerd's) does: lstat both trees.
            start = time.perf_counter()
            walked = 0
            for tree in (lower, m):
                for dirpath, dirnames, filenames in os.walk(tree):
                    for name in dirnames + filenames:
                        os.lstat(os.path.join(dirpath, name))
                        walked += 1
            full_walk = time.perf_counter() - start
    finally:
        unmount(str(lower))
    assert walked == 2 * 10_100 + 5

    start = time.perf_counter()
    stats = capture(str(upper), str(tmp_path / "t.tar"), str(tmp_path / "d.json"))
    took = time.perf_counter() - start

    assert (stats.files, stats.dirs, stats.deleted) == (10, 5, 0)
    assert took < 0.5, f"capture took {took:.3f}s"  # fsyncs included
    print(
        f"capture {took * 1000:.1f} ms; lstat of lower and merged trees {full_walk * 1000:.1f} ms"
    )


# --------------------------------------------------------------------------- hostile input


Entry = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes = b"data", mode: int = 0o644, **pax: str) -> Entry:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.pax_headers = len(data), mode, dict(pax)
    return ti, data


def special(name: str, kind: bytes, linkname: str = "", **kw: Any) -> Entry:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, linkname
    ti.mode = kw.pop("mode", 0o755 if kind == tarfile.DIRTYPE else 0o644)
    ti.pax_headers = kw.pop("pax", {})
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, None


def make_tar(path: Path, entries: list[Entry]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in entries:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    return path


@pytest.fixture
def bed(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """An empty upperdir next to a sentinel directory that must stay untouched."""
    sentinel = tmp_path / "sentinel"
    write(sentinel / "keep", "precious")
    upper = tmp_path / "upper"
    upper.mkdir()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    before = snapshot(sentinel)
    yield {"sentinel": sentinel, "upper": upper, "in": inputs}
    assert snapshot(sentinel) == before, "something was written outside the upperdir"
    assert sorted(os.listdir(tmp_path)) == ["inputs", "sentinel", "upper"]


def run_apply(bed: dict[str, Path], entries: list[Entry], deleted: Any = None, **kw: Any) -> Any:
    tar = make_tar(bed["in"] / "t.tar", entries)
    dpath = bed["in"] / "d.json"
    if deleted is not None:
        dpath.write_text(deleted if isinstance(deleted, str) else json.dumps(deleted))
    return apply(str(tar), str(dpath), str(bed["upper"]), **kw)


def hostile_cases(sentinel: str) -> dict[str, tuple[list[Entry], dict[str, bool], str]]:
    rel = "../sentinel"
    return {
        "absolute": ([reg(f"{sentinel}/x")], {}, "absolute path"),
        "dotdot": ([reg(f"{rel}/x")], {}, r"'\.\.'"),
        "dotdot-inside": ([reg("a/../../sentinel/x")], {}, r"'\.\.'"),
        "symlink-parent": (
            [special("a", tarfile.SYMTYPE, sentinel), reg("a/x")],
            {},
            "not a directory",
        ),
        "relative-symlink-parent": (
            [special("a", tarfile.SYMTYPE, rel), reg("a/x")],
            {},
            "not a directory",
        ),
        "deep-symlink-parent": (
            [
                special("d", tarfile.DIRTYPE),
                special("d/l", tarfile.SYMTYPE, sentinel),
                reg("d/l/sub/x"),
            ],
            {},
            "not a directory",
        ),
        "symlink-parent-of-dir": (
            [special("a", tarfile.SYMTYPE, sentinel), special("a/newdir", tarfile.DIRTYPE)],
            {},
            "not a directory",
        ),
        "symlink-parent-of-symlink": (
            [special("a", tarfile.SYMTYPE, sentinel), special("a/l", tarfile.SYMTYPE, "/")],
            {},
            "not a directory",
        ),
        "file-parent": ([reg("f"), reg("f/x")], {}, "not a directory"),
        "replace-dir": ([special("d", tarfile.DIRTYPE), reg("d")], {}, "replace a directory"),
        "hardlink-dotdot": (
            [special("x", tarfile.LNKTYPE, f"{rel}/keep")],
            {},
            r"'\.\.'",
        ),
        "hardlink-absolute": (
            [special("x", tarfile.LNKTYPE, f"{sentinel}/keep")],
            {},
            "absolute path",
        ),
        "hardlink-absent": ([special("x", tarfile.LNKTYPE, "nope")], {}, "does not exist"),
        "hardlink-absent-dir": ([special("x", tarfile.LNKTYPE, "no/pe")], {}, "does not exist"),
        "hardlink-through-symlink": (
            [special("l", tarfile.SYMTYPE, sentinel), special("x", tarfile.LNKTYPE, "l/keep")],
            {},
            "not a directory",
        ),
        "hardlink-to-dir": (
            [special("d", tarfile.DIRTYPE), special("x", tarfile.LNKTYPE, "d")],
            {},
            "is a directory",
        ),
        "hardlink-to-itself": ([special("x", tarfile.LNKTYPE, "x")], {}, "bad hardlink"),
        "char-device": (
            [special("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1)],
            {"allow_devices": False},
            "device nodes",
        ),
        "block-device": (
            [special("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0)],
            {"allow_devices": False},
            "device nodes",
        ),
        "setuid": ([reg("bin/su", mode=0o4755)], {"allow_setuid": False}, "setuid"),
        "setgid": ([reg("bin/sg", mode=0o2755)], {"allow_setuid": False}, "setgid"),
        "capability": (
            [
                reg(
                    "bin/cap",
                    **{
                        "SCHILY.xattr.security.capability": CAP_NET_BIND.decode(
                            "utf-8", "surrogateescape"
                        )
                    },
                )
            ],
            {"allow_setuid": False},
            "capabilities",
        ),
        "nul-in-name": ([reg("x", path="ok\x00/../../x")], {}, "NUL"),
        "nul-in-symlink": (
            [special("l", tarfile.SYMTYPE, "t", pax={"linkpath": "a\x00b"})],
            {},
            "symlink target",
        ),
        "nul-in-hardlink": (
            [reg("f"), special("x", tarfile.LNKTYPE, "f", pax={"linkpath": "f\x00"})],
            {},
            "NUL",
        ),
        "overlay-opaque-xattr": (
            [special("d", tarfile.DIRTYPE, pax={"SCHILY.xattr.trusted.overlay.opaque": "y"})],
            {},
            "overlay's own xattr",
        ),
        "overlay-redirect-xattr": (
            [special("d", tarfile.DIRTYPE, pax={"SCHILY.xattr.user.overlay.redirect": "/x"})],
            {},
            "overlay's own xattr",
        ),
        "unsupported-type": ([special("v", b"V")], {}, "unsupported"),
        "root-as-file": ([reg("./")], {}, "root"),
    }


@needs_root
@pytest.mark.parametrize("case", sorted(hostile_cases("/s")))
def test_apply_refuses_hostile_tar(bed: dict[str, Path], case: str) -> None:
    entries, kw, match = hostile_cases(str(bed["sentinel"]))[case]
    with pytest.raises(InvalidArgument, match=match) as info:
        run_apply(bed, entries, **kw)
    assert "tar entry" in str(info.value)


@needs_root
@pytest.mark.parametrize(
    ("deleted", "match"),
    [
        (["/../sentinel/keep"], r"'\.\.'"),
        (["../sentinel/keep"], r"'\.\.'"),
        (["/a/../../sentinel/keep"], r"'\.\.'"),
        (["/"], "root"),
        ([""], "root"),
        (["/x\x00"], "NUL"),
        (["/a/keep"], "not a directory"),  # "a" is the tar's symlink to the sentinel
        (["/a/deeper/keep"], "not a directory"),
        (["/f/x"], "not a directory"),  # "f" is a file
        ([1, 2], "JSON array of paths"),
        ({"/a": True}, "JSON array of paths"),
    ],
)
def test_apply_refuses_hostile_deleted_paths(
    bed: dict[str, Path], deleted: Any, match: str
) -> None:
    entries = [special("a", tarfile.SYMTYPE, str(bed["sentinel"])), reg("f")]
    with pytest.raises(InvalidArgument, match=match):
        run_apply(bed, entries, deleted)


@needs_root
def test_apply_replaces_a_symlink_without_following_it(bed: dict[str, Path]) -> None:
    sentinel = str(bed["sentinel"])
    entries = [
        special("a", tarfile.SYMTYPE, sentinel),
        special("a", tarfile.DIRTYPE, mode=0o750),  # a directory replaces the symlink
        reg("a/x", b"inside"),
        special("k", tarfile.SYMTYPE, f"{sentinel}/keep"),
        reg("k", b"a file replaces the symlink, its target untouched"),
        special("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        special("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o600),
    ]
    stats = run_apply(bed, entries, ["/a"])
    upper = bed["upper"]
    assert (upper / "a/x").read_bytes() == b"inside"
    assert stat.S_IMODE(os.lstat(upper / "a").st_mode) == 0o750
    assert os.getxattr(upper / "a", "trusted.overlay.opaque") == b"y"
    assert (upper / "k").read_bytes().startswith(b"a file")
    assert stat.S_IMODE(os.lstat(upper / "dev/null").st_mode) == 0o600  # the later entry wins
    assert stats == DiffStats(files=4, dirs=1, symlinks=2, deleted=1, bytes=55)


@needs_root
def test_apply_whiteouts_create_parents_and_skip_what_is_deleted_already(
    bed: dict[str, Path],
) -> None:
    deleted = ["/usr/share/doc", "/usr/share/doc/x", "/etc/motd", "/etc/motd", "/f"]
    stats = run_apply(bed, [reg("f")], deleted)
    upper = bed["upper"]
    for p in ("usr/share/doc", "etc/motd"):
        st = os.lstat(upper / p)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, p
    assert not (upper / "usr/share/doc/x").exists()  # under a whiteout: nothing to do
    assert (upper / "f").read_bytes() == b"data"  # the tar's file hides the lower one
    assert stats.deleted == 4


@needs_root
def test_apply_allows_devices_and_setuid_by_default(bed: dict[str, Path]) -> None:
    entries = [
        special("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        reg("bin/su", mode=0o4755),
    ]
    run_apply(bed, entries)
    assert os.lstat(bed["upper"] / "dev/null").st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(os.lstat(bed["upper"] / "bin/su").st_mode) == 0o4755


@needs_root
def test_apply_accepts_dot_slash_names_and_missing_files(bed: dict[str, Path]) -> None:
    tar = make_tar(bed["in"] / "t.tar", [special("./", tarfile.DIRTYPE), reg("./etc/x")])
    stats = apply(str(tar), str(bed["in"] / "absent.json"), str(bed["upper"]))
    assert (bed["upper"] / "etc/x").read_bytes() == b"data"
    assert stats == DiffStats(files=1, dirs=0, symlinks=0, deleted=0, bytes=4)
    nothing = apply(
        str(bed["in"] / "absent.tar"), str(bed["in"] / "absent.json"), str(bed["upper"])
    )
    assert nothing == DiffStats(0, 0, 0, 0, 0)


@needs_root
@pytest.mark.parametrize("damage", ["garbage", "empty", "cut-in-data", "cut-at-header", "bad-json"])
def test_apply_reports_corrupt_input_as_data_loss(bed: dict[str, Path], damage: str) -> None:
    tar = make_tar(bed["in"] / "t.tar", [reg("a", b"x" * 5000), reg("b", b"y" * 5000)])
    raw = tar.read_bytes()
    dpath = bed["in"] / "d.json"
    dpath.write_text("[]")
    if damage == "garbage":
        tar.write_bytes(b"\x01" * 4096)
    elif damage == "empty":
        tar.write_bytes(b"")
    elif damage == "cut-in-data":
        tar.write_bytes(raw[:3000])
    elif damage == "cut-at-header":  # both members whole, end-of-archive blocks gone
        end = len(raw.rstrip(b"\x00"))
        tar.write_bytes(raw[: (end + 511) // 512 * 512])
    else:
        dpath.write_text('["/a", ')
    with pytest.raises(DataLoss):
        apply(str(tar), str(dpath), str(bed["upper"]))


# --------------------------------------------------------------------------- descriptors


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@needs_root
def test_no_descriptor_leaks_and_deep_or_wide_trees(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    deep = upper.joinpath(*["d"] * 300)  # deeper than Python's recursion would like
    write(deep / "leaf", "bottom")
    for i in range(150):  # more directories than apply keeps open
        write(upper / "wide" / f"w{i:03}" / "f", str(i))
    before = open_fds()
    stats = capture(str(upper), str(tmp_path / "t.tar"), str(tmp_path / "d.json"))
    assert stats.dirs == 300 + 1 + 150
    assert open_fds() == before

    # Reversed, the files land in directories the cache has evicted long ago.
    with tarfile.open(tmp_path / "t.tar") as tar:
        members = tar.getmembers()
        data = {m.name: tar.extractfile(m).read() for m in members if m.isreg()}  # type: ignore[union-attr]
    dirs = [m for m in members if m.isdir()]
    files = [m for m in members if m.isreg()]
    make_tar(
        tmp_path / "r.tar", [(m, None) for m in dirs] + [(m, data[m.name]) for m in files[::-1]]
    )
    upper2 = tmp_path / "upper2"
    upper2.mkdir()
    assert apply(str(tmp_path / "r.tar"), str(tmp_path / "d.json"), str(upper2)) == stats
    assert snapshot(upper2) == snapshot(upper)
    assert open_fds() == before

    bad = make_tar(tmp_path / "bad.tar", [reg("wide/w001/f/x")])
    with pytest.raises(InvalidArgument):
        apply(str(bad), str(tmp_path / "d.json"), str(upper2))
    assert open_fds() == before


@pytest.mark.parametrize(("durable", "fsyncs"), [(True, 4), (False, 0)])  # 2 files, their dir
def test_capture_fsyncs_only_when_asked_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool, fsyncs: int
) -> None:
    """A checkpoint's writer fsyncs every file at its commit: its capture, inside the
    container's frozen time, asks for none. Either way both files appear whole."""
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "motd").write_text("changed\n")
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    stats = capture(str(upper), str(tmp_path / "t.tar"), str(tmp_path / "d.json"), durable=durable)
    assert len(calls) == fsyncs
    assert stats.files == 1
    assert set(tar_members(tmp_path / "t.tar")) == {"etc", "etc/motd"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "t.tar", "upper"]
