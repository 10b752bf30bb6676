"""A restore's job (shim.task.restoring.RestoreJob) as the container's Start drives
it: its part after ``runc restore``, its verdict on the restored tree, its close."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any, cast

import pytest

from runtime.errors import DataLoss, PermissionDenied, StasisError
from runtime.linux.runc import CheckpointOpts, RestoreOpts, Runc, RuncError
from shim.task.container import Container, CreateConfig
from shim.task.process import InitProcess, Status
from shim.task.reaper import Reaper
from shim.task.stdio import ProcessIO
from tests.unit.test_bounded import RestoringRunc
from tests.unit.test_process import FakeIO, names, run

REF = "file:///var/lib/stasis/checkpoints/ck1"


class Job:
    """A recording RestoreJob whose verdict is ``bad``."""

    ref = REF

    def __init__(self, bad: StasisError | None = None) -> None:
        self.bad = bad
        self.calls: list[tuple[Any, ...]] = []

    def execs(self) -> list[dict[str, Any]]:
        return []

    async def restored(self, pid: int) -> None:
        self.calls.append(("restored", pid))

    async def verdict(self, pid: int) -> StasisError | None:
        self.calls.append(("verdict", pid))
        return self.bad

    async def close(self) -> None:
        self.calls.append(("close",))


class StartedIO(FakeIO):
    def started(self, loop: asyncio.AbstractEventLoop) -> None:
        pass


class NoReaper:
    def watch(self, pid: int) -> asyncio.Future[int]:
        return asyncio.get_running_loop().create_future()


def restoring(bundle: Path, job: Job) -> tuple[Container, RestoringRunc]:
    runc = RestoringRunc()
    init = InitProcess(
        "c1", str(bundle), cast(Runc, runc), cast(ProcessIO, StartedIO()), ("", "", "")
    )
    opts = RestoreOpts(CheckpointOpts(image_path=str(bundle / "img")), str(bundle / "init.pid"))
    init.prepare_restore(opts, timeout=60, job=job)
    cfg = CreateConfig(id="c1", bundle=str(bundle), checkpoint=str(bundle / "img"))
    c = Container(cfg, cast(Runc, runc), init, None, cast(Reaper, NoReaper()), lambda *_: None)
    c.restore = job
    init.on_restored = c._restored
    return c, runc


def test_start_runs_the_job_around_runc_restore(tmp_path: Path) -> None:
    async def body() -> None:
        job = Job()
        c, runc = restoring(tmp_path, job)
        await c.start()
        assert job.calls == [("restored", 4343), ("verdict", 4343), ("close",)]
        assert c.init.status is Status.RUNNING and c.restore is None
        assert names(runc) == ["restore"]

    run(body())


def test_a_tree_the_verdict_refuses_is_killed_and_start_fails(tmp_path: Path) -> None:
    async def body() -> None:
        refused = PermissionDenied("exceeds the container's spec")
        job = Job(refused)
        c, runc = restoring(tmp_path, job)
        with pytest.raises(PermissionDenied) as err:
            await c.start()
        assert err.value is refused
        assert runc.calls[-1] == ("kill", "c1", signal.SIGKILL, True)
        assert job.calls[-1] == ("close",) and c.restore is None

    run(body())


def test_a_failed_restore_reports_the_verdict_over_runcs_error(tmp_path: Path) -> None:
    async def body() -> None:
        corrupt = DataLoss(f"restore from checkpoint {REF!r}: images do not match")
        job = Job(corrupt)
        c, runc = restoring(tmp_path, job)
        runc.fail["restore"] = RuncError("restore", 1, "criu failed")
        with pytest.raises(DataLoss) as err:
            await c.start()
        assert err.value is corrupt and isinstance(err.value.__cause__, StasisError)
        assert REF in str(err.value.__cause__)  # runc's error names the job's checkpoint
        assert job.calls == [("verdict", 0), ("close",)]
        assert c.init.status is Status.CREATED  # deletable, as before
        job.bad = None
        c2, runc2 = restoring(tmp_path, job)
        runc2.fail["restore"] = RuncError("restore", 1, "criu failed")
        with pytest.raises(StasisError, match="criu failed"):
            await c2.start()

    run(body())
