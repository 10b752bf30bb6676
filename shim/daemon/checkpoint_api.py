"""stasis.v1.Checkpointer: Stasis checkpoints of this shim's containers into a store.

Requests become a ``CheckpointSpec`` for ``shim.checkpoint.take.checkpoint`` (imported
by the first checkpoint), with the store and the GPU backend it uses; errors go out
through the Task service's ``edge``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from protos.stasis.v1 import checkpoint_pb2 as stasis_api
from runtime.errors import FailedPrecondition
from runtime.rpc import ttrpc_server as ttrpc
from shim.daemon.task_api import TaskService, edge

log = logging.getLogger("stasis.service")

SERVICE = "stasis.v1.Checkpointer"
_EMPTY = empty_pb2.Empty()
# How long a checkpoint sent with image_pending waits, once its dump is done, for
# the image (SetImage) before it records the annotations' image instead.
IMAGE_WAIT_S = 30.0
# How long a SetImage that came before its Checkpoint waits for it (the two come
# on two connections, in either order).
IMAGE_CLAIM_S = 5.0


@dataclass(frozen=True)
class _Image:
    """What a SetImage delivered."""

    image: str
    error: str
    abort: bool


class _PendingImage:
    """The image of a container's checkpoints sent with image_pending, while the
    CLI looks it up. Created by whichever comes first, the Checkpoint or the
    SetImage; every checkpoint of the container running meanwhile shares it
    (they checkpoint the same container, so the same image)."""

    def __init__(self) -> None:
        self.delivered: asyncio.Future[_Image] = asyncio.get_running_loop().create_future()
        self.claimed = asyncio.Event()  # set once a checkpoint waits for it
        self.checkpoints = 0


class CheckpointService:
    """stasis.v1.Checkpointer for the containers of ``tasks``."""

    #: Seconds a checkpoint sent with image_pending waits for its SetImage.
    image_wait_s = IMAGE_WAIT_S
    #: Seconds a SetImage that came first waits for its checkpoint.
    image_claim_s = IMAGE_CLAIM_S

    def __init__(self, tasks: TaskService) -> None:
        self.tasks = tasks
        # Container id -> its image while checkpoints sent with image_pending run;
        # changed only without an await between lookup and update (one event loop).
        self._images: dict[str, _PendingImage] = {}

    def handlers(self) -> dict[str, ttrpc.Handler]:
        """The ttrpc method table of stasis.v1.Checkpointer."""
        return {
            "Checkpoint": edge("Checkpoint", stasis_api.CheckpointRequest, self.stasis_checkpoint),
            "SetImage": edge("SetImage", stasis_api.SetImageRequest, self.stasis_set_image),
        }

    async def stasis_checkpoint(self, req: stasis_api.CheckpointRequest) -> Message:
        """stasis.v1.Checkpointer/Checkpoint: a Stasis checkpoint into a store."""
        c = self.tasks.get(req.id)
        # Registered before anything can await, so a SetImage that comes later
        # always finds it.
        pending = self._expect_image(req.id) if req.image_pending else None
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
                image="" if pending else req.image,
                labels=dict(req.labels),
                image_later=partial(self._image_of, req.id, pending) if pending else None,
            )
            result = await checkpointing.checkpoint(
                c, spec, store=store, gpu=gpu.load(), namespace=self.tasks.namespace
            )
        finally:
            if pending is not None:
                self._forget_image(req.id, pending)
        return stasis_api.CheckpointResponse(
            ref=result.ref,
            name=result.name,
            size=result.size,
            criu_size=result.criu_size,
            seconds=result.seconds,
            frozen_seconds=result.frozen_seconds,
        )

    def _expect_image(self, id: str) -> _PendingImage:
        pending = self._images.get(id)
        if pending is None:
            pending = self._images[id] = _PendingImage()
        pending.checkpoints += 1
        pending.claimed.set()
        return pending

    def _forget_image(self, id: str, pending: _PendingImage) -> None:
        pending.checkpoints -= 1
        if pending.checkpoints == 0 and self._images.get(id) is pending:
            del self._images[id]

    async def _image_of(self, id: str, pending: _PendingImage) -> str:
        """The image SetImage delivers for a checkpoint of ``id``; "" when none
        comes in time or the CLI could not look it up (the checkpoint then records
        the image the annotations name). Raises FailedPrecondition when the CLI
        found the container is not the one it meant."""
        try:
            # Shielded: the future is shared, and a timeout must not cancel it.
            async with asyncio.timeout(self.image_wait_s):
                got = await asyncio.shield(pending.delivered)
        except TimeoutError:
            log.warning(
                "checkpoint of %s: no image came (SetImage) within %g s; "
                "recording the image its annotations name, if any",
                id,
                self.image_wait_s,
            )
            return ""
        if got.abort:
            raise FailedPrecondition(got.error or f"checkpoint of {id}: aborted by its caller")
        if got.error:
            log.warning(
                "checkpoint of %s: its image could not be looked up (%s); "
                "recording the image its annotations name, if any",
                id,
                got.error,
            )
            return ""
        return got.image

    async def stasis_set_image(self, req: stasis_api.SetImageRequest) -> Message:
        """stasis.v1.Checkpointer/SetImage: the image of a checkpoint sent with image_pending."""
        self.tasks.get(req.id)
        pending = self._images.get(req.id)
        early = pending is None
        if pending is None:
            pending = self._images[req.id] = _PendingImage()
        if not pending.delivered.done():
            pending.delivered.set_result(_Image(req.image, req.error, req.abort))
        if not early:
            return _EMPTY
        try:
            async with asyncio.timeout(self.image_claim_s):
                await pending.claimed.wait()
        except TimeoutError:
            raise FailedPrecondition(
                f"SetImage for container {req.id}: no checkpoint of it waits for an image "
                f"(none sent with image_pending came within {self.image_claim_s:g} s)"
            ) from None
        finally:
            if not pending.claimed.is_set() and self._images.get(req.id) is pending:
                del self._images[req.id]
        return _EMPTY
