"""GPU state in Stasis checkpoints, end to end without a GPU: a private containerd
whose shims load the fake libcuda (tests/fakes/libcuda_fake.c, through
STASIS_LIBCUDA in containerd's environment, which shims inherit) checkpoints and
restores a real container with real CRIU. The fake's log shows the order of the
driver calls around the dump and the restore; injected failures and another
GPU inventory fail cleanly.

The container's init (`sh`, PID 1 inside) is the process that "uses CUDA": its
host PID goes into the fake's PID list. Its fake driver state lives in the
container's own /tmp (see the fake), so a checkpoint carries it to the restore.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bed.containerd import Containerd, images_dir, unique_id
from bed.workload import COUNTER, IMAGE, RUNTIME, remove, stasis, task, wait_count
from conftest import REPO, shim_path
from fakes import libcuda as fake

pytestmark = pytest.mark.integration

LOCK_TIMEOUT_MS = 4321
FAKE_GPU = "Stasis Fake GPU"  # the fake's default inventory: one of these, CUDA 12.8


class FakeGpuContainerd(Containerd):
    """A private containerd whose environment (and so its shims') loads the fake."""

    extra_env: dict[str, str] = {}

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.extra_env}


@dataclass
class Bed:
    c: FakeGpuContainerd
    log: Path
    pids: Path  # the fake's list of processes that use CUDA
    control: Path  # the fake's control file (injected failures, inventory)

    def calls(self, pid: int) -> list[fake.Call]:
        return fake.calls(self.log, pid)


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    if fake.compiler() is None:
        pytest.skip("no C compiler to build the fake libcuda")
    work = Path(f"/tmp/stasis-gpu-fake-{uuid.uuid4().hex[:8]}")
    work.mkdir(mode=0o700)
    c: FakeGpuContainerd | None = None
    left = None
    try:
        library = fake.build(work)
        b = Bed(None, work / "calls.log", work / "pids", work / "control")  # type: ignore[arg-type]
        b.pids.write_text("")
        b.control.write_text("")
        c = FakeGpuContainerd.in_run_dir("2.1", shim_path())
        c.extra_env = {
            "STASIS_LIBCUDA": str(library),
            "STASIS_CUDA_LOCK_TIMEOUT_MS": str(LOCK_TIMEOUT_MS),
            "STASIS_FAKE_CUDA_LOG": str(b.log),
            "STASIS_FAKE_CUDA_PIDS": str(b.pids),
            "STASIS_FAKE_CUDA_CONTROL": str(b.control),
        }
        b.c = c
        c.start()
        c.import_image(images_dir() / "busybox.tar")
        yield b
    finally:
        if c is not None:
            left = c.stop()
        shutil.rmtree(work, ignore_errors=True)
    if left:
        pytest.fail(f"containerd left behind (now cleaned up): {left}")


@pytest.fixture
def ids(bed: Bed) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    bed.control.write_text("")
    for id in made:
        remove(bed.c, id)


def start_cuda_counter(bed: Bed, ids: list[str]) -> tuple[str, int]:
    """A counting container whose init uses "CUDA"; (its id, its host PID)."""
    id = unique_id("gpu")
    bed.c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", COUNTER)
    ids.append(id)
    pid = task(bed.c, id)[0]  # type: ignore[index]
    bed.pids.write_text(f"{pid}\n")
    wait_count(bed.c, id, 5)
    return id, pid


def short(calls: list[fake.Call]) -> list[str]:
    return [c.name.removeprefix("cuCheckpointProcess") for c in calls]


def restore(
    bed: Bed, ref: Path, ids: list[str], check: bool = True
) -> tuple[str, subprocess.CompletedProcess[str]]:
    new = unique_id("gpr")
    done = bed.c.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
                     f"stasis.dev/restore-from={ref}", IMAGE, new, check=check)  # fmt: skip
    ids.append(new)
    return new, done


def test_driver_calls_around_the_dump_and_the_restore(
    bed: Bed, ids: list[str], tmp_path: Path
) -> None:
    id, pid = start_cuda_counter(bed, ids)
    store = tmp_path / "store"

    # Leave running: lock -> checkpoint, then freeze + CRIU dump, thaw, restore -> unlock.
    stasis(bed.c, "checkpoint", id, "--to", str(store), "--name", "live")
    calls = bed.calls(pid)
    assert short(calls) == ["Lock", "Checkpoint", "Restore", "Unlock"], calls
    assert calls[0].timeout == LOCK_TIMEOUT_MS
    assert all(c.result == 0 and c.nspid == 1 for c in calls), calls
    assert not any(c.frozen for c in calls), "the driver was called on a frozen container"
    written = [p.stat().st_mtime_ns / 1e9 for p in (store / "live/checkpoint").glob("*.img")]
    assert written
    assert calls[1].time < min(written) and max(written) < calls[2].time, (
        "CRIU dumped between the GPU checkpoint and the GPU restore",
        calls,
        min(written),
        max(written),
    )
    meta = json.loads(stasis(bed.c, "inspect", str(store / "live")).stdout)
    assert meta["gpu"]["pids"] == [1], meta.get("gpu")
    inventory = meta["gpu"]["inventory"]
    assert inventory["models"] == [FAKE_GPU] and inventory["count"] == 1, inventory
    assert inventory["driver_version"] == 12080
    before = wait_count(bed.c, id, 0)
    wait_count(bed.c, id, before)  # still counting

    # --exit: lock -> checkpoint, dump; the processes end with their GPU state.
    stasis(bed.c, "checkpoint", id, "--exit", "--to", str(store), "--name", "gone")
    assert short(bed.calls(pid)[4:]) == ["Lock", "Checkpoint"]
    remove(bed.c, id)

    # Restore by annotation: CRIU restores, then restore -> unlock on the new process.
    new, _ = restore(bed, store / "gone", ids)
    new_pid = task(bed.c, new)[0]  # type: ignore[index]
    assert wait_count(bed.c, new, 0) >= before
    calls = bed.calls(new_pid)
    assert short(calls) == ["Restore", "Unlock"], fake.calls(bed.log)
    assert all(c.result == 0 and c.nspid == 1 and not c.frozen for c in calls), calls


def test_a_failed_gpu_checkpoint_unlocks_and_the_container_runs_on(
    bed: Bed, ids: list[str], tmp_path: Path
) -> None:
    id, pid = start_cuda_counter(bed, ids)
    bed.control.write_text("fail=cuCheckpointProcessCheckpoint\nfail_result=2\n")
    store = tmp_path / "store"
    done = stasis(bed.c, "checkpoint", id, "--to", str(store), "--name", "bad", check=False)
    assert done.returncode != 0
    for part in (id, f"PID {pid}", "cuCheckpointProcessCheckpoint", "CUDA_ERROR_OUT_OF_MEMORY (2)"):
        assert part in done.stderr, done.stderr
    assert short(bed.calls(pid)) == ["Lock", "Checkpoint", "Unlock"], bed.calls(pid)
    assert not (store / "bad").exists()
    assert task(bed.c, id)[1] == "RUNNING"  # type: ignore[index]
    wait_count(bed.c, id, wait_count(bed.c, id, 0))  # and counting


def test_restore_refuses_another_gpu_model_and_fails_when_the_driver_does(
    bed: Bed, ids: list[str], tmp_path: Path
) -> None:
    id, _ = start_cuda_counter(bed, ids)
    store = tmp_path / "store"
    stasis(bed.c, "checkpoint", id, "--exit", "--to", str(store), "--name", "h")
    remove(bed.c, id)
    bed.control.write_text("gpus=NVIDIA A100-SXM4-80GB\n")  # this node's GPU "changed"
    logged = len(fake.calls(bed.log))
    new, done = restore(bed, store / "h", ids, check=False)
    assert done.returncode != 0
    err = done.stderr
    assert "another GPU model" in err and FAKE_GPU in err and "NVIDIA A100-SXM4-80GB" in err, err
    assert task(bed.c, new) is None
    assert len(fake.calls(bed.log)) == logged, "no driver call for a refused restore"

    # The same GPUs, but the driver fails to give the GPU state back after the CRIU
    # restore: Start fails naming the call, and the stuck restored processes are ended.
    bed.control.write_text("fail=cuCheckpointProcessRestore\nfail_result=999\n")
    new, done = restore(bed, store / "h", ids, check=False)
    assert done.returncode != 0
    err = done.stderr
    assert "cuCheckpointProcessRestore failed: CUDA_ERROR_UNKNOWN (999)" in err, err
    t = task(bed.c, new)
    assert t is None or t[1] == "STOPPED", t


def test_the_gpu_machine_script_runs_with_a_cpu_stand_in(bed: Bed, tmp_path: Path) -> None:
    """bench/gpu_check.py's CRIU choreography (dump, restore, driver calls), here
    with a CPU worker and the fake: on a GPU machine it runs with PyTorch."""
    library = bed.c.extra_env["STASIS_LIBCUDA"]
    env = {
        **os.environ,
        "STASIS_LIBCUDA": library,
        "STASIS_FAKE_CUDA_PIDS": str(tmp_path / "pids"),
        "STASIS_FAKE_CUDA_LOG": str(tmp_path / "log"),
        "STASIS_FAKE_CUDA_STATE": str(tmp_path / "state"),
    }
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu_check.py"), "--cpu-stand-in", "--gib", "0.1",
         "--dir", str(tmp_path / "images"), "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["checksum_ok"] and result["cycles"][0]["restore_gib_s"] > 0, result
    # in place; around the leave-running dump; after the CRIU restore
    assert fake.names(tmp_path / "log") == ["Lock", "Checkpoint", "Restore", "Unlock"] * 2 + [
        "Restore",
        "Unlock",
    ]
    assert not list((tmp_path / "images").iterdir()), "the images are removed"
