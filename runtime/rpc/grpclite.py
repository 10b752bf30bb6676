"""One unary gRPC call over HTTP/2 on a unix socket, without grpcio.

grpcio costs a process about 0.13 s of CPU to import (its C core), more than the
`stasis checkpoint` CLI spends on everything else; that CPU is taken from CRIU and
the image hashing while the dump runs, and twenty CLIs at once pay it twenty times.
The CLI asks containerd one thing on that path (Containers.Get), so it speaks just
enough HTTP/2 (RFC 9113) for one request and its answer: the connection preface,
SETTINGS, one stream's HEADERS and DATA, and the server's HEADERS (HPACK, RFC 7541,
through the `hpack` package), DATA, trailers, SETTINGS, PING, WINDOW_UPDATE,
RST_STREAM and GOAWAY. No TLS (a unix socket), no compression, one call per
connection. Everything else keeps using grpcio.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Mapping

from runtime.errors import Code

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0x0,
    0x1,
    0x3,
    0x4,
    0x6,
    0x7,
    0x8,
    0x9,
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_ENABLE_PUSH, SETTINGS_INITIAL_WINDOW_SIZE = 0x2, 0x4
WINDOW = (1 << 31) - 1  # what we let the server send before a WINDOW_UPDATE: all of it
STREAM = 1  # the one stream of the call
MAX_RESPONSE = 64 << 20  # bytes of an answer we accept (grpc's default is 4 MiB)


class CallError(Exception):
    """The call failed: ``code`` is its grpc status (UNAVAILABLE when the server
    could not be reached or the connection broke), ``message`` the server's text."""

    def __init__(self, code: Code | int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + stream.to_bytes(4, "big")
    return head + payload


def _timeout_header(seconds: float) -> str:
    """grpc-timeout: at most 8 digits and a unit."""
    millis = max(1, int(seconds * 1000))
    return f"{millis}m" if millis < 10**8 else f"{max(1, int(seconds))}S"


def request_bytes(path: str, message: bytes, metadata: Mapping[str, str], timeout: float) -> bytes:
    """What the client sends: the preface, its SETTINGS and window, then the call
    on stream 1 (HEADERS, then DATA with the length-prefixed message)."""
    import hpack

    settings = struct.pack(">HI", SETTINGS_ENABLE_PUSH, 0) + struct.pack(
        ">HI", SETTINGS_INITIAL_WINDOW_SIZE, WINDOW
    )
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", _timeout_header(timeout)),
        *((k.lower(), v) for k, v in metadata.items()),
    ]
    block = hpack.Encoder().encode(headers)
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    return b"".join(
        (
            PREFACE,
            _frame(SETTINGS, 0, 0, settings),
            # The connection's window starts at 65535 whatever SETTINGS say.
            _frame(WINDOW_UPDATE, 0, 0, (WINDOW - 65535).to_bytes(4, "big")),
            _frame(HEADERS, END_HEADERS, STREAM, block),
            _frame(DATA, END_STREAM, STREAM, body),
        )
    )


class _Conn:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.buf = bytearray()

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise CallError(Code.DEADLINE_EXCEEDED, "Deadline Exceeded")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(max(65536, n - len(self.buf)))
            except TimeoutError:
                raise CallError(Code.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            except OSError as e:
                raise CallError(Code.UNAVAILABLE, f"connection lost: {e}") from e
            if not chunk:
                raise CallError(Code.UNAVAILABLE, "the server closed the connection")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def frame(self) -> tuple[int, int, int, bytes]:
        head = self.read(9)
        length = int.from_bytes(head[:3], "big")
        ftype, flags = head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        if length > MAX_RESPONSE:
            raise CallError(Code.UNAVAILABLE, f"frame of {length} bytes")
        return ftype, flags, stream, self.read(length)


def _unpad(flags: int, payload: bytes) -> bytes:
    if flags & PADDED:
        pad = payload[0]
        if pad >= len(payload):
            raise CallError(Code.UNAVAILABLE, "bad padding")
        payload = payload[1 : len(payload) - pad]
    return payload


def read_response(conn: _Conn) -> tuple[list[tuple[str, str]], bytes]:
    """Read frames until stream 1 ends; answer SETTINGS and PING on the way.
    Returns the stream's header fields (headers and trailers, in order) and its
    DATA bytes."""
    import hpack

    decoder = hpack.Decoder()
    decoder.max_allowed_table_size = 1 << 16
    fields: list[tuple[str, str]] = []
    data = bytearray()
    block = bytearray()  # a header block spread over HEADERS + CONTINUATION
    ended = False  # the HEADERS that opened ``block`` carried END_STREAM
    while True:
        ftype, flags, stream, payload = conn.frame()
        if ftype == SETTINGS and not flags & ACK:
            conn.sock.sendall(_frame(SETTINGS, ACK, 0))
        elif ftype == PING and not flags & ACK:
            conn.sock.sendall(_frame(PING, ACK, 0, payload))
        elif ftype == GOAWAY:
            code = int.from_bytes(payload[4:8], "big") if len(payload) >= 8 else 0
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF if len(payload) >= 4 else 0
            if last < STREAM or code != 0:
                raise CallError(Code.UNAVAILABLE, f"the server went away (HTTP/2 error {code})")
        elif stream != STREAM:
            continue  # WINDOW_UPDATE and anything else of the connection
        elif ftype == RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            raise CallError(Code.UNAVAILABLE, f"the server reset the call (HTTP/2 error {code})")
        elif ftype == DATA:
            data += _unpad(flags, payload)
            if len(data) > MAX_RESPONSE:
                raise CallError(Code.UNAVAILABLE, f"answer over {MAX_RESPONSE} bytes")
            if flags & END_STREAM:
                return fields, bytes(data)
        elif ftype in (HEADERS, CONTINUATION):
            if ftype == HEADERS:
                payload = _unpad(flags, payload)
                if flags & PRIORITY:
                    payload = payload[5:]
                ended = bool(flags & END_STREAM)
            block += payload
            if flags & END_HEADERS:
                try:
                    decoded = decoder.decode(bytes(block))
                except hpack.HPACKError as e:
                    raise CallError(Code.UNAVAILABLE, f"bad header block: {e}") from e
                fields += [(str(k), str(v)) for k, v in decoded]
                block.clear()
                if ended:
                    return fields, bytes(data)


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
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(sock_path)
            sock.sendall(request_bytes(path, message, metadata or {}, timeout))
        except OSError as e:
            raise CallError(Code.UNAVAILABLE, f"connect to {sock_path}: {e.strerror or e}") from e
        fields, data = read_response(_Conn(sock, deadline))
    finally:
        sock.close()
    return _result(fields, data)


def _result(fields: list[tuple[str, str]], data: bytes) -> bytes:
    """The answer's message, or its grpc status as a CallError."""
    last: dict[str, str] = {}
    for k, v in fields:
        last[k] = v  # trailers come after headers and win
    status = last.get(":status", "")
    if status != "200":
        raise CallError(Code.UNAVAILABLE, f"HTTP status {status or 'missing'}")
    if "grpc-status" not in last:
        raise CallError(Code.UNAVAILABLE, "the call ended without a grpc-status")
    try:
        code = int(last["grpc-status"])
    except ValueError:
        raise CallError(Code.UNAVAILABLE, f"bad grpc-status {last['grpc-status']!r}") from None
    if code != Code.OK:
        import urllib.parse  # grpc-message is percent-encoded

        raise CallError(code, urllib.parse.unquote(last.get("grpc-message", "")))
    if len(data) < 5:
        raise CallError(Code.UNAVAILABLE, "no message in the answer")
    if data[0] != 0:
        raise CallError(Code.UNAVAILABLE, "the answer is compressed, which was not asked for")
    length = int.from_bytes(data[1:5], "big")
    if length != len(data) - 5:
        raise CallError(Code.UNAVAILABLE, f"answer of {len(data) - 5} bytes, {length} announced")
    return data[5:]
