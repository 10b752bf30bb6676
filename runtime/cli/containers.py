"""`stasis restore` (a container created and started from a checkpoint) and `stasis
demo` (a counting container checkpointed, killed and restored)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
import uuid

from runtime.cli.checkpoint import checkpoint
from runtime.cli.common import progress
from runtime.cli.store import open_checkpoint, remove_checkpoint
from runtime.errors import FailedPrecondition, InvalidArgument, StasisError, Unavailable
from runtime.names import RUNTIME
from runtime.store.metadata import restore_metadata


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


def ctr(ns: argparse.Namespace, *args: str, check: bool = True) -> str:
    """Run containerd's ``ctr`` in the namespace's containerd; its stdout."""
    binary = shutil.which("ctr")
    if binary is None:
        raise Unavailable("ctr (containerd's client) is not installed")
    done = subprocess.run(
        [binary, "--address", ns.address, "--namespace", ns.namespace, *args],
        text=True,
        capture_output=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and done.returncode != 0:
        raise StasisError(f"ctr {' '.join(args[:2])}: {done.stderr.strip()}")
    return done.stdout
