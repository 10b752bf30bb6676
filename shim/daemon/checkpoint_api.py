"""stasis.v1.Checkpointer: Stasis checkpoints of this shim's containers into a store.

Requests become a ``CheckpointSpec`` for ``shim.checkpoint.take.checkpoint`` (imported
by the first checkpoint), with the store and the GPU backend it uses; a request
without an image has containerd looked up while the dump runs. Errors go out through
the Task service's ``edge``.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from protos.stasis.v1 import checkpoint_pb2 as stasis_api
from runtime.errors import FailedPrecondition, NotFound, StasisError
from runtime.names import RUNTIME
from runtime.rpc import ttrpc_server as ttrpc
from shim.daemon.task_api import TaskService, edge

if TYPE_CHECKING:
    from runtime.rpc.containerd import ContainerInfo

log = logging.getLogger("stasis.service")

SERVICE = "stasis.v1.Checkpointer"


class CheckpointService:
    """stasis.v1.Checkpointer for the containers of ``tasks``; containerd (its gRPC
    socket, the shim's -address flag) is asked for images checkpoints come without."""

    def __init__(self, tasks: TaskService, containerd_address: str = "") -> None:
        self.tasks = tasks
        self.containerd_address = containerd_address

    def handlers(self) -> dict[str, ttrpc.Handler]:
        """The ttrpc method table of stasis.v1.Checkpointer."""
        return {
            "Checkpoint": edge("Checkpoint", stasis_api.CheckpointRequest, self.stasis_checkpoint),
        }

    async def stasis_checkpoint(self, req: stasis_api.CheckpointRequest) -> Message:
        """stasis.v1.Checkpointer/Checkpoint: a Stasis checkpoint into a store."""
        c = self.tasks.get(req.id)
        warnings: list[str] = []
        # Without an image in the request, containerd is asked while the dump runs.
        lookup = None if req.image else asyncio.create_task(self._look_up(req.id))
        try:
            # Only checkpoints pay for importing the checkpoint machinery.
            from runtime import config
            from runtime.capture import gpu
            from runtime.store.resolve import default_store, open_store
            from shim.checkpoint import take as checkpointing

            conf = config.load()
            store = open_store(req.store, conf) if req.store else default_store(conf)
            spec = checkpointing.CheckpointSpec(
                name=req.name,
                exit=req.exit,
                tcp_established=req.tcp_established,
                image=req.image,
                labels=dict(req.labels),
                image_later=partial(self._image_of, req.id, req.exit, lookup, warnings)
                if lookup
                else None,
            )
            result = await checkpointing.checkpoint(
                c, spec, store=store, gpu=gpu.load(), namespace=self.tasks.namespace
            )
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
                get_container, self.containerd_address, self.tasks.namespace, id
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
