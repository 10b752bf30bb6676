"""A checkpoint whose image comes later (CheckpointRequest.image_pending, then
stasis.v1.Checkpointer/SetImage), and the stasis CLI's fast path that sends it.

The shim side is the real CheckpointService behind the real ttrpc server (on an event
loop in a thread of its own); only the checkpoint itself is a stand-in that asks
for the image the way shim.checkpoint.take does, once its dump would be done. The
CLI side runs `checkpoint` in this process against that server, listening where
the container's own shim would, with containerd's lookup replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bed.loopserver import LoopServer

from protos.stasis.v1 import checkpoint_pb2 as pb
from runtime import names
from runtime.cli import main as cli
from runtime.errors import Code, NotFound, Unavailable
from runtime.rpc import containerd as ctrd
from runtime.rpc import ttrpc_server as ttrpc
from runtime.rpc.ttrpc_client import Client, RPCError
from shim.checkpoint import take as checkpointing
from shim.daemon.checkpoint_api import SERVICE as STASIS_SERVICE
from shim.daemon.checkpoint_api import CheckpointService
from shim.daemon.events import Publisher
from shim.daemon.task_api import TaskService
from shim.task.reaper import Reaper

ID = "c1"
NAMESPACE = "testns"
ADDRESS = "/run/stasis-unit/containerd.sock"
IMAGE = "docker.io/library/busybox:1"


class Shim(LoopServer):
    """A TaskService serving stasis.v1.Checkpointer on ``path``; its containers are
    stand-ins, and each checkpoint records the image it was given."""

    def __init__(self, path: str, ids: tuple[str, ...] = (ID,)) -> None:
        super().__init__(path)
        tasks = TaskService(NAMESPACE, Publisher(""), Reaper(), on_shutdown=lambda: None)
        tasks.containers.update({id: object() for id in ids})  # type: ignore[misc]
        self.service = CheckpointService(tasks)
        self.images: list[str] = []
        self.dumping = threading.Event()  # a checkpoint waits on `dumped`
        self.dumped: asyncio.Event | None = None

    def services(self) -> dict[str, dict[str, ttrpc.Handler]]:
        return {STASIS_SERVICE: self.service.handlers()}

    async def checkpoint(
        self, container: object, spec: checkpointing.CheckpointSpec, **_: Any
    ) -> checkpointing.CheckpointResult:
        """What shim.checkpoint.take.checkpoint does with the image."""
        if self.dumped is not None:
            self.dumping.set()
            await self.dumped.wait()
        image = await checkpointing._later_image(ID, spec)
        self.images.append(image)
        return checkpointing.CheckpointResult(f"file:///s/{image}", "n", 1, 1, 0.5, 0.25)

    def hold_dumps(self) -> None:
        """Checkpoints wait in their 'dump' until release_dumps()."""
        self.dumped = self.run(self._event())

    async def _event(self) -> asyncio.Event:
        return asyncio.Event()

    def release_dumps(self) -> None:
        assert self.dumped is not None
        self.loop.call_soon_threadsafe(self.dumped.set)

    def pending(self) -> set[str]:
        async def get() -> set[str]:
            return set(self.service._images)

        return self.run(get())


@pytest.fixture
def socket_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # Short: sun_path holds 108 bytes; shim.bootstrap.start.socket_path names sockets in it.
    directory = tempfile.mkdtemp(prefix="stasis-s-", dir="/tmp")
    monkeypatch.setattr(names, "SOCKET_DIR", directory)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def lookup_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "stasis image lookup"]


@pytest.fixture(autouse=True)
def _lookups_finish() -> Iterator[None]:
    """The CLI's lookup threads outlive `checkpoint` at times (a process exits
    without them): here they must end before the next test."""
    yield
    for t in lookup_threads():
        t.join(15)
        assert not t.is_alive()


@pytest.fixture
def shim(socket_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shim]:
    """The shim of container ID, where the CLI's fast path looks for it."""
    s = Shim(names.socket_path(ADDRESS, NAMESPACE, ID))
    monkeypatch.setattr(checkpointing, "checkpoint", s.checkpoint)
    s.start()
    try:
        yield s
    finally:
        # The CLI's lookups connect to the shim too: they end before it stops.
        for t in lookup_threads():
            t.join(15)
        s.stop()


def call(shim: Shim, method: str, req: Any, timeout: float | None = None) -> bytes:
    with Client.connect(shim.path) as client:
        return client.call(
            STASIS_SERVICE,
            method,
            req.SerializeToString(),
            timeout=timeout,
            metadata={ttrpc.NAMESPACE_KEY: NAMESPACE},
        )


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; the list gets its result or its exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def checkpoint_req(id: str = ID, **kw: Any) -> pb.CheckpointRequest:
    return pb.CheckpointRequest(id=id, image_pending=True, **kw)


# -- the shim: Checkpoint with image_pending, SetImage ---------------------------------


def test_image_set_while_the_checkpoint_runs(shim: Shim) -> None:
    t, out = in_thread(lambda: call(shim, "Checkpoint", checkpoint_req()))
    wait_until(lambda: shim.pending() == {ID})
    call(shim, "SetImage", pb.SetImageRequest(id=ID, image=IMAGE), timeout=5)
    t.join(10)
    assert pb.CheckpointResponse.FromString(out[0]).ref == f"file:///s/{IMAGE}"
    assert shim.images == [IMAGE]
    assert shim.pending() == set()


def test_image_set_before_the_checkpoint_arrives(shim: Shim) -> None:
    t, out = in_thread(lambda: call(shim, "SetImage", pb.SetImageRequest(id=ID, image=IMAGE)))
    wait_until(lambda: shim.pending() == {ID})  # the SetImage waits for its checkpoint
    assert t.is_alive()
    call(shim, "Checkpoint", checkpoint_req())
    t.join(10)
    assert out == [b""]  # google.protobuf.Empty
    assert shim.images == [IMAGE]
    assert shim.pending() == set()


def test_image_that_never_comes(shim: Shim, caplog: pytest.LogCaptureFixture) -> None:
    shim.service.image_wait_s = 0.2
    started = time.monotonic()
    call(shim, "Checkpoint", checkpoint_req())
    assert time.monotonic() - started < 5
    # "": shim.checkpoint.take records the image the annotations name instead.
    assert shim.images == [""]
    assert any("no image came" in r.getMessage() and ID in r.getMessage() for r in caplog.records)
    assert shim.pending() == set()


def test_image_lookup_failed(shim: Shim, caplog: pytest.LogCaptureFixture) -> None:
    shim.hold_dumps()
    t, _ = in_thread(lambda: call(shim, "Checkpoint", checkpoint_req()))
    assert shim.dumping.wait(10)
    why = "cannot reach containerd at /x: connection refused"
    call(shim, "SetImage", pb.SetImageRequest(id=ID, error=why))
    shim.release_dumps()
    t.join(10)
    assert shim.images == [""]
    assert any(why in r.getMessage() for r in caplog.records)


def test_abort_fails_the_checkpoint_with_its_message(shim: Shim) -> None:
    t, out = in_thread(lambda: call(shim, "Checkpoint", checkpoint_req()))
    wait_until(lambda: shim.pending() == {ID})
    why = f"container {ID} runs on io.containerd.runc.v2, not io.containerd.stasis.v2"
    call(shim, "SetImage", pb.SetImageRequest(id=ID, error=why, abort=True))
    t.join(10)
    assert isinstance(out[0], RPCError)
    assert (out[0].code, out[0].message) == (Code.FAILED_PRECONDITION, why)
    assert shim.images == [] and shim.pending() == set()


def test_abort_after_an_exit_dump_keeps_the_checkpoint(
    shim: Shim, caplog: pytest.LogCaptureFixture
) -> None:
    # The dump stopped the container: failing now would lose its state.
    t, out = in_thread(lambda: call(shim, "Checkpoint", checkpoint_req(exit=True)))
    wait_until(lambda: shim.pending() == {ID})
    why = f"container {ID} runs on /bin/shim, not io.containerd.stasis.v2"
    call(shim, "SetImage", pb.SetImageRequest(id=ID, error=why, abort=True))
    t.join(10)
    assert isinstance(out[0], bytes)
    assert shim.images == [""]
    assert any(why in r.getMessage() and "kept" in r.getMessage() for r in caplog.records)


def test_set_image_of_an_unknown_container_is_not_found(shim: Shim) -> None:
    with pytest.raises(RPCError) as err:
        call(shim, "SetImage", pb.SetImageRequest(id="nope", image=IMAGE))
    assert (err.value.code, err.value.message) == (Code.NOT_FOUND, "container 'nope' not found")
    assert shim.pending() == set()


def test_set_image_with_no_checkpoint_coming(shim: Shim) -> None:
    shim.service.image_claim_s = 0.2
    with pytest.raises(RPCError) as err:
        call(shim, "SetImage", pb.SetImageRequest(id=ID, image=IMAGE))
    assert err.value.code == Code.FAILED_PRECONDITION
    assert "no checkpoint of it waits for an image" in err.value.message, err.value.message
    assert shim.pending() == set()
    # A checkpoint afterwards does not take that stale image.
    shim.service.image_wait_s = 0.2
    call(shim, "Checkpoint", checkpoint_req())
    assert shim.images == [""]


def test_early_set_image_whose_caller_leaves_is_forgotten(shim: Shim) -> None:
    client = Client.connect(shim.path)
    req = pb.SetImageRequest(id=ID, image=IMAGE).SerializeToString()
    t, _ = in_thread(lambda: client.call(STASIS_SERVICE, "SetImage", req))
    wait_until(lambda: shim.pending() == {ID})
    client._sock.shutdown(socket.SHUT_RDWR)  # the CLI exits
    t.join(10)
    client.close()
    wait_until(lambda: shim.pending() == set())


def test_checkpoints_at_once_share_the_image(shim: Shim) -> None:
    shim.hold_dumps()
    a, out_a = in_thread(lambda: call(shim, "Checkpoint", checkpoint_req()))
    b, out_b = in_thread(lambda: call(shim, "Checkpoint", checkpoint_req()))
    wait_until(lambda: shim.service._images.get(ID) is not None
               and shim.service._images[ID].checkpoints == 2)  # fmt: skip
    call(shim, "SetImage", pb.SetImageRequest(id=ID, image=IMAGE))
    call(shim, "SetImage", pb.SetImageRequest(id=ID, image=IMAGE))  # the second CLI's
    shim.release_dumps()
    a.join(10)
    b.join(10)
    assert [type(out[0]) for out in (out_a, out_b)] == [bytes, bytes]
    assert shim.images == [IMAGE, IMAGE]
    assert shim.pending() == set()


def test_image_in_the_request_needs_no_set_image(shim: Shim) -> None:
    call(shim, "Checkpoint", pb.CheckpointRequest(id=ID, image=IMAGE))
    assert shim.images == [IMAGE] and shim.pending() == set()


# -- the CLI ------------------------------------------------------------------------------


def args(**kw: Any) -> argparse.Namespace:
    base = dict(address=ADDRESS, namespace=NAMESPACE, container=ID, to="/tmp/store",
                name="", exit=True, tcp_established=False)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def info(runtime: str = cli.RUNTIME, group: str = "", image: str = IMAGE) -> ctrd.ContainerInfo:
    annotations = {"io.kubernetes.cri.sandbox-id": group} if group else {}
    return ctrd.ContainerInfo(ID, image, runtime, {"annotations": annotations})


class Lookups:
    """Stands in for runtime.rpc.containerd.get_container: what it answers, and when."""

    def __init__(self, answer: ctrd.ContainerInfo | Exception) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, str, bool]] = []
        self.main = threading.main_thread()

    def __call__(self, address: str, namespace: str, id: str) -> ctrd.ContainerInfo:
        self.calls.append((address, namespace, id, threading.current_thread() is self.main))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], Lookups]:
    def install(answer: ctrd.ContainerInfo | Exception) -> Lookups:
        stand_in = Lookups(answer)
        monkeypatch.setattr(ctrd, "get_container", stand_in)
        return stand_in

    return install


def test_cli_fast_path_sends_at_once_and_the_image_follows(
    shim: Shim, lookups: Callable[[Any], Lookups], monkeypatch: pytest.MonkeyPatch
) -> None:
    looked = lookups(info())
    sent: list[tuple[str, bool]] = []
    original = Client.call

    def spy(self: Client, service: str, method: str, payload: bytes, **kw: Any) -> bytes:
        if method == "Checkpoint":
            sent.append((method, pb.CheckpointRequest.FromString(payload).image_pending))
            assert looked.calls == [], "the Checkpoint goes out before containerd is asked"
        return original(self, service, method, payload, **kw)

    monkeypatch.setattr(Client, "call", spy)
    out = cli.checkpoint(args())
    assert sent == [("Checkpoint", True)]
    assert looked.calls == [(ADDRESS, NAMESPACE, ID, False)]  # in the background
    assert out["ref"] == f"file:///s/{IMAGE}" and out["seconds"] == 0.5
    assert shim.images == [IMAGE]


def test_cli_without_a_shim_of_its_own_asks_containerd_first(
    socket_dir: str, lookups: Callable[[Any], Lookups], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pod's member: its sandbox's shim serves it, and nothing listens on its own socket.
    pod = Shim(names.socket_path(ADDRESS, NAMESPACE, "sandbox1"), ids=(ID,))
    monkeypatch.setattr(checkpointing, "checkpoint", pod.checkpoint)
    pod.start()
    try:
        looked = lookups(info(group="sandbox1"))
        assert cli._own_shim(ADDRESS, NAMESPACE, ID) is None
        out = cli.checkpoint(args())
    finally:
        pod.stop()
    assert looked.calls == [(ADDRESS, NAMESPACE, ID, True)]
    assert out["ref"] == f"file:///s/{IMAGE}" and pod.images == [IMAGE]


def test_cli_fast_path_for_a_container_containerd_does_not_know(
    shim: Shim, lookups: Callable[[Any], Lookups]
) -> None:
    shim.hold_dumps()
    gone = NotFound(f"container {ID!r} not found in namespace {NAMESPACE!r}")
    lookups(gone)
    t, out = in_thread(lambda: cli.checkpoint(args(exit=False)))
    assert shim.dumping.wait(10)
    wait_until(lambda: shim.service._images[ID].delivered.done())
    shim.release_dumps()
    t.join(10)
    assert out == [gone]  # the same error as without the fast path; nothing published
    assert shim.images == []


def test_cli_fast_path_for_a_container_of_another_runtime(
    shim: Shim, lookups: Callable[[Any], Lookups]
) -> None:
    lookups(info(runtime="/usr/bin/containerd-shim-stasis-v2"))
    with pytest.raises(cli.FailedPrecondition) as err:
        cli.checkpoint(args(exit=False))
    why = f"container {ID} runs on /usr/bin/containerd-shim-stasis-v2, not {cli.RUNTIME}"
    assert str(err.value) == why
    assert shim.images == []


def test_cli_fast_path_for_a_container_of_another_runtime_stopped_by_its_dump(
    shim: Shim, lookups: Callable[[Any], Lookups], capsys: pytest.CaptureFixture[str]
) -> None:
    lookups(info(runtime="/usr/bin/containerd-shim-stasis-v2"))
    out = cli.checkpoint(args(exit=True))
    assert out["ref"] == "file:///s/" and shim.images == [""]
    why = f"container {ID} runs on /usr/bin/containerd-shim-stasis-v2, not {cli.RUNTIME}"
    assert capsys.readouterr().err == (
        f"stasis: warning: {why}; its shim checkpointed it all the same, "
        "as the dump had already stopped it\n"
    )


def test_cli_fast_path_reaches_a_shim_that_does_not_serve_it(
    socket_dir: str, lookups: Callable[[Any], Lookups], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shim listens on the container's own socket but serves other containers
    # (a group named like it): the Checkpoint fails there, and goes to its group's.
    wrong = Shim(names.socket_path(ADDRESS, NAMESPACE, ID), ids=("other",))
    right = Shim(names.socket_path(ADDRESS, NAMESPACE, "sandbox1"))
    monkeypatch.setattr(checkpointing, "checkpoint", right.checkpoint)
    wrong.start()
    right.start()
    try:
        lookups(info(group="sandbox1"))
        out = cli.checkpoint(args())
    finally:
        wrong.stop()
        right.stop()
    assert out["ref"] == f"file:///s/{IMAGE}" and right.images == [IMAGE]


def test_cli_fast_path_when_containerd_cannot_be_asked(
    shim: Shim, lookups: Callable[[Any], Lookups], capsys: pytest.CaptureFixture[str]
) -> None:
    lookups(Unavailable("cannot reach containerd at /x: connection refused"))
    out = cli.checkpoint(args())
    assert out["ref"] == "file:///s/" and shim.images == [""]
    err = capsys.readouterr().err
    assert "warning" in err and "cannot reach containerd" in err, err


def test_cli_fast_path_failure_is_the_shims(
    shim: Shim, lookups: Callable[[Any], Lookups], monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups(info())

    async def stopped(*_: Any, **__: Any) -> checkpointing.CheckpointResult:
        raise cli.FailedPrecondition(f"cannot checkpoint container {ID}: it is stopped")

    monkeypatch.setattr(checkpointing, "checkpoint", stopped)
    with pytest.raises(cli.StasisError) as err:
        cli.checkpoint(args())
    assert str(err.value) == f"cannot checkpoint container {ID}: it is stopped"


def test_cli_fast_path_shim_gone(
    shim: Shim, lookups: Callable[[Any], Lookups], monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups(info())
    shim.hold_dumps()
    t, out = in_thread(lambda: cli.checkpoint(args()))
    assert shim.dumping.wait(10)
    assert shim.server is not None
    shim.close_server()  # as if the shim were killed
    t.join(10)
    assert isinstance(out[0], cli.ShimGone), out
    gone = f"checkpoint of {ID}: the shim ({shim.path}) closed the connection before answering"
    assert str(out[0]).startswith(f"{gone} (it exited or was killed)")


def test_cli_leaks_no_fds(shim: Shim, lookups: Callable[[Any], Lookups]) -> None:
    lookups(info())
    server = shim.server
    assert server is not None
    cli.checkpoint(args())  # imports done
    # The server, in this process too, closes its side once it sees the CLI's closed.
    wait_until(lambda: not lookup_threads() and server.connection_count == 0)
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        cli.checkpoint(args())
    wait_until(lambda: not lookup_threads() and server.connection_count == 0)
    assert sorted(os.listdir("/proc/self/fd")) == before


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


def test_cli_names_agree_with_the_shims() -> None:
    # The CLI spells them out to stay free of runtime.rpc.ttrpc_server (asyncio) on its fast path.
    assert (cli.CHECKPOINTER, cli.NAMESPACE_KEY) == (STASIS_SERVICE, ttrpc.NAMESPACE_KEY)
    assert CheckpointService.image_claim_s < cli.SET_IMAGE_TIMEOUT
