"""runc's console socket: how a container's pty master reaches the shim.

With ``terminal: true`` runc creates the pty inside the container and sends
the master end over a unix socket (``--console-socket``) with SCM_RIGHTS.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable

from runtime.errors import Unavailable
from shim.task.stdio import TerminalIO

# Short on purpose: unix socket paths are limited to 108 bytes.
CONSOLE_DIR = "/run/stasis/console"


class ConsoleSocket:
    """A listening socket for one pty master; ``close()`` removes it."""

    def __init__(self) -> None:
        os.makedirs(CONSOLE_DIR, mode=0o700, exist_ok=True)
        self.path = os.path.join(CONSOLE_DIR, f"{os.urandom(8).hex()}.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(self.path)
            os.chmod(self.path, 0o600)
            self._sock.listen(1)
            self._sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    async def receive(self) -> int:
        """Accept runc's connection and return the pty master it sends."""
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self._sock)
        with conn:
            conn.settimeout(10.0)  # runc sends right after connecting
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise Unavailable("runc connected to the console socket but sent no terminal")
        return fds[0]

    def close(self) -> None:
        """Close and remove the socket."""
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


async def with_console(io: TerminalIO, run: Callable[[str], Awaitable[None]]) -> None:
    """Run ``run(console_socket_path)`` (a runc create/exec) and attach the pty it sends."""
    console = ConsoleSocket()
    try:
        received = asyncio.ensure_future(console.receive())
        try:
            await run(console.path)
            master = await asyncio.wait_for(received, 10.0)
        except BaseException:
            received.cancel()
            with contextlib.suppress(BaseException):
                fd = await received
                os.close(fd)
            raise
        io.attach(master)
    finally:
        console.close()
