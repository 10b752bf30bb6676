"""What both ttrpc clients and the server share, without asyncio.

The wire format (github.com/containerd/ttrpc): a 10-byte big-endian header
(uint32 payload length, uint32 stream id, uint8 message type, uint8 flags), then
a protobuf ``ttrpc.Request`` or ``ttrpc.Response``. :mod:`runtime.rpc.ttrpc_server` (asyncio
server and client) and :mod:`runtime.rpc.ttrpc_client` (the CLI's blocking client,
without asyncio) both build on this module.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from google.protobuf.message import DecodeError

from protos.ttrpc import request_pb2
from runtime.errors import Code

#: ttrpc's default limit on one frame's payload (channel.go messageLengthMax).
MAX_MESSAGE_SIZE = 4 << 20

#: Metadata key containerd uses for the namespace when calling a shim over ttrpc
#: (containerd pkg/namespaces/ttrpc.go, TTRPCHeader).
NAMESPACE_KEY = "containerd-namespace-ttrpc"

#: The gRPC spelling of the namespace key; accepted as a fallback.
GRPC_NAMESPACE_KEY = "containerd-namespace"

HEADER = struct.Struct(">IIBB")

TYPE_REQUEST = 0x1
TYPE_RESPONSE = 0x2
TYPE_DATA = 0x3

MAX_STREAM_ID = 0xFFFFFFFF

# Oversized frames are skipped in pieces of this size so that a peer declaring
# 4 GiB never makes us allocate it.
DISCARD_CHUNK = 64 << 10

# The texts a Go ttrpc peer produces for the same conditions (context errors,
# ErrClosed), so containerd's logs read the same with this shim.
DEADLINE_MESSAGE = "context deadline exceeded"
CANCELED_MESSAGE = "context canceled"
CLOSED_MESSAGE = "ttrpc: closed"


class RPCError(Exception):
    """A non-OK ttrpc status.

    Handlers raise it to answer with a specific code; the clients raise it for
    every non-OK response and for transport failures (``UNAVAILABLE`` when the
    connection is gone or could not be made, ``DEADLINE_EXCEEDED`` on timeout).
    """

    code: Code
    message: str

    def __init__(self, code: Code | int, message: str) -> None:
        try:
            resolved = Code(code)
        except ValueError:
            # A peer sent a code outside google.rpc.Code; keep the text and
            # treat it the way gRPC does with codes it does not know.
            resolved = Code.UNKNOWN
        super().__init__(resolved, message)
        self.code = resolved
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @property
    def closed(self) -> bool:
        """Whether the connection closed before the answer came."""
        return self.code == Code.UNAVAILABLE and self.message == CLOSED_MESSAGE


def oversized_message(length: int, limit: int) -> str:
    """Same text as ttrpc's OversizedMessageError / channel.recv."""
    return f"message length {length} exceed maximum message size of {limit}"


def encode_request(
    service: str,
    method: str,
    payload: bytes,
    timeout: float | None,
    metadata: Mapping[str, str] | None,
    max_message_size: int,
) -> bytes:
    """A serialized ``ttrpc.Request``; RPCError(RESOURCE_EXHAUSTED) when it is too big."""
    request = request_pb2.Request(service=service, method=method, payload=payload)
    if timeout is not None:
        request.timeout_nano = max(1, int(timeout * 1e9))
    for key, value in (metadata or {}).items():
        request.metadata.add(key=key, value=value)
    data = request.SerializeToString()
    if len(data) > max_message_size:
        raise RPCError(Code.RESOURCE_EXHAUSTED, oversized_message(len(data), max_message_size))
    return data


def decode_response(data: bytes) -> tuple[int, str, bytes]:
    """(status code, status message, payload) of a serialized ``ttrpc.Response``;
    ValueError when it is malformed."""
    try:
        response = request_pb2.Response.FromString(data)
    except DecodeError as e:
        raise ValueError(str(e)) from e
    return response.status.code, response.status.message, response.payload
