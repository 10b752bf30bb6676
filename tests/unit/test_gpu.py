"""runtime/capture/gpu.py's ctypes backend against the fake libcuda (tests/fakes/libcuda_fake.c)
on ordinary child processes: call order, timeouts, undo after each injected failure,
inventory and its gate."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakes import libcuda as fake

from runtime.capture import gpu
from runtime.errors import FailedPrecondition

if fake.compiler() is None:
    pytest.skip("no C compiler to build the fake libcuda", allow_module_level=True)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fake.build(tmp_path_factory.mktemp("fakecuda"))


@dataclass
class Bed:
    cuda: gpu.CudaCheckpoint
    log: Path
    control: Path
    pids: list[int]  # two processes that "use CUDA"
    other: int  # one that does not

    def names(self, pid: int | None = None) -> list[str]:
        return fake.names(self.log, pid)

    def set(self, **kv: object) -> None:
        self.control.write_text("".join(f"{k}={v}\n" for k, v in kv.items()))


@pytest.fixture
def bed(library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bed]:
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        pids_file = tmp_path / "pids"
        pids_file.write_text(f"{procs[0].pid}\n{procs[1].pid}\n")
        for key, value in {
            "LOG": tmp_path / "calls.log",
            "PIDS": pids_file,
            "STATE": tmp_path / "state",
            "CONTROL": tmp_path / "control",
        }.items():
            monkeypatch.setenv(f"STASIS_FAKE_CUDA_{key}", str(value))
        cuda = gpu.load(str(library))
        assert cuda is not None
        yield Bed(
            cuda,
            tmp_path / "calls.log",
            tmp_path / "control",
            [procs[0].pid, procs[1].pid],
            procs[2].pid,
        )
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_processes_are_those_the_driver_knows(bed: Bed) -> None:
    assert bed.cuda.processes([*bed.pids, bed.other]) == bed.pids
    assert bed.cuda.state(bed.pids[0]) == gpu.RUNNING
    assert bed.cuda.state(bed.other) is None


def test_suspend_locks_all_then_checkpoints_and_resume_restores_then_unlocks(bed: Bed) -> None:
    a, b = bed.pids
    bed.cuda.suspend(bed.pids, 1234)
    assert bed.names() == ["Lock", "Lock", "Checkpoint", "Checkpoint"]
    assert [c.timeout for c in fake.calls(bed.log) if c.name.endswith("Lock")] == [1234, 1234]
    assert bed.cuda.state(a) == bed.cuda.state(b) == gpu.CHECKPOINTED
    bed.cuda.resume(bed.pids)
    assert bed.names(a) == bed.names(b) == ["Lock", "Checkpoint", "Restore", "Unlock"]
    assert all(c.result == 0 for c in fake.calls(bed.log))
    assert bed.cuda.state(a) == bed.cuda.state(b) == gpu.RUNNING


def test_resume_after_a_restore_skips_what_is_done(bed: Bed) -> None:
    a, _ = bed.pids
    bed.cuda.suspend([a], 0)
    bed.cuda.restore(a)  # as if the restore step had already happened
    bed.cuda.resume([a])
    assert bed.names(a) == ["Lock", "Checkpoint", "Restore", "Unlock"]
    bed.cuda.resume([a])  # running: nothing to do
    assert bed.names(a) == ["Lock", "Checkpoint", "Restore", "Unlock"]


@pytest.mark.parametrize(
    ("call", "victim", "a_calls", "b_calls"),
    [
        # The first lock fails: nothing was done, nothing to undo.
        ("cuCheckpointProcessLock", 0, ["Lock"], []),
        # The second lock fails: the first process is unlocked again.
        ("cuCheckpointProcessLock", 1, ["Lock", "Unlock"], ["Lock"]),
        # The first checkpoint fails: both only locked, both unlocked.
        ("cuCheckpointProcessCheckpoint", 0, ["Lock", "Checkpoint", "Unlock"], ["Lock", "Unlock"]),
        # The second checkpoint fails: the first is restored and unlocked.
        (
            "cuCheckpointProcessCheckpoint",
            1,
            ["Lock", "Checkpoint", "Restore", "Unlock"],
            ["Lock", "Checkpoint", "Unlock"],
        ),
    ],
)
def test_suspend_undoes_everything_after_each_failure(
    bed: Bed, call: str, victim: int, a_calls: list[str], b_calls: list[str]
) -> None:
    a, b = bed.pids
    bed.set(fail=call, fail_result=2, fail_pid=bed.pids[victim])
    with pytest.raises(gpu.CudaError) as err:
        bed.cuda.suspend(bed.pids, 500)
    message = str(err.value)
    assert f"PID {bed.pids[victim]}" in message and call in message, message
    assert "CUDA_ERROR_OUT_OF_MEMORY (2)" in message, message
    assert err.value.call == call and err.value.pid == bed.pids[victim]
    assert isinstance(err.value, FailedPrecondition)
    assert bed.names(a) == a_calls
    assert bed.names(b) == b_calls
    assert bed.cuda.state(a) == bed.cuda.state(b) == gpu.RUNNING


def test_a_lock_past_its_timeout_fails_and_is_undone(bed: Bed) -> None:
    a, b = bed.pids
    bed.set(lock_delay_ms=300, fail_pid=b)  # fail_pid alone changes nothing
    bed.cuda.lock(a, 1000)  # 300 ms < 1 s
    bed.cuda.unlock(a)
    bed.log.unlink()
    with pytest.raises(gpu.CudaError, match=r"timeout 100 ms\) failed: CUDA_ERROR_TIMEOUT \(909\)"):
        bed.cuda.suspend(bed.pids, 100)
    # The first lock timed out (after its 100 ms): nothing else was tried.
    assert [(c.name, c.timeout, c.result) for c in fake.calls(bed.log)] == [
        ("cuCheckpointProcessLock", 100, 909)
    ]
    bed.set(lock_delay_ms=0)
    bed.cuda.suspend(bed.pids, 100)
    bed.cuda.resume(bed.pids)
    assert bed.cuda.state(a) == gpu.RUNNING


def test_resume_tries_every_process_then_raises(bed: Bed) -> None:
    a, b = bed.pids
    bed.cuda.suspend(bed.pids, 0)
    bed.set(fail="cuCheckpointProcessRestore", fail_pid=a)
    with pytest.raises(gpu.CudaError, match=f"PID {a}: cuCheckpointProcessRestore failed"):
        bed.cuda.resume(bed.pids)
    assert bed.cuda.state(b) == gpu.RUNNING
    assert bed.cuda.state(a) == gpu.CHECKPOINTED


def test_wrong_transitions_get_the_drivers_error(bed: Bed) -> None:
    a, _ = bed.pids
    with pytest.raises(gpu.CudaError, match=r"CUDA_ERROR_ILLEGAL_STATE \(401\)"):
        bed.cuda.checkpoint(a)
    with pytest.raises(gpu.CudaError, match=r"CUDA_ERROR_NOT_INITIALIZED \(3\)"):
        bed.cuda.lock(bed.other, 0)


def test_inventory(bed: Bed) -> None:
    assert bed.cuda.inventory() == {
        "models": ["Stasis Fake GPU"],
        "count": 1,
        "driver_version": 12080,
        "driver": "",
    }
    bed.set(gpus="NVIDIA H100 80GB HBM3;NVIDIA H100 80GB HBM3", driver=12090)
    inv = bed.cuda.inventory()
    assert inv is not None and inv["count"] == 2 and inv["driver_version"] == 12090
    assert gpu.describe(inv) == "2 x NVIDIA H100 80GB HBM3, CUDA 12.9 driver"


def test_no_library_means_no_gpu_support(tmp_path: Path) -> None:
    assert gpu.load(str(tmp_path / "libcuda.so.1")) is None
    assert gpu.load("libc.so.6") is None  # no checkpoint API: a driver < 550
    gpu.check_restore({"container_id": "x"})  # no GPU state: nothing checked


H100 = {"models": ["H100"], "count": 1, "driver_version": 12080, "driver": "570.10"}


@pytest.mark.parametrize(
    ("current", "why"),
    [
        ({**H100, "models": ["A100"]}, "another GPU model"),
        ({**H100, "models": ["H100", "H100"], "count": 2}, "another GPU count"),
        ({**H100, "driver": "560.35.03"}, "driver is newer than this node's"),
        ({**H100, "driver": "", "driver_version": 12040}, "driver is newer than this node's"),
        (None, "no usable CUDA driver"),
    ],
)
def test_gate_refuses(current: dict[str, object] | None, why: str) -> None:
    with pytest.raises(FailedPrecondition) as err:
        gpu.check_inventory(H100, current)
    message = str(err.value)
    assert why in message and "\n" not in message, message
    assert "1 x H100, driver 570.10 (CUDA 12.8)" in message  # the checkpoint's side
    assert gpu.describe(current) in message  # this node's side


@pytest.mark.parametrize(
    "current",
    [
        H100,
        {**H100, "driver": "580.65.06", "driver_version": 13000},  # a newer node: fine
        {**H100, "driver": "", "driver_version": 12090},
    ],
)
def test_gate_accepts_the_same_gpus_and_an_older_checkpoint_driver(
    current: dict[str, object],
) -> None:
    gpu.check_inventory(H100, current)


def test_check_restore_uses_this_nodes_inventory(
    bed: Bed, library: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(gpu.LIBCUDA_ENV, str(library))
    recorded = {"models": ["Stasis Fake GPU"], "count": 1, "driver_version": 12080}
    gpu.check_restore({"gpu": {"inventory": recorded, "pids": [1]}})
    bed.set(gpus="Other GPU")
    with pytest.raises(FailedPrecondition, match="another GPU model"):
        gpu.check_restore({"gpu": {"inventory": recorded, "pids": [1]}})
