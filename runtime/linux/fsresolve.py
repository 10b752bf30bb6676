"""Opening a path beneath a directory descriptor, never through a symlink or ``..``.

``open_beneath(dir_fd, rel, flags)`` resolves ``rel`` (relative, no ``..``) one
time, inside the directory ``dir_fd`` refers to, and refuses every symlink on
the way, the last component included: ``ELOOP`` for a symlink, ``EXDEV`` for
``..`` or an absolute path. What the returned descriptor refers to is what was
checked, so a caller that then reads through it cannot be sent elsewhere by a
rename or a new symlink between check and use.

The kernel's ``openat2`` does the work (``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``);
Python 3.11 has no wrapper, so it is called through ``ctypes``. Where the
kernel lacks it (``ENOSYS``, before Linux 5.6, or another architecture), the
same rules are kept by a walk from ``dir_fd``, one component at a time, each
opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat

# linux/openat2.h
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

# openat2 is 437 on every architecture but alpha; only these are known here.
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())


class _OpenHow(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    )


_libc: ctypes.CDLL | None = None
_have_openat2: bool | None = None  # None: not tried yet; False: ENOSYS seen once


def _syscall_openat2(dir_fd: int, rel: str, flags: int, mode: int) -> int:
    """``openat2`` beneath ``dir_fd`` with no symlinks; OSError as the kernel says."""
    global _libc
    if _SYS_OPENAT2 is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    how = _OpenHow(flags, mode, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_long(dir_fd),
        ctypes.c_char_p(os.fsencode(rel)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return int(fd)


def _walk(dir_fd: int, parts: list[str], flags: int, mode: int) -> int:
    """The same rules as ``openat2`` above, one component at a time from ``dir_fd``."""
    cur = dir_fd
    try:
        for i, name in enumerate(parts[:-1]):
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            if cur != dir_fd:
                os.close(cur)
            cur = fd
            mode_ = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode_):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), "/".join(parts[: i + 1]))
            if not stat.S_ISDIR(mode_):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "/".join(parts[: i + 1]))
        try:
            last = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
        except NotADirectoryError:
            # O_DIRECTORY | O_NOFOLLOW on a symlink says ENOTDIR: say ELOOP, as openat2 does.
            if stat.S_ISLNK(os.stat(parts[-1], dir_fd=cur, follow_symlinks=False).st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), "/".join(parts)) from None
            raise
        # O_PATH | O_NOFOLLOW opens a symlink itself rather than failing: refuse it here.
        if flags & os.O_PATH and stat.S_ISLNK(os.fstat(last).st_mode):
            os.close(last)
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), "/".join(parts))
        return last
    finally:
        if cur != dir_fd:
            os.close(cur)


def split(rel: str) -> list[str]:
    """The components of relative path ``rel`` (``.`` and empty ones dropped).

    OSError ``EXDEV`` for an absolute path or a ``..`` component (even one that
    would stay inside: a reference is refused, not reinterpreted), ``ENOENT``
    for an empty one.
    """
    if rel.startswith("/") or "\0" in rel:
        raise OSError(errno.EXDEV, "not a relative path", rel)
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EXDEV, "'..' in the path", rel)
    if not parts:
        raise OSError(errno.ENOENT, "empty path", rel)
    return parts


def open_beneath(dir_fd: int, rel: str, flags: int, mode: int = 0) -> int:
    """Open ``rel`` beneath directory ``dir_fd``; no symlink, no ``..``, nothing absolute.

    ``flags`` as for ``os.open`` (``O_CLOEXEC`` is added). OSError: ``ELOOP`` if
    a component (the last one too) is a symlink, ``EXDEV`` for ``..`` or an
    absolute path, otherwise what opening says (``ENOENT``, ``ENOTDIR`` ...).
    """
    global _have_openat2
    parts = split(rel)
    flags |= os.O_CLOEXEC
    if _have_openat2 is not False:
        try:
            fd = _syscall_openat2(dir_fd, "/".join(parts), flags, mode)
        except OSError as e:
            if e.errno != errno.ENOSYS:
                raise
            _have_openat2 = False
        else:
            _have_openat2 = True
            return fd
    return _walk(dir_fd, parts, flags, mode)


def fd_path(fd: int) -> str:
    """The absolute path the kernel gives for what ``fd`` refers to (``/proc/self/fd``).

    At the moment of the call every component of it is a real directory (no
    symlink): it names the same file only as long as nobody renames the tree
    or swaps a component, which is why callers use it only beneath a directory
    nobody but root can change.
    """
    path = os.readlink(f"/proc/self/fd/{fd}")
    here, there = os.fstat(fd), (os.stat(path) if path.startswith("/") else None)
    if there is None or (here.st_dev, here.st_ino) != (there.st_dev, there.st_ino):
        raise OSError(errno.ENOENT, "the descriptor's file has no path now", path)
    return path
