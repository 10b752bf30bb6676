"""Stasis checkpoints end to end on containerd 1.7 and 2.1: `stasis checkpoint`
writes a checkpoint (CRIU images + rootfs diff + manifest) into a store, and a
new container created with the stasis.dev/restore-from annotation continues
from it; corrupt checkpoints and full stores fail safely.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from bed import workload
from bed.containerd import Containerd, mounts_under, unique_id
from bed.workload import IMAGE, RUNTIME, remove, stasis, stasis_argv, task, wait_count

pytestmark = pytest.mark.integration

COUNTER = (
    "echo data > /written; rm /etc/group; "
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"
)


def start_counter(c: Containerd, ids: list[str]) -> str:
    return workload.start_counter(c, ids, "cnt", COUNTER)


def test_checkpoint_exit_then_restore_by_annotation(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    id = start_counter(containerd, ids)
    before = wait_count(containerd, id, 40)
    out = stasis(containerd, "checkpoint", id, "--exit", "--to", str(tmp_path / "store"), "--json")
    result = json.loads(out.stdout)
    ref = result["ref"]
    assert ref.startswith("file://") and result["criu_size"] > 0
    assert task(containerd, id) is None or task(containerd, id)[1] == "STOPPED"  # type: ignore[index]
    remove(containerd, id)

    new = unique_id("rst")
    containerd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
                   f"stasis.dev/restore-from={ref}", IMAGE, new)  # fmt: skip
    ids.append(new)
    # A fresh start would count from 1; the restored counter goes on.
    assert wait_count(containerd, new, 0) >= before
    pid = task(containerd, new)[0]  # type: ignore[index]
    root = f"/proc/{pid}/root"
    assert Path(root, "written").read_text() == "data\n"
    assert not Path(root, "etc/group").exists(), (
        "a file deleted before the checkpoint stays deleted"
    )
    assert Path(root, "etc/passwd").exists()
    ping = containerd.ctr("task", "exec", "--exec-id", "lo", new, "ping", "-c1", "-W2", "127.0.0.1")
    assert "1 packets received" in ping.stdout


SIDE = "j=0; while true; do j=$((j+1)); echo $j > /tmp/side; sleep 0.05; done"


def side_count(c: Containerd, id: str, above: int, timeout: float = 20) -> int:
    """Wait until the exec'd side counter of ``id`` has counted past ``above``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t = task(c, id)
        with contextlib.suppress(OSError, ValueError, TypeError):
            n = int(Path(f"/proc/{t[0]}/root/tmp/side").read_text().strip())  # type: ignore[index]
            if n > above:
                return n
        time.sleep(0.05)
    raise AssertionError(f"side counter of {id} did not pass {above}")


def test_exec_process_is_restored_too(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    id = start_counter(containerd, ids)
    wait_count(containerd, id, 5)
    containerd.ctr("task", "exec", "-d", "--exec-id", "side", id, "sh", "-c", SIDE)
    before = side_count(containerd, id, 10)
    ref = stasis(containerd, "checkpoint", id, "--exit", "--to", str(tmp_path)).stdout.split()[-1]
    meta = json.loads(stasis(containerd, "inspect", ref).stdout)
    assert [e["id"] for e in meta["execs"]] == ["side"], meta["execs"]
    remove(containerd, id)

    new = unique_id("rst")
    containerd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
                   f"stasis.dev/restore-from={ref}", IMAGE, new)  # fmt: skip
    ids.append(new)
    # The exec'd counter goes on from where it was, next to the init's.
    after = side_count(containerd, new, before)
    side_count(containerd, new, after)
    # It is still exec "side" of the task: listed, and signalled by its id.
    ps = containerd.ctr("task", "ps", new).stdout
    assert "side" in ps, ps
    containerd.ctr("task", "kill", "--exec-id", "side", "-s", "KILL", new)
    time.sleep(0.5)
    stopped = side_count(containerd, new, 0)
    time.sleep(0.5)
    assert side_count(containerd, new, 0) == stopped, "the killed exec stopped counting"
    wait_count(containerd, new, wait_count(containerd, new, 0))  # the init counts on


def test_exec_survives_a_leave_running_checkpoint_and_keeps_its_exit_code(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    id = start_counter(containerd, ids)
    wait_count(containerd, id, 5)
    # A foreground exec: ctr waits for its exit code across the checkpoint.
    ctr = [str(containerd.bin_dir / "ctr"), "--address", str(containerd.address),
           "--namespace", containerd.namespace]  # fmt: skip
    waiter = subprocess.Popen(
        [*ctr, "task", "exec", "--exec-id", "fg", id,
         "sh", "-c", "while [ ! -e /tmp/stop ]; do sleep 0.05; done; exit 7"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=containerd.env(),
    )  # fmt: skip
    try:
        time.sleep(1.0)
        stasis(containerd, "checkpoint", id, "--to", str(tmp_path), "--name", "live")
        wait_count(containerd, id, wait_count(containerd, id, 0))  # still running
        containerd.ctr("task", "exec", "--exec-id", "stop", id, "touch", "/tmp/stop")
        out, err = waiter.communicate(timeout=30)
        assert waiter.returncode == 7, (out, err)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()


def test_exec_of_a_missing_command_fails_like_runc(containerd: Containerd, ids: list[str]) -> None:
    id = start_counter(containerd, ids)
    wait_count(containerd, id, 1)
    done = containerd.ctr("task", "exec", "--exec-id", "nope", id, "no-such-cmd", check=False)
    assert done.returncode != 0
    assert "executable file not found in $PATH" in done.stderr, done.stderr


def test_checkpoint_leave_running_and_cli_store_commands(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    id = start_counter(containerd, ids)
    wait_count(containerd, id, 5)
    store = tmp_path / "store"
    ref = stasis(containerd, "checkpoint", id, "--to", str(store), "--name", "keep").stdout
    assert ref.strip().splitlines()[-1] == f"file://{store}/keep"
    n = wait_count(containerd, id, 0)
    wait_count(containerd, id, n)  # still counting
    meta = json.loads(stasis(containerd, "inspect", str(store / "keep")).stdout)
    assert meta["container_id"] == id and meta["image"] == IMAGE
    archive = tmp_path / "keep.tar"
    stasis(containerd, "export", str(store / "keep"), str(archive))
    import tarfile

    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        config_dump = tar.extractfile("config.dump")
        assert config_dump is not None
        assert json.load(config_dump)["rootfsImageName"] == IMAGE
    assert {"spec.dump", "config.dump", "rootfs-diff.tar", "manifest.json"} <= names
    assert any(n.startswith("checkpoint/") for n in names)
    stasis(containerd, "rm", str(store / "keep"))
    assert not (store / "keep").exists()


def test_corrupt_checkpoint_is_refused_and_nothing_starts(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    id = start_counter(containerd, ids)
    wait_count(containerd, id, 5)
    store = tmp_path / "store"
    stasis(containerd, "checkpoint", id, "--to", str(store), "--name", "c1")
    pages = sorted((store / "c1" / "checkpoint").glob("pages-*.img"))[0]
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pages.write_bytes(bytes(data))
    new = unique_id("bad")
    annotation = f"stasis.dev/restore-from={store / 'c1'}"
    r = containerd.ctr(
        "run", "-d", "--runtime", RUNTIME, "--annotation", annotation, IMAGE, new, check=False
    )
    containerd.ctr("containers", "rm", new, check=False)
    assert r.returncode != 0
    assert pages.name in r.stderr and "c1" in r.stderr, r.stderr
    # The images are checked while CRIU restores them; CRIU holds the restored
    # processes at post-restore until the check passes, so these never ran.
    assert "never ran" in r.stderr, r.stderr
    assert task(containerd, new) is None
    assert not mounts_under(Path("/run/containerd/runc", containerd.namespace, new))

    fresh = unique_id("fresh")
    containerd.ctr("run", "-d", "--runtime", RUNTIME,
                   "--annotation", f"stasis.dev/restore-from={store / 'c1'}",
                   "--annotation", "stasis.dev/restore-policy=fresh",
                   IMAGE, fresh, "sh", "-c", COUNTER)  # fmt: skip
    ids.append(fresh)
    assert wait_count(containerd, fresh, 0) < 40, "policy fresh starts from scratch"


def test_full_store_keeps_container_running_and_leaves_nothing(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    id = start_counter(containerd, ids)
    containerd.ctr("task", "exec", "-d", "--exec-id", "fat", id, "sh", "-c",
                   "head -c 8000000 /dev/urandom > /tmp/blob; exec sleep 1000")  # fmt: skip
    wait_count(containerd, id, 5)
    time.sleep(0.5)
    # A small loop-mounted ext4 (a real block filesystem, as a disk or NAS export is).
    image = tmp_path / "small.img"
    with open(image, "wb") as f:
        f.truncate(4 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(image)],
                   check=True, capture_output=True)  # fmt: skip
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(small)], check=True)
    try:
        r = stasis(containerd, "checkpoint", id, "--to", str(small), "--name", "x", check=False)
        assert r.returncode != 0
        assert "full" in r.stderr or "space" in r.stderr, r.stderr
        n = wait_count(containerd, id, 0)
        wait_count(containerd, id, n)  # the container keeps running
        left = [n for n in os.listdir(small) if n != "lost+found"]
        assert left == [], "no partial checkpoint and no manifest left"
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_checkpoint_of_stopped_or_unknown_container_is_a_clear_error(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    r = stasis(containerd, "checkpoint", unique_id("nope"), "--to", str(tmp_path), check=False)
    assert r.returncode != 0 and "not found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    id = unique_id("stopped")
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "true")
    ids.append(id)
    deadline = time.monotonic() + 10
    while (t := task(containerd, id)) and t[1] != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.05)
    r = stasis(containerd, "checkpoint", id, "--to", str(tmp_path), check=False)
    assert r.returncode != 0 and "stopped" in r.stderr, r.stderr


# -- the CLI's fast path: the Checkpoint goes to the container's own shim at once -------

REPO = Path(__file__).resolve().parents[2]

# `stasis ARGS` with a spy on the ttrpc client: the method and image of each call
# (written as JSON to argv[1]).
SPY = """
import json, sys
from protos.stasis.v1 import checkpoint_pb2 as pb
from runtime.cli import main as cli
from runtime.rpc import ttrpc_client

seen = []
call = ttrpc_client.Client.call

def spy(self, service, method, payload, **kw):
    seen.append({"method": method, "image": pb.CheckpointRequest.FromString(payload).image})
    return call(self, service, method, payload, **kw)

ttrpc_client.Client.call = spy
code = cli.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(seen, f)
sys.exit(code)
"""


def spied_stasis(
    c: Containerd, calls: Path, *args: str
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, object]]]:
    argv = stasis_argv(c)
    assert argv[1:3] == ["-m", "runtime.cli"]
    done = subprocess.run(
        [argv[0], "-c", SPY, str(calls), *argv[3:], *args],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    return done, json.loads(calls.read_text())


def test_checkpoint_goes_to_the_shim_which_records_the_image(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    id = start_counter(containerd, ids)
    wait_count(containerd, id, 5)
    store = tmp_path / "store"
    # containerd's options after the command, too.
    argv = stasis_argv(containerd)
    done, calls = spied_stasis(
        containerd, tmp_path / "calls.json", "checkpoint", id, "--to", str(store), "--name", "f"
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    # One call, without the image: the shim asks containerd for it while it checkpoints.
    assert calls == [{"method": "Checkpoint", "image": ""}], calls
    assert json.loads((store / "f" / "config.dump").read_text())["rootfsImageName"] == IMAGE
    assert json.loads((store / "f" / "stasis.json").read_text())["image"] == IMAGE
    inspect = subprocess.run(
        [*argv[:3], "inspect", str(store / "f"), *argv[3:]],
        capture_output=True, text=True, timeout=60, check=True, cwd=REPO,
    )  # fmt: skip
    assert json.loads(inspect.stdout)["image"] == IMAGE
    wait_count(containerd, id, wait_count(containerd, id, 0))  # still counting


def test_fast_path_to_a_container_of_another_runtime_name(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    # Run by the shim's path: a Stasis shim serves it (the fast path reaches it),
    # but containerd names another runtime, which `stasis checkpoint` refuses.
    binary = shutil.which("containerd-shim-stasis-v2", path=containerd.env()["PATH"])
    assert binary is not None
    id = unique_id("path")
    containerd.ctr("run", "-d", "--runtime", binary, IMAGE, id, "sh", "-c", COUNTER)
    ids.append(id)
    wait_count(containerd, id, 5)
    store = tmp_path / "store"
    why = f"container {id} runs on {binary}, not {RUNTIME}"
    done, calls = spied_stasis(containerd, tmp_path / "calls.json", "checkpoint", id,
                               "--to", str(store), "--name", "a")  # fmt: skip
    assert (done.returncode, done.stderr) == (1, f"stasis: {why}\n")
    assert [c["method"] for c in calls] == ["Checkpoint"], calls
    # The shim published nothing, and the container runs on.
    assert json.loads(stasis(containerd, "list", "--store", str(store), "--json").stdout) == []
    wait_count(containerd, id, wait_count(containerd, id, 0))
    # With --exit, the dump stops it before the shim's lookup can stop the
    # checkpoint: the checkpoint is kept, with a warning.
    done, _ = spied_stasis(containerd, tmp_path / "calls.json", "checkpoint", id,
                           "--to", str(store), "--name", "b", "--exit")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"stasis: warning: {why}; "), done.stderr
    assert done.stdout.strip() == f"file://{store}/b"


def test_containerd_lookup(containerd: Containerd, ids: list[str]) -> None:
    """runtime.rpc.containerd.get_container (h2, the CLI's and the shim's lookup)
    against the real containerd: the container's image, runtime and spec, and
    containerd's NotFound for an unknown id or another namespace."""
    from runtime.errors import NotFound
    from runtime.rpc.containerd import get_container

    id = unique_id("look")
    containerd.ctr("container", "create", "--runtime", RUNTIME, "--label", "k=v",
                   "--annotation", "stasis.test/a=b", IMAGE, id, "true")  # fmt: skip
    ids.append(id)
    address, ns = str(containerd.address), containerd.namespace
    info = get_container(address, ns, id)
    assert (info.id, info.image, info.runtime) == (id, IMAGE, RUNTIME)
    assert info.annotations["stasis.test/a"] == "b"
    assert info.spec["process"]["args"] == ["true"]
    with pytest.raises(NotFound, match=f"container 'gone-{id}' not found in namespace '{ns}'"):
        get_container(address, ns, f"gone-{id}")
    with pytest.raises(NotFound):
        get_container(address, f"other-{ns}", id)


def _shim_parent_key(c: Containerd, id: str) -> str | None:
    """The key of the zygote that forked ``id``'s shim daemon, if one did."""
    bundle = c.state / "io.containerd.runtime.v2.task" / c.namespace / id
    pid = int((bundle / "shim.pid").read_text())
    with open(f"/proc/{pid}/stat", "rb") as fh:
        ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
    with contextlib.suppress(OSError):
        argv = Path(f"/proc/{ppid}/cmdline").read_bytes().split(b"\0")
        if argv[1:2] == [b"zygote"]:
            return argv[2].decode()
    return None


def test_restores_come_from_the_restore_zygote(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    """A restore is forked by the zygote that preloads the checkpoint machinery (the
    first restore launches it when there is none); plain containers never are."""
    id = start_counter(containerd, ids)
    before = wait_count(containerd, id, 5)
    ref = stasis(containerd, "checkpoint", id, "--to", str(tmp_path)).stdout.split()[-1]
    key = None
    for _ in range(3):
        new = unique_id("rst")
        containerd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
                       f"stasis.dev/restore-from={ref}", IMAGE, new)  # fmt: skip
        ids.append(new)
        assert wait_count(containerd, new, before) > before
        key = _shim_parent_key(containerd, new)
        if key and key.endswith("-restore"):
            break
        time.sleep(1)  # the first restore launched the restore zygote: let it load
    assert key and key.endswith("-restore"), f"restored shims' zygote: {key}"
    plain = unique_id("plain")
    containerd.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, plain, "sleep", "100")
    ids.append(plain)
    assert _shim_parent_key(containerd, plain) in (key.removesuffix("-restore"), None)
