"""`stasis checkpoint`: a running container checkpointed by its shim, through the
shim's stasis.v1.Checkpointer service. Imports only what that call needs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from protos.stasis.v1 import checkpoint_pb2 as pb
from runtime.cli.common import progress
from runtime.errors import Code, FailedPrecondition, NotFound, StasisError, Unavailable
from runtime.names import (
    GROUP_ANNOTATIONS,
    RUNTIME,
    SPOOL_DIR,
    TTRPC_NAMESPACE_KEY,
    socket_path,
)
from runtime.rpc import ttrpc_client

if TYPE_CHECKING:
    from runtime.rpc.containerd import ContainerInfo

CHECKPOINTER = "stasis.v1.Checkpointer"


class ShimGone(Unavailable):
    """The shim's connection closed before it answered: it exited or was killed."""


def checkpoint_command(ns: argparse.Namespace) -> int:
    out = checkpoint(ns)
    print(json.dumps(out) if ns.json else out["ref"])
    return 0


def checkpoint(ns: argparse.Namespace) -> dict[str, Any]:
    """Checkpoint a running Stasis container; returns what the shim reported.

    A container with a shim of its own (not a pod's member) is found without
    asking containerd: a Stasis shim listens on its socket (runtime.names.socket_path
    of the container id), and asks containerd for the container's image itself.
    Otherwise containerd is asked first which shim serves it.
    """
    store = ns.to or ""
    if store and "://" not in store:
        store = os.path.abspath(store)
    req = pb.CheckpointRequest(
        id=ns.container,
        store=store,
        name=ns.name or "",
        exit=ns.exit,
        tcp_established=ns.tcp_established,
    )
    own = socket_path(ns.address, ns.namespace, ns.container)
    try:
        client = ttrpc_client.Client.connect(own)
    except ttrpc_client.RPCError:  # a pod's member, no such container, a shim gone
        raw = _checkpoint_looked_up(ns, req)
    else:
        progress(f"checkpointing {ns.container} ...")
        try:
            raw = _send_checkpoint(ns, req, own, client)
        except NotFound as e:
            if str(e) != f"container {ns.container!r} not found":
                raise
            # A shim of a group named like it, which serves others: ask its group's.
            raw = _checkpoint_looked_up(ns, req)
    try:
        resp = pb.CheckpointResponse.FromString(raw)
    except Exception as e:  # google.protobuf.message.DecodeError
        msg = f"checkpoint of {ns.container}: the shim's answer is malformed: {e}"
        raise StasisError(msg) from e
    for warning in resp.warnings:
        print(f"stasis: warning: {warning}", file=sys.stderr)
    return {
        "ref": resp.ref,
        "name": resp.name,
        "size": resp.size,
        "criu_size": resp.criu_size,
        "seconds": round(resp.seconds, 3),
        "frozen_seconds": round(resp.frozen_seconds, 3),
    }


def _checkpoint_looked_up(ns: argparse.Namespace, req: pb.CheckpointRequest) -> bytes:
    """Ask containerd for the container, then its group's shim for the checkpoint."""
    from runtime.rpc.containerd import get_container  # HTTP/2: only when containerd is asked

    info = get_container(ns.address, ns.namespace, ns.container)
    if info.runtime != RUNTIME:
        runtime = info.runtime or "an unknown runtime"
        raise FailedPrecondition(f"container {ns.container} runs on {runtime}, not {RUNTIME}")
    req.image = info.image
    progress(f"checkpointing {ns.container} ...")
    return _send_checkpoint(ns, req, _group_socket(ns, info))


def _group_socket(ns: argparse.Namespace, info: ContainerInfo) -> str:
    """The socket of the shim that serves the container: its group's."""
    group = next((info.annotations[k] for k in GROUP_ANNOTATIONS if info.annotations.get(k)), "")
    return socket_path(ns.address, ns.namespace, group or ns.container)


def _send_checkpoint(
    ns: argparse.Namespace,
    req: pb.CheckpointRequest,
    sock: str,
    client: ttrpc_client.Client | None = None,
) -> bytes:
    """The Checkpoint call, on ``client`` (closed afterwards) or a new connection to
    ``sock``; the shim's error as the Stasis error of its code."""
    try:
        if client is None:
            client = ttrpc_client.Client.connect(sock)
        with client:
            return client.call(
                CHECKPOINTER,
                "Checkpoint",
                req.SerializeToString(),
                metadata={TTRPC_NAMESPACE_KEY: ns.namespace},
            )
    except ttrpc_client.RPCError as e:
        if not e.closed:
            raise _error(e.code, e.message) from e
        leftovers = "stasis gc removes what it had written"
        if req.store.startswith("s3://") or (not req.store and default_is_s3()):
            # The upload runs in a worker process that outlives the shim.
            leftovers = (
                f"its upload worker may still publish it; a spool kept under {SPOOL_DIR} "
                "uploads with stasis push, and stasis gc removes what was written"
            )
        raise ShimGone(
            f"checkpoint of {ns.container}: the shim ({sock}) closed the connection before "
            f"answering (it exited or was killed); unless stasis list shows the checkpoint, "
            f"it was not published: {leftovers}"
        ) from e


def _error(code: Code, message: str) -> StasisError:
    """The Stasis error class of a status code (StasisError itself for the others)."""
    kinds = {kind.code: kind for kind in StasisError.__subclasses__()}
    return kinds.get(code, StasisError)(message)


def default_is_s3() -> bool:
    """Whether the configured store is an S3 one (False when the config is unreadable)."""
    from runtime import config  # on this error path only

    try:
        return config.load().storage.url.startswith("s3://")
    except StasisError:
        return False
