"""A restore that hangs in CRIU is bounded (issue 17, finding 4), on real containerd,
runc and CRIU: it ends at restore.timeout_seconds with an error naming the
checkpoint and the timeout, or at once when the task is killed or removed; nothing
of it is left (no process, no mount under the bundle or runc's state, no cgroup);
the task is deletable; the other containers of its shim group (a pod) are created,
started and exec'd while it hangs.

CRIU is made to hang by a CRIU configuration file of the test's private containerd
(CRIU_CONFIG_FILE in its environment, hence runc's and CRIU's; CRIU reads it besides
the one the restore gate names): an action script that sleeps at a restore stage, as
a stuck CRIU would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bed.containerd import Containerd, bed_missing, images_dir, mounts_under, unique_id
from bed.workload import COUNTER, IMAGE, RUNTIME, bundle, remove, stasis, task, wait_count
from conftest import shim_path

pytestmark = pytest.mark.integration

GROUP = "io.containerd.runc.v2.group"
TIMEOUT_S = 5  # the shim's restore timeout in the timeout test
SETTLE_S = 25  # what a loaded machine may add to it (kill, cleanup, ctr)

# CRIU runs this at every restore stage (CRTOOLS_SCRIPT_ACTION); at STAGE it records
# its PID and hangs. Bounded, so that a failed run leaves nothing for ever.
HANG = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = "{stage}" ] || exit 0
echo $$ > {marker}.tmp
mv {marker}.tmp {marker}
exec sleep 300
"""


@dataclass
class Bed:
    """A private containerd whose shims read ``config`` (restore timeout), and a
    checkpoint of a counter to restore from."""

    containerd: Containerd
    config: Path
    ref: str
    criu_config: Path  # CRIU_CONFIG_FILE of the daemon: empty unless a restore is to hang

    def set_timeout(self, seconds: float) -> None:
        self.config.write_text(
            '[storage]\nrestore_sources = ["file:///tmp", "file:///var/tmp"]\n'
            f"[restore]\ntimeout_seconds = {seconds}\n"
        )


@pytest.fixture(scope="module", params=["1.7", "2.1"], ids=["ctrd1.7", "ctrd2.1"])
def bed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    version = request.param
    if why := bed_missing([version]):
        pytest.fail(why, pytrace=False)
    work = tmp_path_factory.mktemp("hang")
    config = work / "config.toml"
    criu_config = work / "criu.conf"
    criu_config.write_text("")
    c = Containerd.in_run_dir(version, shim_path())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STASIS_CONFIG", str(config))  # the daemon's, hence its shims'
        mp.setenv("CRIU_CONFIG_FILE", str(criu_config))  # and CRIU's, through runc
        b = Bed(c, config, "", criu_config)
        b.set_timeout(600)
        try:
            c.start()
            c.import_image(images_dir() / "busybox.tar")
            id = unique_id("src")
            c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", COUNTER)
            try:
                wait_count(c, id, 5)
                out = stasis(c, "checkpoint", id, "--exit", "--to", str(work / "store"), "--json")
                b.ref = json.loads(out.stdout)["ref"]
            finally:
                remove(c, id)
            yield b
        finally:
            left = c.stop()
    assert not left, f"containerd {version} left behind (now cleaned up): {left}"


@dataclass
class Hang:
    """A restore started in the background (``ctr run -d``), hanging in CRIU."""

    id: str
    proc: subprocess.Popen[str]
    marker: Path
    began: float
    pids: dict[int, str]  # the restore's processes while it hung: PID -> start time
    cgroup: str  # the container's linux.cgroupsPath
    bundle: Path
    runc_state: Path  # runc's state directory of the container (criu-root under it)
    mounts: list[Path]  # what was mounted under the bundle and runc's state meanwhile
    restored: list[int]  # processes CRIU had restored (in the container's pid namespace)

    def finish(self, timeout: float) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _ancestors(pid: int) -> list[int]:
    """``pid`` and its ancestors below the shim (runc, CRIU, the script's shells)."""
    chain = []
    for _ in range(16):
        if b"containerd-shim" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return chain
        chain.append(pid)
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    raise AssertionError(f"no shim above {chain}")


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _cgroup_members(cgroup: str) -> set[int]:
    found: set[int] = set()
    for procs in Path("/sys/fs/cgroup").glob(f"*{cgroup}/cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            found.update(int(p) for p in procs.read_text().split())
    for procs in Path("/sys/fs/cgroup").glob(f"*{cgroup}/**/cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            found.update(int(p) for p in procs.read_text().split())
    return found


def _cgroup_dirs(cgroup: str) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    return [d for d in [root / cgroup.lstrip("/"), *root.glob(f"*{cgroup}")] if d.is_dir()]


def start_hanging(b: Bed, tmp: Path, stage: str, group: str) -> Hang:
    """``ctr run -d`` a restore whose CRIU hangs at ``stage``; returns once it hangs."""
    c = b.containerd
    marker = tmp / f"hung-{stage}"
    script = tmp / f"hang-{stage}.sh"
    script.write_text(HANG.format(stage=stage, marker=marker))
    script.chmod(0o700)
    b.criu_config.write_text(f"action-script {script}\n")
    id = unique_id("hung")
    argv = [
        str(c.bin_dir / "ctr"), "--address", str(c.address), "--namespace", c.namespace,
        "run", "-d", "--runtime", RUNTIME,
        "--annotation", f"stasis.dev/restore-from={b.ref}",
        "--annotation", f"{GROUP}={group}",
        IMAGE, id,
    ]  # fmt: skip
    began = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None:
            b.criu_config.write_text("")
            out, err = proc.communicate()
            c.ctr("task", "rm", "-f", id, check=False)
            c.ctr("containers", "rm", id, check=False)
            raise AssertionError(f"the restore did not hang at {stage}: {err or out}")
        assert time.monotonic() < deadline, f"CRIU never reached {stage}"
        time.sleep(0.02)
    b.criu_config.write_text("")  # CRIU read it when it began: later ones do not hang
    where = bundle(c, id)
    spec = json.loads((where / "config.json").read_text())
    cgroup = spec["linux"]["cgroupsPath"]
    hung = int(marker.read_text())
    members = _cgroup_members(cgroup)
    pids = [*_ancestors(hung), *members]
    runc_state = Path("/run/containerd/runc") / c.namespace / id
    return Hang(
        id, proc, marker, began,
        {p: t for p in pids if (t := _start_time(p)) is not None},
        cgroup, where, runc_state,
        [*mounts_under(where / "criu-restore"), *mounts_under(runc_state)],
        [p for p in members if _pid_ns(p) not in (None, _pid_ns(os.getpid()))],
    )  # fmt: skip


def unhang(h: Hang) -> None:
    """Kill what is left of a hung restore, by the PIDs it had (a failed test)."""
    for pid, started in h.pids.items():
        if _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if h.proc.poll() is None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            h.proc.communicate(timeout=30)
        if h.proc.poll() is None:
            h.proc.kill()
            h.proc.communicate()


def assert_nothing_left(c: Containerd, h: Hang) -> None:
    alive = {p for p, t in h.pids.items() if _start_time(p) == t}
    assert not alive, f"processes of the restore still run: {alive}"
    assert not _cgroup_members(h.cgroup), f"processes in {h.cgroup}"
    assert not _cgroup_dirs(h.cgroup), f"cgroup {h.cgroup} left: {_cgroup_dirs(h.cgroup)}"
    assert not mounts_under(h.bundle / "criu-restore"), mounts_under(h.bundle / "criu-restore")
    assert not mounts_under(h.runc_state), mounts_under(h.runc_state)
    # Only the rootfs, mounted at Create, until the task is deleted.
    assert mounts_under(h.bundle) in ([], [h.bundle / "rootfs"]), mounts_under(h.bundle)


def start_member(c: Containerd, group: str) -> str:
    """A counter in shim group ``group``: created and started, counting."""
    id = unique_id("pod")
    c.ctr("run", "-d", "--runtime", RUNTIME, "--annotation", f"{GROUP}={group}",
          IMAGE, id, "sh", "-c", COUNTER, timeout=30)  # fmt: skip
    wait_count(c, id, 2)
    return id


def exec_in(c: Containerd, id: str, exec_id: str) -> None:
    out = c.ctr("task", "exec", "--exec-id", exec_id, id, "echo", "served", timeout=30)
    assert out.stdout.strip() == "served"


def same_shim(c: Containerd, a: str, b: str) -> None:
    assert (bundle(c, a) / "address").read_text() == (bundle(c, b) / "address").read_text()


def test_a_restore_hung_in_criu_ends_at_the_timeout_and_leaves_nothing(
    bed: Bed, tmp_path: Path
) -> None:
    c = bed.containerd
    bed.set_timeout(TIMEOUT_S)
    group = unique_id("grp")
    member = start_member(c, group)
    h: Hang | None = None
    try:
        # post-restore: CRIU has restored the processes and holds them; its cgroup
        # yard is mounted under the bundle, runc's criu-root under its state.
        h = start_hanging(bed, tmp_path, "post-restore", group)
        same_shim(c, member, h.id)
        assert len(h.pids) >= 4, h.pids  # runc, CRIU, the script, restored processes
        assert h.restored, "CRIU had restored nothing yet: the test would prove less"
        assert h.mounts, "CRIU mounted nothing: the test would prove nothing about mounts"
        # The group serves while the restore hangs: exec, and a new container.
        exec_in(c, member, "during")
        second = start_member(c, group)
        same_shim(c, second, member)
        assert h.proc.poll() is None, "the restore ended before the group was tried"

        code, err = h.finish(timeout=TIMEOUT_S + SETTLE_S)
        took = time.monotonic() - h.began
        assert code != 0
        assert f"did not finish within {TIMEOUT_S} s" in err, err
        assert bed.ref in err, err  # names the checkpoint
        assert TIMEOUT_S - 1 < took < TIMEOUT_S + SETTLE_S, took
        assert_nothing_left(c, h)
        # Deletable, plainly; the group still serves.
        assert task(c, h.id) is not None
        c.ctr("task", "rm", h.id, timeout=30)
        c.ctr("containers", "rm", h.id, timeout=30)
        exec_in(c, member, "after")
        exec_in(c, second, "after")
        remove(c, second)
    finally:
        if h is not None:
            unhang(h)
            remove(c, h.id)
        remove(c, member)
    bed.set_timeout(600)


@pytest.mark.parametrize("end", ["kill", "rm -f"])
def test_kill_or_rm_ends_a_hung_restore_at_once(bed: Bed, tmp_path: Path, end: str) -> None:
    c = bed.containerd
    bed.set_timeout(600)
    group = unique_id("grp")
    h: Hang | None = None
    member = ""
    try:
        h = start_hanging(bed, tmp_path, "pre-restore", group)
        # A container joins the hung restore's shim, and is exec'd, meanwhile.
        member = start_member(c, group)
        same_shim(c, member, h.id)
        exec_in(c, member, "during")
        assert h.proc.poll() is None

        began = time.monotonic()
        if end == "kill":
            c.ctr("task", "kill", "-s", "KILL", h.id, timeout=30)
        else:
            c.ctr("task", "rm", "-f", h.id, timeout=30)
        code, err = h.finish(timeout=30)
        assert time.monotonic() - began < 15
        assert code != 0 and "ended before it finished" in err, err
        assert_nothing_left(c, h)
        if end == "kill":
            assert task(c, h.id)[1] == "STOPPED"  # type: ignore[index]
            c.ctr("task", "rm", h.id, timeout=30)
        assert task(c, h.id) is None
        c.ctr("containers", "rm", h.id, timeout=30)
        exec_in(c, member, "after")
    finally:
        if h is not None:
            unhang(h)
            remove(c, h.id)
        if member:
            remove(c, member)
