"""The image a Stasis checkpoint records: the shim asks containerd for it while the
checkpoint runs (runtime.rpc.containerd over h2), and the stasis CLI that sends the
Checkpoint.

containerd is a grpcio server on a unix socket answering Containers.Get. The shim
side is the real TaskService behind the real ttrpc server (on an event loop in a
thread of its own); only the checkpoint itself is a stand-in that asks for the image
the way shim.checkpoint.take does, once its dump would be done. The CLI side runs
`checkpoint` in this process against that server, listening where the container's
own shim would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from bed.loopserver import LoopServer

from protos.containerd.services.containers.v1 import containers_pb2
from protos.stasis.v1 import checkpoint_pb2 as pb
from runtime import names
from runtime.cli import checkpoint as cli
from runtime.errors import (
    Code,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    StasisError,
    Unavailable,
)
from runtime.names import RUNTIME
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
IMAGE = "docker.io/library/busybox:1"


class Containerd:
    """Containers.Get of containerd, for the containers in ``records`` (id -> a
    Container, or a grpc.StatusCode to fail with); ``asked`` lists (namespace, id)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.records: dict[str, containers_pb2.Container | grpc.StatusCode] = {}
        self.asked: list[tuple[str, str]] = []
        self.delay = 0.0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(
            self._get,
            request_deserializer=containers_pb2.GetContainerRequest.FromString,
            response_serializer=containers_pb2.GetContainerResponse.SerializeToString,
        )
        service = "containerd.services.containers.v1.Containers"
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"Get": handler}),)
        )
        self.server.add_insecure_port(f"unix:{path}")

    def add(
        self, id: str = ID, image: str = IMAGE, runtime: str = RUNTIME, group: str = ""
    ) -> None:
        annotations = {"io.kubernetes.cri.sandbox-id": group} if group else {}
        spec = {"annotations": annotations, "process": {"args": ["true"]}}
        c = containers_pb2.Container(id=id, image=image)
        c.runtime.name = runtime
        c.spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
        c.spec.value = json.dumps(spec).encode()
        self.records[id] = c

    def _get(
        self, req: containers_pb2.GetContainerRequest, context: grpc.ServicerContext
    ) -> containers_pb2.GetContainerResponse:
        metadata = dict(context.invocation_metadata())
        self.asked.append((str(metadata.get(ctrd.NAMESPACE_KEY)), req.id))
        time.sleep(self.delay)
        record = self.records.get(req.id, grpc.StatusCode.NOT_FOUND)
        if isinstance(record, grpc.StatusCode):
            context.abort(record, f'container "{req.id}" in namespace "x": not found')
        return containers_pb2.GetContainerResponse(container=record)


@pytest.fixture
def socket_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # Short: sun_path holds 108 bytes; runtime.names.socket_path names sockets in it.
    directory = tempfile.mkdtemp(prefix="stasis-s-", dir="/tmp")
    monkeypatch.setattr(names, "SOCKET_DIR", directory)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


@pytest.fixture
def containerd(socket_dir: str) -> Iterator[Containerd]:
    c = Containerd(os.path.join(socket_dir, "containerd.sock"))
    c.server.start()
    try:
        yield c
    finally:
        c.server.stop(None).wait(10)


class Shim(LoopServer):
    """A TaskService serving stasis.v1.Checkpointer on ``path``; its containers are
    stand-ins, and each checkpoint records the image it was given."""

    def __init__(self, path: str, containerd: str, ids: tuple[str, ...] = (ID,)) -> None:
        super().__init__(path)
        self.service = TaskService(NAMESPACE, Publisher(""), Reaper(), lambda: None)
        self.service.containers.update({id: object() for id in ids})  # type: ignore[misc]
        self.checkpoints = CheckpointService(self.service, containerd_address=containerd)
        self.images: list[str] = []
        self.specs: list[checkpointing.CheckpointSpec] = []
        self.dumping = threading.Event()  # a checkpoint waits on `dumped`
        self.dumped: asyncio.Event | None = None

    def services(self) -> dict[str, dict[str, ttrpc.Handler]]:
        return {STASIS_SERVICE: self.checkpoints.handlers()}

    async def checkpoint(
        self, container: object, spec: checkpointing.CheckpointSpec, **_: Any
    ) -> checkpointing.CheckpointResult:
        """What shim.checkpoint.take.checkpoint does with the image."""
        self.specs.append(spec)
        if self.dumped is not None:
            self.dumping.set()
            await self.dumped.wait()
        later = spec.image_later
        image = await later() if later is not None else spec.image
        self.images.append(image)
        return checkpointing.CheckpointResult(f"file:///s/{image}", "n", 1, 1, 0.5, 0.25)

    def hold_dumps(self) -> None:
        """Checkpoints wait in their 'dump' until the connection or the test ends."""
        self.dumped = self.run(self._event())

    async def _event(self) -> asyncio.Event:
        return asyncio.Event()


def start_shim(monkeypatch: pytest.MonkeyPatch, group: str, containerd: Containerd,
               ids: tuple[str, ...] = (ID,)) -> Shim:  # fmt: skip
    s = Shim(names.socket_path(containerd.path, NAMESPACE, group), containerd.path, ids)
    monkeypatch.setattr(checkpointing, "checkpoint", s.checkpoint)
    s.start()
    return s


@pytest.fixture
def shim(containerd: Containerd, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shim]:
    """The shim of container ID, where the CLI's fast path looks for it."""
    s = start_shim(monkeypatch, ID, containerd)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)


def call(shim: Shim, req: pb.CheckpointRequest) -> pb.CheckpointResponse:
    with Client.connect(shim.path) as client:
        raw = client.call(
            STASIS_SERVICE,
            "Checkpoint",
            req.SerializeToString(),
            timeout=30,
            metadata={ttrpc.NAMESPACE_KEY: NAMESPACE},
        )
    return pb.CheckpointResponse.FromString(raw)


# -- runtime.rpc.containerd against a gRPC server ------------------------------------


def test_get_container(containerd: Containerd) -> None:
    containerd.add()
    info = ctrd.get_container(f"unix://{containerd.path}", NAMESPACE, ID)
    assert (info.id, info.image, info.runtime) == (ID, IMAGE, RUNTIME)
    assert info.spec["process"]["args"] == ["true"] and info.annotations == {}
    assert containerd.asked == [(NAMESPACE, ID)]
    with pytest.raises(NotFound, match=f"container 'gone' not found in namespace '{NAMESPACE}'"):
        ctrd.get_container(containerd.path, NAMESPACE, "gone")


def test_get_container_of_a_large_spec(containerd: Containerd) -> None:
    containerd.add(image="x" * 300_000)  # past HTTP/2's first flow-control window
    assert ctrd.get_container(containerd.path, NAMESPACE, ID).image == "x" * 300_000


def test_other_grpc_errors_keep_their_message(containerd: Containerd) -> None:
    containerd.records[ID] = grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(StasisError, match=f'Containers.Get {ID}: container "{ID}" in namespace'):
        ctrd.get_container(containerd.path, NAMESPACE, ID)


def test_no_answer_in_time_is_deadline_exceeded(containerd: Containerd) -> None:
    containerd.add()
    containerd.delay = 2
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        ctrd.get_container(containerd.path, NAMESPACE, ID, timeout=0.3)
    assert time.monotonic() - started < 1.5


def test_nothing_listening_is_unavailable(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "none.sock")
    with pytest.raises(Unavailable, match=f"cannot reach containerd at {path}: connect to"):
        ctrd.get_container(path, NAMESPACE, ID)


# -- the shim asks containerd while the checkpoint runs ------------------------------


def test_the_shim_records_the_image_containerd_names(shim: Shim, containerd: Containerd) -> None:
    containerd.add()
    resp = call(shim, pb.CheckpointRequest(id=ID))
    assert resp.ref == f"file:///s/{IMAGE}" and list(resp.warnings) == []
    assert shim.images == [IMAGE]
    assert containerd.asked == [(NAMESPACE, ID)]


def test_an_image_in_the_request_needs_no_lookup(shim: Shim, containerd: Containerd) -> None:
    call(shim, pb.CheckpointRequest(id=ID, image="registry.test/given:1"))
    assert shim.images == ["registry.test/given:1"] and containerd.asked == []


def test_a_container_containerd_does_not_know_fails_the_checkpoint(shim: Shim) -> None:
    with pytest.raises(RPCError) as err:
        call(shim, pb.CheckpointRequest(id=ID))
    why = f"container {ID!r} not found in namespace {NAMESPACE!r}"
    assert (err.value.code, err.value.message) == (Code.FAILED_PRECONDITION, why)
    assert shim.images == []  # nothing recorded: nothing published


def test_a_container_of_another_runtime_fails_the_checkpoint(
    shim: Shim, containerd: Containerd
) -> None:
    containerd.add(runtime="io.containerd.runc.v2")
    with pytest.raises(RPCError) as err:
        call(shim, pb.CheckpointRequest(id=ID))
    why = f"container {ID} runs on io.containerd.runc.v2, not {RUNTIME}"
    assert (err.value.code, err.value.message) == (Code.FAILED_PRECONDITION, why)


def test_an_exit_dump_is_kept_with_a_warning(
    shim: Shim, containerd: Containerd, caplog: pytest.LogCaptureFixture
) -> None:
    # The dump stopped the container: failing now would lose its state.
    containerd.add(runtime="/bin/shim")
    resp = call(shim, pb.CheckpointRequest(id=ID, exit=True))
    why = f"container {ID} runs on /bin/shim, not {RUNTIME}"
    assert list(resp.warnings) == [
        f"{why}; its shim checkpointed it all the same, as the dump had already stopped it"
    ]
    assert shim.images == [""]
    assert any(why in r.getMessage() for r in caplog.records)


def test_containerd_out_of_reach_records_the_annotations_image(
    socket_dir: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gone = os.path.join(socket_dir, "gone.sock")
    s = Shim(names.socket_path(gone, NAMESPACE, ID), gone)
    monkeypatch.setattr(checkpointing, "checkpoint", s.checkpoint)
    s.start()
    try:
        resp = call(s, pb.CheckpointRequest(id=ID))
    finally:
        s.stop()
    # "": shim.checkpoint.take records the image the annotations name instead.
    assert s.images == [""]
    [warning] = resp.warnings
    assert warning.startswith(f"the image of {ID} could not be looked up (cannot reach containerd")
    assert warning.endswith("; the checkpoint records the one its annotations name, if any")
    assert any(warning in r.getMessage() for r in caplog.records)


# -- the CLI ------------------------------------------------------------------------------


def args(containerd: Containerd, **kw: Any) -> argparse.Namespace:
    base = dict(address=containerd.path, namespace=NAMESPACE, container=ID, to="/tmp/store",
                name="", exit=True, tcp_established=False)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_cli_sends_to_the_containers_own_shim_which_asks_containerd(
    shim: Shim, containerd: Containerd
) -> None:
    containerd.add()
    out = cli.checkpoint(args(containerd))
    assert out == {"ref": f"file:///s/{IMAGE}", "name": "n", "size": 1, "criu_size": 1,
                   "seconds": 0.5, "frozen_seconds": 0.25}  # fmt: skip
    assert [s.image for s in shim.specs] == [""]  # the CLI did not look it up
    assert shim.images == [IMAGE] and containerd.asked == [(NAMESPACE, ID)]


def test_cli_without_a_shim_of_its_own_asks_containerd_first(
    containerd: Containerd, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pod's member: its sandbox's shim serves it, and nothing listens on its own socket.
    containerd.add(group="sandbox1")
    pod = start_shim(monkeypatch, "sandbox1", containerd)
    try:
        out = cli.checkpoint(args(containerd))
    finally:
        pod.stop()
    assert out["ref"] == f"file:///s/{IMAGE}"
    assert [s.image for s in pod.specs] == [IMAGE] and containerd.asked == [(NAMESPACE, ID)]


def test_cli_without_a_shim_for_a_container_containerd_does_not_know(
    containerd: Containerd,
) -> None:
    with pytest.raises(NotFound, match=f"container '{ID}' not found in namespace"):
        cli.checkpoint(args(containerd))


def test_cli_reaches_a_shim_that_does_not_serve_it(
    containerd: Containerd, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shim listens on the container's own socket but serves other containers
    # (a group named like it): the Checkpoint fails there, and goes to its group's.
    containerd.add(group="sandbox1")
    wrong = Shim(names.socket_path(containerd.path, NAMESPACE, ID), containerd.path, ("other",))
    wrong.start()
    right = start_shim(monkeypatch, "sandbox1", containerd)
    try:
        out = cli.checkpoint(args(containerd))
    finally:
        wrong.stop()
        right.stop()
    assert out["ref"] == f"file:///s/{IMAGE}" and right.images == [IMAGE]


def test_cli_prints_the_shims_warnings(
    shim: Shim, containerd: Containerd, capsys: pytest.CaptureFixture[str]
) -> None:
    containerd.add(runtime="/usr/bin/containerd-shim-stasis-v2")
    out = cli.checkpoint(args(containerd, exit=True))
    assert out["ref"] == "file:///s/" and shim.images == [""]
    why = f"container {ID} runs on /usr/bin/containerd-shim-stasis-v2, not {RUNTIME}"
    assert capsys.readouterr().err == (
        f"stasis: warning: {why}; its shim checkpointed it all the same, "
        "as the dump had already stopped it\n"
    )


def test_cli_failure_is_the_shims(
    shim: Shim, containerd: Containerd, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def stopped(*_: Any, **__: Any) -> checkpointing.CheckpointResult:
        raise FailedPrecondition(f"cannot checkpoint container {ID}: it is stopped")

    monkeypatch.setattr(checkpointing, "checkpoint", stopped)
    with pytest.raises(FailedPrecondition) as err:
        cli.checkpoint(args(containerd))
    assert str(err.value) == f"cannot checkpoint container {ID}: it is stopped"


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


def test_cli_shim_gone(shim: Shim, containerd: Containerd) -> None:
    containerd.add()
    shim.hold_dumps()
    t, out = in_thread(lambda: cli.checkpoint(args(containerd)))
    assert shim.dumping.wait(10)
    shim.close_server()  # as if the shim were killed
    t.join(10)
    assert isinstance(out[0], cli.ShimGone), out
    gone = f"checkpoint of {ID}: the shim ({shim.path}) closed the connection before answering"
    assert str(out[0]).startswith(f"{gone} (it exited or was killed)")


def test_cli_leaks_no_fds(shim: Shim, containerd: Containerd) -> None:
    containerd.add()
    server = shim.server
    assert server is not None
    cli.checkpoint(args(containerd))  # imports done

    def settled() -> bool:
        return server.connection_count == 0

    deadline = time.monotonic() + 10
    while not settled():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        cli.checkpoint(args(containerd))
    while not settled() or sorted(os.listdir("/proc/self/fd")) != before:
        if time.monotonic() > deadline + 10:
            break
        time.sleep(0.01)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_cli_names_agree_with_the_shims() -> None:
    assert cli.CHECKPOINTER == STASIS_SERVICE
