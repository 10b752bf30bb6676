"""A fault-injecting HTTP proxy in front of the test S3 server (moto_server).

Requests pass through unchanged, except those a ``Fault`` matches: they are
answered with an S3 error (500 InternalError, 503 SlowDown) instead of being
forwarded, or forwarded only after a stall. Faults count their hits, so a
test can inject "the first two part uploads fail" or "every part upload fails".
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_CODES = {500: "InternalError", 503: "SlowDown"}


@dataclass
class Fault:
    """Answer matching requests with ``status`` (or delay them ``stall`` seconds), at
    most ``times`` times (None: always)."""

    method: str
    query_has: str = ""  # e.g. "partNumber=": UploadPart
    status: int = 503
    stall: float = 0.0
    times: int | None = None
    hits: int = field(default=0)

    def matches(self, method: str, path: str) -> bool:
        return (
            method == self.method
            and self.query_has in path
            and (self.times is None or self.hits < self.times)
        )


class FaultProxy:
    """Serves on a loopback port (``endpoint``) until ``close``."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.faults: list[Fault] = []
        self.forwarded = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:  # kept encoded: forwarded as it came
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:
                                trailer = self.rfile.readline()
                                raw += trailer
                                if trailer in (b"\r\n", b"\n", b""):
                                    return raw
                        raw += self.rfile.read(size + 2)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._take(self.command, self.path)
                if fault is not None and fault.stall:
                    time.sleep(fault.stall)
                if fault is not None and not fault.stall:
                    code = _CODES.get(fault.status, "InternalError")
                    xml = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        f"<Message>injected by the test proxy</Message></Error>"
                    ).encode()
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    self.wfile.write(xml)
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                    headers["Host"] = f"{host}:{port}"
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    with proxy._lock:
                        proxy.forwarded += 1
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
