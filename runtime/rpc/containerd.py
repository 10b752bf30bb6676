"""A small client of containerd's gRPC API: a container's spec, runtime and image,
for the stasis CLI (which shim serves it) and the shim (what a checkpoint records).

One unary call per connection over containerd's unix socket: HTTP/2 by `h2`, the
messages by protobuf's generated code. Failures are Stasis errors: NotFound for a
container containerd does not know, Unavailable when it cannot be reached.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from protos.containerd.services.containers.v1 import containers_pb2
from runtime.errors import (
    Code,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    StasisError,
    Unavailable,
)

NAMESPACE_KEY = "containerd-namespace"
GET_CONTAINER = "/containerd.services.containers.v1.Containers/Get"
MAX_RESPONSE = 64 << 20  # bytes of an answer accepted


@dataclass(frozen=True)
class ContainerInfo:
    """What containerd records of a container."""

    id: str
    image: str
    runtime: str
    spec: dict[str, Any]

    @property
    def annotations(self) -> dict[str, str]:
        """The OCI spec's annotations."""
        return dict(self.spec.get("annotations") or {})


class CallError(Exception):
    """A gRPC call failed: ``code`` its status (UNAVAILABLE when the server could not
    be reached or the connection broke), ``message`` the server's text."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def get_container(address: str, namespace: str, id: str, timeout: float = 10.0) -> ContainerInfo:
    """Containers.Get of ``id`` in ``namespace`` through containerd's socket ``address``."""
    request = containers_pb2.GetContainerRequest(id=id).SerializeToString()
    try:
        raw = call(address, GET_CONTAINER, request, {NAMESPACE_KEY: namespace}, timeout)
    except CallError as e:
        if e.code == Code.NOT_FOUND:
            raise NotFound(f"container {id!r} not found in namespace {namespace!r}") from e
        if e.code == Code.UNAVAILABLE:
            raise Unavailable(f"cannot reach containerd at {address}: {e.message}") from e
        if e.code == Code.DEADLINE_EXCEEDED:
            raise DeadlineExceeded(f"containerd at {address}: {e.message}") from e
        raise StasisError(f"containerd Containers.Get {id}: {e.message}") from e
    try:
        c = containers_pb2.GetContainerResponse.FromString(raw).container
    except Exception as e:  # google.protobuf.message.DecodeError
        raise StasisError(f"containerd Containers.Get {id}: malformed answer: {e}") from e
    try:
        spec = json.loads(c.spec.value or b"{}")
    except ValueError as e:
        raise InvalidArgument(f"container {id}: spec is not JSON: {e}") from e
    return ContainerInfo(id=c.id, image=c.image, runtime=c.runtime.name, spec=spec)


def call(
    address: str,
    path: str,
    message: bytes,
    metadata: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> bytes:
    """Call ``path`` (``/package.Service/Method``) on the gRPC server at the unix
    socket ``address`` (``unix://`` optional) with the serialized ``message``;
    returns the serialized answer, or raises CallError."""
    sock_path = address.removeprefix("unix://")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(sock_path)
        except OSError as e:
            raise CallError(Code.UNAVAILABLE, f"connect to {sock_path}: {e.strerror or e}") from e
        try:
            headers, data = _exchange(sock, path, message, metadata or {}, deadline)
        except TimeoutError as e:
            raise CallError(Code.DEADLINE_EXCEEDED, "context deadline exceeded") from e
        except OSError as e:
            raise CallError(Code.UNAVAILABLE, f"connection to {sock_path}: {e}") from e
        except h2.exceptions.H2Error as e:
            raise CallError(Code.UNAVAILABLE, f"HTTP/2: {e}") from e
    return _result(headers, data)


def _exchange(
    sock: socket.socket, path: str, message: bytes, metadata: Mapping[str, str], deadline: float
) -> tuple[dict[str, str], bytes]:
    """Send the call on one stream; return the answer's headers (trailers included)
    and its body."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    millis = max(1, int((deadline - time.monotonic()) * 1000))
    conn.send_headers(
        stream,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", f"{min(millis, 10**8 - 1)}m"),
            *((k.lower(), v) for k, v in metadata.items()),
        ],
    )
    conn.send_data(stream, b"\0" + len(message).to_bytes(4, "big") + message, end_stream=True)
    sock.sendall(conn.data_to_send())
    headers: dict[str, str] = {}
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise CallError(Code.UNAVAILABLE, "the server closed the connection")
        for event in conn.receive_data(chunk):
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers.update((str(k), str(v)) for k, v in event.headers)
            elif isinstance(event, h2.events.DataReceived):
                data += event.data
                if len(data) > MAX_RESPONSE:
                    raise CallError(Code.RESOURCE_EXHAUSTED, "answer over 64 MiB")
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                raise CallError(Code.UNAVAILABLE, f"the stream was reset ({event.error_code!r})")
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise CallError(Code.UNAVAILABLE, "the server went away (GOAWAY)")
            elif isinstance(event, h2.events.StreamEnded):
                return headers, bytes(data)
        sock.sendall(conn.data_to_send())


def _result(headers: dict[str, str], data: bytes) -> bytes:
    """The answer's message, or its gRPC status as a CallError."""
    status = headers.get(":status", "")
    if status != "200":
        raise CallError(Code.UNAVAILABLE, f"HTTP status {status or 'missing'}")
    try:
        code = int(headers["grpc-status"])
    except (KeyError, ValueError):
        raise CallError(Code.UNAVAILABLE, "the call ended without a valid grpc-status") from None
    if code != Code.OK:
        raise CallError(code, urllib.parse.unquote(headers.get("grpc-message", "")))
    if len(data) < 5 or data[0] != 0:
        raise CallError(Code.UNAVAILABLE, "no uncompressed message in the answer")
    length = int.from_bytes(data[1:5], "big")
    if length != len(data) - 5:
        raise CallError(Code.UNAVAILABLE, f"answer of {len(data) - 5} bytes, {length} announced")
    return data[5:]
