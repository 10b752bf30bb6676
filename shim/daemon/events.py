"""Publishing task events to containerd over ttrpc, in order, surviving containerd restarts.

Events go to ``containerd.services.events.ttrpc.v1.Events/Forward`` at
TTRPC_ADDRESS. One queue and one sender keep them in the order they were
published (containerd requires create -> start -> exit -> delete); a failed
send is retried with backoff and a fresh connection, so a containerd restart
delays events instead of losing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from google.protobuf.message import Message

from protos.containerd.services.events.ttrpc.v1 import events_pb2
from runtime.names import TTRPC_NAMESPACE_KEY
from runtime.rpc import ttrpc_server as ttrpc

log = logging.getLogger("stasis.events")

SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = TTRPC_NAMESPACE_KEY
_MAX_QUEUE = 4096


class Publisher:
    """An ordered, retrying event sender (the only writer of ``_client``)."""

    def __init__(self, address: str, *, retry_for: float = 30.0) -> None:
        self.address = address
        self.retry_for = retry_for
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(_MAX_QUEUE)
        self._client: ttrpc.Client | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, namespace: str, topic: str, event: Message) -> None:
        """Queue ``event`` under ``topic``; never blocks the caller."""
        env = events_pb2.Envelope(namespace=namespace, topic=topic)
        env.timestamp.FromNanoseconds(time.time_ns())
        env.event.type_url = event.DESCRIPTOR.full_name  # containerd uses bare type URLs
        env.event.value = event.SerializeToString()
        payload = events_pb2.ForwardRequest(envelope=env).SerializeToString()
        try:
            self._queue.put_nowait((namespace, payload))
        except asyncio.QueueFull:
            log.error("event queue full, dropping %s", topic)
            return
        if self._task is None and self.address:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _send(self, namespace: str, payload: bytes) -> None:
        if self._client is None:
            self._client = await ttrpc.Client.connect(self.address, timeout=5.0)
        await self._client.call(
            SERVICE, "Forward", payload, timeout=5.0, metadata={NAMESPACE_KEY: namespace}
        )

    async def _run(self) -> None:
        while True:
            namespace, payload = await self._queue.get()
            deadline = time.monotonic() + self.retry_for
            delay = 0.05
            while True:
                try:
                    await self._send(namespace, payload)
                    break
                except (OSError, ttrpc.RPCError) as e:
                    await self._reset()
                    if time.monotonic() > deadline:
                        log.error("dropping event after retries: %s", e)
                        break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
            self._queue.task_done()

    async def _reset(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def close(self, timeout: float = 3.0) -> None:
        """Send what is queued (up to ``timeout``), then stop."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._reset()
