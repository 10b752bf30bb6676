"""runtime.rpc.grpclite: one unary gRPC call over HTTP/2 without grpcio, against a
scripted HTTP/2 server on a unix socket (the real containerd answers it in the
integration tests: every `stasis checkpoint` asks it for the container)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import hpack
import pytest

from runtime.errors import Code
from runtime.rpc import grpclite as g

PATH = "/containerd.services.containers.v1.Containers/Get"


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return g._frame(ftype, flags, stream, payload)


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    while data:
        length = int.from_bytes(data[:3], "big")
        out.append((data[3], data[4], int.from_bytes(data[5:9], "big"), data[9 : 9 + length]))
        data = data[9 + length :]
    return out


def message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


class Server:
    """Accepts one connection, reads the client's call, sends ``answer`` (bytes, or
    a function of the hpack encoder returning bytes), then records what the client
    sends until it closes."""

    def __init__(self, path: str, answer: Callable[[hpack.Encoder], bytes]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen()
        self.answer = answer
        self.request = b""
        self.after = b""
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data = b""
            while not any(
                t == g.DATA and f & g.END_STREAM for t, f, _, _ in frames(data[len(g.PREFACE) :])
            ):
                data += conn.recv(65536)
            self.request = data
            try:
                conn.sendall(self.answer(hpack.Encoder()))
                conn.settimeout(2)
                while chunk := conn.recv(65536):
                    self.after += chunk
            except OSError:
                pass  # the client left first (a test of its timeout)

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


def ok_headers(e: hpack.Encoder) -> bytes:
    return frame(
        g.HEADERS,
        g.END_HEADERS,
        1,
        e.encode([(":status", "200"), ("content-type", "application/grpc")]),
    )


def trailers(e: hpack.Encoder, status: int = 0, text: str = "") -> bytes:
    fields = [("grpc-status", str(status))] + ([("grpc-message", text)] if text else [])
    return frame(g.HEADERS, g.END_HEADERS | g.END_STREAM, 1, e.encode(fields))


def test_the_request_is_one_stream_with_the_call() -> None:
    raw = g.request_bytes(PATH, b"\x0a\x02c1", {"containerd-namespace": "default"}, 10)
    assert raw.startswith(g.PREFACE)
    got = frames(raw[len(g.PREFACE) :])
    assert [(t, f, s) for t, f, s, _ in got] == [
        (g.SETTINGS, 0, 0),
        (g.WINDOW_UPDATE, 0, 0),
        (g.HEADERS, g.END_HEADERS, 1),
        (g.DATA, g.END_STREAM, 1),
    ]
    headers = dict(hpack.Decoder().decode(got[2][3]))
    assert headers == {
        ":method": "POST",
        ":scheme": "http",
        ":path": PATH,
        ":authority": "localhost",
        "content-type": "application/grpc",
        "te": "trailers",
        "grpc-timeout": "10000m",
        "containerd-namespace": "default",
    }
    assert got[3][3] == message(b"\x0a\x02c1")


def test_an_answer_in_pieces_with_settings_and_ping_on_the_way(sock_path: str) -> None:
    body = b"\x0a\x05hello" * 5000  # over one 16 KiB frame

    def answer(e: hpack.Encoder) -> bytes:
        data = message(body)
        trailer = e.encode([("grpc-status", "0"), ("grpc-message", "")])
        return b"".join(
            (
                frame(g.SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64"),
                frame(g.WINDOW_UPDATE, 0, 0, (1000).to_bytes(4, "big")),
                ok_headers(e),
                frame(g.PING, 0, 0, b"12345678"),
                # padded DATA, then the rest
                frame(g.DATA, g.PADDED, 1, b"\x03" + data[:16000] + b"\x00\x00\x00"),
                frame(g.DATA, 0, 1, data[16000:]),
                # trailers split over HEADERS and CONTINUATION
                frame(g.HEADERS, g.END_STREAM, 1, trailer[:3]),
                frame(g.CONTINUATION, g.END_HEADERS, 1, trailer[3:]),
            )
        )

    server = Server(sock_path, answer)
    try:
        assert g.call(sock_path, PATH, b"x", {"containerd-namespace": "ns"}) == body
    finally:
        server.close()
    acks = [(t, f, p) for t, f, _, p in frames(server.after)]
    assert (g.SETTINGS, g.ACK, b"") in acks and (g.PING, g.ACK, b"12345678") in acks


def test_a_trailers_only_error_keeps_its_code_and_decoded_message(sock_path: str) -> None:
    def answer(e: hpack.Encoder) -> bytes:
        fields = [
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", "5"),
            ("grpc-message", "container %22c1%22 in namespace %22default%22: not found"),
        ]
        return frame(g.HEADERS, g.END_HEADERS | g.END_STREAM, 1, e.encode(fields))

    server = Server(sock_path, answer)
    try:
        with pytest.raises(g.CallError) as err:
            g.call(f"unix://{sock_path}", PATH, b"")
    finally:
        server.close()
    assert err.value.code == Code.NOT_FOUND
    assert err.value.message == 'container "c1" in namespace "default": not found'


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (lambda e: ok_headers(e), "the server closed the connection"),
        (lambda e: ok_headers(e) + frame(g.RST_STREAM, 0, 1, b"\x00\x00\x00\x08"), "reset"),
        (lambda e: frame(g.GOAWAY, 0, 0, b"\x00\x00\x00\x00\x00\x00\x00\x02"), "went away"),
        (
            lambda e: (
                ok_headers(e) + frame(g.DATA, 0, 1, b"\x01" + message(b"x")[1:]) + trailers(e)
            ),
            "compressed",
        ),
        (
            lambda e: ok_headers(e) + frame(g.DATA, 0, 1, message(b"xy")[:-1]) + trailers(e),
            "1 bytes, 2 announced",
        ),
        (lambda e: ok_headers(e) + frame(g.DATA, g.END_STREAM, 1, message(b"x")), "grpc-status"),
        (
            lambda e: frame(
                g.HEADERS, g.END_HEADERS | g.END_STREAM, 1, e.encode([(":status", "503")])
            ),
            "HTTP status 503",
        ),
    ],
)
def test_broken_answers_are_unavailable(
    sock_path: str, answer: Callable[[hpack.Encoder], bytes], why: str
) -> None:
    server = Server(sock_path, answer)
    try:
        with pytest.raises(g.CallError) as err:
            g.call(sock_path, PATH, b"", timeout=5)
    finally:
        server.close()
    assert err.value.code == Code.UNAVAILABLE and why in err.value.message, err.value.message


def test_no_answer_within_the_timeout_is_deadline_exceeded(sock_path: str) -> None:
    stop = threading.Event()

    def answer(e: hpack.Encoder) -> bytes:
        stop.wait(5)
        return b""

    server = Server(sock_path, answer)
    t0 = time.monotonic()
    try:
        with pytest.raises(g.CallError) as err:
            g.call(sock_path, PATH, b"", timeout=0.3)
    finally:
        stop.set()
        server.close()
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 3


def test_nothing_listening_is_unavailable(sock_path: str) -> None:
    with pytest.raises(g.CallError) as err:
        g.call(sock_path, PATH, b"")
    assert err.value.code == Code.UNAVAILABLE and "No such file or directory" in err.value.message
