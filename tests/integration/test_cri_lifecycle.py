"""How a CRI container ends, on Stasis as on containerd's runc shim (containerd 2.1).

A container whose init exits while processes it started live on in a PID namespace
it shares (the pod's, or the host's with hostPID) must end like with runc: the shim
kills what is left in the container (runc's shim does so when the spec has no PID
namespace of its own), the container reaches EXITED, and stopping it returns at once.
Left running, such a process keeps the container's stdout open: the container never
finishes and StopContainer hangs until its deadline (critest's HostPID/PodPID specs,
nginx's master and worker).

Also: a kill of a container that has already exited succeeds as containerd expects
(the runc shim maps runc's "container not running" to NotFound, which containerd
ignores), and StopContainer of an exited container is quick.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bed.containerd import STASIS_HANDLER, Containerd, process_start_ticks
from bed.cri import CriClient, Pods
from bed.registry import Registry
from conftest import REGISTRY_BASE

pytestmark = pytest.mark.integration

HANDLERS = [STASIS_HANDLER, "runc"]  # runc: the reference
CRI_TIMEOUT = 60.0
EXITED = 2  # runtime.v1.ContainerState.CONTAINER_EXITED
# The init exits after 1 s; the `sleep 600` it started lives on in the shared namespace.
LEAVES_A_CHILD = ["sh", "-c", "sleep 600 & echo started; sleep 1; echo done"]


class _Started:
    """Host PIDs of what a test's containers ran, to end any the runtime left behind."""

    def __init__(self, containerd: Containerd) -> None:
        self.containerd = containerd
        self.seen: dict[int, str] = {}

    def record(self, cid: str) -> None:
        done = self.containerd.ctr("task", "ps", cid, check=False)
        for line in done.stdout.splitlines()[1:]:
            pid = int(line.split()[0])
            if (started := process_start_ticks(pid)) is not None:
                self.seen[pid] = started

    def alive(self) -> list[int]:
        return [pid for pid, t in self.seen.items() if process_start_ticks(pid) == t]

    def end(self) -> None:
        for pid in self.alive():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def pods(
    request: pytest.FixtureRequest,
    cri: CriClient,
    cri_containerd_2_1: Containerd,
    tmp_path: Path,
) -> Iterator[tuple[Pods, _Started]]:
    handler: str = request.param
    made = Pods(cri, tmp_path / "logs", handler, CRI_TIMEOUT)
    started = _Started(cri_containerd_2_1)
    try:
        yield made, started
    finally:
        started.end()  # only what a wrong runtime left: remove_all would hang on it
        made.remove_all()


def _wait_exited(cri: CriClient, cid: str, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status = cri.call("ContainerStatus", container_id=cid).status
        if status.state == EXITED:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"container {cid} did not reach EXITED within {timeout} s")


@pytest.mark.parametrize("pods", HANDLERS, indirect=True)
@pytest.mark.parametrize("pid_ns", ["pod", "host"])
def test_init_exit_ends_what_it_left_in_a_shared_pid_namespace(
    pods: tuple[Pods, _Started], cri: CriClient, registry: Registry, pid_ns: str
) -> None:
    made, started = pods
    host = pid_ns == "host"
    sandbox, config = made.run(f"leaves-child-{pid_ns}", host_pid=host)
    cid = made.container(
        sandbox, config, registry.ref(REGISTRY_BASE), LEAVES_A_CHILD, name="c", host_pid=host
    )
    started.record(cid)
    assert len(started.seen) >= 2, started.seen  # sh, the sleep it left (and sleep 1)
    _wait_exited(cri, cid, 20)
    status = cri.call("ContainerStatus", container_id=cid).status
    assert status.exit_code == 0
    assert started.alive() == [], "the init's child outlived the container"
    log = Path(config.log_directory) / "c.log"
    assert "done" in log.read_text()  # its output up to the end reached the log
    t0 = time.monotonic()
    cri.call("StopContainer", container_id=cid, timeout=CRI_TIMEOUT)
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("pods", HANDLERS, indirect=True)
def test_stop_of_a_container_that_exits_meanwhile(
    pods: tuple[Pods, _Started], cri: CriClient, registry: Registry
) -> None:
    """StopContainer's SIGTERM reaches an init that has just gone: no error."""
    made, started = pods
    sandbox, config = made.run("exits-meanwhile")
    cid = made.container(
        sandbox, config, registry.ref(REGISTRY_BASE), ["sh", "-c", "sleep 0.3"], name="c"
    )
    started.record(cid)
    time.sleep(0.25)
    cri.call("StopContainer", container_id=cid, timeout=CRI_TIMEOUT)
    _wait_exited(cri, cid, 10)
    cri.call("StopContainer", container_id=cid, timeout=CRI_TIMEOUT)  # again: a no-op
