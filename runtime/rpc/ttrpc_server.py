"""A ttrpc server (containerd's RPC protocol over unix sockets) on asyncio: unary calls,
payloads as bytes (the service layer owns its protobuf types), answered in any order.

It stays up whatever its clients do: at most ``max_connections`` connections, a
connection dropped when it sends no complete request within
``first_request_timeout`` or stalls mid-frame for ``frame_timeout`` (an idle one that
has made a request stays: containerd keeps one for the shim's lifetime), a backoff
when accept fails for lack of descriptors, complaints logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

from protos.ttrpc import request_pb2, status_pb2
from runtime.errors import Code, StasisError
from runtime.rpc.ttrpc_wire import (
    CANCELED_MESSAGE,
    CLOSED_MESSAGE,
    DEADLINE_MESSAGE,
    DISCARD_CHUNK,
    GRPC_NAMESPACE_KEY,
    HEADER,
    MAX_MESSAGE_SIZE,
    MAX_STREAM_ID,
    NAMESPACE_KEY,
    TYPE_DATA,
    TYPE_REQUEST,
    TYPE_RESPONSE,
    RPCError,
    decode_response,
    encode_request,
    oversized_message,
)

__all__ = [
    "GRPC_NAMESPACE_KEY",
    "MAX_MESSAGE_SIZE",
    "NAMESPACE_KEY",
    "Client",
    "Handler",
    "RPCError",
    "RequestContext",
    "Server",
]

log = logging.getLogger("stasis.ttrpc")


# StreamReader pauses the socket once it buffers twice this much; a bit more
# than the 64 KiB default keeps big (MiB-sized) payloads from ping-ponging
# between pause and resume for every 128 KiB.
_READ_LIMIT = 256 << 10

# How long a closing connection may take to flush what is already queued
# before the socket is dropped; a peer that stopped reading must not hang
# close() forever.
_CLOSE_GRACE_S = 1.0

# containerd holds one connection per shim (two with the sandbox API) and the
# stasis CLI one per command: a cap far above that costs nobody.
MAX_CONNECTIONS = 128
FIRST_REQUEST_TIMEOUT_S = 60.0
FRAME_TIMEOUT_S = 60.0
# accept() failing (out of descriptors, EMFILE, say): retry after a pause, growing up to 1 s.
_ACCEPT_BACKOFF_S = (0.01, 1.0)
# The peer gave up before we accepted: nothing to do but accept the next.
_ACCEPT_TRANSIENT_ERRORS = frozenset({errno.ECONNABORTED, errno.EINTR, errno.EAGAIN, errno.EPROTO})
_COMPLAINT_INTERVAL_S = 60.0


@dataclass
class RequestContext:
    """What a handler knows about the call besides its payload."""

    service: str
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    #: Seconds the caller allowed (from ``timeout_nano``), None when unbounded.
    timeout: float | None = None

    @property
    def namespace(self) -> str | None:
        """The containerd namespace of the call, or None when none was sent.

        containerd sends ``containerd-namespace-ttrpc`` to shims; the gRPC key
        ``containerd-namespace`` is accepted too so hand-written clients work.
        """
        for key in (NAMESPACE_KEY, GRPC_NAMESPACE_KEY):
            values = self.metadata.get(key)
            if values:
                return values[0]
        return None


#: A unary method: request payload bytes and context in, response payload out.
Handler: TypeAlias = Callable[[bytes, RequestContext], Awaitable[bytes]]


class _ProtocolError(Exception):
    """The peer broke the framing rules; the connection cannot be trusted."""


class _Stalled(Exception):
    """The peer sent no request in time, or stopped in the middle of a frame."""


def _status_response(code: Code, message: str) -> bytes:
    status = status_pb2.Status(code=int(code), message=message)
    return bytes(request_pb2.Response(status=status).SerializeToString())


async def _discard(reader: asyncio.StreamReader, count: int) -> None:
    """Drop exactly ``count`` bytes from ``reader`` without holding them all."""
    while count > 0:
        chunk = await reader.read(min(count, DISCARD_CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", count)
        count -= len(chunk)


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a stream, flushing queued frames for a short while, then drop it."""
    writer.close()
    # Shielded so that the grace timeout cancels only our wait, not the
    # protocol's close future that the final wait below still needs.
    try:
        await asyncio.wait_for(asyncio.shield(writer.wait_closed()), _CLOSE_GRACE_S)
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        # The peer reset the connection; it is closed either way.
        return
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _invoke(handler: Handler, payload: bytes, ctx: RequestContext) -> tuple[Code, str, bytes]:
    """Run one handler and turn its outcome into (code, message, payload)."""
    scope: asyncio.Timeout | None = None
    try:
        if ctx.timeout is None:
            result = await handler(payload, ctx)
        else:
            async with asyncio.timeout(ctx.timeout) as scope:
                result = await handler(payload, ctx)
    except RPCError as exc:
        return exc.code, exc.message, b""
    except StasisError as exc:
        return exc.code, str(exc), b""
    except TimeoutError as exc:
        if scope is not None and scope.expired():
            return Code.DEADLINE_EXCEEDED, DEADLINE_MESSAGE, b""
        # The handler's own timeout (e.g. waiting on runc), not the caller's.
        log.exception("ttrpc: /%s/%s failed", ctx.service, ctx.method)
        return Code.UNKNOWN, str(exc) or type(exc).__name__, b""
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # We are being cancelled: the connection or server is closing.
        # Something inside the handler was cancelled and leaked the error; the
        # caller still deserves an answer instead of waiting forever.
        return Code.CANCELLED, CANCELED_MESSAGE, b""
    except Exception as exc:
        log.exception("ttrpc: /%s/%s failed", ctx.service, ctx.method)
        return Code.UNKNOWN, str(exc) or type(exc).__name__, b""
    if not isinstance(result, bytes | bytearray | memoryview):
        log.error(
            "ttrpc: /%s/%s returned %s instead of bytes",
            ctx.service,
            ctx.method,
            type(result).__name__,
        )
        return Code.INTERNAL, f"ttrpc: handler returned {type(result).__name__}, not bytes", b""
    return Code.OK, "", bytes(result)


class _ServerConnection:
    """One accepted connection: a frame reader plus a task per request."""

    def __init__(
        self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        # One frame at a time: header and payload must never interleave with
        # another response, and a slow reader should hold back one response,
        # not let every finished handler queue megabytes.
        self._write_lock = asyncio.Lock()
        self._handlers: set[asyncio.Task[None]] = set()
        self._last_stream_id = 0
        self._requested = False  # a complete request came: idle is fine from now on
        self._tearing_down = False
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """Serve requests until the peer leaves, breaks the protocol or we close."""
        complain = self._server._complain
        try:
            await self._read_loop()
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                complain("partial", "ttrpc: connection closed in the middle of a frame")
        except ConnectionError:
            pass  # The peer went away; nothing to answer.
        except _ProtocolError as exc:
            complain("protocol", f"ttrpc: closing connection: {exc}")
        except _Stalled as exc:
            complain("stalled", f"ttrpc: closing connection: {exc}")
        except Exception:
            log.exception("ttrpc: connection failed")
        finally:
            await self._teardown()

    async def _read_frame_start(self) -> tuple[bytes, float]:
        """The frame's first byte, and the deadline for the rest of it."""
        loop = asyncio.get_running_loop()
        server = self._server
        if self._requested:
            lead = await self._reader.readexactly(1)  # idle as long as it likes
            return lead, loop.time() + server.frame_timeout
        deadline = loop.time() + server.first_request_timeout
        try:
            async with asyncio.timeout_at(deadline):
                lead = await self._reader.readexactly(1)
        except TimeoutError:
            raise _Stalled(f"no request within {server.first_request_timeout:g} s") from None
        return lead, min(deadline, loop.time() + server.frame_timeout)

    async def _read_loop(self) -> None:
        while True:
            lead, deadline = await self._read_frame_start()
            try:
                async with asyncio.timeout_at(deadline):
                    request = await self._read_frame(lead)
            except TimeoutError:
                raise _Stalled("the rest of a frame did not come in time") from None
            if request is not None:
                self._requested = True
                await self._on_request(*request)

    async def _read_frame(self, lead: bytes) -> tuple[int, bytes] | None:
        """The rest of one frame: (stream id, payload) of a request to serve, or None."""
        reader = self._reader
        limit = self._server.max_message_size
        header = lead + await reader.readexactly(HEADER.size - 1)
        length, stream_id, mtype, _flags = HEADER.unpack(header)
        if mtype not in (TYPE_REQUEST, TYPE_DATA):
            raise _ProtocolError(f"unexpected message type {mtype} on stream {stream_id}")
        if stream_id % 2 != 1:
            raise _ProtocolError(f"stream id {stream_id} is not odd (client initiated)")
        if length > limit:
            # Skip the payload so the next frame is read from its start,
            # then answer this stream only: the connection stays usable.
            await _discard(reader, length)
            if mtype == TYPE_REQUEST:
                message = oversized_message(length, limit)
                await self._send_status(stream_id, Code.RESOURCE_EXHAUSTED, message)
            return None
        payload = await reader.readexactly(length) if length else b""
        if mtype == TYPE_DATA:
            # No streaming methods exist here, so no stream can take data;
            # the request that opened it was already answered.
            log.debug("ttrpc: ignoring data frame for stream %d", stream_id)
            return None
        return stream_id, payload

    async def _on_request(self, stream_id: int, payload: bytes) -> None:
        if stream_id <= self._last_stream_id:
            # A reused id would make two answers share one stream.
            message = "StreamID cannot be re-used and must increment"
            await self._send_status(stream_id, Code.INVALID_ARGUMENT, message)
            return
        self._last_stream_id = stream_id
        try:
            request = request_pb2.Request.FromString(payload)
        except Exception as exc:
            # protobuf raises DecodeError; any failure to parse untrusted bytes
            # is the peer's fault, and catching broadly keeps this module free
            # of google.protobuf imports, which have no type stubs here.
            message = f"unmarshal request error: {exc}"
            await self._send_status(stream_id, Code.INVALID_ARGUMENT, message)
            return
        methods = self._server._services.get(request.service)
        if methods is None:
            message = f"service {request.service}: unimplemented"
            await self._send_status(stream_id, Code.UNIMPLEMENTED, message)
            return
        handler = methods.get(request.method)
        if handler is None:
            message = f"method {request.method}: unimplemented"
            await self._send_status(stream_id, Code.UNIMPLEMENTED, message)
            return
        metadata: dict[str, list[str]] = {}
        for pair in request.metadata:
            metadata.setdefault(pair.key, []).append(pair.value)
        ctx = RequestContext(
            service=request.service,
            method=request.method,
            metadata=metadata,
            timeout=request.timeout_nano / 1e9 if request.timeout_nano > 0 else None,
        )
        # Each request is its own task so that a call that blocks (Wait) never
        # holds up the others on the same connection.
        task = asyncio.get_running_loop().create_task(
            self._run_handler(stream_id, handler, request.payload, ctx),
            name=f"ttrpc /{request.service}/{request.method} #{stream_id}",
        )
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _run_handler(
        self, stream_id: int, handler: Handler, payload: bytes, ctx: RequestContext
    ) -> None:
        code, message, result = await _invoke(handler, payload, ctx)
        response = bytes(
            request_pb2.Response(
                status=status_pb2.Status(code=int(code), message=message), payload=result
            ).SerializeToString()
        )
        limit = self._server.max_message_size
        if len(response) > limit:
            # The client would drop it anyway; tell it why instead.
            log.error(
                "ttrpc: /%s/%s response of %d bytes exceeds %d",
                ctx.service,
                ctx.method,
                len(response),
                limit,
            )
            response = _status_response(
                Code.RESOURCE_EXHAUSTED, oversized_message(len(response), limit)
            )
        await self._send(stream_id, response)

    async def _send_status(self, stream_id: int, code: Code, message: str) -> None:
        await self._send(stream_id, _status_response(code, message))

    async def _send(self, stream_id: int, response: bytes) -> None:
        header = HEADER.pack(len(response), stream_id, TYPE_RESPONSE, 0)
        try:
            async with self._write_lock:
                # Two writes with no await between them reach the transport
                # back to back, so no other frame can land in the middle.
                self._writer.write(header)
                self._writer.write(response)
                await self._writer.drain()
        except ConnectionError:
            # The peer is gone; dropping the transport wakes the reader,
            # which then tears the connection down.
            self._writer.transport.abort()

    def abort(self) -> None:
        """Stop serving this connection (used by Server.close)."""
        # A teardown already under way must run to its end: cancelling it
        # would skip closing the socket.
        if self.task is not None and not self._tearing_down:
            self.task.cancel()

    def ended(self, _task: asyncio.Task[None]) -> None:
        """The connection's task is done. Its teardown closed the socket, unless
        the task was cancelled before its first step (a close right after the
        accept), when ``run`` never ran: drop the transport here then."""
        if not self._writer.transport.is_closing():
            self._writer.transport.abort()
        self._server._connections.discard(self)

    async def _teardown(self) -> None:
        self._tearing_down = True
        try:
            handlers = set(self._handlers)
            for task in handlers:
                task.cancel()
            if handlers:
                # Wait so that no handler outlives its connection (no leaked tasks).
                await asyncio.wait(handlers)
            await _close_writer(self._writer)
        finally:
            self._server._connections.discard(self)


class Server:
    """A ttrpc server: register services, then :meth:`serve` listening sockets.

    ``max_message_size`` bounds both the requests it reads and the responses
    it writes (ttrpc's 4 MiB by default); ``max_connections``,
    ``first_request_timeout`` and ``frame_timeout`` are described in the
    module's docstring.
    """

    def __init__(
        self,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_connections: int = MAX_CONNECTIONS,
        first_request_timeout: float = FIRST_REQUEST_TIMEOUT_S,
        frame_timeout: float = FRAME_TIMEOUT_S,
    ) -> None:
        self.max_message_size = max_message_size
        self.max_connections = max_connections
        self.first_request_timeout = first_request_timeout
        self.frame_timeout = frame_timeout
        self._services: dict[str, dict[str, Handler]] = {}
        self._accepting: list[asyncio.Task[None]] = []
        self._connections: set[_ServerConnection] = set()
        # complaint -> (when last logged, how many left unlogged since)
        self._complaints: dict[str, tuple[float, int]] = {}
        self._closing = False
        self._closed = asyncio.Event()
        self._close_task: asyncio.Task[None] | None = None

    def register(self, service: str, methods: Mapping[str, Handler]) -> None:
        """Expose ``methods`` (method name -> handler) under a full service name.

        ``service`` is the protobuf full name, e.g.
        ``containerd.task.v2.Task``; registering a name twice is a bug.
        """
        if service in self._services:
            raise ValueError(f"duplicate service {service} registered")
        self._services[service] = dict(methods)

    @property
    def connection_count(self) -> int:
        """How many client connections are open right now."""
        return len(self._connections)

    async def serve(self, sock: socket.socket) -> None:
        """Accept connections on a bound, listening unix socket until :meth:`close`.

        The server takes ownership of ``sock`` and closes it; the socket's path
        is left for the caller to unlink.
        """
        if self._closing:
            sock.close()
            return
        sock.setblocking(False)
        accepting = asyncio.get_running_loop().create_task(
            self._accept_loop(sock), name="ttrpc accept"
        )
        self._accepting.append(accepting)
        try:
            await self._closed.wait()
        finally:
            accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await accepting
            sock.close()

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.0
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:
                if e.errno in _ACCEPT_TRANSIENT_ERRORS:
                    continue
                # Out of descriptors (or worse): the pending connection stays
                # queued and the socket readable, so retrying at once would spin.
                low, high = _ACCEPT_BACKOFF_S
                backoff = min(max(backoff * 2, low), high)
                self._complain(
                    "accept", f"ttrpc: cannot accept connections: {e.strerror}; retrying"
                )
                await asyncio.sleep(backoff)
                continue
            backoff = 0.0
            if len(self._connections) >= self.max_connections:
                conn.close()
                self._complain(
                    "cap",
                    f"ttrpc: {len(self._connections)} connections open, the most allowed: "
                    "refusing new ones",
                )
                continue
            try:
                reader, writer = await asyncio.open_unix_connection(sock=conn, limit=_READ_LIMIT)
            except OSError as e:
                conn.close()
                self._complain("accept", f"ttrpc: cannot serve a connection: {e}")
                continue
            self._on_connection(reader, writer)

    def _complain(self, kind: str, message: str) -> None:
        """Log a warning about clients, at most once a minute per kind (a flood of
        bad connections must not become a flood of log lines)."""
        now = time.monotonic()
        last, unlogged = self._complaints.get(kind, (-math.inf, 0))
        if now - last < _COMPLAINT_INTERVAL_S:
            self._complaints[kind] = (last, unlogged + 1)
            return
        if unlogged:
            message += f" ({unlogged} more like it not logged)"
        log.warning("%s", message)
        self._complaints[kind] = (now, 0)

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback (not a coroutine) so the connection task is ours to
        # track and cancel, rather than an anonymous one asyncio creates.
        if self._closing:
            writer.transport.abort()
            return
        conn = _ServerConnection(self, reader, writer)
        self._connections.add(conn)
        conn.task = asyncio.get_running_loop().create_task(conn.run(), name="ttrpc connection")
        conn.task.add_done_callback(conn.ended)

    async def close(self) -> None:
        """Stop accepting, cancel in-flight handlers and close every connection.

        Safe to call more than once and from several tasks. Called from inside
        a handler it still completes, but that handler is cancelled with its
        connection and its caller gets no answer; to answer first (e.g. a
        Shutdown RPC), return and close from a task scheduled by the handler.
        """
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(
                self._close(), name="ttrpc server close"
            )
        # Shielded: a handler awaiting close() is itself cancelled by it, and
        # that must not stop the close half way (serve() would never return).
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        self._closing = True
        for accepting in self._accepting:
            accepting.cancel()
        connections = list(self._connections)
        for conn in connections:
            conn.abort()
        tasks = {conn.task for conn in connections if conn.task is not None}
        if tasks:
            await asyncio.wait(tasks)
        self._closed.set()


class Client:
    """A ttrpc client over one unix socket connection; safe for concurrent calls."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        """Wrap an open stream pair; most callers want :meth:`connect`."""
        self._reader = reader
        self._writer = writer
        self._max_message_size = max_message_size
        self._write_lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[tuple[int, str, bytes]]] = {}
        self._next_stream_id = 1
        self._closed = False
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name="ttrpc client reader"
        )

    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        timeout: float | None = 5.0,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> Client:
        """Connect to ``path`` (``unix:///x``, ``/x``, or ``@name`` for abstract).

        Raises RPCError(UNAVAILABLE) when the socket cannot be reached in time.
        """
        address = path.removeprefix("unix://")
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(address, limit=_READ_LIMIT)
        except TimeoutError as exc:
            raise RPCError(Code.UNAVAILABLE, f"ttrpc: dial {path}: timed out") from exc
        except OSError as exc:
            raise RPCError(Code.UNAVAILABLE, f"ttrpc: dial {path}: {exc}") from exc
        return cls(reader, writer, max_message_size=max_message_size)

    @property
    def closed(self) -> bool:
        """True once the connection is gone; every call then fails UNAVAILABLE."""
        return self._closed

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bytes:
        """Call ``service``/``method`` and return the response payload.

        ``timeout`` (seconds) bounds the wait here and is sent as
        ``timeout_nano`` so the server gives up too. Raises RPCError with the
        server's status, DEADLINE_EXCEEDED on timeout, UNAVAILABLE when the
        connection is or gets closed, RESOURCE_EXHAUSTED for oversized
        messages either way.
        """
        if self._closed:
            raise RPCError(Code.UNAVAILABLE, CLOSED_MESSAGE)
        data = encode_request(service, method, payload, timeout, metadata, self._max_message_size)
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise RPCError(Code.UNAVAILABLE, "ttrpc: stream ids exhausted, reconnect")
        self._next_stream_id += 2
        future: asyncio.Future[tuple[int, str, bytes]] = asyncio.get_running_loop().create_future()
        self._pending[stream_id] = future
        scope: asyncio.Timeout | None = None
        try:
            async with asyncio.timeout(timeout) as scope:
                await self._send(stream_id, data)
                code, message, result = await future
        except TimeoutError:
            if scope is not None and scope.expired():
                raise RPCError(Code.DEADLINE_EXCEEDED, DEADLINE_MESSAGE) from None
            raise
        finally:
            # A late answer for this stream is dropped by the reader from now on.
            del self._pending[stream_id]
            if future.done() and not future.cancelled():
                future.exception()  # Mark it retrieved even if we were cancelled.
        if code != Code.OK:
            raise RPCError(code, message)
        return result

    async def _send(self, stream_id: int, data: bytes) -> None:
        header = HEADER.pack(len(data), stream_id, TYPE_REQUEST, 0)
        try:
            async with self._write_lock:
                self._writer.write(header)
                self._writer.write(data)
                await self._writer.drain()
        except ConnectionError as exc:
            raise RPCError(Code.UNAVAILABLE, CLOSED_MESSAGE) from exc

    async def _read_loop(self) -> None:
        reader = self._reader
        limit = self._max_message_size
        try:
            while True:
                header = await reader.readexactly(HEADER.size)
                length, stream_id, mtype, _flags = HEADER.unpack(header)
                if length > limit:
                    await _discard(reader, length)
                    self._fail(
                        stream_id,
                        RPCError(Code.RESOURCE_EXHAUSTED, oversized_message(length, limit)),
                    )
                    continue
                payload = await reader.readexactly(length) if length else b""
                if mtype != TYPE_RESPONSE:
                    # Servers only answer; anything else belongs to streams,
                    # which this client never opens.
                    log.debug("ttrpc: client ignoring message type %d", mtype)
                    continue
                future = self._pending.get(stream_id)
                if future is None or future.done():
                    continue  # The caller gave up (timeout) before the answer came.
                try:
                    future.set_result(decode_response(payload))
                except ValueError as exc:  # as protobuf's DecodeError; see _on_request.
                    future.set_exception(
                        RPCError(Code.INTERNAL, f"ttrpc: unmarshal response error: {exc}")
                    )
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # The server closed the connection.
        except Exception:
            log.exception("ttrpc: client connection failed")
        finally:
            self._closed = True
            for stream_id in list(self._pending):
                self._fail(stream_id, RPCError(Code.UNAVAILABLE, CLOSED_MESSAGE))
            # Release the socket now, even if nobody calls close().
            self._writer.close()

    def _fail(self, stream_id: int, error: RPCError) -> None:
        future = self._pending.get(stream_id)
        if future is not None and not future.done():
            future.set_exception(error)

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with UNAVAILABLE."""
        self._closed = True
        self._reader_task.cancel()
        await asyncio.wait({self._reader_task})
        await _close_writer(self._writer)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
