"""The Task service: the only layer that speaks protobuf.

Each RPC decodes its request into plain values, calls the container layer,
and encodes the reply; ``_edge`` converts Stasis errors to ttrpc statuses
exactly once. Events are published here, in the order containerd requires.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from protos.containerd.events import task_pb2 as events
from protos.containerd.runc.v1 import options_pb2
from protos.containerd.task.v2 import shim_pb2 as api
from protos.containerd.types.task import task_pb2 as types
from runtime import mount as mounts
from runtime.errors import AlreadyExists, Code, NotFound, StasisError
from shim import ttrpc
from shim.container import Container, CreateConfig, RuncOptions
from shim.events import Publisher
from shim.process import Exit, InitProcess
from shim.reaper import Reaper

log = logging.getLogger("stasis.service")

SERVICE = "containerd.task.v2.Task"
_EMPTY = empty_pb2.Empty()


def _timestamp(msg: Message, field: str, at_ns: int) -> None:
    getattr(msg, field).FromNanoseconds(at_ns)


class TaskService:
    """containerd.task.v2.Task for every container of one shim (one pod or one container).

    Guarded by ``_lifecycle`` (an asyncio lock): the container map and the
    start/exit bookkeeping that keeps TaskStart before TaskExit.
    """

    def __init__(
        self,
        namespace: str,
        publisher: Publisher,
        reaper: Reaper,
        on_shutdown: Callable[[], None],
    ) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self.reaper = reaper
        self.on_shutdown = on_shutdown
        self.containers: dict[str, Container] = {}
        self._lifecycle = asyncio.Lock()
        self._starting: set[InitProcess] = set()
        self._pending_exits: dict[InitProcess, Exit] = {}

    # -- plumbing -----------------------------------------------------------------

    def handlers(self) -> dict[str, ttrpc.Handler]:
        """The ttrpc method table."""
        table: dict[str, tuple[type[Message], Callable[[Message], Awaitable[Message]]]] = {
            "Create": (api.CreateTaskRequest, self._create),  # type: ignore[dict-item]
            "Start": (api.StartRequest, self._start),  # type: ignore[dict-item]
            "Delete": (api.DeleteRequest, self._delete),  # type: ignore[dict-item]
            "State": (api.StateRequest, self._state),  # type: ignore[dict-item]
            "Wait": (api.WaitRequest, self._wait),  # type: ignore[dict-item]
            "Kill": (api.KillRequest, self._kill),  # type: ignore[dict-item]
            "Pids": (api.PidsRequest, self._pids),  # type: ignore[dict-item]
            "Pause": (api.PauseRequest, self._pause),  # type: ignore[dict-item]
            "Resume": (api.ResumeRequest, self._resume),  # type: ignore[dict-item]
            "Connect": (api.ConnectRequest, self._connect),  # type: ignore[dict-item]
            "Shutdown": (api.ShutdownRequest, self._shutdown),  # type: ignore[dict-item]
        }
        out: dict[str, ttrpc.Handler] = {m: self._edge(m, *entry) for m, entry in table.items()}
        for name in ("Checkpoint", "Exec", "ResizePty", "CloseIO", "Update", "Stats"):
            out[name] = self._unimplemented(name)
        return out

    def _edge(
        self,
        method: str,
        req_type: type[Message],
        fn: Callable[[Message], Awaitable[Message]],
    ) -> ttrpc.Handler:
        async def handle(payload: bytes, ctx: ttrpc.RequestContext) -> bytes:
            req = req_type()
            try:
                req.ParseFromString(payload)
            except Exception as e:
                raise ttrpc.RPCError(Code.INVALID_ARGUMENT, f"{method}: bad request: {e}") from e
            try:
                reply = await fn(req)
            except StasisError as e:
                raise ttrpc.RPCError(e.code, str(e)) from e
            except OSError as e:
                raise ttrpc.RPCError(Code.UNKNOWN, f"{method}: {e}") from e
            return reply.SerializeToString()

        return handle

    @staticmethod
    def _unimplemented(method: str) -> ttrpc.Handler:
        async def handle(payload: bytes, ctx: ttrpc.RequestContext) -> bytes:
            raise ttrpc.RPCError(Code.UNIMPLEMENTED, f"{method} is not implemented by stasis")

        return handle

    def _get(self, id: str) -> Container:
        c = self.containers.get(id)
        if c is None:
            raise NotFound(f"container {id!r} not found")
        return c

    def _publish(self, topic: str, event: Message) -> None:
        self.publisher.publish(self.namespace, topic, event)

    # -- exits ----------------------------------------------------------------------

    def _on_exit(self, container: Container, proc: InitProcess, e: Exit) -> None:
        # Called from the reaper: hold back an exit until its TaskStart is out.
        if proc in self._starting:
            self._pending_exits[proc] = e
            return
        self._publish_exit(container, proc, e)

    def _publish_exit(self, container: Container, proc: InitProcess, e: Exit) -> None:
        ev = events.TaskExit(
            container_id=container.id,
            id=proc.id or container.id,
            pid=proc.pid,
            exit_status=e.status,
        )
        _timestamp(ev, "exited_at", e.at_ns)
        self._publish("/tasks/exit", ev)

    # -- RPCs -----------------------------------------------------------------------

    async def _create(self, req: api.CreateTaskRequest) -> api.CreateTaskResponse:
        opts = RuncOptions()
        if req.options.type_url.endswith("containerd.runc.v1.Options"):
            o = options_pb2.Options()
            o.ParseFromString(req.options.value)
            opts = RuncOptions(
                root=o.root,
                binary_name=o.binary_name,
                systemd_cgroup=o.systemd_cgroup,
                no_pivot_root=o.no_pivot_root,
                no_new_keyring=o.no_new_keyring,
            )
        cfg = CreateConfig(
            id=req.id,
            bundle=req.bundle,
            rootfs=tuple(
                mounts.Mount(m.type, m.source, m.target, tuple(m.options)) for m in req.rootfs
            ),
            terminal=req.terminal,
            stdin=req.stdin,
            stdout=req.stdout,
            stderr=req.stderr,
            checkpoint=req.checkpoint,
            options=opts,
        )
        async with self._lifecycle:
            if req.id in self.containers:
                raise AlreadyExists(f"container {req.id!r} already exists in this shim")
            c = await Container.create(
                cfg, namespace=self.namespace, reaper=self.reaper, on_exit=self._on_exit
            )
            self.containers[req.id] = c
            ev = events.TaskCreate(
                container_id=req.id,
                bundle=req.bundle,
                rootfs=req.rootfs,
                checkpoint=req.checkpoint,
                pid=c.init.pid,
            )
            ev.io.stdin, ev.io.stdout, ev.io.stderr = req.stdin, req.stdout, req.stderr
            ev.io.terminal = req.terminal
            self._publish("/tasks/create", ev)
        return api.CreateTaskResponse(pid=c.init.pid)

    async def _start(self, req: api.StartRequest) -> api.StartResponse:
        c = self._get(req.id)
        proc = c.process(req.exec_id)
        self._starting.add(proc)
        try:
            await proc.start()
            self._publish("/tasks/start", events.TaskStart(container_id=c.id, pid=proc.pid))
        finally:
            self._starting.discard(proc)
            pending = self._pending_exits.pop(proc, None)
            if pending is not None:
                self._publish_exit(c, proc, pending)
        return api.StartResponse(pid=proc.pid)

    async def _delete(self, req: api.DeleteRequest) -> api.DeleteResponse:
        async with self._lifecycle:
            c = self._get(req.id)
            proc = await c.delete(req.exec_id)
            e = proc.exit or Exit(0, 0)
            if not req.exec_id:
                del self.containers[req.id]
            ev = events.TaskDelete(
                container_id=c.id, pid=proc.pid, exit_status=e.status, id=req.exec_id or c.id
            )
            _timestamp(ev, "exited_at", e.at_ns)
            self._publish("/tasks/delete", ev)
        resp = api.DeleteResponse(pid=proc.pid, exit_status=e.status)
        _timestamp(resp, "exited_at", e.at_ns)
        return resp

    async def _state(self, req: api.StateRequest) -> api.StateResponse:
        c = self._get(req.id)
        proc = c.process(req.exec_id)
        stdin, stdout, stderr = proc.stdio_paths
        resp = api.StateResponse(
            id=req.exec_id or c.id,
            bundle=c.bundle,
            pid=proc.pid,
            status=types.Status.Value(proc.status.name),  # type: ignore[arg-type]
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            terminal=proc.terminal,
            exec_id=req.exec_id,
        )
        if proc.exit is not None:
            resp.exit_status = proc.exit.status
            _timestamp(resp, "exited_at", proc.exit.at_ns)
        return resp

    async def _wait(self, req: api.WaitRequest) -> api.WaitResponse:
        proc = self._get(req.id).process(req.exec_id)
        e = await proc.wait()
        resp = api.WaitResponse(exit_status=e.status)
        _timestamp(resp, "exited_at", e.at_ns)
        return resp

    async def _kill(self, req: api.KillRequest) -> Message:
        proc = self._get(req.id).process(req.exec_id)
        await proc.kill(req.signal, req.all)
        return _EMPTY

    async def _pids(self, req: api.PidsRequest) -> api.PidsResponse:
        c = self._get(req.id)
        return api.PidsResponse(processes=[types.ProcessInfo(pid=p) for p in await c.pids()])

    async def _pause(self, req: api.PauseRequest) -> Message:
        c = self._get(req.id)
        await c.init.pause()
        self._publish("/tasks/paused", events.TaskPaused(container_id=c.id))
        return _EMPTY

    async def _resume(self, req: api.ResumeRequest) -> Message:
        c = self._get(req.id)
        await c.init.resume()
        self._publish("/tasks/resumed", events.TaskResumed(container_id=c.id))
        return _EMPTY

    async def _connect(self, req: api.ConnectRequest) -> api.ConnectResponse:
        # Succeeds for unknown ids too: containerd probes after a restart.
        c = self.containers.get(req.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0)

    async def _shutdown(self, req: api.ShutdownRequest) -> Message:
        async with self._lifecycle:
            # Like the runc shim, never leave running containers without their
            # reaper and stdio: `now` does not override this.
            if self.containers:
                return _EMPTY
        self.on_shutdown()
        return _EMPTY
