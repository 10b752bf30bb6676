"""Cgroup facts the shim needs: the host's cgroup mode, a container's memory
cgroup directory, and OOM notifications (v1 eventfd, v2 memory.events).
"""

from __future__ import annotations

import ctypes
import os
import struct

CGROUP_ROOT = "/sys/fs/cgroup"
_CGROUP2_SUPER_MAGIC = 0x63677270


def unified() -> bool:
    """True on a pure cgroup v2 host (hybrid hosts count as v1, as in containerd)."""
    return _fs_magic(CGROUP_ROOT) == _CGROUP2_SUPER_MAGIC


def _fs_magic(path: str) -> int:
    # statfs(2) through libc: os.statvfs does not report f_type.
    buf = ctypes.create_string_buffer(256)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(os.fsencode(path), buf) != 0:
        return 0
    magic: int = struct.unpack_from("l", buf.raw)[0]
    return magic & 0xFFFFFFFF


def _systemd_path(cgroups_path: str) -> str:
    """Convert runc's systemd form "slice:prefix:name" to a cgroupfs path."""
    slice_, prefix, name = cgroups_path.split(":", 2)
    slice_ = slice_ or "system.slice"
    # Nested slices: a-b.slice lives in a.slice/a-b.slice.
    parts = slice_.removesuffix(".slice").split("-")
    dirs = ["-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)) if parts[i]]
    if slice_ == "-.slice":
        dirs = []
    # runc's unit name: "<prefix>-<name>.scope" (even with an empty prefix), or
    # the name itself when it is a slice.
    unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope"
    return "/" + "/".join([*dirs, unit])


def memory_dir(cgroups_path: str) -> str | None:
    """The container's memory cgroup directory, from the spec's linux.cgroupsPath."""
    if not cgroups_path:
        return None
    path = _systemd_path(cgroups_path) if ":" in cgroups_path else cgroups_path
    if not path.startswith("/"):
        path = "/" + path
    base = CGROUP_ROOT if unified() else os.path.join(CGROUP_ROOT, "memory")
    return base + path


class OOMWatcher:
    """Calls ``on_oom`` each time the kernel OOM-kills in a memory cgroup.

    ``fd`` is what to poll for readability; ``check()`` consumes the
    notification and says whether an OOM kill happened.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.v2 = unified()
        self._count = 0
        if self.v2:
            self.fd = _inotify_watch(os.path.join(directory, "memory.events"))
            self._count = self._oom_kills()
        else:
            self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                control = os.open(os.path.join(directory, "memory.oom_control"), os.O_RDONLY)
                try:
                    with open(os.path.join(directory, "cgroup.event_control"), "w") as f:
                        f.write(f"{self.fd} {control}")
                finally:
                    os.close(control)
            except BaseException:
                os.close(self.fd)
                raise

    def _oom_kills(self) -> int:
        try:
            with open(os.path.join(self.directory, "memory.events"), encoding="ascii") as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            pass
        return 0

    def check(self) -> bool:
        """Consume what made ``fd`` readable; True when it was an OOM kill."""
        try:
            os.read(self.fd, 4096)
        except BlockingIOError:
            return False
        except OSError:
            return False
        if not self.v2:
            # The eventfd also fires when the cgroup is removed.
            return os.path.exists(os.path.join(self.directory, "memory.oom_control"))
        count = self._oom_kills()
        new = count > self._count
        self._count = count
        return new

    def close(self) -> None:
        """Stop watching."""
        os.close(self.fd)


def _inotify_watch(path: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd: int = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    in_modify = 0x2
    if libc.inotify_add_watch(fd, os.fsencode(path), in_modify) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
    return fd
