"""The shim daemon: the ttrpc server, the reaper and the event publisher on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

from runtime.rpc import ttrpc_server as ttrpc
from shim.daemon import checkpoint_api
from shim.daemon.events import Publisher
from shim.daemon.task_api import SERVICE, TaskService
from shim.task.reaper import Reaper, set_subreaper

log = logging.getLogger("stasis.shim")


class _QuietStream:
    """A log sink that never raises (the log FIFO's reader may come and go)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, s: str) -> int:
        with contextlib.suppress(OSError):
            os.write(self.fd, s.encode(errors="replace"))
        return len(s)

    def flush(self) -> None:
        pass


def _setup_logging(bundle: str, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    # The S3 client's own debug output is megabytes per checkpoint, multi-line,
    # and full of signed requests: keep only its warnings.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        # containerd holds the bundle's `log` FIFO open for reading while it
        # starts the shim; without a reader there is nowhere to log to.
        fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        root.addHandler(logging.NullHandler())
        return
    os.set_blocking(fd, True)
    handler = logging.StreamHandler(_QuietStream(fd))
    handler.setFormatter(
        logging.Formatter('time="%(asctime)s" level=%(levelname)s msg="%(message)s" runtime=stasis')
    )
    root.addHandler(handler)


def serve(
    sock: socket.socket,
    *,
    socket_path: str,
    namespace: str,
    bundle: str,
    address: str,
    ttrpc_address: str,
    debug: bool = False,
) -> int:
    """Serve the Task API on ``sock`` until Shutdown (or SIGTERM); returns the exit code."""
    _setup_logging(bundle, debug)
    try:
        asyncio.run(_serve(sock, socket_path, namespace, address, ttrpc_address))
    except Exception:
        log.exception("shim failed")
        return 1
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
    return 0


async def _serve(
    sock: socket.socket, socket_path: str, namespace: str, address: str, ttrpc_address: str
) -> None:
    loop = asyncio.get_running_loop()
    set_subreaper()
    reaper = Reaper()
    reaper.install(loop)
    stop = asyncio.Event()
    publisher = Publisher(ttrpc_address)

    def shutdown() -> None:
        # Let the Shutdown reply reach containerd before the socket closes.
        loop.call_later(0.01, stop.set)

    service = TaskService(namespace, publisher, reaper, on_shutdown=shutdown)
    server = ttrpc.Server()
    server.register(SERVICE, service.handlers())
    server.register(
        checkpoint_api.SERVICE,
        checkpoint_api.CheckpointService(service, containerd_address=address).handlers(),
    )
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    serving = loop.create_task(server.serve(sock))
    log.info("serving %s in namespace %s", socket_path, namespace)
    await stop.wait()
    # Nothing else may bind the path once we decided to go.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    await publisher.close()
    await server.close()
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    reaper.uninstall()
