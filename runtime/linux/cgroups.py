"""Cgroup facts the shim needs: the host's cgroup mode, a container's memory
cgroup directory, OOM notifications (v1 eventfd, v2 memory.events), its
freezer (what `runc pause` and `runc resume` write, without their process), and
the processes in its cgroup (what a killed restore may leave there).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import time

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


def _cgroup_path(cgroups_path: str) -> str | None:
    """The cgroupfs path (below a hierarchy's root) of the spec's linux.cgroupsPath."""
    if not cgroups_path:
        return None
    path = _systemd_path(cgroups_path) if ":" in cgroups_path else cgroups_path
    return path if path.startswith("/") else "/" + path


def memory_dir(cgroups_path: str) -> str | None:
    """The container's memory cgroup directory, from the spec's linux.cgroupsPath."""
    path = _cgroup_path(cgroups_path)
    if path is None:
        return None
    base = CGROUP_ROOT if unified() else os.path.join(CGROUP_ROOT, "memory")
    return base + path


def remove_empty(cgroups_path: str, wait: float = 2.0) -> None:
    """rmdir the cgroup a spec's linux.cgroupsPath names from every hierarchy where it
    is empty. rmdir fails on a cgroup that still has processes or children: nothing is
    ever killed here; processes on their way out get up to ``wait`` seconds. Systemd
    scopes (slice:prefix:name) are systemd's to remove, and relative paths lie under
    runc's own cgroup, not known here."""
    if not cgroups_path.startswith("/") or ":" in cgroups_path:
        return
    path = os.path.normpath(cgroups_path)  # as runc cleans it
    if path == "/":
        return
    try:
        hierarchies = [CGROUP_ROOT] if unified() else [
            os.path.join(CGROUP_ROOT, h)
            for h in os.listdir(CGROUP_ROOT)
            if not os.path.islink(os.path.join(CGROUP_ROOT, h))
        ]  # fmt: skip
    except OSError:
        return
    pending = [h + path for h in hierarchies]
    deadline = time.monotonic() + wait
    while pending:
        busy = []
        for d in pending:
            try:
                os.rmdir(d)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    busy.append(d)  # processes left: wait for them, never kill
        if not busy or time.monotonic() >= deadline:
            return
        pending = busy
        time.sleep(0.05)


def _own_path(cgroups_path: str) -> str | None:
    """The cgroupfs path of the cgroup a spec's linux.cgroupsPath names, or None where
    that is not known here (relative paths lie under runc's own cgroup) or names no
    container's own cgroup (the root)."""
    if ":" in cgroups_path:
        path = _systemd_path(cgroups_path)
    elif cgroups_path.startswith("/"):
        path = os.path.normpath(cgroups_path)
    else:
        return None
    path = "/" + path.strip("/")
    return None if path == "/" else path


def _hierarchies() -> list[str]:
    if unified():
        return [CGROUP_ROOT]
    return [
        os.path.join(CGROUP_ROOT, h)
        for h in os.listdir(CGROUP_ROOT)
        if not os.path.islink(os.path.join(CGROUP_ROOT, h))
    ]


def members(cgroups_path: str) -> set[int]:
    """PIDs of the processes in the cgroup a spec's linux.cgroupsPath names, or in a
    cgroup below it, in any hierarchy; empty where the path is not known here."""
    path = _own_path(cgroups_path)
    if path is None:
        return set()
    found: set[int] = set()
    try:
        hierarchies = _hierarchies()
    except OSError:
        return found
    for h in hierarchies:
        for directory, _, _ in os.walk(h + path):
            try:
                with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as f:
                    found.update(int(line) for line in f if line.strip())
            except (OSError, ValueError):
                continue
    return found


def contains(pid: int, cgroups_path: str) -> bool:
    """Whether process ``pid`` is in the cgroup ``cgroups_path`` names (or below it),
    in any hierarchy, as its /proc/PID/cgroup says."""
    path = _own_path(cgroups_path)
    if path is None:
        return False
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        where = line.split(":", 2)[-1]
        if where == path or where.startswith(path + "/"):
            return True
    return False


class Freezer:
    """A container's freezer, written directly: what ``runc pause`` and ``runc
    resume`` do (v1: freezer.state; v2: cgroup.freeze, and cgroup.events says when
    every process is frozen), without a runc process each.

    ``freeze_step`` asks for the freeze (again: on v1 that also catches processes
    forked meanwhile) and says whether the whole cgroup is frozen; the caller polls.
    """

    def __init__(self, directory: str, v2: bool) -> None:
        self.directory = directory
        self.v2 = v2

    @classmethod
    def of(cls, pid: int, cgroups_path: str) -> Freezer | None:
        """The freezer of the container whose init is ``pid`` and whose spec names
        ``cgroups_path``; None unless ``pid`` is in that cgroup (or below it) and the
        freezer is there (the caller then leaves it to runc)."""
        path = _cgroup_path(cgroups_path)
        if path is None or pid <= 0:
            return None
        v2 = unified()
        try:
            with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        own = None
        for line in lines:
            _, controllers, where = line.split(":", 2)
            if (v2 and controllers == "") or (not v2 and "freezer" in controllers.split(",")):
                own = where
        if own is None or not (own == path or own.startswith(path.rstrip("/") + "/")):
            return None
        base = CGROUP_ROOT if v2 else os.path.join(CGROUP_ROOT, "freezer")
        directory = base + path
        control = "cgroup.freeze" if v2 else "freezer.state"
        if not os.path.exists(os.path.join(directory, control)):
            return None
        return cls(directory, v2)

    def freeze_step(self) -> bool:
        """Ask for the freeze; True once every process of the cgroup is frozen."""
        if self.v2:
            self._write("cgroup.freeze", "1")
            return "frozen 1" in self._read("cgroup.events").splitlines()
        self._write("freezer.state", "FROZEN")
        return self._read("freezer.state").strip() == "FROZEN"

    def thaw(self) -> None:
        """Let the cgroup's processes run again."""
        if self.v2:
            self._write("cgroup.freeze", "0")
        else:
            self._write("freezer.state", "THAWED")

    def _write(self, name: str, value: str) -> None:
        fd = os.open(os.path.join(self.directory, name), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def _read(self, name: str) -> str:
        with open(os.path.join(self.directory, name), encoding="ascii") as f:
            return f.read()


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
