"""The new container's OCI spec as the ceiling of what a restored process may hold.

``Ceiling.from_spec`` derives from a spec the most a process of that container
could hold by itself (capability sets, ids, seccomp, no_new_privs, mounts, device
nodes). ``check_restored`` reads what the kernel says about a restored process
tree (every thread's ``/proc`` status, the init's mount table, the device nodes on
its tmpfs mounts, every process's cgroups) and returns each excess, naming the
process, the field, what it holds and what the spec allows. ``profile`` is what a
checkpoint records of its own spec, and ``Ceiling.admits`` refuses a recorded
profile that already exceeds a new spec before CRIU runs; the kernel's view stays
the authority, since images can lie. This module only reads; the caller kills.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.linux.mount import unescape

CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
_BIT = {name: i for i, name in enumerate(CAPABILITIES)}
_SETGID, _SETUID, _SETPCAP, _SYS_ADMIN = (
    1 << _BIT[n] for n in ("CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_SYS_ADMIN")
)
# The /proc status fields, in the order a violation is reported.
_CAP_FIELDS = ("CapBnd", "CapPrm", "CapEff", "CapInh", "CapAmb")
# Device nodes runc creates in every container whatever the spec lists
# (libcontainer's default devices): (type, major, minor).
_RUNC_DEVICES = frozenset(
    {("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9), ("c", 5, 0), ("c", 5, 2)}
)
MAX_PROCESSES = 4096  # a restored tree larger than this is refused, not walked
MAX_DEVICE_WALK = 20000  # entries looked at under a tmpfs mount for device nodes
_MAX_STATUS = 64 << 10


def cap_mask(names: Iterable[object] | None) -> int:
    """The bit mask of OCI capability names (unknown names are ignored, as runc does)."""
    mask = 0
    for name in names or ():
        if isinstance(name, str):
            bit = _BIT.get(name.upper() if name.upper().startswith("CAP_") else f"CAP_{name}")
            if bit is not None:
                mask |= 1 << bit
    return mask


def cap_names(mask: int, limit: int = 12) -> str:
    """``CAP_A, CAP_B`` for ``mask`` (at most ``limit`` names, then a count)."""
    names = [n for i, n in enumerate(CAPABILITIES) if mask >> i & 1]
    names += [f"cap#{i}" for i in range(len(CAPABILITIES), 64) if mask >> i & 1]
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def seccomp_digest(seccomp: object) -> str:
    """A stable digest of a spec's ``linux.seccomp`` ("" when there is none)."""
    if not seccomp:
        return ""
    canonical = json.dumps(seccomp, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class MountRule:
    """What the spec says of one mount point."""

    type: str
    readonly: bool
    flags: frozenset[str]  # of nosuid, nodev, noexec that the spec asks for


@dataclass(frozen=True)
class Ceiling:
    """The most a process of one container could hold (capability masks are bit sets)."""

    bounding: int
    permitted: int  # also the ceiling of the effective set
    inheritable: int
    ambient: int
    no_new_privs: bool
    seccomp: str  # seccomp_digest of the spec's filter, "" for none
    uids: frozenset[int] | None  # host ids a process may hold; None: any mapped id
    gids: frozenset[int] | None
    id_ranges: tuple[tuple[int, int], ...]  # host id ranges mapped into a user namespace
    gid_ranges: tuple[tuple[int, int], ...]
    mounts: Mapping[str, MountRule]
    root_readonly: bool
    masked: frozenset[str]
    readonly_paths: frozenset[str]
    devices: frozenset[tuple[str, int, int]]

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Ceiling:
        """The ceiling an OCI spec sets (a missing capability set is an empty one, as in runc)."""
        process = _dict(spec.get("process"))
        linux = _dict(spec.get("linux"))
        caps = _dict(process.get("capabilities"))
        bounding = cap_mask(caps.get("bounding"))
        nnp = bool(process.get("noNewPrivileges"))
        granted = cap_mask(caps.get("permitted")) | cap_mask(caps.get("effective"))
        ambient = cap_mask(caps.get("ambient"))
        # execve of a file with capabilities (or as root) grants up to the bounding
        # set, unless no_new_privs forbids it.
        permitted = (granted | ambient | (0 if nnp else bounding)) & bounding
        inheritable = cap_mask(caps.get("inheritable")) | permitted
        if permitted & _SETPCAP:  # capset may then raise it up to the bounding set
            inheritable |= bounding
        user = _dict(process.get("user"))
        uid, gid = _int(user.get("uid"), 0), _int(user.get("gid"), 0)
        extra = [_int(g, -1) for g in user.get("additionalGids") or () if _int(g, -1) >= 0]
        userns = any(_dict(n).get("type") == "user" for n in linux.get("namespaces") or ())
        uid_map = _ranges(linux.get("uidMappings")) if userns else ()
        gid_map = _ranges(linux.get("gidMappings")) if userns else ()
        uids = None if permitted & _SETUID else frozenset({_to_host(uid, uid_map)})
        gids = (
            None if permitted & _SETGID else frozenset(_to_host(g, gid_map) for g in (gid, *extra))
        )
        devices = set(_RUNC_DEVICES)
        for d in linux.get("devices") or ():
            d = _dict(d)
            kind = "b" if d.get("type") == "b" else "c"
            devices.add((kind, _int(d.get("major"), -1), _int(d.get("minor"), -1)))
        return cls(
            bounding=bounding,
            permitted=permitted,
            inheritable=inheritable,
            ambient=ambient | (permitted & inheritable),
            no_new_privs=nnp,
            seccomp=seccomp_digest(linux.get("seccomp")),
            uids=uids,
            gids=gids,
            id_ranges=tuple((h, n) for _, h, n in uid_map),
            gid_ranges=tuple((h, n) for _, h, n in gid_map),
            mounts=_mount_rules(spec.get("mounts")),
            root_readonly=bool(_dict(spec.get("root")).get("readonly")),
            masked=frozenset(_norm(p) for p in linux.get("maskedPaths") or () if _str(p)),
            readonly_paths=frozenset(_norm(p) for p in linux.get("readonlyPaths") or () if _str(p)),
            devices=frozenset(devices),
        )

    @property
    def may_mount(self) -> bool:
        """Whether a process could change its own mount table (CAP_SYS_ADMIN)."""
        return bool(self.permitted & _SYS_ADMIN)

    def admits(self, recorded: Ceiling) -> list[str]:
        """What a checkpoint's recorded ceiling holds beyond this one (empty: nothing)."""
        problems = []
        for what, theirs, ours in (
            ("bounding", recorded.bounding, self.bounding),
            ("permitted", recorded.permitted, self.permitted),
            ("ambient", recorded.ambient, self.ambient),
        ):
            if theirs & ~ours:  # the first set that exceeds says it (they nest)
                problems.append(
                    f"its {what} capabilities include {cap_names(theirs & ~ours)}, "
                    f"which the container's spec does not allow"
                )
                break
        if self.no_new_privs and not recorded.no_new_privs:
            problems.append("it ran without no_new_privs, which the container's spec sets")
        if self.seccomp and recorded.seccomp != self.seccomp:
            problems.append(
                "its seccomp profile "
                + ("was none" if not recorded.seccomp else "differs from the container's")
            )
        if self.uids is not None and (recorded.uids is None or recorded.uids - self.uids):
            problems.append(f"it ran as another user than the container's ({_ids(self.uids)})")
        if self.gids is not None and (recorded.gids is None or recorded.gids - self.gids):
            problems.append(
                f"it ran with groups the container's spec does not give ({_ids(self.gids)})"
            )
        return problems


def profile(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of its container's spec: enough to rebuild its Ceiling."""
    process = _dict(spec.get("process"))
    linux = _dict(spec.get("linux"))
    return {
        "process": {
            "capabilities": _dict(process.get("capabilities")),
            "noNewPrivileges": bool(process.get("noNewPrivileges")),
            "user": _dict(process.get("user")),
        },
        "linux": {
            "namespaces": linux.get("namespaces") or [],
            "uidMappings": linux.get("uidMappings") or [],
            "gidMappings": linux.get("gidMappings") or [],
        },
        "seccomp_sha256": seccomp_digest(linux.get("seccomp")),
    }


def recorded_ceiling(doc: object) -> Ceiling:
    """The Ceiling a checkpoint's recorded ``profile`` stands for (ValueError if malformed)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("process"), dict):
        raise ValueError("security profile: not an object with a process")
    digest = doc.get("seccomp_sha256", "")
    if not isinstance(digest, str):
        raise ValueError("security profile: seccomp_sha256 is not a string")
    ceiling = Ceiling.from_spec({"process": doc["process"], "linux": _dict(doc.get("linux"))})
    return dataclasses.replace(ceiling, seccomp=digest)


# --------------------------------------------------------------------------- kernel view


@dataclass(frozen=True)
class Thread:
    """What /proc says of one thread."""

    pid: int
    tid: int
    name: str
    fields: Mapping[str, str]


def process_tree(root: int, proc: str = "/proc") -> list[int]:
    """``root`` and every descendant (through each thread's ``children``), root first."""
    seen = [root]
    i = 0
    while i < len(seen):
        pid = seen[i]
        i += 1
        try:
            tids = os.listdir(f"{proc}/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"{proc}/{pid}/task/{tid}/children", "rb") as f:
                    children = f.read(1 << 20).split()
            except OSError:
                continue
            for child in children:
                if child.isdigit() and int(child) not in seen:
                    seen.append(int(child))
        if len(seen) > MAX_PROCESSES:
            raise ValueError(f"the restored tree has more than {MAX_PROCESSES} processes")
    return seen


def threads(pid: int, proc: str = "/proc") -> list[Thread]:
    """Every thread of ``pid`` with its status fields (none if it is gone)."""
    out = []
    try:
        tids = sorted(int(t) for t in os.listdir(f"{proc}/{pid}/task") if t.isdigit())
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"{proc}/{pid}/task/{tid}/status", "rb") as f:
                text = f.read(_MAX_STATUS).decode(errors="replace")
        except OSError:
            continue
        fields = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        out.append(Thread(pid, tid, fields.get("Name", "?"), fields))
    return out


def check_thread(c: Ceiling, t: Thread) -> list[str]:
    """Each way thread ``t`` exceeds ``c``, as one phrase naming field, holding, allowed."""
    who = f"process {t.pid} ({t.name})" + (f" thread {t.tid}" if t.tid != t.pid else "")
    problems = []
    allowed = {
        "CapBnd": c.bounding,
        "CapPrm": c.permitted,
        "CapEff": c.permitted,
        "CapInh": c.inheritable,
        "CapAmb": c.ambient,
    }
    for name in _CAP_FIELDS:
        held = _hex(t.fields.get(name))
        if held is None:
            problems.append(f"{who}: {name} is unreadable ({t.fields.get(name)!r})")
            continue
        excess = held & ~allowed[name]
        if excess:
            problems.append(
                f"{who}: {name} {held:016x} holds {cap_names(excess)}; "
                f"the spec allows {allowed[name]:016x}"
            )
    if c.no_new_privs and t.fields.get("NoNewPrivs") != "1":
        problems.append(f"{who}: NoNewPrivs {t.fields.get('NoNewPrivs')}; the spec sets 1")
    if c.seccomp and t.fields.get("Seccomp") not in ("1", "2"):
        problems.append(
            f"{who}: Seccomp {t.fields.get('Seccomp')} (no filter); the spec sets a filter (2)"
        )
    for field, allowed_ids, ranges in (
        ("Uid", c.uids, c.id_ranges),
        ("Gid", c.gids, c.gid_ranges),
        ("Groups", c.gids, c.gid_ranges),
    ):
        ids = _id_list(t.fields.get(field, ""))
        if ids is None:
            problems.append(f"{who}: {field} is unreadable")
            continue
        bad = [i for i in ids if allowed_ids is not None and i not in allowed_ids]
        bad += [i for i in ids if ranges and not _mapped(i, ranges) and i not in bad]
        if bad:
            limit = _ids(allowed_ids) if allowed_ids is not None else "ids mapped into its userns"
            problems.append(f"{who}: {field} {' '.join(map(str, ids))}; the spec allows {limit}")
    return problems


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/PID/mountinfo."""

    point: str
    fstype: str
    options: frozenset[str]  # per-mount and superblock options together


def parse_mountinfo(text: str) -> list[MountEntry]:
    """The mounts of a mountinfo file (malformed lines are skipped)."""
    out = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 6 or len(rest) < 1:
            continue
        options = set(fields[5].split(","))
        if len(rest) >= 3:
            options |= set(rest[2].split(","))
        out.append(MountEntry(unescape(fields[4]), rest[0], frozenset(options)))
    return out


def check_mounts(c: Ceiling, mounts: Sequence[MountEntry], exists: Any = None) -> list[str]:
    """Each restored mount that the spec does not give, or gives with stricter flags.

    ``exists(path)`` tells whether a masked or read-only path exists in the container
    (such a path left unmasked is an excess too); None skips that check.
    """
    problems = []
    points = {m.point for m in mounts}
    for m in mounts:
        point = _norm(m.point)
        rule = c.mounts.get(point)
        if point == "/":
            if c.root_readonly and "ro" not in m.options:
                problems.append("mount /: read-write; the spec's root is read-only")
            continue
        if rule is not None:
            # runc restores a cgroup v1 mount as a read-write tmpfs holding the
            # read-only hierarchies (runc's own restore does the same): only the
            # hierarchies below it are held to "ro".
            v1_cgroup_root = rule.type == "cgroup" and m.fstype == "tmpfs"
            if rule.readonly and "ro" not in m.options and not v1_cgroup_root:
                problems.append(f"mount {point} ({m.fstype}): read-write; the spec mounts it ro")
            missing = sorted(rule.flags - m.options)
            if missing:
                problems.append(
                    f"mount {point} ({m.fstype}): without {', '.join(missing)}, which the spec sets"
                )
            continue
        if point in c.masked or point in c.readonly_paths:
            if "ro" not in m.options and point in c.readonly_paths:
                problems.append(f"mount {point}: read-write; the spec lists it read-only")
            continue
        parent = _under(point, c.mounts)
        if parent is not None and c.mounts[parent].type in ("cgroup", "cgroup2"):
            if c.mounts[parent].readonly and "ro" not in m.options:
                problems.append(f"mount {point} ({m.fstype}): read-write under ro {parent}")
            continue
        if not c.may_mount:
            problems.append(
                f"mount {point} ({m.fstype}): not in the spec "
                "(and the spec gives no CAP_SYS_ADMIN to mount it)"
            )
    if not c.may_mount and exists is not None:
        for path in sorted(c.masked | c.readonly_paths):
            if path not in points and exists(path):
                what = "masked" if path in c.masked else "read-only"
                problems.append(f"{path}: not {what} as the spec asks")
    return problems


def check_devices(c: Ceiling, root: str, mounts: Sequence[MountEntry]) -> list[str]:
    """Device nodes on the restored tmpfs mounts (seen under ``root``, the init's
    ``/proc/PID/root``) that are not the spec's devices or runc's defaults."""
    problems: list[str] = []
    budget = [MAX_DEVICE_WALK]
    for m in mounts:
        if m.fstype != "tmpfs":
            continue
        top = root.rstrip("/") + _norm(m.point)
        _walk_devices(c, top, _norm(m.point), problems, budget)
        if budget[0] <= 0:
            problems.append(f"more than {MAX_DEVICE_WALK} files on tmpfs mounts: not checked")
            break
    return problems


def _walk_devices(
    c: Ceiling, path: str, shown: str, problems: list[str], budget: list[int]
) -> None:
    try:
        entries = list(os.scandir(path))
    except OSError:
        return
    for e in entries:
        budget[0] -= 1
        if budget[0] <= 0:
            return
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        where = f"{shown.rstrip('/')}/{e.name}"
        if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
            dev = (kind, os.major(st.st_rdev), os.minor(st.st_rdev))
            if dev not in c.devices and dev != ("c", 0, 0):  # 0/0: an overlay whiteout
                problems.append(
                    f"device node {where} ({kind} {dev[1]}:{dev[2]}): not a device of the spec"
                )
        elif stat.S_ISDIR(st.st_mode) and not _is_mountpoint_boundary(e.path, path):
            _walk_devices(c, e.path, where, problems, budget)


def _is_mountpoint_boundary(child: str, parent: str) -> bool:
    try:
        return os.lstat(child).st_dev != os.lstat(parent).st_dev
    except OSError:
        return True


def cgroup_paths(pid: int, proc: str = "/proc") -> dict[str, str]:
    """``/proc/PID/cgroup`` as {hierarchy (controllers, or "" for v2): path}."""
    out = {}
    with open(f"{proc}/{pid}/cgroup", "rb") as f:
        for line in f.read(_MAX_STATUS).decode(errors="replace").splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3:
                out[parts[1]] = parts[2]
    return out


def check_cgroups(expected: Mapping[str, str], actual: Mapping[str, str], who: str) -> list[str]:
    """Each hierarchy where ``actual`` is not ``expected`` or below it."""
    problems = []
    for hierarchy, want in expected.items():
        have = actual.get(hierarchy)
        if have is None:
            continue
        if have != want and not have.startswith(want.rstrip("/") + "/"):
            name = hierarchy or "unified"
            problems.append(f"{who}: cgroup {name}:{have}, outside the container's {want}")
    return problems


def check_restored(
    c: Ceiling, init: int, cgroups: Mapping[str, str] | None, proc: str = "/proc"
) -> list[str]:
    """Everything the restored tree rooted at ``init`` holds beyond ``c`` (empty: nothing).

    ``cgroups`` is the container's own cgroup per hierarchy (None: not checked).
    """
    try:
        pids = process_tree(init, proc)
    except ValueError as e:
        return [str(e)]
    problems: list[str] = []
    for pid in pids:
        for t in threads(pid, proc):
            problems += check_thread(c, t)
        if cgroups is not None:
            with contextlib.suppress(OSError):  # gone since
                problems += check_cgroups(cgroups, cgroup_paths(pid, proc), f"process {pid}")
    try:
        with open(f"{proc}/{init}/mountinfo", "rb") as f:
            mounts = parse_mountinfo(f.read(16 << 20).decode(errors="replace"))
    except OSError as e:
        return [*problems, f"the mount table of process {init} is unreadable: {e.strerror}"]
    root = f"{proc}/{init}/root"

    def exists(path: str) -> bool:
        # Only kernel filesystems hold masked paths (/proc, /sys): nothing there is
        # the container's to plant a symlink in.
        return os.path.lexists(root + path)

    problems += check_mounts(c, mounts, exists)
    problems += check_devices(c, root, mounts)
    return problems


# --------------------------------------------------------------------------- helpers


def _dict(v: object) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _str(v: object) -> bool:
    return isinstance(v, str) and v.startswith("/")


def _int(v: object, default: int) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else default


def _norm(path: str) -> str:
    return "/" + "/".join(p for p in path.split("/") if p not in ("", "."))


def _under(point: str, mounts: Mapping[str, MountRule]) -> str | None:
    best = None
    for dest in mounts:
        if point.startswith(dest.rstrip("/") + "/") and (best is None or len(dest) > len(best)):
            best = dest
    return best


def _mount_rules(mounts: object) -> dict[str, MountRule]:
    rules = {}
    for m in mounts if isinstance(mounts, list) else ():
        m = _dict(m)
        dest = m.get("destination")
        if not isinstance(dest, str) or not dest.startswith("/"):
            continue
        options = {o for o in m.get("options") or () if isinstance(o, str)}
        rules[_norm(dest)] = MountRule(
            type=str(m.get("type") or ""),
            readonly="ro" in options,
            flags=frozenset(options & {"nosuid", "nodev", "noexec"}),
        )
    return rules


def _ranges(maps: object) -> tuple[tuple[int, int, int], ...]:
    """A spec's id mappings as (containerID, hostID, size)."""
    out = []
    for m in maps if isinstance(maps, list) else ():
        m = _dict(m)
        inside, host, size = (
            _int(m.get("containerID"), -1),
            _int(m.get("hostID"), -1),
            _int(m.get("size"), 0),
        )
        if inside >= 0 and host >= 0 and size > 0:
            out.append((inside, host, size))
    return tuple(out)


def _to_host(id: int, maps: tuple[tuple[int, int, int], ...]) -> int:
    """The host id of container id ``id`` (itself without a user namespace; -1 unmapped)."""
    if not maps:
        return id
    for inside, host, size in maps:
        if inside <= id < inside + size:
            return host + id - inside
    return -1


def _mapped(id: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(h <= id < h + s for h, s in ranges)


def _hex(v: str | None) -> int | None:
    try:
        return int(v or "", 16)
    except ValueError:
        return None


def _id_list(v: str) -> list[int] | None:
    try:
        return [int(x) for x in v.split()]
    except ValueError:
        return None


def _ids(ids: frozenset[int] | None) -> str:
    return "any" if ids is None else " ".join(map(str, sorted(ids)))
