"""The stasis commands on containers: checkpoint one (through its shim's
stasis.v1.Checkpointer), restore one from a checkpoint, and the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

from protos.stasis.v1 import checkpoint_pb2 as pb
from runtime.cli.checkpoints import (
    SPOOL_DIR,
    default_is_s3,
    open_checkpoint,
    remove_checkpoint,
)
from runtime.cli.common import ctr, progress
from runtime.errors import (
    Code,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StasisError,
    Unavailable,
)
from runtime.names import GROUP_ANNOTATIONS, RUNTIME, TTRPC_NAMESPACE_KEY, socket_path
from runtime.rpc import ttrpc_client
from runtime.rpc.containerd import ContainerInfo, get_container
from runtime.store.metadata import restore_metadata

CHECKPOINTER = "stasis.v1.Checkpointer"
DEMO_IMAGE = "docker.io/stasis/busybox:test"


class ShimGone(Unavailable):
    """The shim's connection closed before it answered: it exited or was killed."""


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """The commands' parsers, each with its handler as ``run``."""
    c = sub.add_parser("checkpoint", help="checkpoint a running container", parents=[parent])
    c.set_defaults(run=checkpoint_command)
    c.add_argument("container", help="the container's id")
    c.add_argument("--to", help="store: a directory, file:///dir or s3://bucket/prefix")
    c.add_argument("--name", help="checkpoint name (default: CONTAINER-UTCTIME)")
    c.add_argument("--exit", action="store_true", help="stop the container once checkpointed")
    c.add_argument("--tcp-established", action="store_true", help="allow open TCP connections")
    c.add_argument("--json", action="store_true", help="print what the shim reported as JSON")
    r = sub.add_parser(
        "restore", help="create and start a container from a checkpoint", parents=[parent]
    )
    r.set_defaults(run=restore_command)
    r.add_argument("ref", help="the checkpoint: a name, a path, file:// or s3:// URL")
    r.add_argument("new_id", help="the id of the container to create")
    r.add_argument("--image", help="image to create it from (default: the checkpoint's)")
    d = sub.add_parser(
        "demo", help="checkpoint, kill and restore a counting container", parents=[parent]
    )
    d.set_defaults(run=demo)
    d.add_argument("--image", default=DEMO_IMAGE, help=f"the image to run (default {DEMO_IMAGE})")
    d.add_argument(
        "--seconds", type=float, default=2.0, help="how long it counts before the checkpoint"
    )
    d.add_argument("--keep", action="store_true", help="keep the demo's checkpoint")


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


def restore_command(ns: argparse.Namespace) -> int:
    print(restore(ns))
    return 0


def restore(ns: argparse.Namespace) -> str:
    """Create and start NEW_ID from checkpoint REF; returns the container id."""
    with open_checkpoint(ns.ref) as reader:
        metadata, path = restore_metadata(reader), reader.path
    image = ns.image or str(metadata.get("image") or "")
    if not image:
        raise FailedPrecondition(f"checkpoint {ns.ref} records no image: pass --image")
    for what, value in (("image", image), ("container id", ns.new_id)):
        if value.startswith("-"):  # ctr would take it for an option
            raise InvalidArgument(f"restore: {what} {value!r} starts with '-'")
    # An absolute reference: the shim may run with another default store.
    ref = f"file://{path}" if not ns.ref.startswith(("s3://", "file://")) else ns.ref
    progress(f"restoring {ns.ref} as {ns.new_id} ...")
    # "--": what follows are positional values, never options.
    ctr(ns, "run", "-d", "--runtime", RUNTIME, "--annotation",
        f"stasis.dev/restore-from={ref}", "--", image, ns.new_id)  # fmt: skip
    return str(ns.new_id)


def demo(ns: argparse.Namespace) -> int:
    """A counting container checkpointed (and stopped), then restored: it counts on."""
    images = ctr(ns, "images", "ls", "-q")
    if ns.image not in images.split():
        raise FailedPrecondition(f"image {ns.image} is not in namespace {ns.namespace}")
    first = f"stasis-demo-{uuid.uuid4().hex[:6]}"
    second = f"{first}-restored"
    script = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
    ctr(ns, "run", "-d", "--runtime", RUNTIME, "--", ns.image, first, "sh", "-c", script)
    created: list[str] = [first]
    ref = ""
    try:
        time.sleep(ns.seconds)
        before = ctr(ns, "task", "exec", "--exec-id", "count", "--", first, "cat", "/tmp/count")
        before = before.strip()
        print(f"{first} counted to {before}; checkpointing it (and stopping it)")
        ckpt = checkpoint(
            argparse.Namespace(
                address=ns.address, namespace=ns.namespace, container=first, to=None,
                name=None, exit=True, tcp_established=False,
            )
        )  # fmt: skip
        ref = ckpt["ref"]
        print(f"checkpoint {ref}: {ckpt['size']} bytes, frozen {ckpt['frozen_seconds']} s")
        _remove(ns, first)
        created.remove(first)
        restore(argparse.Namespace(**{**vars(ns), "ref": ref, "new_id": second, "image": None}))
        created.append(second)
        time.sleep(1.0)
        after = ctr(ns, "task", "exec", "--exec-id", "count", "--", second, "cat", "/tmp/count")
        after = after.strip()
        print(f"{second} restored from the checkpoint, counting on: {after}")
        if int(after) <= int(before):
            raise StasisError(f"restored counter at {after}, not past {before}")
        print("demo: ok (the count continued from the checkpoint)")
    finally:
        for id in created:
            _remove(ns, id)
        if ref and not ns.keep:
            remove_checkpoint(ref)
    return 0


def _remove(ns: argparse.Namespace, id: str) -> None:
    ctr(ns, "task", "kill", "-s", "KILL", "--", id, check=False)
    for _ in range(50):
        if "not found" in ctr(ns, "task", "rm", "--", id, check=False) or not _task_exists(ns, id):
            break
        time.sleep(0.1)
    ctr(ns, "containers", "rm", "--", id, check=False)


def _task_exists(ns: argparse.Namespace, id: str) -> bool:
    return any(line.split()[:1] == [id] for line in ctr(ns, "task", "ls", check=False).splitlines())
