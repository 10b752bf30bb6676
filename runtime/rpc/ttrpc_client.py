"""A blocking ttrpc client for unary calls over a unix socket, without asyncio.

It speaks the wire format of :mod:`runtime.rpc.ttrpc_server` (10-byte big-endian
header: uint32 payload length, uint32 stream id, uint8 message type, uint8 flags;
then a protobuf ``ttrpc.Request`` or ``ttrpc.Response``) over a plain socket, for
callers that are not event loops (the stasis CLI). One call at a time per
connection; a thread that needs a call of its own opens its own connection.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Mapping

from runtime.errors import Code
from runtime.rpc.ttrpc_wire import (
    CLOSED_MESSAGE,
    DEADLINE_MESSAGE,
    DISCARD_CHUNK,
    HEADER,
    MAX_MESSAGE_SIZE,
    MAX_STREAM_ID,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    RPCError,
    decode_response,
    encode_request,
    oversized_message,
)

__all__ = ["CLOSED_MESSAGE", "MAX_MESSAGE_SIZE", "Client", "RPCError"]


class _Deadline(Exception):
    """The call's timeout ran out while waiting for the answer."""


class Client:
    """One connection to a ttrpc server; :meth:`call` blocks until the answer."""

    def __init__(self, sock: socket.socket, *, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        """Wrap a connected unix stream socket; most callers want :meth:`connect`."""
        self._sock = sock
        self._max_message_size = max_message_size
        self._next_stream_id = 1
        self._broken = False

    @classmethod
    def connect(cls, path: str, *, timeout: float | None = 5.0) -> Client:
        """Connect to ``path`` (``unix:///x``, ``/x``, or ``@name`` for abstract).

        Raises RPCError(UNAVAILABLE) when the socket cannot be reached in time
        (missing, refused: nobody listens).
        """
        address = path.removeprefix("unix://")
        if address.startswith("@"):
            address = "\0" + address[1:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except TimeoutError as exc:
            sock.close()
            raise RPCError(Code.UNAVAILABLE, f"ttrpc: dial {path}: timed out") from exc
        except OSError as exc:
            sock.close()
            raise RPCError(Code.UNAVAILABLE, f"ttrpc: dial {path}: {exc}") from exc
        return cls(sock)

    def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        on_sent: Callable[[], object] | None = None,
    ) -> bytes:
        """Call ``service``/``method`` and return the response payload.

        ``timeout`` (seconds; None waits for ever) bounds the wait and is sent
        as ``timeout_nano`` so the server gives up too. ``on_sent`` runs once
        the request is written, before the wait for the answer. Raises RPCError with
        the server's status, DEADLINE_EXCEEDED on timeout (the connection is
        then unusable: the late answer would be in the way), UNAVAILABLE
        (:data:`CLOSED_MESSAGE`) when the connection is or gets closed.
        """
        if self._broken:
            raise RPCError(Code.UNAVAILABLE, CLOSED_MESSAGE)
        data = encode_request(service, method, payload, timeout, metadata, self._max_message_size)
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise RPCError(Code.UNAVAILABLE, "ttrpc: stream ids exhausted, reconnect")
        self._next_stream_id += 2
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._settimeout(deadline)
            self._sock.sendall(HEADER.pack(len(data), stream_id, TYPE_REQUEST, 0) + data)
            if on_sent is not None:
                on_sent()
            code, message, result = self._receive(stream_id, deadline)
        except (_Deadline, TimeoutError) as exc:
            self._broken = True
            raise RPCError(Code.DEADLINE_EXCEEDED, DEADLINE_MESSAGE) from exc
        except OSError as exc:  # reset, broken pipe: the server is gone
            self._broken = True
            raise RPCError(Code.UNAVAILABLE, CLOSED_MESSAGE) from exc
        if code != Code.OK:
            raise RPCError(code, message)
        return result

    def _receive(self, stream_id: int, deadline: float | None) -> tuple[int, str, bytes]:
        """Read frames until the response to ``stream_id``."""
        while True:
            length, got, mtype, _flags = HEADER.unpack(self._read(HEADER.size, deadline))
            if length > self._max_message_size:
                self._skip(length, deadline)
                if got == stream_id:
                    raise RPCError(
                        Code.RESOURCE_EXHAUSTED, oversized_message(length, self._max_message_size)
                    )
                continue
            payload = self._read(length, deadline) if length else b""
            if mtype != TYPE_RESPONSE or got != stream_id:
                continue  # a stream's data, or a late answer to a call that gave up
            try:
                return decode_response(payload)
            except ValueError as exc:  # as DecodeError: see ttrpc_server._on_request
                raise RPCError(Code.INTERNAL, f"ttrpc: unmarshal response error: {exc}") from exc

    def _settimeout(self, deadline: float | None) -> None:
        if deadline is None:
            self._sock.settimeout(None)
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Deadline
        self._sock.settimeout(left)

    def _read(self, count: int, deadline: float | None) -> bytes:
        chunks: list[bytes] = []
        while count > 0:
            self._settimeout(deadline)
            chunk = self._sock.recv(min(count, 1 << 20))
            if not chunk:
                self._broken = True
                raise RPCError(Code.UNAVAILABLE, CLOSED_MESSAGE)
            chunks.append(chunk)
            count -= len(chunk)
        return b"".join(chunks)

    def _skip(self, count: int, deadline: float | None) -> None:
        while count > 0:
            n = min(count, DISCARD_CHUNK)
            self._read(n, deadline)
            count -= n

    def close(self) -> None:
        """Close the connection (a call in progress on the server is cancelled there)."""
        self._broken = True
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
