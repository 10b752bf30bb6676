"""Tests for runtime.rpc.ttrpc_server: wire format, server robustness and the client.

Most server tests talk to a real unix socket with hand-made frames so that the
bytes on the wire are what is checked, not just our own client's view of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.ttrpc import request_pb2, status_pb2
from runtime.errors import Code, NotFound
from runtime.rpc.ttrpc_server import (
    MAX_MESSAGE_SIZE,
    Client,
    RequestContext,
    RPCError,
    Server,
)

HEADER = struct.Struct(">IIBB")
SERVICE = "test.v1.Echo"
REQUEST, RESPONSE, DATA = 1, 2, 3


# --------------------------------------------------------------------------- helpers


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run one test body on a fresh loop, bounded so a hang fails fast."""

    async def guarded() -> None:
        # Debug mode catches never-awaited coroutines and such; its "slow
        # callback" warnings would only make the tests flaky on a busy host.
        asyncio.get_running_loop().slow_callback_duration = 10
        async with asyncio.timeout(5):
            await coro

    asyncio.run(guarded(), debug=True)
    # Surface "Task exception was never retrieved" and unclosed-transport
    # complaints while this test is still the one running.
    gc.collect()


@pytest.fixture(autouse=True)
def _no_asyncio_complaints(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    complaints = [
        r.getMessage()
        for r in caplog.get_records("call")
        if r.name == "asyncio" and r.levelno >= logging.WARNING
    ]
    assert complaints == []


class Harness:
    """Handlers of the test service plus what they observed."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.blocked = asyncio.Event()
        self.cancelled: list[str] = []
        self.contexts: list[RequestContext] = []
        self.server: Server | None = None
        self.background: set[asyncio.Task[None]] = set()

    async def echo(self, payload: bytes, ctx: RequestContext) -> bytes:
        self.contexts.append(ctx)
        return payload

    async def block(self, payload: bytes, ctx: RequestContext) -> bytes:
        self.blocked.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(ctx.method)
            raise
        return b"unblocked"

    async def unblock(self, payload: bytes, ctx: RequestContext) -> bytes:
        self.release.set()
        return b"released"

    async def sleep(self, payload: bytes, ctx: RequestContext) -> bytes:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.append(ctx.method)
            raise
        return b""

    async def namespace(self, payload: bytes, ctx: RequestContext) -> bytes:
        return (ctx.namespace or "<none>").encode()

    async def big(self, payload: bytes, ctx: RequestContext) -> bytes:
        return b"x" * int(payload)

    async def rpc_error(self, payload: bytes, ctx: RequestContext) -> bytes:
        raise RPCError(Code.FAILED_PRECONDITION, "not now")

    async def stasis_error(self, payload: bytes, ctx: RequestContext) -> bytes:
        raise NotFound("container abc not found")

    async def crash(self, payload: bytes, ctx: RequestContext) -> bytes:
        raise ValueError("boom")

    async def own_timeout(self, payload: bytes, ctx: RequestContext) -> bytes:
        async with asyncio.timeout(0):
            await asyncio.sleep(1)
        return b""

    async def leaks_cancel(self, payload: bytes, ctx: RequestContext) -> bytes:
        # As if an inner task it awaited was cancelled by someone else.
        raise asyncio.CancelledError

    async def not_bytes(self, payload: bytes, ctx: RequestContext) -> bytes:
        return "text"  # type: ignore[return-value]

    async def shutdown_now(self, payload: bytes, ctx: RequestContext) -> bytes:
        assert self.server is not None
        await self.server.close()
        return b"never sent"

    async def shutdown_after_reply(self, payload: bytes, ctx: RequestContext) -> bytes:
        assert self.server is not None
        task = asyncio.create_task(self.server.close())
        self.background.add(task)
        return b"bye"

    def methods(self) -> dict[str, Callable[[bytes, RequestContext], Any]]:
        return {
            "Echo": self.echo,
            "Block": self.block,
            "Unblock": self.unblock,
            "Sleep": self.sleep,
            "Namespace": self.namespace,
            "Big": self.big,
            "RPCError": self.rpc_error,
            "StasisError": self.stasis_error,
            "Crash": self.crash,
            "OwnTimeout": self.own_timeout,
            "NotBytes": self.not_bytes,
            "LeaksCancel": self.leaks_cancel,
            "ShutdownNow": self.shutdown_now,
            "ShutdownAfterReply": self.shutdown_after_reply,
        }


def listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    return sock


@contextlib.asynccontextmanager
async def serving(
    path: str, harness: Harness, *, max_message_size: int = MAX_MESSAGE_SIZE, **options: Any
) -> AsyncIterator[Server]:
    server = Server(max_message_size=max_message_size, **options)
    server.register(SERVICE, harness.methods())
    serve_task = asyncio.create_task(server.serve(listen(path)))
    await asyncio.sleep(0)  # Let serve() start listening.
    try:
        yield server
    finally:
        await server.close()
        await serve_task


async def eventually(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(2):
        while not predicate():
            await asyncio.sleep(0.005)


def request_bytes(
    method: str,
    payload: bytes = b"",
    *,
    service: str = SERVICE,
    timeout_nano: int = 0,
    metadata: Iterable[tuple[str, str]] = (),
) -> bytes:
    request = request_pb2.Request(
        service=service, method=method, payload=payload, timeout_nano=timeout_nano
    )
    request.metadata.extend(request_pb2.KeyValue(key=k, value=v) for k, v in metadata)
    return bytes(request.SerializeToString())


class Raw:
    """A hand-driven ttrpc peer: writes exact frames, reads exact frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: str) -> Raw:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(
        self, stream_id: int, payload: bytes, *, mtype: int = REQUEST, flags: int = 0
    ) -> None:
        await self.send(HEADER.pack(len(payload), stream_id, mtype, flags) + payload)

    async def request(self, stream_id: int, method: str, payload: bytes = b"", **kw: Any) -> None:
        await self.frame(stream_id, request_bytes(method, payload, **kw))

    async def read_frame(self) -> tuple[bytes, bytes]:
        header = await self.reader.readexactly(HEADER.size)
        length = HEADER.unpack(header)[0]
        return header, await self.reader.readexactly(length)

    async def response(self) -> tuple[int, request_pb2.Response]:
        header, payload = await self.read_frame()
        _length, stream_id, mtype, flags = HEADER.unpack(header)
        assert (mtype, flags) == (RESPONSE, 0)
        return stream_id, request_pb2.Response.FromString(payload)

    async def expect_closed(self) -> None:
        assert await self.reader.read() == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def assert_echo_works(raw: Raw, stream_id: int) -> None:
    await raw.request(stream_id, "Echo", b"still alive")
    got_id, response = await raw.response()
    assert got_id == stream_id
    assert response.status.code == Code.OK
    assert response.payload == b"still alive"


# --------------------------------------------------------------------------- wire format


def test_request_response_exact_bytes(sock_path: str) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness()):
            raw = await Raw.open(sock_path)
            # Request{service="test.v1.Echo", method="Echo", payload="hi"}, by hand.
            payload = b"\x0a\x0ctest.v1.Echo" + b"\x12\x04Echo" + b"\x1a\x02hi"
            assert payload == request_bytes("Echo", b"hi")
            await raw.send(b"\x00\x00\x00\x18" + b"\x00\x00\x00\x01" + b"\x01\x00" + payload)
            header, body = await raw.read_frame()
            # length 6, stream 1, type response, no flags.
            assert header == b"\x00\x00\x00\x06\x00\x00\x00\x01\x02\x00"
            # Response{status={} (present, code OK), payload="hi"}.
            assert body == b"\x0a\x00\x12\x02hi"
            await raw.close()

    run(body())


def test_client_writes_exact_frames_with_odd_increasing_ids(sock_path: str) -> None:
    frames: list[tuple[tuple[int, int, int, int], request_pb2.Request]] = []

    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):
            header = await reader.readexactly(HEADER.size)
            fields = HEADER.unpack(header)
            frames.append(
                (fields, request_pb2.Request.FromString(await reader.readexactly(fields[0])))
            )
        # Answer out of order: the client must match answers by stream id.
        for stream_id in (5, 1, 3):
            response = request_pb2.Response(
                status=status_pb2.Status(code=0), payload=b"r%d" % stream_id
            ).SerializeToString()
            writer.write(HEADER.pack(len(response), stream_id, RESPONSE, 0) + response)
        await writer.drain()
        await reader.read()  # Until the client closes.
        writer.close()
        await writer.wait_closed()

    async def body() -> None:
        fake = await asyncio.start_unix_server(fake_server, sock_path)
        client = await Client.connect("unix://" + sock_path)
        results = await asyncio.gather(
            client.call("svc.A", "M1", b"one"),
            client.call("svc.A", "M2", b"two", timeout=1.5),
            client.call("svc.B", "M3", b"", metadata={"containerd-namespace-ttrpc": "k8s.io"}),
        )
        assert list(results) == [b"r1", b"r3", b"r5"]
        await client.close()
        fake.close()
        await fake.wait_closed()

    run(body())
    assert [fields for fields, _ in frames] == [
        (len(req.SerializeToString()), stream_id, REQUEST, 0)
        for stream_id, (_, req) in zip((1, 3, 5), frames, strict=True)
    ]
    first, second, third = (req for _, req in frames)
    assert (first.service, first.method, first.payload, first.timeout_nano) == (
        "svc.A",
        "M1",
        b"one",
        0,
    )
    assert second.timeout_nano == 1_500_000_000
    assert [(kv.key, kv.value) for kv in third.metadata] == [
        ("containerd-namespace-ttrpc", "k8s.io")
    ]


# --------------------------------------------------------------------------- concurrency


def test_concurrent_requests_first_blocks_until_a_later_one_completes(sock_path: str) -> None:
    async def body() -> None:
        harness = Harness()
        async with serving(sock_path, harness):
            raw = await Raw.open(sock_path)
            await raw.request(1, "Block")
            await raw.request(3, "Echo", b"three")
            await raw.request(5, "Unblock")
            order = [(await raw.response()) for _ in range(3)]
            ids = [stream_id for stream_id, _ in order]
            assert sorted(ids[:2]) == [3, 5]
            assert ids[2] == 1
            payloads = {stream_id: r.payload for stream_id, r in order}
            assert payloads == {1: b"unblocked", 3: b"three", 5: b"released"}
            await raw.close()

    run(body())


def test_client_concurrent_calls_do_not_block_each_other(sock_path: str) -> None:
    async def body() -> None:
        harness = Harness()
        async with serving(sock_path, harness):
            client = await Client.connect(sock_path)
            blocked = asyncio.create_task(client.call(SERVICE, "Block", b""))
            await harness.blocked.wait()
            assert await client.call(SERVICE, "Echo", b"x") == b"x"
            assert not blocked.done()
            assert await client.call(SERVICE, "Unblock", b"") == b"released"
            assert await blocked == b"unblocked"
            await client.close()

    run(body())


def test_many_clients_at_once(sock_path: str) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness()) as server:
            clients = await asyncio.gather(*(Client.connect(sock_path) for _ in range(20)))
            await eventually(lambda: server.connection_count == 20)
            calls = [
                client.call(SERVICE, "Echo", b"%d-%d" % (c, n))
                for c, client in enumerate(clients)
                for n in range(5)
            ]
            results = await asyncio.gather(*calls)
            assert results == [b"%d-%d" % (c, n) for c in range(20) for n in range(5)]
            await asyncio.gather(*(client.close() for client in clients))
            await eventually(lambda: server.connection_count == 0)

    run(body())


# --------------------------------------------------------------------------- size limits


def test_oversized_frame_is_discarded_and_answered(sock_path: str) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness()):
            raw = await Raw.open(sock_path)
            length = MAX_MESSAGE_SIZE + 1
            # 0x01 filler: had the server misjudged the skip, the next header
            # would parse as garbage and the connection would close.
            await raw.send(HEADER.pack(length, 1, REQUEST, 0) + b"\x01" * length)
            stream_id, response = await raw.response()
            assert stream_id == 1
            assert response.status.code == Code.RESOURCE_EXHAUSTED
            assert response.status.message == (
                "message length 4194305 exceed maximum message size of 4194304"
            )
            await assert_echo_works(raw, 3)
            await raw.close()

    run(body())


def test_oversized_data_frame_is_skipped_silently(sock_path: str) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness(), max_message_size=1024):
            raw = await Raw.open(sock_path)
            await raw.send(HEADER.pack(2000, 1, DATA, 0) + b"\x01" * 2000)
            await assert_echo_works(raw, 3)
            await raw.close()

    run(body())


def test_handler_response_too_large_is_resource_exhausted(sock_path: str) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness(), max_message_size=1024):
            client = await Client.connect(sock_path)
            with pytest.raises(RPCError) as err:
                await client.call(SERVICE, "Big", b"2000")
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            assert "exceed maximum message size of 1024" in err.value.message
            assert await client.call(SERVICE, "Big", b"10") == b"x" * 10
            await client.close()

    run(body())


def test_client_rejects_oversized_response_and_keeps_working(sock_path: str) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness()):
            client = await Client.connect(sock_path, max_message_size=1024)
            with pytest.raises(RPCError) as err:
                await client.call(SERVICE, "Big", b"5000")
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            assert "exceed maximum message size of 1024" in err.value.message
            assert await client.call(SERVICE, "Echo", b"ok") == b"ok"
            await client.close()

    run(body())


def test_client_refuses_to_send_oversized_request(sock_path: str) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness()):
            client = await Client.connect(sock_path, max_message_size=1024)
            with pytest.raises(RPCError) as err:
                await client.call(SERVICE, "Echo", b"y" * 2000)
            assert err.value.code == Code.RESOURCE_EXHAUSTED
            assert await client.call(SERVICE, "Echo", b"ok") == b"ok"
            await client.close()

    run(body())


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x00\x00\x00", id="truncated-header"),
        pytest.param(HEADER.pack(100, 1, REQUEST, 0) + b"0123456789", id="truncated-payload"),
    ],
)
def test_truncated_frame_closes_only_that_connection(sock_path: str, data: bytes) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness()) as server:
            other = await Raw.open(sock_path)
            raw = await Raw.open(sock_path)
            await eventually(lambda: server.connection_count == 2)
            await raw.send(data)
            raw.writer.write_eof()
            await raw.expect_closed()
            await eventually(lambda: server.connection_count == 1)
            await assert_echo_works(other, 1)
            await raw.close()
            await other.close()

    run(body())


@pytest.mark.parametrize(
    ("stream_id", "mtype"),
    [
        pytest.param(1, 0, id="type-0"),
        pytest.param(1, 9, id="type-9"),
        pytest.param(1, RESPONSE, id="response-from-client"),
        pytest.param(2, REQUEST, id="even-stream-id"),
        pytest.param(0, REQUEST, id="stream-id-0"),
    ],
)
def test_malformed_header_closes_only_that_connection(
    sock_path: str, stream_id: int, mtype: int
) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness()) as server:
            other = await Raw.open(sock_path)
            raw = await Raw.open(sock_path)
            await raw.frame(stream_id, request_bytes("Echo", b"x"), mtype=mtype)
            await raw.expect_closed()
            await eventually(lambda: server.connection_count == 1)
            await assert_echo_works(other, 1)
            # New connections are accepted as before.
            fresh = await Raw.open(sock_path)
            await assert_echo_works(fresh, 1)
            for peer in (raw, other, fresh):
                await peer.close()

    run(body())


def test_garbage_request_payload_is_answered_on_its_stream(sock_path: str) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness()):
            raw = await Raw.open(sock_path)
            # Field 1 claims 127 bytes that are not there.
            await raw.frame(1, b"\x0a\x7f\x00")
            stream_id, response = await raw.response()
            assert stream_id == 1
            assert response.status.code == Code.INVALID_ARGUMENT
            assert response.status.message.startswith("unmarshal request error")
            await assert_echo_works(raw, 3)
            await raw.close()

    run(body())


def test_reused_stream_id_is_rejected(sock_path: str) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness()):
            raw = await Raw.open(sock_path)
            await assert_echo_works(raw, 5)
            await raw.request(3, "Echo", b"x")
            stream_id, response = await raw.response()
            assert stream_id == 3
            assert response.status.code == Code.INVALID_ARGUMENT
            await assert_echo_works(raw, 7)
            await raw.close()

    run(body())


def test_data_frames_for_unknown_streams_are_ignored(sock_path: str) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness()):
            raw = await Raw.open(sock_path)
            await raw.frame(9, b"payload", mtype=DATA, flags=0x1)
            await raw.frame(11, b"", mtype=DATA, flags=0x4)
            await assert_echo_works(raw, 1)
            await raw.close()

    run(body())


# --------------------------------------------------------------------------- statuses


def test_unknown_service_and_method_are_unimplemented(sock_path: str) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness()):
            client = await Client.connect(sock_path)
            with pytest.raises(RPCError) as err:
                await client.call("no.such.Service", "Echo", b"")
            assert (err.value.code, err.value.message) == (
                Code.UNIMPLEMENTED,
                "service no.such.Service: unimplemented",
            )
            with pytest.raises(RPCError) as err:
                await client.call(SERVICE, "Nope", b"")
            assert (err.value.code, err.value.message) == (
                Code.UNIMPLEMENTED,
                "method Nope: unimplemented",
            )
            await client.close()

    run(body())


def test_timeout_nano_cancels_handler_with_deadline_exceeded(sock_path: str) -> None:
    async def body() -> None:
        harness = Harness()
        async with serving(sock_path, harness):
            raw = await Raw.open(sock_path)
            await raw.request(1, "Sleep", timeout_nano=50_000_000)
            stream_id, response = await raw.response()
            assert stream_id == 1
            assert response.status.code == Code.DEADLINE_EXCEEDED
            assert response.status.message == "context deadline exceeded"
            assert harness.cancelled == ["Sleep"]
            await raw.close()

    run(body())


def test_client_timeout_is_deadline_exceeded(sock_path: str) -> None:
    async def body() -> None:
        harness = Harness()
        async with serving(sock_path, harness):
            client = await Client.connect(sock_path)
            with pytest.raises(RPCError) as err:
                await client.call(SERVICE, "Sleep", b"", timeout=0.05)
            assert err.value.code == Code.DEADLINE_EXCEEDED
            await eventually(lambda: harness.cancelled == ["Sleep"])
            # The late answer (if any) must not disturb the next call.
            assert await client.call(SERVICE, "Echo", b"next", timeout=1) == b"next"
            await client.close()

    run(body())


def test_handler_errors_map_to_statuses(sock_path: str, caplog: pytest.LogCaptureFixture) -> None:
    outcomes: dict[str, tuple[Code, str]] = {}

    async def body() -> None:
        async with serving(sock_path, Harness()):
            client = await Client.connect(sock_path)
            for method in (
                "RPCError",
                "StasisError",
                "Crash",
                "OwnTimeout",
                "NotBytes",
                "LeaksCancel",
            ):
                with pytest.raises(RPCError) as err:
                    await client.call(SERVICE, method, b"")
                outcomes[method] = (err.value.code, err.value.message)
            await client.close()

    run(body())
    assert outcomes["RPCError"] == (Code.FAILED_PRECONDITION, "not now")
    assert outcomes["StasisError"] == (Code.NOT_FOUND, "container abc not found")
    assert outcomes["Crash"] == (Code.UNKNOWN, "boom")
    # A TimeoutError of the handler's own is not the caller's deadline.
    assert outcomes["OwnTimeout"][0] == Code.UNKNOWN
    assert outcomes["NotBytes"][0] == Code.INTERNAL
    # The caller still gets an answer rather than waiting forever.
    assert outcomes["LeaksCancel"] == (Code.CANCELLED, "context canceled")
    crash_logs = [
        r for r in caplog.records if r.name == "stasis.ttrpc" and "Crash" in r.getMessage()
    ]
    assert crash_logs and crash_logs[0].exc_info is not None


def test_metadata_reaches_the_handler(sock_path: str) -> None:
    async def body() -> None:
        harness = Harness()
        async with serving(sock_path, harness):
            client = await Client.connect(sock_path)
            ns = {"containerd-namespace-ttrpc": "k8s.io"}
            assert await client.call(SERVICE, "Namespace", b"", metadata=ns) == b"k8s.io"
            grpc_ns = {"containerd-namespace": "moby"}
            assert await client.call(SERVICE, "Namespace", b"", metadata=grpc_ns) == b"moby"
            assert await client.call(SERVICE, "Namespace", b"") == b"<none>"
            await client.close()

            raw = await Raw.open(sock_path)
            pairs = [("containerd-namespace-ttrpc", "default"), ("k", "1"), ("k", "2")]
            await raw.request(1, "Echo", metadata=pairs, timeout_nano=2_000_000_000)
            await raw.response()
            ctx = harness.contexts[-1]
            assert ctx.metadata == {"containerd-namespace-ttrpc": ["default"], "k": ["1", "2"]}
            assert (ctx.service, ctx.method, ctx.namespace, ctx.timeout) == (
                SERVICE,
                "Echo",
                "default",
                2.0,
            )
            await raw.close()

    run(body())


def test_request_context_namespace() -> None:
    assert RequestContext("s", "m", {}).namespace is None
    assert RequestContext("s", "m", {"containerd-namespace-ttrpc": []}).namespace is None
    both = {"containerd-namespace": ["grpc"], "containerd-namespace-ttrpc": ["ttrpc"]}
    assert RequestContext("s", "m", both).namespace == "ttrpc"


def test_rpc_error() -> None:
    err = RPCError(5, "gone")
    assert err.code is Code.NOT_FOUND
    assert err.message == "gone"
    assert str(err) == "NOT_FOUND: gone"
    assert RPCError(99, "odd").code is Code.UNKNOWN


# --------------------------------------------------------------------------- lifecycle


def test_server_close_cancels_handlers_and_clients_see_unavailable(sock_path: str) -> None:
    async def body() -> None:
        harness = Harness()
        server = Server()
        server.register(SERVICE, harness.methods())
        serve_task = asyncio.create_task(server.serve(listen(sock_path)))
        client = await Client.connect(sock_path)
        pending = asyncio.create_task(client.call(SERVICE, "Block", b""))
        await harness.blocked.wait()

        await server.close()
        await serve_task  # serve() returns once the server is closed.
        assert harness.cancelled == ["Block"]
        assert server.connection_count == 0

        with pytest.raises(RPCError) as err:
            await pending
        assert err.value.code == Code.UNAVAILABLE
        with pytest.raises(RPCError) as err:
            await client.call(SERVICE, "Echo", b"")
        assert err.value.code == Code.UNAVAILABLE
        assert client.closed
        await client.close()

        with pytest.raises(RPCError) as err:
            await Client.connect(sock_path, timeout=1)
        assert err.value.code == Code.UNAVAILABLE
        await server.close()  # Idempotent.

    run(body())


@pytest.mark.parametrize("method", ["ShutdownNow", "ShutdownAfterReply"])
def test_close_from_inside_a_handler(sock_path: str, method: str) -> None:
    async def body() -> None:
        harness = Harness()
        server = harness.server = Server()
        server.register(SERVICE, harness.methods())
        serve_task = asyncio.create_task(server.serve(listen(sock_path)))
        client = await Client.connect(sock_path)
        other = await Client.connect(sock_path)
        pending = asyncio.create_task(other.call(SERVICE, "Block", b""))
        await harness.blocked.wait()
        if method == "ShutdownNow":
            # The handler is cancelled by the close it started: no answer.
            with pytest.raises(RPCError) as err:
                await client.call(SERVICE, method, b"")
            assert err.value.code == Code.UNAVAILABLE
        else:
            assert await client.call(SERVICE, method, b"") == b"bye"
        await serve_task  # The close finished: serve() returned.
        assert server.connection_count == 0
        assert harness.cancelled == ["Block"]
        with pytest.raises(RPCError):
            await pending
        await asyncio.gather(*harness.background)
        await client.close()
        await other.close()

    run(body())


def test_serve_after_close_returns_and_closes_socket(sock_path: str) -> None:
    async def body() -> None:
        server = Server()
        await server.close()
        sock = listen(sock_path)
        await server.serve(sock)
        assert sock.fileno() == -1

    run(body())


def test_close_in_the_same_loop_turn_as_an_accept_closes_that_connection() -> None:
    """The server's close runs in the loop turn where a connection was accepted,
    before the connection's task took its first step: cancelled then, that task
    never runs its own teardown; the socket is closed all the same."""

    async def body() -> None:
        server = Server()
        ours, peer = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        closing = asyncio.create_task(server._close())  # queued first ...
        server._on_connection(reader, writer)  # ... then the accepted connection's task
        assert server.connection_count == 1
        await closing
        assert writer.transport.is_closing()
        assert server.connection_count == 0
        await asyncio.sleep(0)  # the transport's connection_lost closes the socket
        assert ours.fileno() == -1
        peer.setblocking(False)
        assert peer.recv(1) == b""  # the peer sees the end
        peer.close()

    run(body())


def test_client_disconnecting_mid_request_cancels_its_handler(sock_path: str) -> None:
    async def body() -> None:
        harness = Harness()
        async with serving(sock_path, harness) as server:
            raw = await Raw.open(sock_path)
            await raw.request(1, "Block")
            await harness.blocked.wait()
            await raw.close()
            await eventually(lambda: harness.cancelled == ["Block"])
            await eventually(lambda: server.connection_count == 0)
            client = await Client.connect(sock_path)
            assert await client.call(SERVICE, "Echo", b"after") == b"after"
            await client.close()

    run(body())


def test_client_close_fails_pending_calls(sock_path: str) -> None:
    async def body() -> None:
        harness = Harness()
        async with serving(sock_path, harness) as server:
            client = await Client.connect(sock_path)
            pending = asyncio.create_task(client.call(SERVICE, "Block", b""))
            await harness.blocked.wait()
            await client.close()
            with pytest.raises(RPCError) as err:
                await pending
            assert err.value.code == Code.UNAVAILABLE
            await eventually(lambda: harness.cancelled == ["Block"])
            await eventually(lambda: server.connection_count == 0)

    run(body())


def test_connect_errors_are_unavailable(sock_path: str) -> None:
    async def body() -> None:
        with pytest.raises(RPCError) as err:
            await Client.connect(sock_path)
        assert err.value.code == Code.UNAVAILABLE
        with pytest.raises(RPCError):
            await Client.connect("unix://" + sock_path)

    run(body())


def test_register_rejects_duplicate_service() -> None:
    server = Server()
    server.register(SERVICE, {})
    with pytest.raises(ValueError, match="duplicate service"):
        server.register(SERVICE, {})


def test_no_fd_leak_over_server_and_client_lifecycle(sock_path: str) -> None:
    def open_fds() -> int:
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    async def body() -> None:
        harness = Harness()
        async with serving(sock_path, harness) as server:
            clients = [await Client.connect(sock_path) for _ in range(5)]
            await asyncio.gather(*(c.call(SERVICE, "Echo", b"x") for c in clients))
            blocked = asyncio.create_task(clients[0].call(SERVICE, "Block", b""))
            await harness.blocked.wait()
            raw = await Raw.open(sock_path)
            await raw.frame(2, b"")  # Makes the server drop this connection.
            await raw.expect_closed()
            await raw.close()
            await clients[1].close()
            await eventually(lambda: server.connection_count == 4)
        with pytest.raises(RPCError):
            await blocked
        for client in clients:
            await client.close()

    before = open_fds()
    run(body())
    assert open_fds() == before


# --------------------------------------------------------------------------- fuzzing

_frames = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 64), st.integers(0, 2 * MAX_MESSAGE_SIZE)),  # claimed length
        st.integers(0, 2**32 - 1),  # stream id
        st.integers(0, 255),  # type
        st.integers(0, 255),  # flags
        st.one_of(
            st.binary(max_size=64),
            st.builds(
                lambda m, p: request_bytes(m, p),
                st.sampled_from(["Echo", "Nope"]),
                st.binary(max_size=32),
            ),
        ),
    ),
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=_frames, cut=st.integers(0, 4096))
def test_fuzzed_frames_never_stop_the_server_serving_others(
    frames: list[tuple[int, int, int, int, bytes]], cut: int
) -> None:
    """Whatever a client sends (headers lying about lengths, unknown types and
    streams, garbage payloads, truncated at any byte), the server answers or
    drops that connection, and another client is served all along."""
    data = b"".join(HEADER.pack(n, sid, t, f) + p for n, sid, t, f, p in frames)
    data = data[: max(cut, 1)] if cut < len(data) else data
    directory = tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp")
    path = os.path.join(directory, "s.sock")

    async def body() -> None:
        async with serving(path, Harness()):
            other = await Raw.open(path)
            raw = await Raw.open(path)
            with contextlib.suppress(ConnectionError):
                await raw.send(data)
                raw.writer.write_eof()
            # The server reads to our EOF and then closes: nothing may hang.
            with contextlib.suppress(ConnectionError):
                while await raw.reader.read(65536):
                    pass
            await assert_echo_works(other, 1)
            await raw.close()
            await other.close()

    try:
        run(body())
    finally:
        shutil.rmtree(directory)


# --------------------------------------------------------------------------- connection limits


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "stasis.ttrpc" and r.levelno == logging.WARNING and text in r.getMessage()
    ]


def test_connections_beyond_the_cap_are_closed_and_complained_about_once(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness(), max_connections=2) as server:
            first, second = await Raw.open(sock_path), await Raw.open(sock_path)
            await eventually(lambda: server.connection_count == 2)
            extra = [await Raw.open(sock_path) for _ in range(20)]
            for raw in extra:
                await raw.expect_closed()
                await raw.close()
            assert server.connection_count == 2
            await assert_echo_works(first, 1)
            await second.close()
            await eventually(lambda: server.connection_count == 1)
            third = await Raw.open(sock_path)  # a slot is free again
            await assert_echo_works(third, 1)
            await first.close()
            await third.close()
        assert len(warnings_of(caplog, "refusing new ones")) == 1

    run(body())


def test_a_connection_that_sends_no_request_is_dropped(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with serving(sock_path, Harness(), first_request_timeout=0.2) as server:
            silent = [await Raw.open(sock_path) for _ in range(5)]
            partial = await Raw.open(sock_path)
            await partial.send(b"\x00\x00")  # the start of a header, and no more
            for raw in [*silent, partial]:
                await raw.expect_closed()
                await raw.close()
            await eventually(lambda: server.connection_count == 0)
        assert len(warnings_of(caplog, "no request within 0.2 s")) == 1

    run(body())


def test_a_connection_idle_after_its_first_request_is_kept(sock_path: str) -> None:
    """containerd's one connection to the shim is idle for hours between calls."""

    async def body() -> None:
        async with serving(
            sock_path, Harness(), first_request_timeout=0.1, frame_timeout=0.1
        ) as server:
            raw = await Raw.open(sock_path)
            await assert_echo_works(raw, 1)
            await asyncio.sleep(0.5)
            assert server.connection_count == 1
            await assert_echo_works(raw, 3)
            # but a frame, once begun, must be finished in time
            await raw.send(HEADER.pack(10, 5, REQUEST, 0)[:4])
            await raw.expect_closed()
            await raw.close()

    run(body())


def test_accept_backs_off_when_out_of_descriptors(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        real = loop.sock_accept
        attempts = 0
        failing = True

        async def accept(sock: socket.socket) -> tuple[socket.socket, Any]:
            nonlocal attempts
            if failing:
                attempts += 1
                await asyncio.sleep(0)
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return await real(sock)

        loop.sock_accept = accept  # type: ignore[method-assign]
        async with serving(sock_path, Harness()):
            await asyncio.sleep(1.0)
            assert 3 <= attempts <= 12, attempts  # backing off, not spinning
            failing = False
            raw = await Raw.open(sock_path)
            await assert_echo_works(raw, 1)  # it recovers once descriptors are back
            await raw.close()
        assert len(warnings_of(caplog, "Too many open files")) == 1

    run(body())
