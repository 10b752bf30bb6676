"""shim.checkpoint.take.checkpoint with its collaborators injected: the recording GPU
fake (runtime.capture.gpu.RecordingGpu), a local store on tmp_path, runc stand-ins.
What a checkpoint writes, in which order it moves GPU state and freezes, that a
failure leaves the container running with its GPU state and no checkpoint behind,
and what other requests do while it runs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any, cast

import pytest

from runtime.capture.gpu import CudaError, RecordingGpu
from runtime.errors import FailedPrecondition, StasisError
from runtime.linux.proc import ns_pid
from runtime.linux.runc import CreateOpts, Runc, RuncError
from runtime.store.local import LocalStore
from shim.checkpoint import take
from shim.task.container import Container, CreateConfig
from shim.task.process import InitProcess, Status
from shim.task.reaper import Reaper
from shim.task.stdio import ProcessIO
from tests.unit.test_checkpoint_state import DumpingRunc
from tests.unit.test_process import FakeIO, names, run

ID = "c1"
IMAGE = "docker.io/library/busybox:1"


class NoCriu:
    """A spawner for `criu --version` on a node without CRIU."""

    async def run(self, argv: list[str], **_: Any) -> None:
        raise FileNotFoundError(argv[0])


class CheckpointRunc(DumpingRunc):
    """What checkpoint() asks of runc besides pause, resume and checkpoint."""

    binary = "runc-fake"

    def __init__(self, pids: list[int]) -> None:
        super().__init__()
        self.pids = pids
        self.spawner = NoCriu()

    async def ps(self, id: str) -> list[int]:
        await self._call("ps", id)
        return self.pids

    async def version(self) -> str:
        return "runc version 1.2.3"

    async def update(self, id: str, resources: bytes) -> None:
        await self._call("update", id)


async def container(bundle: Path, pids: list[int]) -> tuple[Container, CheckpointRunc]:
    spec = {"annotations": {"io.containerd.image.name": IMAGE}, "process": {"args": ["sh"]}}
    (bundle / "config.json").write_text(json.dumps(spec))
    runc = CheckpointRunc(pids)
    init = InitProcess(ID, str(bundle), cast(Runc, runc), cast(ProcessIO, FakeIO()), ("", "", ""))
    await init.create(CreateOpts(pid_file=str(bundle / "init.pid")))
    await init.start()
    runc.calls.clear()
    cfg = CreateConfig(id=ID, bundle=str(bundle), spec=spec)
    c = Container(cfg, cast(Runc, runc), init, None, Reaper(), lambda *_: None)
    c.shepherd = None
    return c, runc


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    (tmp_path / "bundle").mkdir()
    return tmp_path / "bundle"


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(str(tmp_path / "store"))


def checkpoint(c: Container, store: LocalStore, gpu: RecordingGpu | None, **spec: Any) -> Any:
    spec.setdefault("name", "ck1")
    return take.checkpoint(c, take.CheckpointSpec(**spec), store=store, gpu=gpu, namespace="ns")


def test_a_checkpoint_moves_gpu_state_out_before_the_freeze_and_back_after(
    bundle: Path, store: LocalStore
) -> None:
    cuda = os.getpid()  # a PID whose NSpid can be read
    gpu = RecordingGpu(cuda=[cuda])

    async def body() -> None:
        c, runc = await container(bundle, [cuda, 1])
        seen: dict[str, list[str]] = {}
        runc.hooks["pause"] = lambda: seen.setdefault("at freeze", [n for n, _ in gpu.calls])
        runc.hooks["checkpoint"] = lambda: seen.setdefault("at dump", [n for n, _ in gpu.calls])
        result = await checkpoint(c, store, gpu, labels={"k": "v"})
        assert seen == {"at freeze": ["processes", "suspend"], "at dump": ["processes", "suspend"]}
        assert gpu.calls == [("processes", [cuda]), ("suspend", [cuda]), ("resume", [cuda])]
        assert names(runc) == ["ps", "pause", "checkpoint", "resume"]
        assert c.init.status is Status.RUNNING
        assert result.name == "ck1" and result.ref.endswith("/ck1")
        reader = store.open("ck1")
        try:
            meta = reader.metadata
            assert meta["container_id"] == ID and meta["namespace"] == "ns"
            assert meta["image"] == IMAGE and meta["labels"] == {"k": "v"}
            assert meta["gpu"]["pids"] == [ns_pid(cuda)]
            assert meta["gpu"]["inventory"]["models"] == ["Fake"]
            assert meta["runc"] == "runc version 1.2.3" and meta["exit"] is False
            assert "checkpoint/pages-1.img" in reader.manifest.files
            reader.verify()
        finally:
            reader.close()

    run(body())


def test_without_cuda_processes_or_a_backend_nothing_gpu_happens(
    bundle: Path, store: LocalStore
) -> None:
    async def body() -> None:
        c, runc = await container(bundle, [4242])
        gpu = RecordingGpu(cuda=[1])
        await checkpoint(c, store, gpu)
        assert gpu.calls == [("processes", [])]
        c, runc = await container(bundle, [4242])
        await checkpoint(c, store, None, name="ck2")
        assert "ps" not in names(runc)
        assert [i.name for i in store.list()] == ["ck1", "ck2"]
        reader = store.open("ck2")
        assert "gpu" not in reader.metadata
        reader.close()

    run(body())


def test_a_failed_dump_gives_gpu_state_back_thaws_and_leaves_no_checkpoint(
    bundle: Path, store: LocalStore
) -> None:
    gpu = RecordingGpu(cuda=[4242])

    async def body() -> None:
        c, runc = await container(bundle, [4242])
        runc.fail["checkpoint"] = RuncError("checkpoint", 1, "criu failed")
        with pytest.raises(StasisError, match=f"checkpoint of {ID} failed"):
            await checkpoint(c, store, gpu)
        assert gpu.calls[-1] == ("resume", [4242])
        assert names(runc) == ["ps", "pause", "checkpoint", "resume"]
        assert c.init.status is Status.RUNNING
        assert store.list() == []

    run(body())


def test_a_failed_gpu_suspend_never_freezes(bundle: Path, store: LocalStore) -> None:
    gpu = RecordingGpu(cuda=[4242])
    gpu.fail["suspend"] = CudaError("GPU state of PID 4242: cuCheckpointProcessLock failed")

    async def body() -> None:
        c, runc = await container(bundle, [4242])
        with pytest.raises(CudaError, match=f"checkpoint of {ID}: GPU state of PID 4242"):
            await checkpoint(c, store, gpu)
        assert names(runc) == ["ps"]
        assert c.init.status is Status.RUNNING and store.list() == []

    run(body())


def test_an_exit_dump_gives_no_gpu_state_back_and_thaws_nothing(
    bundle: Path, store: LocalStore
) -> None:
    gpu = RecordingGpu(cuda=[4242])

    async def body() -> None:
        c, runc = await container(bundle, [4242])
        await checkpoint(c, store, gpu, exit=True)
        assert [n for n, _ in gpu.calls] == ["processes", "suspend"]
        assert names(runc) == ["ps", "pause", "checkpoint"]
        reader = store.open("ck1")
        assert reader.metadata["exit"] is True
        reader.close()

    run(body())


def test_a_paused_container_with_cuda_processes_is_refused(bundle: Path, store: LocalStore) -> None:
    gpu = RecordingGpu(cuda=[4242])

    async def body() -> None:
        c, runc = await container(bundle, [4242])
        await c.init.pause()
        with pytest.raises(FailedPrecondition, match="checkpoint it running"):
            await checkpoint(c, store, gpu)
        assert c.init.status is Status.PAUSED
        assert names(runc) == ["pause", "ps"] and store.list() == []

    run(body())


def test_requests_during_a_checkpoint(bundle: Path, store: LocalStore) -> None:
    """Update and Exec wait for it, as Pause does; Kill ends the container at once."""

    async def body() -> None:
        c, runc = await container(bundle, [4242])
        runc.hold = asyncio.Event()
        task = asyncio.ensure_future(checkpoint(c, store, None))
        await runc.dumping.wait()
        waiting = [
            asyncio.ensure_future(c.update(b"{}")),
            asyncio.ensure_future(c.init.settled()),  # what an Exec waits for
            asyncio.ensure_future(c.init.pause()),
        ]
        for _ in range(5):
            await asyncio.sleep(0)
        assert not any(w.done() for w in waiting)
        await c.init.kill(signal.SIGKILL, all=True)
        assert names(runc)[-1] == "kill"
        runc.hold.set()
        await task
        await asyncio.gather(*waiting)
        assert names(runc)[-4:] == ["kill", "resume", "update", "pause"]

    run(body())
