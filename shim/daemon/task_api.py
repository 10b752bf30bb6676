"""The Task service: the only layer that speaks protobuf.

Each RPC decodes its request into plain values, calls the container layer,
and encodes the reply; ``_edge`` converts Stasis errors to ttrpc statuses
exactly once. Events are published here, in the order containerd requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from protos.containerd.events import task_pb2 as events
from protos.containerd.runc.v1 import options_pb2
from protos.containerd.task.v2 import shim_pb2 as api
from protos.containerd.types.task import task_pb2 as types
from protos.stasis.v1 import checkpoint_pb2 as stasis_api
from runtime.errors import (
    AlreadyExists,
    Code,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StasisError,
)
from runtime.linux import cgroups
from runtime.linux import mount as mounts
from runtime.linux.runc import CheckpointOpts
from runtime.names import RESTORE_ANNOTATION, RUNTIME
from runtime.rpc import ttrpc_server as ttrpc
from shim.daemon import runtimeoptions
from shim.daemon.events import Publisher
from shim.task.container import Container, CreateConfig, read_spec
from shim.task.process import Exit, Process
from shim.task.reaper import Reaper

if TYPE_CHECKING:
    from runtime.rpc.containerd import ContainerInfo

log = logging.getLogger("stasis.service")

SERVICE = "containerd.task.v2.Task"
STASIS_SERVICE = "stasis.v1.Checkpointer"
RESTORE_FROM = RESTORE_ANNOTATION
CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
_EMPTY = empty_pb2.Empty()
# How long an init's exit waits for the exits of its execs.
_EXEC_EXIT_GRACE = 2.0


def _empty_dir(path: str) -> None:
    """Remove everything inside ``path`` (a fresh upperdir after a failed restore)."""
    import shutil

    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _timestamp(msg: Message, field: str, at_ns: int) -> None:
    getattr(msg, field).FromNanoseconds(at_ns)


# CRI's per-container directory, <containerd root>/<this>/containers/<id> (fixed in
# containerd 2.x "for backward compatibility", plugins/cri/runtime/plugin.go).
_CRI_ROOT = "io.containerd.grpc.v1.cri"
_CRI_CHECKPOINT_DIR = "ctrd-checkpoint"  # CRI CheckpointContainer's archive staging dir


def _cri_work_path(c: Container) -> str:
    """CRIU's work directory for a Task.Checkpoint of a CRI container that came
    without runc CheckpointOptions, or "" (the shim's own, removed afterwards).

    containerd's CRI CheckpointContainer sends CheckpointOptions{work_path} only to
    runtime type io.containerd.runc.v2; any other type gets no options, yet CRI still
    expects CRIU's work files where that work_path would have put them:
    containerd 2.1.9, 2.2.5 and 2.3.2 on pass the staging directory
    ``<CRI dir>/ctrd-checkpoint``, made before the call and archived whole (dump.log
    and stats-dump then travel in the archive); earlier 2.x pass ``<CRI dir>`` itself
    and fail the checkpoint when ``<CRI dir>/stats-dump`` is missing. The shim does
    what runc would have been told to do. containerd's root comes from the bundle's
    ``work`` link (``<root>/io.containerd.runtime.v2.task/<ns>/<id>``).
    """
    annotations = c.config.spec.get("annotations") or {}
    if CRI_CONTAINER_TYPE not in annotations:
        return ""
    try:
        work = os.path.realpath(os.path.join(c.bundle, "work"), strict=True)
    except OSError:
        return ""
    root = os.path.dirname(os.path.dirname(os.path.dirname(work)))
    cri_dir = os.path.join(root, _CRI_ROOT, "containers", c.id)
    staging = os.path.join(cri_dir, _CRI_CHECKPOINT_DIR)
    for candidate in (staging, cri_dir):
        if os.path.isdir(candidate) and not os.path.islink(candidate):
            log.info("checkpoint of %s: CRIU work files into %s (CRI)", c.id, candidate)
            return candidate
    return ""


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
        containerd_address: str = "",
    ) -> None:
        self.namespace = namespace
        self.containerd_address = containerd_address  # its gRPC socket (the -address flag)
        self.publisher = publisher
        self.reaper = reaper
        self.on_shutdown = on_shutdown
        self.containers: dict[str, Container] = {}
        self._unified = cgroups.unified()
        self._lifecycle = asyncio.Lock()
        self._starting: set[Process] = set()
        self._pending_exits: dict[Process, Exit] = {}
        self._held_inits: dict[Container, Exit] = {}

    # -- plumbing -----------------------------------------------------------------

    def handlers(self) -> dict[str, ttrpc.Handler]:
        """The ttrpc method table."""
        table: dict[str, tuple[type[Message], Callable[[Any], Awaitable[Message]]]] = {
            "Create": (api.CreateTaskRequest, self._create),
            "Start": (api.StartRequest, self._start),
            "Delete": (api.DeleteRequest, self._delete),
            "State": (api.StateRequest, self._state),
            "Wait": (api.WaitRequest, self._wait),
            "Kill": (api.KillRequest, self._kill),
            "Pids": (api.PidsRequest, self._pids),
            "Pause": (api.PauseRequest, self._pause),
            "Resume": (api.ResumeRequest, self._resume),
            "Exec": (api.ExecProcessRequest, self._exec),
            "ResizePty": (api.ResizePtyRequest, self._resize_pty),
            "CloseIO": (api.CloseIORequest, self._close_io),
            "Update": (api.UpdateTaskRequest, self._update),
            "Checkpoint": (api.CheckpointTaskRequest, self._checkpoint),
            "Stats": (api.StatsRequest, self._stats),
            "Connect": (api.ConnectRequest, self._connect),
            "Shutdown": (api.ShutdownRequest, self._shutdown),
        }
        return {m: self._edge(m, *entry) for m, entry in table.items()}

    def _edge(
        self,
        method: str,
        req_type: type[Message],
        fn: Callable[[Any], Awaitable[Message]],
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
                log.info("%s failed (%s): %s", method, e.code.name, e)
                raise ttrpc.RPCError(e.code, str(e)) from e
            except OSError as e:
                log.warning("%s failed: %s", method, e)
                raise ttrpc.RPCError(Code.UNKNOWN, f"{method}: {e}") from e
            return reply.SerializeToString()

        return handle

    def _get(self, id: str) -> Container:
        c = self.containers.get(id)
        if c is None:
            raise NotFound(f"container {id!r} not found")
        return c

    def _publish(self, topic: str, event: Message) -> None:
        self.publisher.publish(self.namespace, topic, event)

    # -- exits ----------------------------------------------------------------------

    def _on_exit(self, container: Container, proc: Process, e: Exit) -> None:
        # Called from the reaper. An exit waits for its TaskStart (or
        # TaskExecStarted) to be out, and an init's exit for the exits of the
        # container's execs, which the kernel delivers at about the same time.
        if proc in self._starting:
            self._pending_exits[proc] = e
            return
        if proc is container.init and container.running_execs():
            self._held_inits[container] = e
            asyncio.get_running_loop().call_later(
                _EXEC_EXIT_GRACE, self._release_init_exit, container
            )
            return
        self._publish_exit(container, proc, e)
        if proc is not container.init and not container.running_execs():
            self._release_init_exit(container)

    def _release_init_exit(self, container: Container) -> None:
        e = self._held_inits.pop(container, None)
        if e is not None:
            self._publish_exit(container, container.init, e)

    def _publish_exit(self, container: Container, proc: Process, e: Exit) -> None:
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
        # runc's Options, or (a CRI handler of Stasis's own type) runtimeoptions'
        opts = await asyncio.to_thread(
            runtimeoptions.decode, req.options.type_url, req.options.value
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
            spec=read_spec(req.bundle),
        )
        async with self._lifecycle:
            if req.id in self.containers:
                raise AlreadyExists(f"container {req.id!r} already exists in this shim")
            plan = None
            if not cfg.checkpoint:
                cfg, plan = await self._restore_by_annotation(cfg)
            else:  # containerd's own checkpoint (ctr run --checkpoint)
                cfg = replace(cfg, restore_timeout=_restore_timeout())
            try:
                c = await Container.create(
                    cfg, namespace=self.namespace, reaper=self.reaper, on_exit=self._on_exit
                )
                if cfg.checkpoint:  # a restore: held until checked against this spec
                    c.restore_gate = _restore_gate(c, plan)
            except BaseException:
                if plan is not None:
                    await asyncio.to_thread(plan.reader.close)
                raise
            c.restore_source = plan.reader if plan is not None else None
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

    async def _restore_by_annotation(self, cfg: CreateConfig) -> tuple[CreateConfig, Any]:
        """Honour stasis.dev/restore-from: verify, apply the rootfs diff, restore at Start."""
        annotations = cfg.spec.get("annotations") or {}
        if RESTORE_FROM not in annotations or annotations.get(CRI_CONTAINER_TYPE) == "sandbox":
            return cfg, None  # a pod's sandbox carries the pod's annotations: never restored
        # Only restores pay for importing the checkpoint machinery.
        from runtime import config
        from shim.checkpoint import take as checkpointing

        request = checkpointing.restore_request(annotations)
        if request is None:
            return cfg, None
        ref, policy = request
        upper = next((u for m in cfg.rootfs if (u := m.upperdir())), None)
        member = annotations.get(checkpointing.CRI_CONTAINER_NAME)
        try:
            conf = config.load()
            # With policy fresh, everything is checked now, while starting fresh is
            # still possible; with fail, the CRIU images are checked during Start.
            plan = await asyncio.to_thread(
                partial(
                    checkpointing.prepare_restore,
                    ref,
                    upper,
                    conf,
                    defer_images=policy == "fail",
                    container_name=member,
                    spec=cfg.spec,
                    target=checkpointing.RestoreTarget.of(self.namespace, annotations),
                )
            )
        except StasisError as e:
            if policy != "fresh":
                raise
            log.warning("container %s starts fresh (restore-policy fresh): %s", cfg.id, e)
            if upper is not None:
                await asyncio.to_thread(_empty_dir, upper)
            return cfg, None
        if plan is None:
            log.info("container %s starts fresh: pod checkpoint %s has no %r", cfg.id, ref, member)
            return cfg, None
        log.info("container %s restores from %s", cfg.id, ref)
        restored = replace(
            cfg,
            checkpoint=plan.images,
            restore_tcp_established=plan.tcp_established,
            restore_timeout=conf.restore.timeout_seconds,
            restore_ref=ref,
        )
        return restored, plan

    async def _start(self, req: api.StartRequest) -> api.StartResponse:
        c = self._get(req.id)
        proc = c.process(req.exec_id)
        self._starting.add(proc)
        try:
            if not req.exec_id and c.restore_gate is not None:
                await _start_gated(c)
            else:
                await proc.start()
            if req.exec_id:
                self._publish(
                    "/tasks/exec-started",
                    events.TaskExecStarted(container_id=c.id, exec_id=req.exec_id, pid=proc.pid),
                )
            else:
                self._publish("/tasks/start", events.TaskStart(container_id=c.id, pid=proc.pid))
                c.watch_oom(self._on_oom)
        finally:
            if not req.exec_id:
                await c.release_restore_source()
            self._starting.discard(proc)
            pending = self._pending_exits.pop(proc, None)
            if pending is not None:
                self._on_exit(c, proc, pending)
        return api.StartResponse(pid=proc.pid)

    def _on_oom(self, container: Container) -> None:
        self._publish("/tasks/oom", events.TaskOOM(container_id=container.id))

    async def _delete(self, req: api.DeleteRequest) -> api.DeleteResponse:
        async with self._lifecycle:
            c = self._get(req.id)
            if not req.exec_id:
                # Its exit goes out before its delete, whatever the execs do.
                self._release_init_exit(c)
            proc = await c.delete(req.exec_id)
            e = proc.exit or Exit(0, 0)
            if not req.exec_id:
                del self.containers[req.id]
                ev = events.TaskDelete(
                    container_id=c.id, pid=proc.pid, exit_status=e.status, id=c.id
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
        out = api.PidsResponse()
        for pid, exec_id in await c.pids():
            info = out.processes.add(pid=pid)
            if exec_id:
                details = options_pb2.ProcessDetails(exec_id=exec_id)
                info.info.type_url = details.DESCRIPTOR.full_name
                info.info.value = details.SerializeToString()
        return out

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

    async def _exec(self, req: api.ExecProcessRequest) -> Message:
        try:
            spec = json.loads(req.spec.value or b"{}")
        except ValueError as e:
            raise InvalidArgument(f"exec {req.exec_id}: process spec is not JSON: {e}") from e
        if not isinstance(spec, dict):
            raise InvalidArgument(f"exec {req.exec_id}: process spec is not a JSON object")
        async with self._lifecycle:
            c = self._get(req.id)
            c.exec(req.exec_id, spec, (req.stdin, req.stdout, req.stderr), req.terminal)
        self._publish(
            "/tasks/exec-added", events.TaskExecAdded(container_id=c.id, exec_id=req.exec_id)
        )
        return _EMPTY

    async def _resize_pty(self, req: api.ResizePtyRequest) -> Message:
        self._get(req.id).process(req.exec_id).resize(req.width, req.height)
        return _EMPTY

    async def _close_io(self, req: api.CloseIORequest) -> Message:
        proc = self._get(req.id).process(req.exec_id)
        if req.stdin:
            proc.io.close_stdin()
        return _EMPTY

    async def _update(self, req: api.UpdateTaskRequest) -> Message:
        await self._get(req.id).update(req.resources.value)
        return _EMPTY

    async def _checkpoint(self, req: api.CheckpointTaskRequest) -> Message:
        o = options_pb2.CheckpointOptions()
        if req.options.type_url.endswith("containerd.runc.v1.CheckpointOptions"):
            o.ParseFromString(req.options.value)
        image = o.image_path or req.path
        if not image:
            raise InvalidArgument(f"checkpoint of {req.id}: no image path")
        c = self._get(req.id)
        opts = CheckpointOpts(
            image_path=image,
            work_path=o.work_path or _cri_work_path(c),
            leave_running=not o.exit,
            tcp_established=o.open_tcp,
            ext_unix_sk=o.external_unix_sockets,
            shell_job=o.terminal,
            file_locks=o.file_locks,
            empty_ns=tuple(o.empty_namespaces),
            manage_cgroups_mode=o.cgroups_mode,
        )
        await c.checkpoint(opts)
        return _EMPTY

    async def stasis_checkpoint(self, req: stasis_api.CheckpointRequest) -> Message:
        """stasis.v1.Checkpointer/Checkpoint: a Stasis checkpoint into a store."""
        from runtime import config
        from shim.checkpoint import take as checkpointing

        c = self._get(req.id)
        warnings: list[str] = []
        # Without an image in the request, containerd is asked while the dump runs.
        lookup = None if req.image else asyncio.create_task(self._look_up(req.id))
        try:
            spec = checkpointing.CheckpointSpec(
                store=req.store,
                name=req.name,
                exit=req.exit,
                tcp_established=req.tcp_established,
                image=req.image,
                labels=dict(req.labels),
                image_later=partial(self._image_of, req.id, req.exit, lookup, warnings)
                if lookup
                else None,
            )
            result = await checkpointing.checkpoint(c, spec, config.load(), self.namespace)
        finally:
            if lookup is not None:
                lookup.cancel()
        return stasis_api.CheckpointResponse(
            ref=result.ref,
            name=result.name,
            size=result.size,
            criu_size=result.criu_size,
            seconds=result.seconds,
            frozen_seconds=result.frozen_seconds,
            warnings=warnings,
        )

    async def _look_up(self, id: str) -> ContainerInfo | StasisError:
        """containerd's record of container ``id``, or why it has none to give."""
        from runtime.rpc.containerd import get_container

        try:
            return await asyncio.to_thread(
                get_container, self.containerd_address, self.namespace, id
            )
        except StasisError as e:
            return e

    async def _image_of(
        self,
        id: str,
        exit: bool,
        lookup: asyncio.Task[ContainerInfo | StasisError],
        warnings: list[str],
    ) -> str:
        """The image containerd records for ``id``; "" when containerd cannot be asked
        (the checkpoint then records the image its annotations name). Raises
        FailedPrecondition when containerd does not know the container or runs it on
        another runtime, unless the dump already stopped it (``exit``): then failing
        would lose its state, and the checkpoint is kept, with a warning."""
        found = await lookup
        if not isinstance(found, StasisError):
            if found.runtime == RUNTIME:
                return found.image
            runtime = found.runtime or "an unknown runtime"
            found = FailedPrecondition(f"container {id} runs on {runtime}, not {RUNTIME}")
        if isinstance(found, NotFound | FailedPrecondition):
            if not exit:
                raise FailedPrecondition(str(found)) from found
            why = (
                f"{found}; its shim checkpointed it all the same, "
                "as the dump had already stopped it"
            )
        else:
            why = (
                f"the image of {id} could not be looked up ({found}); "
                "the checkpoint records the one its annotations name, if any"
            )
        log.warning("checkpoint of %s: %s", id, why)
        warnings.append(why)
        return ""

    def stasis_handlers(self) -> dict[str, ttrpc.Handler]:
        """The ttrpc method table of stasis.v1.Checkpointer."""
        return {
            "Checkpoint": self._edge(
                "Checkpoint", stasis_api.CheckpointRequest, self.stasis_checkpoint
            ),
        }

    async def _stats(self, req: api.StatsRequest) -> api.StatsResponse:
        from shim.daemon.metrics import metrics_v1, metrics_v2  # first Stats call pays for it

        stats = await self._get(req.id).stats()
        m = metrics_v2(stats) if self._unified else metrics_v1(stats)
        resp = api.StatsResponse()
        resp.stats.type_url = m.DESCRIPTOR.full_name
        resp.stats.value = m.SerializeToString()
        return resp

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


def _restore_timeout() -> float:
    """The config's restore.timeout_seconds."""
    from runtime import config

    return config.load().restore.timeout_seconds


def _restore_gate(c: Container, plan: Any) -> Any:
    """Hold the restored tree until it is checked: the spec's ceiling, and the
    checkpoint's CRIU images when ``plan`` left them to the gate (see RestoreGate)."""
    from shim.checkpoint.take import RestoreGate

    ref = plan.ref if plan is not None else c.config.checkpoint
    gate = RestoreGate(c.bundle, ref, c.config.spec, plan)
    gate.install()
    gate.start()
    return gate


async def _start_gated(c: Container) -> None:
    """Start (restore) a container through its gate: CRIU holds the restored tree
    until the images and the tree are checked, so neither a corrupt checkpoint nor
    one that exceeds the container's spec ever runs."""
    gate, c.restore_gate = c.restore_gate, None
    try:
        try:
            await c.init.start()
        except StasisError as e:
            bad = await gate.outcome(0)
            if bad is not None:
                if gate.held("images") and not gate.held("ceiling"):
                    raise type(bad)(f"{bad} (its restored processes never ran)") from e
                raise bad from e
            raise
        bad = await gate.outcome(c.init.pid)
        if bad is not None:  # CRIU resumed it anyway: never leave it running
            log.error("restore gate of %s was not honoured; killing it", c.id)
            with contextlib.suppress(StasisError):
                await c.init.kill(signal.SIGKILL, all=True)
            raise bad
        if not gate.held("images") and gate.plan is not None:
            log.warning("CRIU did not run the restore gate of %s; its images matched", c.id)
        elif gate.plan is not None:
            log.debug(
                "restore of %s: CRIU waited %.3fs for the image check", c.id, gate.held_seconds()
            )
        held = gate.held_seconds("ceiling")
        if held is not None:  # bench/checkpoint.py reads this line
            log.debug(
                "restore of %s: CRIU held %.4fs at pre-resume for the spec ceiling", c.id, held
            )
    finally:
        gate.remove()
