"""Tests for shim.daemon.events.Publisher against a real ttrpc server standing in for containerd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Coroutine
from typing import Any

import pytest

from protos.containerd.events import task_pb2
from protos.containerd.services.events.ttrpc.v1 import events_pb2
from runtime.rpc.ttrpc_server import RequestContext, Server
from shim.daemon.events import NAMESPACE_KEY, SERVICE, Publisher


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(5):
            await coro

    asyncio.run(guarded())


class Containerd:
    """A ttrpc server with containerd's Events service; records every Forward."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.received: list[tuple[events_pb2.Envelope, dict[str, list[str]]]] = []
        self.arrived = asyncio.Condition()
        self._server: Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def _forward(self, payload: bytes, ctx: RequestContext) -> bytes:
        req = events_pb2.ForwardRequest.FromString(payload)
        async with self.arrived:
            self.received.append((req.envelope, ctx.metadata))
            self.arrived.notify_all()
        return b""

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(16)
        server = Server()
        server.register(SERVICE, {"Forward": self._forward})
        self._server = server
        self._task = asyncio.get_running_loop().create_task(server.serve(sock))
        await asyncio.sleep(0)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.close()
        if self._task is not None:
            await self._task
        self._server = self._task = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def wait_for(self, count: int, timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: len(self.received) >= count)

    def topics(self) -> list[str]:
        return [env.topic for env, _ in self.received]


def exit_event(pid: int) -> task_pb2.TaskExit:
    e = task_pb2.TaskExit(container_id="c1", id="c1", pid=pid, exit_status=pid % 256)
    e.exited_at.FromNanoseconds(1_700_000_000_000_000_000 + pid)
    return e


def test_events_arrive_in_order_with_bare_type_urls(sock_path: str) -> None:
    async def body() -> None:
        containerd = Containerd(sock_path)
        await containerd.start()
        pub = Publisher(sock_path)
        try:
            pub.publish("k8s.io", "/tasks/create", task_pb2.TaskCreate(container_id="c1"))
            pub.publish("k8s.io", "/tasks/start", task_pb2.TaskStart(container_id="c1", pid=42))
            pub.publish("default", "/tasks/exit", exit_event(42))
            pub.publish("k8s.io", "/tasks/delete", task_pb2.TaskDelete(container_id="c1"))
            await containerd.wait_for(4)
        finally:
            await pub.close()
            await containerd.stop()

        assert containerd.topics() == [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete",
        ]
        urls = [env.event.type_url for env, _ in containerd.received]
        assert urls == [
            "containerd.events.TaskCreate",
            "containerd.events.TaskStart",
            "containerd.events.TaskExit",
            "containerd.events.TaskDelete",
        ]
        namespaces = [env.namespace for env, _ in containerd.received]
        assert namespaces == ["k8s.io", "k8s.io", "default", "k8s.io"]
        for env, metadata in containerd.received:
            assert metadata[NAMESPACE_KEY] == [env.namespace]
            assert env.timestamp.ToNanoseconds() > 0
        exit_env = containerd.received[2][0]
        assert task_pb2.TaskExit.FromString(exit_env.event.value) == exit_event(42)
        start = task_pb2.TaskStart.FromString(containerd.received[1][0].event.value)
        assert start.pid == 42

    run(body())


def test_queued_events_wait_for_a_late_server(sock_path: str) -> None:
    async def body() -> None:
        containerd = Containerd(sock_path)
        pub = Publisher(sock_path)
        try:
            for pid in range(1, 6):
                pub.publish("ns", "/tasks/exit", exit_event(pid))
            await asyncio.sleep(0.3)  # several failed connection attempts
            assert containerd.received == []
            await containerd.start()
            await containerd.wait_for(5)
        finally:
            await pub.close()
            await containerd.stop()
        pids = [task_pb2.TaskExit.FromString(env.event.value).pid for env, _ in containerd.received]
        assert pids == [1, 2, 3, 4, 5]

    run(body())


def test_events_survive_a_containerd_restart(sock_path: str) -> None:
    async def body() -> None:
        first = Containerd(sock_path)
        second = Containerd(sock_path)
        await first.start()
        pub = Publisher(sock_path)
        try:
            pub.publish("ns", "/tasks/exit", exit_event(1))
            await first.wait_for(1)
            await first.stop()  # containerd goes away; the publisher's connection dies
            for pid in (2, 3, 4):
                pub.publish("ns", "/tasks/exit", exit_event(pid))
            await asyncio.sleep(0.1)
            await second.start()
            await second.wait_for(3)
        finally:
            await pub.close()
            await first.stop()
            await second.stop()

        def pids(c: Containerd) -> list[int]:
            return [task_pb2.TaskExit.FromString(env.event.value).pid for env, _ in c.received]

        assert pids(first) == [1]
        assert pids(second) == [2, 3, 4]

    run(body())


def test_close_flushes_the_queue(sock_path: str) -> None:
    async def body() -> None:
        containerd = Containerd(sock_path)
        await containerd.start()
        pub = Publisher(sock_path)
        try:
            for pid in range(1, 21):
                pub.publish("ns", "/tasks/exit", exit_event(pid))
            await pub.close()
            assert len(containerd.received) == 20
        finally:
            await pub.close()  # twice is fine
            await containerd.stop()
        pids = [task_pb2.TaskExit.FromString(env.event.value).pid for env, _ in containerd.received]
        assert pids == list(range(1, 21))

    run(body())


def test_publisher_is_usable_after_close(sock_path: str) -> None:
    async def body() -> None:
        containerd = Containerd(sock_path)
        await containerd.start()
        pub = Publisher(sock_path)
        try:
            pub.publish("ns", "/tasks/exit", exit_event(1))
            await pub.close()
            pub.publish("ns", "/tasks/exit", exit_event(2))
            await containerd.wait_for(2)
        finally:
            await pub.close()
            await containerd.stop()

    run(body())


def test_close_gives_up_after_its_timeout(sock_path: str) -> None:
    async def body() -> None:
        pub = Publisher(sock_path)  # nobody ever listens
        pub.publish("ns", "/tasks/exit", exit_event(1))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await pub.close(timeout=0.2)
        assert loop.time() - t0 < 1.5

    run(body())


def test_undeliverable_event_is_dropped_after_retry_for(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        containerd = Containerd(sock_path)
        pub = Publisher(sock_path, retry_for=0.1)
        try:
            pub.publish("ns", "/tasks/exit", exit_event(1))
            await asyncio.sleep(0.4)  # past retry_for: event 1 is given up
            await containerd.start()
            pub.publish("ns", "/tasks/exit", exit_event(2))
            await containerd.wait_for(1)
        finally:
            await pub.close()
            await containerd.stop()
        pids = [task_pb2.TaskExit.FromString(env.event.value).pid for env, _ in containerd.received]
        assert pids == [2]

    run(body())
    assert "dropping event after retries" in caplog.text


def test_no_address_sends_nothing() -> None:
    async def body() -> None:
        pub = Publisher("")
        pub.publish("ns", "/tasks/exit", exit_event(1))
        await pub.close(timeout=0.1)

    run(body())
