"""Checkpoints under contention and restores from where they may not come from:
concurrent checkpoints of one container (serialized, never interleaved), many
containers checkpointed at once, and restore-from references outside the
configured stores (refused, nothing starts), and checkpoints whose metadata was
tampered with (refused before anything of them runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bed import workload
from bed.containerd import Containerd, mounts_under, unique_id
from bed.tamper import rewrite
from bed.workload import (
    COUNTER,
    IMAGE,
    RUNTIME,
    bundle,
    holding_memory,
    remove,
    stasis,
    stasis_argv,
    task,
    wait_count,
)

pytestmark = pytest.mark.integration

CONCURRENT = 20  # containers checkpointed at once


def start_counter(c: Containerd, ids: list[str]) -> str:
    return workload.start_counter(c, ids, "flt", COUNTER)


def checkpoint(c: Containerd, id: str, store: Path, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*stasis_argv(c), "checkpoint", id, "--to", str(store), "--name", name, "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def test_two_checkpoints_of_one_container_are_serialized(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    id = start_counter(containerd, ids)
    wait_count(containerd, id, 5)
    store = tmp_path / "store"
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda n: checkpoint(containerd, id, store, n), ["a", "b"]))
    for run in runs:
        assert run.returncode == 0, run.stderr
    results = [json.loads(run.stdout) for run in runs]
    assert {r["name"] for r in results} == {"a", "b"}
    # Each is whole and verifies on its own; they were taken one after the other.
    for name in ("a", "b"):
        stasis(containerd, "inspect", str(store / name))
    wait_count(containerd, id, wait_count(containerd, id, 0))  # still counting

    # Both restore.
    for name in ("a", "b"):
        new = unique_id("rst")
        containerd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
                       f"stasis.dev/restore-from={store / name}", IMAGE, new)  # fmt: skip
        ids.append(new)
        wait_count(containerd, new, 5)


def test_many_containers_checkpointed_at_once(containerd_1_7: Containerd, tmp_path: Path) -> None:
    containerd = containerd_1_7  # one version: twenty containers are enough work
    ids: list[str] = []
    try:
        _many_at_once(containerd, ids, tmp_path)
    finally:
        for id in ids:
            remove(containerd, id)


def _many_at_once(containerd: Containerd, ids: list[str], tmp_path: Path) -> None:
    made = [start_counter(containerd, ids) for _ in range(CONCURRENT)]
    for id in made:
        wait_count(containerd, id, 2, timeout=60)
    store = tmp_path / "store"
    with ThreadPoolExecutor(CONCURRENT) as pool:
        runs = list(pool.map(lambda id: checkpoint(containerd, id, store, f"c-{id}"), made))
    for run in runs:
        assert run.returncode == 0, run.stderr
    listed = stasis(containerd, "list", "--store", str(store), "--json").stdout
    for id in made:
        assert f"c-{id}" in listed
        assert (store / f"c-{id}" / "manifest.json").exists()
        assert task(containerd, id)[1] == "RUNNING"  # type: ignore[index]
        wait_count(containerd, id, wait_count(containerd, id, 0, timeout=60), timeout=60)


@pytest.mark.parametrize(
    "ref",
    ["file:///etc/stasis-nothing/c1", "/usr/share/c1", "file:///var/lib/../../etc/c1"],
)
def test_restore_from_outside_the_configured_stores_is_refused(
    containerd: Containerd, ids: list[str], ref: str
) -> None:
    new = unique_id("evil")
    r = containerd.ctr(
        "run", "-d", "--runtime", RUNTIME, "--annotation", f"stasis.dev/restore-from={ref}",
        IMAGE, new, check=False,
    )  # fmt: skip
    containerd.ctr("containers", "rm", new, check=False)
    assert r.returncode != 0
    assert "restore_sources" in r.stderr and ref in r.stderr, r.stderr
    assert task(containerd, new) is None


# -- a reference that walks out of the store through a symlink the container made -------


@pytest.fixture
def only_the_store(tmp_path: Path) -> Iterator[Path]:
    """The session config narrowed to one store, ``tmp_path/store``: nothing else may be
    restored from (the bed otherwise allows /run/stasis-test, where rootfses live)."""
    config = Path(os.environ["STASIS_CONFIG"])
    saved = config.read_text()
    store = tmp_path / "store"
    config.write_text(f'[storage]\nurl = "file://{store}"\nrestore_sources = []\n')
    try:
        yield store
    finally:
        config.write_text(saved)


def refused_restore(c: Containerd, ref: str) -> str:
    """``ctr run`` restoring from ``ref``: it must fail and start nothing; its stderr."""
    new = unique_id("evil")
    r = c.ctr(
        "run", "-d", "--runtime", RUNTIME, "--annotation", f"stasis.dev/restore-from={ref}",
        IMAGE, new, check=False,
    )  # fmt: skip
    started = task(c, new)
    remove(c, new)
    assert r.returncode != 0, f"restore from {ref} was not refused"
    assert started is None, f"restore from {ref} started a task"
    return r.stderr


def restores(c: Containerd, ids: list[str], ref: str) -> None:
    new = unique_id("rst")
    c.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
          f"stasis.dev/restore-from={ref}", IMAGE, new)  # fmt: skip
    ids.append(new)
    wait_count(c, new, 5)


def test_restore_ref_through_a_container_symlink_is_refused(
    containerd: Containerd, ids: list[str], only_the_store: Path
) -> None:
    """``<rootfs>/lnk/../evil``, ``lnk`` -> a checkpoint in the store (made by the
    container), ``evil`` a checkpoint the container wrote: the check's realpath said
    ``<store>/evil``, the open's normpath read ``<rootfs>/evil``."""
    c, store = containerd, only_the_store
    id = start_counter(c, ids)
    wait_count(c, id, 5)
    assert checkpoint(c, id, store, "good").returncode == 0
    attacker = start_counter(c, ids)
    wait_count(c, attacker, 1)
    c.ctr("task", "exec", "--exec-id", "ln", attacker, "ln", "-s", str(store / "good"), "/lnk")
    rootfs = bundle(c, attacker) / "rootfs"
    assert os.readlink(rootfs / "lnk") == str(store / "good")
    # What the container could write itself: a restorable checkpoint (here, a copy).
    subprocess.run(["cp", "-a", str(store / "good"), str(rootfs / "evil")], check=True)

    ref = f"{rootfs}/lnk/../evil"
    err = refused_restore(c, ref)
    assert ref in err and "'..' component" in err and f"file://{store}" in err, err
    err = refused_restore(c, f"file://{ref}")
    assert ref in err and "'..' component" in err, err
    err = refused_restore(c, f"{rootfs}/evil")  # and the plain path: outside
    assert "restore_sources" in err, err
    restores(c, ids, str(store / "good"))  # the store itself still restores by path


def test_restore_by_a_name_that_is_a_symlink_in_the_store_is_refused(
    containerd: Containerd, ids: list[str], only_the_store: Path, tmp_path: Path
) -> None:
    """A name skipped the source check, and its open followed a symlink out of the store."""
    c, store = containerd, only_the_store
    id = start_counter(c, ids)
    wait_count(c, id, 5)
    assert checkpoint(c, id, store, "good").returncode == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    subprocess.run(["cp", "-a", str(store / "good"), str(outside / "evil")], check=True)
    os.symlink(outside / "evil", store / "alias")

    err = refused_restore(c, "alias")
    assert "'alias'" in err and "is a symlink" in err, err
    inspect = stasis(c, "inspect", "alias", check=False)
    assert inspect.returncode != 0 and "is a symlink" in inspect.stderr, inspect.stderr
    restores(c, ids, "good")  # a real name still restores


# -- the shim killed, containerd restarted, in the middle of a checkpoint -------------------

MEM_MIB = 384  # memory the container holds, so that the dump takes a while


def wait_for_dump(store: Path, timeout: float = 60) -> None:
    """Until CRIU is writing page images somewhere under ``store``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pages in store.glob("*/checkpoint/pages-*.img"):
            with contextlib.suppress(OSError):
                if pages.stat().st_size > 1 << 20:
                    return
        time.sleep(0.005)
    raise AssertionError(f"no dump under {store} within {timeout} s")


def start_holding(c: Containerd, ids: list[str]) -> str:
    id = unique_id("mem")
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", holding_memory(MEM_MIB))
    ids.append(id)
    wait_count(c, id, 5)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until dd holds it all
        pid = task(c, id)[0]  # type: ignore[index]
        rss = 0
        with contextlib.suppress(OSError):  # a child may come and go meanwhile
            for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                for line in Path(f"/proc/{child}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
        if rss >= (MEM_MIB << 10) * 0.95:
            return id
        time.sleep(0.2)
    raise AssertionError(f"{id} never held {MEM_MIB} MiB")


def checkpoint_in_background(c: Containerd, id: str, store: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*stasis_argv(c), "checkpoint", id, "--to", str(store), "--name", "k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def test_shim_killed_during_checkpoint_leaves_no_checkpoint_and_no_orphans(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    id = start_holding(containerd, ids)
    init = task(containerd, id)[0]  # type: ignore[index]
    shim = int((bundle(containerd, id) / "shim.pid").read_text())
    store = tmp_path / "store"
    cli = checkpoint_in_background(containerd, id, store)
    try:
        wait_for_dump(store)
        os.kill(shim, signal.SIGKILL)
        _, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode != 0
    assert len(err.strip().splitlines()) == 1, err  # one clear line
    # containerd cleans up after a dead shim: the container is stopped, its
    # processes are gone, and nothing is left mounted.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        Path(f"/proc/{init}").exists() or (task(containerd, id) or ("", "STOPPED"))[1] != "STOPPED"
    ):
        time.sleep(0.2)
    assert not Path(f"/proc/{init}").exists(), "the container's init outlived its shim"
    assert not mounts_under(bundle(containerd, id))
    # No checkpoint looks complete; gc removes what the dump left.
    assert not list(store.glob("*/manifest.json"))
    listed = json.loads(stasis(containerd, "list", "--store", str(store), "--json").stdout)
    assert listed == []
    time.sleep(1)  # CRIU, re-parented, may still be finishing its files
    stasis(containerd, "gc", "--store", str(store), "--grace", "0")
    assert [p.name for p in store.iterdir()] == []


def test_containerd_restarted_during_checkpoint_changes_nothing(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    id = start_holding(containerd, ids)
    store = tmp_path / "store"
    cli = checkpoint_in_background(containerd, id, store)
    try:
        wait_for_dump(store)
        containerd.restart()
        out, err = cli.communicate(timeout=180)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 0, err
    assert out.strip().splitlines()[-1] == f"file://{store}/k"
    assert (store / "k" / "manifest.json").exists()
    stasis(containerd, "inspect", str(store / "k"))
    assert task(containerd, id)[1] == "RUNNING"  # type: ignore[index]
    wait_count(containerd, id, wait_count(containerd, id, 0))


def cgroup_procs(c: Containerd, id: str) -> list[int]:
    """PIDs in the container's cgroup (ctr puts it at /<namespace>/<id>), v1 or v2."""
    found: list[int] = []
    for base in ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
        procs = Path(base, c.namespace, id, "cgroup.procs")
        with contextlib.suppress(OSError):
            found += [int(p) for p in procs.read_text().split()]
    return found


def test_shim_killed_during_restore_leaves_nothing_running(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    id = start_holding(containerd, ids)
    store = tmp_path / "store"
    stasis(containerd, "checkpoint", id, "--exit", "--to", str(store), "--name", "k")
    remove(containerd, id)

    new = unique_id("rst")
    ids.append(new)
    restore = subprocess.Popen(
        [str(containerd.bin_dir / "ctr"), "--address", str(containerd.address),
         "--namespace", containerd.namespace, "run", "-d", "--runtime", RUNTIME,
         "--annotation", f"stasis.dev/restore-from={store / 'k'}", IMAGE, new],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        text=True, env=containerd.env(),
    )  # fmt: skip
    try:
        log = bundle(containerd, new) / "criu-restore" / "restore.log"
        deadline = time.monotonic() + 60
        while not (log.exists() and log.stat().st_size > 0):
            assert time.monotonic() < deadline and restore.poll() is None, "no restore seen"
            time.sleep(0.005)
        shim = int((bundle(containerd, new) / "shim.pid").read_text())
        os.kill(shim, signal.SIGKILL)
        _, err = restore.communicate(timeout=120)
    finally:
        if restore.poll() is None:
            restore.kill()
            restore.communicate()
    assert restore.returncode != 0, err
    # CRIU aborts with runc gone: no restored process runs, not even for a moment
    # after the fact, and containerd's cleanup of the dead shim leaves no mounts.
    deadline = time.monotonic() + 30
    while cgroup_procs(containerd, new) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cgroup_procs(containerd, new) == []
    time.sleep(1)
    assert cgroup_procs(containerd, new) == []
    remove(containerd, new)
    assert not mounts_under(bundle(containerd, new))
    # nor its cgroup, which CRIU had made and runc never recorded: the shim's delete
    # removes it once empty
    left = [b for b in ("pids", "memory", "freezer", "") if Path("/sys/fs/cgroup", b,
            containerd.namespace, new, "cgroup.procs").exists()]  # fmt: skip
    assert left == [], f"cgroup of {new} left in {left}"
    # nor the rootfs bind mount runc prepares for CRIU (criu-root), which a runc
    # killed in the middle cannot remove itself: the shim's delete does
    assert not mounts_under(Path("/run/containerd/runc", containerd.namespace, new))
    # The checkpoint is untouched: a second restore goes on counting.
    again = unique_id("rst")
    containerd.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
                   f"stasis.dev/restore-from={store / 'k'}", IMAGE, again)  # fmt: skip
    ids.append(again)
    wait_count(containerd, again, 5)


# -- malformed checkpoint metadata -----------------------------------------------------------


@pytest.mark.parametrize(
    "execs", [["junk"], [{"id": "x", "pid": "1"}], [{"id": "-x", "pid": 1}]], ids=str
)
def test_malformed_execs_record_leaves_nothing_running(
    containerd: Containerd, ids: list[str], tmp_path: Path, execs: list[object]
) -> None:
    id = start_counter(containerd, ids)
    wait_count(containerd, id, 3)
    store = tmp_path / "store"
    stasis(containerd, "checkpoint", id, "--exit", "--to", str(store), "--name", "k")
    remove(containerd, id)
    metadata = json.loads((store / "k" / "stasis.json").read_text())
    metadata["execs"] = execs
    rewrite(store / "k", "stasis.json", json.dumps(metadata).encode())

    new, r = workload.run_restoring(containerd, ids, store / "k")
    assert r.returncode != 0
    assert "execs[0]" in r.stderr, r.stderr
    # Nothing of the checkpoint runs, now or a moment later ...
    time.sleep(1)
    assert cgroup_procs(containerd, new) == []
    state = task(containerd, new)
    assert state is None or state[1] == "STOPPED", state
    # ... and what containerd kept of it goes with a plain rm.
    if state is not None:
        containerd.ctr("task", "rm", new)
    containerd.ctr("containers", "rm", new)
    assert not mounts_under(bundle(containerd, new))


def restore_cli(c: Containerd, ref: str, new: str) -> subprocess.CompletedProcess[str]:
    """`stasis restore`, with this containerd's ctr first on PATH."""
    env = {**os.environ, "PATH": f"{c.bin_dir}:{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [*stasis_argv(c), "restore", ref, new],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env,
    )  # fmt: skip


def test_stasis_restore_passes_the_image_after_dashdash(
    containerd: Containerd, ids: list[str], tmp_path: Path
) -> None:
    """ctr (urfave/cli) takes `--` as the end of its options: the restore works; an
    image recorded as `--privileged` is refused before ctr runs."""
    id = start_counter(containerd, ids)
    n = wait_count(containerd, id, 3)
    store = tmp_path / "store"
    stasis(containerd, "checkpoint", id, "--exit", "--to", str(store), "--name", "k")
    remove(containerd, id)
    new = unique_id("rst")
    ids.append(new)
    done = restore_cli(containerd, str(store / "k"), new)
    assert done.returncode == 0, done.stderr
    assert wait_count(containerd, new, n) > n

    metadata = json.loads((store / "k" / "stasis.json").read_text())
    metadata["image"] = "--privileged"
    rewrite(store / "k", "stasis.json", json.dumps(metadata).encode())
    evil = unique_id("rst")
    ids.append(evil)
    r = restore_cli(containerd, str(store / "k"), evil)
    assert r.returncode != 0
    assert "image: '--privileged' starts with '-'" in r.stderr, r.stderr
    assert task(containerd, evil) is None
