"""A runtime.rpc.ttrpc_server.Server on a unix socket, served from an event loop in a thread of
its own, for tests whose clients block (the stasis CLI's, runtime.rpc.ttrpc_client)."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from runtime.rpc import ttrpc_server as ttrpc

T = TypeVar("T")


class LoopServer:
    """Serves ``services()`` (service name -> its method table) on ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.server: ttrpc.Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._served: Future[None] | None = None

    def services(self) -> dict[str, dict[str, ttrpc.Handler]]:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen()
        self.server = ttrpc.Server()
        for name, methods in self.services().items():
            self.server.register(name, methods)
        self._served = asyncio.run_coroutine_threadsafe(self.server.serve(sock), self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close_server(self) -> None:
        """Close every connection, answering nothing that is pending."""
        assert self.server is not None
        self.run(self.server.close())

    def stop(self) -> None:
        if self.server is not None:
            self.close_server()
        if self._served is not None:
            self._served.result(10)
        self.run(_drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        # The loop no longer runs: in this thread, drop any transport it still
        # holds (one that never reached the server) before closing it, so that no
        # socket of this server outlives it.
        self.loop.run_until_complete(_drop_transports())
        self.loop.close()


async def _drain() -> None:
    """End what is left on the loop (a connection accepted as the server closed)
    and let aborted transports finish closing, so none outlives the loop."""
    # First let what is already under way finish: an accept in flight as the server
    # closed meets the closed server and drops its connection itself (cancelled
    # before its first step, it would leave the accepted socket unclosed).
    await asyncio.sleep(0.05)
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    for t in others:
        t.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    await asyncio.sleep(0.05)


async def _drop_transports() -> None:
    loop = asyncio.get_running_loop()
    held = getattr(loop, "_transports", None)  # selector loops: fd -> transport (weak)
    left = [t for t in list(held.values()) if not t.is_closing()] if held is not None else []
    for transport in left:
        print(f"loopserver: dropping {transport!r}, left open at stop", file=sys.stderr)
        transport.abort()
    for _ in range(3):  # their connection_lost callbacks close the sockets
        await asyncio.sleep(0)
