"""runtime.security.ceiling: what an OCI spec allows a process, and each excess the kernel's
view of a restored tree shows (read from a fake /proc laid out in a directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runtime.security import ceiling
from runtime.security.ceiling import Ceiling

DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip
DEFAULT_MASK = 0xA80425FB  # what the kernel shows for containerd's default set


def spec(**process: Any) -> dict[str, Any]:
    caps = {k: list(DEFAULT_CAPS) for k in ("bounding", "effective", "permitted")}
    proc = {"capabilities": caps, "noNewPrivileges": True, "user": {"uid": 0, "gid": 0}}
    proc.update(process)
    return {
        "process": proc,
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "options": ["nosuid", "strictatime"]},
            {"destination": "/sys", "type": "sysfs", "options": ["nosuid", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "options": ["ro"]},
        ],
        "linux": {"maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"]},
    }


def status(**fields: str) -> dict[str, str]:
    base = {
        "CapBnd": f"{DEFAULT_MASK:016x}",
        "CapPrm": f"{DEFAULT_MASK:016x}",
        "CapEff": f"{DEFAULT_MASK:016x}",
        "CapInh": "0" * 16,
        "CapAmb": "0" * 16,
        "NoNewPrivs": "1",
        "Seccomp": "0",
        "Uid": "0\t0\t0\t0",
        "Gid": "0\t0\t0\t0",
        "Groups": "",
    }
    base.update(fields)
    return base


def thread(**fields: str) -> ceiling.Thread:
    return ceiling.Thread(7, 7, "sh", status(**fields))


def test_default_spec_mask_is_what_the_kernel_shows() -> None:
    c = Ceiling.from_spec(spec())
    assert c.bounding == DEFAULT_MASK and c.permitted == DEFAULT_MASK
    assert ceiling.check_thread(c, thread()) == []


def test_a_missing_capability_set_is_empty_and_unknown_names_are_ignored() -> None:
    c = Ceiling.from_spec(spec(capabilities={"bounding": ["CAP_KILL", "CAP_NO_SUCH", 3]}))
    assert c.bounding == 1 << 5 and c.permitted == 0


def test_privileged_bounding_set_is_refused_naming_field_caps_and_ceiling() -> None:
    c = Ceiling.from_spec(spec())
    problems = ceiling.check_thread(c, thread(CapBnd="000001fffeffffff"))
    assert len(problems) == 1
    p = problems[0]
    assert p.startswith("process 7 (sh): CapBnd 000001fffeffffff holds ")
    assert "CAP_SYS_ADMIN" in p and f"the spec allows {DEFAULT_MASK:016x}" in p


def test_no_new_privs_limits_permitted_to_the_granted_sets() -> None:
    caps = {"bounding": list(DEFAULT_CAPS), "permitted": ["CAP_KILL"], "effective": ["CAP_KILL"]}
    strict = Ceiling.from_spec(spec(capabilities=caps, noNewPrivileges=True))
    loose = Ceiling.from_spec(spec(capabilities=caps, noNewPrivileges=False))
    assert strict.permitted == 1 << 5
    assert loose.permitted == DEFAULT_MASK  # a file capability could grant the rest
    assert ceiling.check_thread(strict, thread(CapPrm=f"{DEFAULT_MASK:016x}"))


def test_seccomp_and_no_new_privs_must_hold_when_the_spec_sets_them() -> None:
    with_filter = {**spec(), "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}}
    c = Ceiling.from_spec(with_filter)
    problems = ceiling.check_thread(c, thread(Seccomp="0", NoNewPrivs="0"))
    assert any("Seccomp 0" in p for p in problems)
    assert any("NoNewPrivs 0; the spec sets 1" in p for p in problems)
    assert ceiling.check_thread(c, thread(Seccomp="2")) == []


def test_ids_are_fixed_without_setuid_and_mapped_through_a_user_namespace() -> None:
    caps = {"bounding": ["CAP_KILL"], "permitted": [], "effective": []}
    c = Ceiling.from_spec(spec(capabilities=caps, user={"uid": 1000, "gid": 1000}))
    none = dict(CapBnd="0000000000000020", CapPrm="0" * 16, CapEff="0" * 16)
    ids = dict(Uid="1000\t1000\t1000\t1000", Gid="1000\t1000\t1000\t1000")
    assert ceiling.check_thread(c, thread(**ids, **none)) == []
    bad = ceiling.check_thread(c, thread(**{**ids, "Uid": "1000\t0\t0\t0"}, **none))
    assert bad == ["process 7 (sh): Uid 1000 0 0 0; the spec allows 1000"]

    userns = spec(capabilities=caps, user={"uid": 0, "gid": 0})
    userns["linux"]["namespaces"] = [{"type": "user"}]
    userns["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    userns["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    c = Ceiling.from_spec(userns)
    assert c.uids == {100000}
    ok = dict(Uid="100000\t100000\t100000\t100000", Gid="100000\t100000\t100000\t100000")
    common = dict(CapBnd="0000000000000020", CapPrm="0" * 16, CapEff="0" * 16)
    assert ceiling.check_thread(c, thread(**ok, **common)) == []
    assert ceiling.check_thread(c, thread(**{**ok, "Uid": "0\t0\t0\t0"}, **common))


MOUNTINFO = """\
20 19 0:50 / / rw,relatime - overlay overlay rw,lowerdir=/l
21 20 0:51 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
22 20 0:52 / /dev rw,nosuid - tmpfs tmpfs rw,mode=755
23 20 0:53 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
24 23 0:54 / /sys/fs/cgroup ro,relatime - tmpfs tmpfs ro
25 24 0:55 / /sys/fs/cgroup/memory ro,relatime - cgroup cgroup ro,memory
26 21 0:5 /null /proc/kcore rw,nosuid - devtmpfs udev rw
27 21 0:51 /sys /proc/sys ro,relatime - proc proc rw
"""


def test_a_fresh_containers_mounts_pass() -> None:
    c = Ceiling.from_spec(spec())
    assert ceiling.check_mounts(c, ceiling.parse_mountinfo(MOUNTINFO), lambda p: True) == []


def test_writable_sys_extra_mounts_and_unmasked_paths_are_refused() -> None:
    text = MOUNTINFO.replace("/sys ro,nosuid,nodev", "/sys rw,nosuid,nodev").replace(
        "sysfs sysfs ro", "sysfs sysfs rw"
    )
    text = "\n".join(line for line in text.splitlines() if "/proc/kcore" not in line)
    text += "\n30 20 0:60 / /host rw - ext4 /dev/sda1 rw\n"
    problems = ceiling.check_mounts(Ceiling.from_spec(spec()), ceiling.parse_mountinfo(text),
                                    lambda p: True)  # fmt: skip
    assert "mount /sys (sysfs): read-write; the spec mounts it ro" in problems
    assert any(p.startswith("mount /host (ext4): not in the spec") for p in problems)
    assert "/proc/kcore: not masked as the spec asks" in problems


def test_cap_sys_admin_may_mount_for_itself() -> None:
    caps = {k: [*DEFAULT_CAPS, "CAP_SYS_ADMIN"] for k in ("bounding", "effective", "permitted")}
    c = Ceiling.from_spec(spec(capabilities=caps))
    extra = ceiling.parse_mountinfo(MOUNTINFO + "30 20 0:60 / /mnt rw - tmpfs tmpfs rw\n")
    assert ceiling.check_mounts(c, extra, lambda p: True) == []


def test_recorded_profile_beyond_the_new_spec_is_refused_before_restore() -> None:
    privileged = {k: list(ceiling.CAPABILITIES) for k in ("bounding", "effective", "permitted")}
    recorded = ceiling.recorded_ceiling(ceiling.profile(spec(capabilities=privileged)))
    new = {**spec(), "linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}}}
    problems = Ceiling.from_spec(new).admits(recorded)
    assert problems[0].startswith("its bounding capabilities include ")
    assert "CAP_SYS_ADMIN" in problems[0]
    assert "its seccomp profile was none" in problems
    same = ceiling.recorded_ceiling(ceiling.profile(new))
    assert Ceiling.from_spec(new).admits(same) == []
    with pytest.raises(ValueError):
        ceiling.recorded_ceiling({"process": "x"})


def fake_proc(root: Path, tree: dict[int, list[int]], fields: dict[str, str]) -> str:
    for pid, children in tree.items():
        task = root / str(pid) / "task" / str(pid)
        task.mkdir(parents=True)
        (task / "children").write_text(" ".join(map(str, children)) + (" " if children else ""))
        (task / "status").write_text(
            f"Name:\tp{pid}\n" + "".join(f"{k}:\t{v}\n" for k, v in fields.items())
        )
        (root / str(pid) / "cgroup").write_text("4:memory:/ns/c\n0::/ns/c\n")
    (root / "1" / "mountinfo").write_text(MOUNTINFO)
    (root / "1" / "root").mkdir()
    return str(root)


def test_every_process_of_the_tree_is_checked(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {1: [2], 2: [3], 3: []}, status(CapBnd="000001fffeffffff"))
    assert ceiling.process_tree(1, proc) == [1, 2, 3]
    problems = ceiling.check_restored(Ceiling.from_spec(spec()), 1, {"4:memory": "/ns/c"}, proc)
    assert [p.split(":")[0] for p in problems] == ["process 1 (p1)", "process 2 (p2)",
                                                    "process 3 (p3)"]  # fmt: skip


def test_a_process_outside_the_containers_cgroup_is_refused(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, {1: []}, status())
    problems = ceiling.check_restored(
        Ceiling.from_spec(spec()), 1, {"memory": "/ns/other", "": "/ns/c"}, proc
    )
    assert problems == ["process 1: cgroup memory:/ns/c, outside the container's /ns/other"]


def test_a_restored_cgroup_v1_tmpfs_may_be_read_write_but_not_its_hierarchies() -> None:
    # runc restores a cgroup v1 mount as a read-write tmpfs (its own restore too);
    # the hierarchies below it stay held to the spec's "ro".
    text = MOUNTINFO.replace(
        "/sys/fs/cgroup ro,relatime - tmpfs tmpfs ro", "/sys/fs/cgroup rw,relatime - tmpfs tmpfs rw"
    )
    c = Ceiling.from_spec(spec())
    assert ceiling.check_mounts(c, ceiling.parse_mountinfo(text), lambda p: True) == []
    text = text.replace("/sys/fs/cgroup/memory ro,relatime", "/sys/fs/cgroup/memory rw,relatime")
    text = text.replace("cgroup cgroup ro,memory", "cgroup cgroup rw,memory")
    problems = ceiling.check_mounts(c, ceiling.parse_mountinfo(text), lambda p: True)
    assert problems == ["mount /sys/fs/cgroup/memory (cgroup): read-write under ro /sys/fs/cgroup"]
