"""Mounting a container's rootfs from containerd's mount list, and unmounting it.

The mount list comes from the snapshotter (overlay with lowerdir/upperdir/
workdir, or a bind mount for the native snapshotter). Options follow
mount(8) names as containerd uses them; what is not a flag is fs data.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from runtime.errors import InvalidArgument, Unavailable

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2
_PROPAGATION = MS_SHARED | MS_PRIVATE | MS_SLAVE | MS_UNBINDABLE

# option -> (clear?, flag)
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
_PROPAGATION_FLAGS = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}


@dataclass(frozen=True)
class Mount:
    """One entry of containerd's mount list (containerd.types.Mount)."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()

    def upperdir(self) -> str | None:
        """The overlay upper directory (where the container's writes land), if any."""
        if self.type != "overlay":
            return None
        for opt in self.options:
            if opt.startswith("upperdir="):
                return opt.removeprefix("upperdir=")
        return None


def parse_options(options: Sequence[str]) -> tuple[int, int, str]:
    """Split mount options into (flags, propagation flags, fs data)."""
    flags = 0
    propagation = 0
    data: list[str] = []
    for opt in options:
        if opt in _FLAGS:
            clear, flag = _FLAGS[opt]
            flags = flags & ~flag if clear else flags | flag
        elif opt in _PROPAGATION_FLAGS:
            propagation |= _PROPAGATION_FLAGS[opt]
        else:
            data.append(opt)
    return flags, propagation, ",".join(data)


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        _libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return _libc


def _b(s: str | None) -> bytes | None:
    return None if s is None else os.fsencode(s)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str) -> None:
    if _lib().mount(_b(source), _b(target), _b(fstype), flags, _b(data) if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or ''} {source} on {target}: {os.strerror(err)}")


def mount(m: Mount, target: str) -> None:
    """Mount ``m`` on ``target`` like containerd's mount.Mount does."""
    flags, propagation, data = parse_options(m.options)
    if len(data) >= os.sysconf("SC_PAGESIZE") - 1:
        raise InvalidArgument(
            f"mount options of {m.type} {m.source} are {len(data)} bytes, over the page size"
        )
    try:
        if not flags & MS_REMOUNT or data:
            # Propagation and remount-only flags cannot be set in the same call.
            _mount(m.source, target, m.type, flags & ~_PROPAGATION, data)
        if propagation:
            _mount(None, target, None, propagation, "")
        if flags & MS_BIND and flags & MS_RDONLY:
            # A bind mount ignores MS_RDONLY until it is remounted.
            _mount(None, target, None, flags | MS_REMOUNT | MS_BIND, "")
    except OSError as e:
        raise Unavailable(str(e)) from e


def mount_all(mounts: Sequence[Mount], target: str) -> None:
    """Mount every entry on ``target`` in order; on failure undo what was done."""
    done = 0
    try:
        for m in mounts:
            mount(m, target)
            done += 1
    except BaseException:
        for _ in range(done):
            unmount(target)
        raise


def unmount(target: str, *, retries: int = 50) -> None:
    """Unmount the top mount on ``target``; retries EBUSY, then detaches lazily."""
    for _ in range(retries):
        if _lib().umount2(_b(target), 0) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return
        if err != errno.EBUSY:
            raise OSError(err, f"umount {target}: {os.strerror(err)}")
        time.sleep(0.05)
    if _lib().umount2(_b(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount -l {target}: {os.strerror(err)}")


def is_mountpoint(path: str) -> bool:
    """Whether ``path`` is the mount point of something (per /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(" ", 5)
                if len(fields) > 4 and unescape(fields[4]) == real:
                    return True
    except OSError:
        return False
    return False


def unescape(s: str) -> str:
    """A mountinfo field as the path it stands for."""
    # mountinfo escapes space, tab, newline and backslash as octal.
    return (
        s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
    )


def unmount_all(target: str) -> None:
    """Unmount everything stacked on ``target`` (no error when nothing is mounted)."""
    for _ in range(64):
        if not is_mountpoint(target):
            return
        unmount(target)


def mounts_below(path: str) -> list[str]:
    """Mount points at or below ``path`` (per /proc/self/mountinfo), the deepest and
    the latest mounted first: the order to unmount them in."""
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    found: list[tuple[int, int, str]] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f):
                fields = line.split(" ", 5)
                if len(fields) < 5:
                    continue
                point = unescape(fields[4])
                if point == real or point.startswith(prefix):
                    found.append((point.count("/"), n, point))
    except OSError:
        return []
    return [point for _, _, point in sorted(found, reverse=True)]


def unmount_below(path: str) -> list[str]:
    """Unmount everything mounted at or below ``path``, deepest first (lazily where
    busy); returns the mount points that could not be unmounted."""
    left: list[str] = []
    for point in mounts_below(path):
        try:
            unmount(point, retries=1)
        except OSError:
            left.append(point)
    return left
