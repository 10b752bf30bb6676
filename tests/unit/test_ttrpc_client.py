"""Tests for runtime.rpc.ttrpc_client, the blocking client, against the real asyncio
server of runtime.rpc.ttrpc_server (run on an event loop in a thread of its own)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from bed.loopserver import LoopServer

from runtime.errors import Code, NotFound
from runtime.rpc import ttrpc_client
from runtime.rpc import ttrpc_server as ttrpc
from runtime.rpc.ttrpc_client import Client, RPCError
from runtime.rpc.ttrpc_server import RequestContext

SERVICE = "test.v1.Sync"


class Server(LoopServer):
    """A runtime.rpc.ttrpc_server.Server serving SERVICE on a unix socket, from a
    background loop."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.contexts: list[RequestContext] = []
        self.blocked = threading.Event()
        self.cancelled = threading.Event()

    def services(self) -> dict[str, dict[str, ttrpc.Handler]]:
        return {SERVICE: self.methods()}

    def methods(self) -> dict[str, ttrpc.Handler]:
        async def echo(payload: bytes, ctx: RequestContext) -> bytes:
            self.contexts.append(ctx)
            return payload

        async def not_found(payload: bytes, ctx: RequestContext) -> bytes:
            raise NotFound("container 'abc' not found")

        async def rpc_error(payload: bytes, ctx: RequestContext) -> bytes:
            raise ttrpc.RPCError(Code.FAILED_PRECONDITION, "not now")

        async def block(payload: bytes, ctx: RequestContext) -> bytes:
            self.blocked.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return b""

        async def big(payload: bytes, ctx: RequestContext) -> bytes:
            return b"x" * int(payload)

        return {"Echo": echo, "NotFound": not_found, "RPCError": rpc_error,
                "Block": block, "Big": big}  # fmt: skip


@pytest.fixture
def server(sock_path: str) -> Iterator[Server]:
    s = Server(sock_path)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_ok_answer_with_metadata_and_timeout(server: Server) -> None:
    sent: list[bool] = []
    with Client.connect(server.path) as client:
        out = client.call(SERVICE, "Echo", b"hello", timeout=7,
                          metadata={ttrpc.NAMESPACE_KEY: "ns1"},
                          on_sent=lambda: sent.append(True))  # fmt: skip
        assert out == b"hello"
        # Calls go one after the other on one connection, on odd increasing ids.
        assert client.call(SERVICE, "Echo", b"") == b""
    assert sent == [True]
    first, second = server.contexts
    assert first.namespace == "ns1" and first.timeout == pytest.approx(7)
    assert second.timeout is None and second.namespace is None


def test_exact_request_frames(sock_path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen()
    from protos.ttrpc import request_pb2, status_pb2

    def answer() -> tuple[bytes, bytes]:
        conn, _ = listener.accept()
        with conn:
            head = conn.recv(10, socket.MSG_WAITALL)
            length, stream, _type, _flags = struct.unpack(">IIBB", head)
            body = conn.recv(length, socket.MSG_WAITALL)
            response = request_pb2.Response(
                status=status_pb2.Status(code=0), payload=b"pong"
            ).SerializeToString()
            # A data frame and an answer to another stream come first: skipped.
            conn.sendall(struct.pack(">IIBB", 3, stream, 3, 0) + b"abc")
            conn.sendall(struct.pack(">IIBB", len(response), stream + 2, 2, 0) + response)
            conn.sendall(struct.pack(">IIBB", len(response), stream, 2, 0) + response)
            return head, body

    result: list[tuple[bytes, bytes]] = []
    t = threading.Thread(target=lambda: result.append(answer()))
    t.start()
    try:
        with Client.connect(f"unix://{sock_path}") as client:
            assert client.call("s.v1.S", "M", b"ping") == b"pong"
    finally:
        t.join(5)
        listener.close()
    head, body = result[0]
    assert struct.unpack(">IIBB", head)[1:] == (1, 1, 0)
    request = request_pb2.Request.FromString(body)
    assert (request.service, request.method, request.payload) == ("s.v1.S", "M", b"ping")
    assert request.timeout_nano == 0


@pytest.mark.parametrize(
    ("method", "code", "message"),
    [
        ("NotFound", Code.NOT_FOUND, "container 'abc' not found"),
        ("RPCError", Code.FAILED_PRECONDITION, "not now"),
        ("Nope", Code.UNIMPLEMENTED, "method Nope: unimplemented"),
    ],
)
def test_error_status_maps_to_rpc_error(
    server: Server, method: str, code: Code, message: str
) -> None:
    with Client.connect(server.path) as client:
        with pytest.raises(RPCError) as err:
            client.call(SERVICE, method, b"")
        assert (err.value.code, err.value.message, err.value.closed) == (code, message, False)
        assert client.call(SERVICE, "Echo", b"still usable") == b"still usable"


def test_connection_closed_before_the_answer(server: Server) -> None:
    def close_when_blocked() -> None:
        assert server.blocked.wait(5)
        server.close_server()

    closer = threading.Thread(target=close_when_blocked)
    closer.start()
    try:
        with Client.connect(server.path) as client, pytest.raises(RPCError) as err:
            client.call(SERVICE, "Block", b"")
    finally:
        closer.join(5)
    assert err.value.closed
    assert (err.value.code, err.value.message) == (Code.UNAVAILABLE, ttrpc_client.CLOSED_MESSAGE)
    assert server.cancelled.is_set()


def test_timeout_is_deadline_exceeded(server: Server) -> None:
    started = time.monotonic()
    with Client.connect(server.path) as client:
        with pytest.raises(RPCError) as err:
            client.call(SERVICE, "Block", b"", timeout=0.2)
        assert err.value.code == Code.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        with pytest.raises(RPCError) as again:  # the late answer would be in the way
            client.call(SERVICE, "Echo", b"")
        assert again.value.closed


def test_oversized_response_is_resource_exhausted(server: Server) -> None:
    with Client.connect(server.path) as client:
        with pytest.raises(RPCError) as err:
            client.call(SERVICE, "Big", str(5 << 20).encode())
        # The server refuses to send more than 4 MiB, and says so on the stream.
        assert err.value.code == Code.RESOURCE_EXHAUSTED


def test_dial_errors_are_unavailable(sock_path: str) -> None:
    with pytest.raises(RPCError) as missing:
        Client.connect(sock_path)
    assert missing.value.code == Code.UNAVAILABLE and "dial" in missing.value.message
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()  # a socket file nobody listens on, as a killed shim leaves
    with pytest.raises(RPCError) as refused:
        Client.connect(sock_path)
    assert refused.value.code == Code.UNAVAILABLE and not refused.value.closed


def test_no_fd_leak(server: Server, sock_path: str) -> None:
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with Client.connect(server.path) as client:
            client.call(SERVICE, "Echo", b"x")
        with pytest.raises(RPCError):
            Client.connect(sock_path + ".missing")
    # The server (in this process too) closes its side once it sees ours closed.
    deadline = time.monotonic() + 5
    while sorted(os.listdir("/proc/self/fd")) != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_agrees_with_the_asyncio_module() -> None:
    # One error type and one wire module for both clients and the server.
    assert ttrpc_client.RPCError is ttrpc.RPCError
    assert ttrpc_client.MAX_MESSAGE_SIZE == ttrpc.MAX_MESSAGE_SIZE


def test_ttrpc_envelopes_match_protobufs() -> None:
    """The clients' Request and Response, as runtime.rpc.ttrpc_wire writes and reads them."""
    from protos.ttrpc import request_pb2, status_pb2
    from runtime.rpc.ttrpc_wire import decode_response, encode_request

    data = encode_request(
        "stasis.v1.Checkpointer", "Checkpoint", b"\x0a\x01x", 2.5, {"k": "v", "e": ""}, 1 << 20
    )
    assert request_pb2.Request.FromString(data) == request_pb2.Request(
        service="stasis.v1.Checkpointer",
        method="Checkpoint",
        payload=b"\x0a\x01x",
        timeout_nano=2_500_000_000,
        metadata=[request_pb2.KeyValue(key="k", value="v"), request_pb2.KeyValue(key="e")],
    )
    bare = encode_request("s", "m", b"", None, None, 1 << 20)
    assert bare == request_pb2.Request(service="s", method="m").SerializeToString()

    status = status_pb2.Status(code=5, message="container x: not found")
    status.details.add(type_url="t", value=b"d")
    raw = request_pb2.Response(status=status, payload=b"answer").SerializeToString()
    assert decode_response(raw) == (5, "container x: not found", b"answer")
    raw = request_pb2.Response(status=status_pb2.Status(code=-3)).SerializeToString()
    assert decode_response(raw) == (-3, "", b"")
    assert decode_response(b"") == (0, "", b"")
    with pytest.raises(ValueError):
        decode_response(b"\x12\x09short")
