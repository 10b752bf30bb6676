"""stasis: checkpoint and restore containers that run on the Stasis runtime.

  stasis checkpoint CONTAINER [--to STORE] [--name NAME] [--exit] [--tcp-established] [--json]
  stasis restore REF NEW_ID          create and start a container from a checkpoint
  stasis list [--store STORE]        complete checkpoints of a store
  stasis inspect REF [--json]        a checkpoint's metadata and files
  stasis rm REF                      remove a checkpoint
  stasis trust REF                   sign a local checkpoint this node did not sign (an
                                     older or foreign one), its files checked first; logged
  stasis export REF FILE.tar         the checkpoint as a containerd/Podman-style archive
  stasis import FILE.tar [--name N] [--trust]
                                     an archive into the default store; one not signed
                                     by a trusted key only with --trust (then signed
                                     by this node, and logged)
  stasis gc [--store STORE] [--grace SECONDS]
                                     remove partial leftovers older than SECONDS (3600);
                                     for an S3 store, also the local spools its failed
                                     uploads kept, and spools never committed
  stasis push SPOOL_DIR [--to STORE] [--name NAME]
                                     upload again a checkpoint whose S3 upload failed
                                     (to the store it was meant for, by default)
  stasis demo                        a counter checkpointed, killed and restored
  stasis keygen FILE                 a new checkpoint encryption key (encryption.key_file)
  stasis keygen --signing FILE       a new checkpoint signing key (signing.key_file),
                                     its public key in FILE.pub
  stasis kube checkpoint NAMESPACE/POD [--to STORE] [--name NAME] [--leave-running]
                     [--snapshot-volumes] [--snapshot-class C] [--json]
                     [--kubeconfig F] [--address CONTAINERD_SOCK]
                                     checkpoint every container of a pod at one moment
                                     (run on its node); stops (deletes) the pod unless
                                     --leave-running; prints the pod checkpoint's REF
  stasis kube restore REF [--name NEW] [--namespace NS] [--node NODE]
                     [--policy fail|fresh] [--allow-cross-namespace] [--no-wait]
                     [--kubeconfig F]
                                     create the pod again, restored; prints its name
  stasis kube install [--kubeconfig F]
                                     register the `stasis` RuntimeClass (idempotent)

Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import os
import sys
import time

from runtime.errors import FailedPrecondition, InvalidArgument, StasisError, Unavailable

TYPE_CHECKING = False  # typing's import costs every CLI ~5 ms; mypy treats this name as True
if TYPE_CHECKING:
    import argparse
    import threading
    from collections.abc import Callable
    from typing import Any, NoReturn

VERSION = "0.1.0"
RUNTIME = "io.containerd.stasis.v2"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEMO_IMAGE = "docker.io/stasis/busybox:test"
DEFAULT_GC_GRACE = 3600.0
SPOOL_DIR = "/var/lib/stasis/spool"  # runtime.store.s3.DEFAULT_SPOOL_DIR
PENDING = ".stasis-pending.json"  # runtime.store.s3.PENDING: written once a commit starts


def _seconds(text: str) -> float:
    """argparse type of --grace: a finite number of seconds, >= 0."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds >= 0")
    return value


def _progress(msg: str) -> None:
    if sys.stderr.isatty():
        print(f"stasis: {msg}", file=sys.stderr, flush=True)


def _ctr(ns: argparse.Namespace, *args: str, check: bool = True) -> str:
    # Imported here: `stasis checkpoint` never runs ctr, and waits for every import.
    import shutil
    import subprocess

    ctr = shutil.which("ctr")
    if ctr is None:
        raise Unavailable("ctr (containerd's client) is not installed")
    done = subprocess.run(
        [ctr, "--address", ns.address, "--namespace", ns.namespace, *args],
        text=True,
        capture_output=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and done.returncode != 0:
        raise StasisError(f"ctr {' '.join(args[:2])}: {done.stderr.strip()}")
    return done.stdout


class ShimGone(Unavailable):
    """The shim's connection closed before it answered: it exited or was killed."""


CHECKPOINTER = "stasis.v1.Checkpointer"
NAMESPACE_KEY = "containerd-namespace-ttrpc"  # runtime.rpc.ttrpc_server.NAMESPACE_KEY
# SetImage answers at once, unless it came before its Checkpoint: then the shim
# waits up to shim.daemon.task_api.IMAGE_CLAIM_S (5 s) for it.
SET_IMAGE_TIMEOUT = 10.0

if TYPE_CHECKING:
    from runtime.rpc.containerd import ContainerInfo
    from runtime.rpc.ttrpc_client import Client


def _shim_call(
    socket: str,
    namespace: str,
    method: str,
    payload: bytes,
    *,
    client: Client | None = None,
    timeout: float | None = None,
    on_sent: Callable[[], object] | None = None,
) -> bytes:
    """One stasis.v1.Checkpointer call, on ``client`` (closed afterwards) or a new
    connection to ``socket``; blocking, without asyncio."""
    from runtime.rpc import ttrpc_client

    try:
        if client is None:
            client = ttrpc_client.Client.connect(socket)
        with client:
            return client.call(
                CHECKPOINTER,
                method,
                payload,
                timeout=timeout,
                metadata={NAMESPACE_KEY: namespace},
                on_sent=on_sent,
            )
    except ttrpc_client.RPCError as e:
        if e.closed:
            raise ShimGone(f"the shim ({socket}) closed the connection before answering") from e
        raise StasisError(e.message) from e


def checkpoint(ns: argparse.Namespace) -> dict[str, Any]:
    """Checkpoint a running Stasis container; returns what the shim reported.

    A container with a shim of its own (not a pod's member) is found without
    asking containerd: a Stasis shim listens on its socket (runtime.names.socket_path
    of the container id). The Checkpoint goes there at once, and containerd is
    asked for the container's image while it runs (the shim waits for it only to
    record it). Otherwise containerd is asked first which shim serves it.
    """
    from runtime.rpc.pbwire import Message

    store = ns.to or ""
    if store and "://" not in store:
        store = os.path.abspath(store)
    req = CheckpointRequest(
        id=ns.container,
        store=store,
        name=ns.name or "",
        exit=ns.exit,
        tcp_established=ns.tcp_established,
    )
    own = _own_shim(ns.address, ns.namespace, ns.container)
    raw = _checkpoint_looked_up(ns, req) if own is None else _checkpoint_fast(ns, req, *own)
    try:
        resp = Message(raw)  # stasis.v1.CheckpointResponse
        return {
            "ref": resp.string(1),
            "name": resp.string(2),
            "size": resp.uint(3),
            "criu_size": resp.uint(4),
            "seconds": round(resp.double(5), 3),
            "frozen_seconds": round(resp.double(6), 3),
        }
    except ValueError as e:
        msg = f"checkpoint of {ns.container}: the shim's answer is malformed: {e}"
        raise StasisError(msg) from e


class CheckpointRequest:
    """stasis.v1.CheckpointRequest (protos/stasis/v1/checkpoint.proto), encoded by
    runtime.rpc.pbwire: the CLI does without protobuf's import."""

    def __init__(
        self,
        id: str,
        store: str = "",
        name: str = "",
        exit: bool = False,
        tcp_established: bool = False,
    ) -> None:
        self.id = id
        self.store = store
        self.name = name
        self.exit = exit
        self.tcp_established = tcp_established
        self.image = ""
        self.image_pending = False

    def encode(self) -> bytes:
        from runtime.rpc.pbwire import encode

        return encode(
            [
                (1, self.id),
                (2, self.store),
                (3, self.name),
                (4, self.exit),
                (5, self.tcp_established),
                (6, self.image),
                (8, self.image_pending),
            ]
        )


def set_image_request(id: str, image: str = "", error: str = "", abort: bool = False) -> bytes:
    """stasis.v1.SetImageRequest, encoded."""
    from runtime.rpc.pbwire import encode

    return encode([(1, id), (2, image), (3, error), (4, abort)])


def _own_shim(address: str, namespace: str, id: str) -> tuple[str, Client] | None:
    """The socket of the shim that serves ``id`` alone, and a connection to it; None
    when nothing listens there (a pod's member, no such container, a shim gone).

    The socket's name is a hash that only a Stasis shim started for a group
    named ``id`` listens on: ``id`` itself, or a pod's sandbox.
    """
    from runtime.names import socket_path
    from runtime.rpc import ttrpc_client

    sock = socket_path(address, namespace, id)
    try:
        return sock, ttrpc_client.Client.connect(sock)
    except ttrpc_client.RPCError:
        return None


def _runtime_error(id: str, info: ContainerInfo) -> FailedPrecondition | None:
    if info.runtime == RUNTIME:
        return None
    runtime = info.runtime or "an unknown runtime"
    return FailedPrecondition(f"container {id} runs on {runtime}, not {RUNTIME}")


def _group_socket(ns: argparse.Namespace, info: ContainerInfo) -> str:
    """The socket of the shim that serves the container: its group's."""
    from runtime.names import GROUP_ANNOTATIONS, socket_path

    group = next((info.annotations[k] for k in GROUP_ANNOTATIONS if info.annotations.get(k)), "")
    return socket_path(ns.address, ns.namespace, group or ns.container)


def _checkpoint_looked_up(
    ns: argparse.Namespace, req: CheckpointRequest, info: ContainerInfo | None = None
) -> bytes:
    """Ask containerd for the container (unless ``info`` says already), then its
    group's shim for the checkpoint."""
    from runtime.rpc.containerd import get_container

    if info is None:
        info = get_container(ns.address, ns.namespace, ns.container)
    wrong = _runtime_error(ns.container, info)
    if wrong is not None:
        raise wrong
    req.image = info.image
    req.image_pending = False
    _progress(f"checkpointing {ns.container} ...")
    return _send_checkpoint(ns, req, _group_socket(ns, info))


def _send_checkpoint(
    ns: argparse.Namespace,
    req: CheckpointRequest,
    sock: str,
    client: Client | None = None,
    on_sent: Callable[[], object] | None = None,
) -> bytes:
    try:
        payload = req.encode()
        return _shim_call(sock, ns.namespace, "Checkpoint", payload, client=client, on_sent=on_sent)
    except ShimGone as e:
        leftovers = "stasis gc removes what it had written"
        if req.store.startswith("s3://") or (not req.store and _default_is_s3()):
            # The upload runs in a worker process that outlives the shim.
            leftovers = (
                f"its upload worker may still publish it; a spool kept under {SPOOL_DIR} "
                "uploads with stasis push, and stasis gc removes what was written"
            )
        raise ShimGone(
            f"checkpoint of {ns.container}: {e} (it exited or was killed); unless stasis "
            f"list shows the checkpoint, it was not published: {leftovers}"
        ) from e


def _checkpoint_fast(
    ns: argparse.Namespace, req: CheckpointRequest, sock: str, client: Client
) -> bytes:
    """The Checkpoint to the container's own shim at once, with image_pending; the
    lookup in containerd runs meanwhile (_ImageLookup), and decides afterwards
    whether a failure is what it seems."""
    req.image_pending = True
    lookup = _ImageLookup(ns, sock)
    _progress(f"checkpointing {ns.container} ...")
    try:
        # The lookup starts once the request is out: nothing delays it.
        raw = _send_checkpoint(ns, req, sock, client, on_sent=lookup.start)
    except StasisError as e:
        lookup.answer()  # no SetImage is needed any more
        if lookup.ident is None:
            raise  # not even sent: the shim went away at once
        lookup.ready.wait()
        if lookup.mismatch is not None:
            # containerd does not know it, or runs it on another runtime: as
            # without the fast path (and the shim published nothing).
            raise lookup.mismatch from e
        if lookup.info is not None and lookup.socket != sock:
            # Another shim serves it (its group's), unlike its socket suggested.
            return _checkpoint_looked_up(ns, req, lookup.info)
        raise
    lookup.answer()
    if lookup.ready.is_set() and lookup.failure:
        print(
            f"stasis: warning: the image of {ns.container} could not be looked up "
            f"({lookup.failure}); the checkpoint records the one its annotations name, if any",
            file=sys.stderr,
        )
    elif lookup.ready.is_set() and lookup.mismatch is not None:
        # The shim keeps a checkpoint whose dump stopped the container (--exit).
        print(
            f"stasis: warning: {lookup.mismatch}; its shim checkpointed it all the same, "
            "as the dump had already stopped it",
            file=sys.stderr,
        )
    return raw


class _ImageLookup:
    """Asks containerd for the container while its fast-path checkpoint runs, then
    hands the shim the image (stasis.v1.Checkpointer/SetImage on a connection of
    its own), why it could not be looked up, or, when the container is not what the
    fast path assumed, that the checkpoint must fail.

    ``start`` runs it in a thread (threading is imported only then: the Checkpoint
    is already out). Its findings are read only after ``ready`` is set.
    """

    def __init__(self, ns: argparse.Namespace, sock: str) -> None:
        self.ns = ns
        self.sock = sock
        self.ident: int | None = None  # the thread's, once started
        self.ready: threading.Event  # the lookup is done: the fields below are final
        self.answered: threading.Event  # the Checkpoint came back: no SetImage now
        self.info: ContainerInfo | None = None
        self.socket = ""  # the socket of the shim that serves it, per containerd
        self.mismatch: StasisError | None = None
        self.failure = ""  # why the lookup failed: the shim falls back on annotations

    def start(self) -> None:
        """Look up in a (daemon) thread."""
        import threading

        self.ready = threading.Event()
        self.answered = threading.Event()
        thread = threading.Thread(target=self.run, name="stasis image lookup", daemon=True)
        thread.start()
        self.ident = thread.ident

    def answer(self) -> None:
        """The Checkpoint came back (or was never sent): no SetImage is needed now."""
        if self.ident is not None:
            self.answered.set()

    def run(self) -> None:
        """Look up, then deliver."""
        try:
            self._look_up()
        except Exception as e:  # the lookup's own failure (grpc missing, say)
            self.failure = str(e) or type(e).__name__
        finally:
            self.ready.set()
        if not self.answered.is_set():
            self._deliver()

    def _look_up(self) -> None:
        from runtime.errors import NotFound
        from runtime.rpc.containerd import get_container

        try:
            info = get_container(self.ns.address, self.ns.namespace, self.ns.container)
        except NotFound as e:
            self.mismatch = e
            return
        except StasisError as e:
            self.failure = str(e)
            return
        self.mismatch = _runtime_error(self.ns.container, info)
        if self.mismatch is None:
            self.info = info
            self.socket = _group_socket(self.ns, info)

    def _deliver(self) -> None:
        id = self.ns.container
        if self.mismatch is not None:
            payload = set_image_request(id, error=str(self.mismatch), abort=True)
        elif self.info is not None:
            payload = set_image_request(id, image=self.info.image)
        else:
            payload = set_image_request(id, error=self.failure)
        # Failures are the Checkpoint's to report (or the shim's to log: without
        # an image it falls back on the annotations after a while).
        import contextlib

        with contextlib.suppress(StasisError):
            _shim_call(self.sock, self.ns.namespace, "SetImage", payload, timeout=SET_IMAGE_TIMEOUT)


def _default_is_s3() -> bool:
    from runtime import config

    try:
        return config.load().storage.url.startswith("s3://")
    except StasisError:
        return False


def _resolve(ref: str) -> tuple[Any, str]:
    from runtime import config
    from runtime.store.resolve import resolve

    return resolve(ref, config.load())


def _open(ref: str) -> Any:
    """The checkpoint's reader: a context manager that closes it (an S3 reader's
    local copies go)."""
    store, name = _resolve(ref)
    return store.open(name)


def _remove_checkpoint(ref: str) -> None:
    """Remove a checkpoint, which must be one of its store's complete checkpoints (a
    path to any other directory is refused); an unsigned or untrusted one too."""
    from runtime.errors import NotFound

    store, name = _resolve(ref)
    if name not in {info.name for info in store.list()}:
        raise NotFound(f"{ref!r} is not a complete checkpoint of {store.url}")
    store.remove(name)


def _vouch(ref: str) -> None:
    """Sign a checkpoint of a local store that this node's key did not sign."""
    from runtime.errors import InvalidArgument
    from runtime.store.local import LocalStore

    store, name = _resolve(ref)
    if not isinstance(store, LocalStore):
        raise InvalidArgument(
            f"{ref!r}: only checkpoints of local stores are signed in place; for another "
            "store, `stasis export` it where it is trusted and `stasis import --trust` it here"
        )
    store.vouch(name)


def restore(ns: argparse.Namespace) -> str:
    """Create and start NEW_ID from checkpoint REF; returns the container id."""
    from runtime.store.metadata import restore_metadata

    with _open(ns.ref) as reader:
        metadata, path = restore_metadata(reader), reader.path
    image = ns.image or str(metadata.get("image") or "")
    if not image:
        raise FailedPrecondition(f"checkpoint {ns.ref} records no image: pass --image")
    for what, value in (("image", image), ("container id", ns.new_id)):
        if value.startswith("-"):  # ctr would take it for an option
            raise InvalidArgument(f"restore: {what} {value!r} starts with '-'")
    # An absolute reference: the shim may run with another default store.
    ref = f"file://{path}" if not ns.ref.startswith(("s3://", "file://")) else ns.ref
    _progress(f"restoring {ns.ref} as {ns.new_id} ...")
    # "--": what follows are positional values, never options.
    _ctr(ns, "run", "-d", "--runtime", RUNTIME, "--annotation",
         f"stasis.dev/restore-from={ref}", "--", image, ns.new_id)  # fmt: skip
    return str(ns.new_id)


def demo(ns: argparse.Namespace) -> int:
    """A counting container checkpointed (and stopped), then restored: it counts on."""
    import argparse
    import uuid

    images = _ctr(ns, "images", "ls", "-q")
    if ns.image not in images.split():
        raise FailedPrecondition(f"image {ns.image} is not in namespace {ns.namespace}")
    first = f"stasis-demo-{uuid.uuid4().hex[:6]}"
    second = f"{first}-restored"
    script = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
    _ctr(ns, "run", "-d", "--runtime", RUNTIME, "--", ns.image, first, "sh", "-c", script)
    created: list[str] = [first]
    ref = ""
    try:
        time.sleep(ns.seconds)
        before = _ctr(ns, "task", "exec", "--exec-id", "count", "--", first, "cat", "/tmp/count")
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
        after = _ctr(ns, "task", "exec", "--exec-id", "count", "--", second, "cat", "/tmp/count")
        after = after.strip()
        print(f"{second} restored from the checkpoint, counting on: {after}")
        if int(after) <= int(before):
            raise StasisError(f"restored counter at {after}, not past {before}")
        print("demo: ok (the count continued from the checkpoint)")
    finally:
        for id in created:
            _remove(ns, id)
        if ref and not ns.keep:
            _remove_checkpoint(ref)
    return 0


def gc(ns: argparse.Namespace) -> list[str]:
    """Remove a store's leftovers older than ``--grace``; returns them as references."""
    from runtime import config
    from runtime.store.resolve import default_store, open_store

    cfg = config.load()
    store = open_store(ns.store, cfg) if ns.store else default_store(cfg)
    _progress(f"collecting leftovers in {store.url} older than {ns.grace:g} s ...")
    base = store.url.rstrip("/")
    removed = [f"{base}/{item}" for item in store.gc(ns.grace)]
    if store.url.startswith("s3://"):
        from runtime.store.s3 import S3Store

        assert isinstance(store, S3Store)
        removed += [f"file://{path}" for path in store.gc_spools(ns.grace)]
    return removed


def push(ns: argparse.Namespace) -> dict[str, Any]:
    """Upload a spool that a failed S3 upload kept (the spool goes once it is uploaded)."""
    from runtime import config
    from runtime.store.resolve import open_store
    from runtime.store.s3 import S3Store

    cfg = config.load()
    spool = os.path.abspath(ns.spool)
    meant = _spool_url(spool)
    url = ns.to or meant or cfg.storage.url
    if not url.startswith("s3://"):
        where = "--to" if ns.to else "the configured store (storage.url)"
        raise FailedPrecondition(
            f"push uploads a kept spool to an S3 store: {where} is {url}, give --to s3://..."
        )
    if not os.path.isdir(spool):
        raise FailedPrecondition(f"spool {spool} does not exist (or is not a directory)")
    if not os.path.lexists(os.path.join(spool, PENDING)):
        # Its writer died before commit (during the CRIU dump, say): the files may be
        # incomplete, and a manifest over them would make them look restorable.
        raise FailedPrecondition(
            f"spool {spool} was never committed (no {PENDING}): its checkpoint may be "
            "incomplete; not uploading it"
        )
    store = open_store(url, cfg)
    assert isinstance(store, S3Store)
    _progress(f"uploading {spool} to {store.url} ...")
    info = store.push(spool, ns.name or None)
    return {"ref": info.ref, "name": info.name, "size": info.size}


def _spool_url(spool: str) -> str:
    """The store a committed spool was meant for ("" if it does not say)."""
    try:
        with open(os.path.join(spool, PENDING), "rb") as f:
            import json

            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return ""
    url = doc.get("url") if isinstance(doc, dict) else None
    return url if isinstance(url, str) and url.startswith("s3://") else ""


def _remove(ns: argparse.Namespace, id: str) -> None:
    _ctr(ns, "task", "kill", "-s", "KILL", "--", id, check=False)
    for _ in range(50):
        if "not found" in _ctr(ns, "task", "rm", "--", id, check=False) or not _task_exists(ns, id):
            break
        time.sleep(0.1)
    _ctr(ns, "containers", "rm", "--", id, check=False)


def _task_exists(ns: argparse.Namespace, id: str) -> bool:
    return any(
        line.split()[:1] == [id] for line in _ctr(ns, "task", "ls", check=False).splitlines()
    )


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with ``only``, just that subcommand's (every ArgumentParser
    costs ~0.3 ms of gettext lookups: the whole tree, ~13 ms, is built for help and
    errors about the command itself)."""
    import argparse

    def want(command: str) -> bool:
        return only is None or only == command

    p = argparse.ArgumentParser(
        prog="stasis", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"stasis {VERSION}")
    p.add_argument(
        "--address", default=os.environ.get("CONTAINERD_ADDRESS", DEFAULT_ADDRESS),
        help="containerd's socket",
    )  # fmt: skip
    p.add_argument(
        "-n", "--namespace", default=os.environ.get("CONTAINERD_NAMESPACE", "default"),
        help="containerd namespace",
    )  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)
    if want("checkpoint"):
        c = sub.add_parser("checkpoint", help="checkpoint a running container")
        c.add_argument("container")
        c.add_argument("--to", help="store: a directory, file:///dir or s3://bucket/prefix")
        c.add_argument("--name", help="checkpoint name (default: CONTAINER-UTCTIME)")
        c.add_argument("--exit", action="store_true", help="stop the container once checkpointed")
        c.add_argument("--tcp-established", action="store_true", help="allow open TCP connections")
        c.add_argument("--json", action="store_true")
    if want("restore"):
        r = sub.add_parser("restore", help="create and start a container from a checkpoint")
        r.add_argument("ref")
        r.add_argument("new_id")
        r.add_argument("--image", help="image to create it from (default: the checkpoint's)")
    if want("list"):
        li = sub.add_parser("list", help="list checkpoints")
        li.add_argument("--store", default="")
        li.add_argument("--json", action="store_true")
    if want("inspect"):
        i = sub.add_parser("inspect", help="show a checkpoint")
        i.add_argument("ref")
        i.add_argument("--json", action="store_true")
    if want("rm"):
        rm = sub.add_parser("rm", help="remove a checkpoint")
        rm.add_argument("ref")
    if want("trust"):
        t = sub.add_parser(
            "trust",
            help="sign a local checkpoint this node did not sign (an older or a foreign "
            "one) after checking every file against its manifest; logged",
        )
        t.add_argument("ref", help="the checkpoint: a name, a path or file:// URL")
    if want("export"):
        e = sub.add_parser("export", help="write a checkpoint archive")
        e.add_argument("ref")
        e.add_argument("file")
    if want("import"):
        im = sub.add_parser("import", help="read a checkpoint archive into the default store")
        im.add_argument("file")
        im.add_argument("--name")
        im.add_argument(
            "--trust", action="store_true",
            help="import an archive not signed by a trusted key (it is signed by this node)",
        )  # fmt: skip
    if want("gc"):
        g = sub.add_parser("gc", help="remove partial checkpoints, stray objects and kept spools")
        g.add_argument("--store", default="", help="default: the configured store")
        g.add_argument(
            "--grace", type=_seconds, default=DEFAULT_GC_GRACE, metavar="SECONDS",
            help=f"only leftovers untouched for this long (default {DEFAULT_GC_GRACE:g})",
        )  # fmt: skip
        g.add_argument("--json", action="store_true")
    if want("push"):
        pu = sub.add_parser("push", help="upload a kept spool again (after a failed S3 upload)")
        pu.add_argument("spool", metavar="SPOOL_DIR")
        pu.add_argument(
            "--to", default="",
            help="s3://bucket/prefix (default: the spool's own store, else the configured one)",
        )  # fmt: skip
        pu.add_argument("--name", help="checkpoint name (default: the one the spool records)")
        pu.add_argument("--json", action="store_true")
    if want("demo"):
        d = sub.add_parser("demo", help="checkpoint, kill and restore a counting container")
        d.add_argument("--image", default=DEMO_IMAGE)
        d.add_argument("--seconds", type=float, default=2.0)
        d.add_argument("--keep", action="store_true", help="keep the demo's checkpoint")
    if want("keygen"):
        kg = sub.add_parser("keygen", help="write a new checkpoint encryption key (mode 0600)")
        kg.add_argument("file", metavar="FILE", help="the key file to create (never overwritten)")
        kg.add_argument(
            "--signing", action="store_true",
            help="an Ed25519 signing key (PEM) instead, its public key in FILE.pub",
        )  # fmt: skip
    if want("kube"):
        _kube_parser(sub)
    return p


COMMANDS = frozenset(
    ("checkpoint", "restore", "list", "inspect", "rm", "trust", "export", "import", "gc", "push",
     "demo", "keygen", "kube")
)  # fmt: skip
_VALUED = frozenset(("--address", "-n", "--namespace"))  # the top level's options with a value


def _command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names, if it is one (None: the parser must know them all)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUED or (len(arg) > 2 and any(v.startswith(arg) for v in _VALUED)):
            i += 2  # argparse takes "--addr" for "--address" too
        elif arg.startswith("-"):
            i += 1
        else:
            return arg if arg in COMMANDS else None
    return None


def _kube_parser(sub: Any) -> None:
    k = sub.add_parser("kube", help="Kubernetes pods: checkpoint, restore, install")
    ks = k.add_subparsers(dest="kube_command", required=True)
    kc = ks.add_parser("checkpoint", help="checkpoint every container of a pod (on its node)")
    kc.add_argument("pod", metavar="NAMESPACE/POD")
    kc.add_argument("--to", default="", help="store (default: the configured one)")
    kc.add_argument("--name", default="", help="name (default: NAMESPACE-POD-UTCTIME)")
    kc.add_argument("--leave-running", action="store_true",
                    help="resume the pod afterwards (default: delete it, like --exit)")  # fmt: skip
    kc.add_argument("--snapshot-volumes", action="store_true",
                    help="snapshot every PVC the pod mounts (VolumeSnapshot)")  # fmt: skip
    kc.add_argument("--snapshot-class", default=None, help="VolumeSnapshotClass to use")
    kc.add_argument("--kubeconfig", default=None)
    kc.add_argument("--address", dest="kube_address", default=None,
                    help="containerd's socket (default: --address)")  # fmt: skip
    kc.add_argument("--json", action="store_true")
    kr = ks.add_parser("restore", help="create a pod again from a pod checkpoint")
    kr.add_argument("ref")
    kr.add_argument("--name", default=None, help="pod name (default: the checkpointed pod's)")
    kr.add_argument("--namespace", dest="kube_namespace", default=None,
                    help="namespace (default: the checkpointed pod's)")  # fmt: skip
    kr.add_argument("--node", default=None, help="bind it to this node (skip the scheduler)")
    kr.add_argument("--policy", choices=("fail", "fresh"), default="fail",
                    help="stasis.dev/restore-policy of the pod")  # fmt: skip
    kr.add_argument("--allow-cross-namespace", action="store_true",
                    help="restore into another namespace than the checkpointed pod's")  # fmt: skip
    kr.add_argument("--no-wait", action="store_true", help="do not wait until it runs")
    kr.add_argument("--timeout", type=_seconds, default=120.0)
    kr.add_argument("--kubeconfig", default=None)
    ki = ks.add_parser("install", help="register the stasis RuntimeClass")
    ki.add_argument("--kubeconfig", default=None)


def kube(ns: argparse.Namespace) -> int:
    """`stasis kube ...`: the kubernetes client is imported only here."""
    import json

    from kubernetes import client

    from runtime.kube import pods as k

    api = k.connect(ns.kubeconfig)
    try:
        if ns.kube_command == "install":
            created = k.install_runtime_class(api)
            _progress("RuntimeClass stasis " + ("created" if created else "already there"))
            print(k.RUNTIME_CLASS)
        elif ns.kube_command == "checkpoint":
            namespace, pod = k.split_pod(ns.pod)
            _progress(f"checkpointing pod {namespace}/{pod} ...")
            out = k.checkpoint_pod(
                client.CoreV1Api(api), namespace, pod,
                address=ns.kube_address or ns.address, store=ns.to, name=ns.name,
                leave_running=ns.leave_running, custom=client.CustomObjectsApi(api),
                snapshot_volumes=ns.snapshot_volumes, snapshot_class=ns.snapshot_class,
            )  # fmt: skip
            print(json.dumps(out) if ns.json else out["ref"])
        elif ns.kube_command == "restore":
            _progress(f"restoring pod from {ns.ref} ...")
            print(
                k.restore_pod(
                    client.CoreV1Api(api),
                    ns.ref,
                    name=ns.name,
                    namespace=ns.kube_namespace,
                    node=ns.node,
                    policy=ns.policy,
                    custom=client.CustomObjectsApi(api),
                    wait=not ns.no_wait,
                    timeout=ns.timeout,
                    allow_cross_namespace=ns.allow_cross_namespace,
                )
            )
    finally:
        api.close()
    return 0


def _run(ns: argparse.Namespace) -> int:
    if ns.command == "checkpoint":
        out = checkpoint(ns)
        print(flat_json(out) if ns.json else out["ref"])
        return 0
    import json

    if ns.command == "restore":
        print(restore(ns))
    elif ns.command == "demo":
        return demo(ns)
    elif ns.command == "kube":
        return kube(ns)
    elif ns.command == "keygen" and ns.signing:
        from runtime.store.signing import PUBLIC_SUFFIX, key_id, write_private

        kid = key_id(write_private(ns.file).public_key())
        pub = ns.file + PUBLIC_SUFFIX
        _progress(f"wrote {ns.file} and {pub}: set signing.key_file to it (key id {kid})")
        print(kid)
    elif ns.command == "keygen":
        from runtime.store.crypt import write_key_file

        key = write_key_file(ns.file)
        _progress(f"wrote {ns.file}: set encryption.key_file to it (key id {key.id})")
        print(key.id)
    elif ns.command == "list":
        from runtime import config
        from runtime.store.resolve import default_store, open_store

        cfg = config.load()
        store = open_store(ns.store, cfg) if ns.store else default_store(cfg)
        infos = store.list()
        if ns.json:
            print(json.dumps([_info(i) for i in infos], indent=1, default=str))
        else:
            for i in infos:
                print(f"{i.name}\t{i.size}\t{i.created}")
    elif ns.command == "gc":
        removed = gc(ns)
        if ns.json:
            print(json.dumps(removed, indent=1))
        for ref in [] if ns.json else removed:
            print(ref)
    elif ns.command == "push":
        out = push(ns)
        print(json.dumps(out) if ns.json else out["ref"])
    elif ns.command == "inspect":
        with _open(ns.ref) as reader:
            manifest = json.loads(reader.manifest.to_json())
            data = {"name": reader.name, "ref": reader.info.ref, "manifest": manifest}
            if not reader.info.ref.startswith("s3://"):
                data["path"] = reader.path  # an S3 reader's path is a temporary copy
            print(json.dumps(data, indent=1) if ns.json else json.dumps(reader.metadata, indent=1))
    elif ns.command == "rm":
        _remove_checkpoint(ns.ref)
    elif ns.command == "trust":
        _vouch(ns.ref)
        print(f"{ns.ref}: signed by this node")
    elif ns.command == "export":
        from runtime import config
        from runtime.store.archive import export_tar
        from runtime.store.resolve import signing_for

        cfg = config.load()
        with _open(ns.ref) as reader:
            export_tar(reader, ns.file, signing_for(cfg))
    elif ns.command == "import":
        import logging

        from runtime import config
        from runtime.store.archive import import_tar
        from runtime.store.resolve import default_store

        # --trust's warning goes to the log and, as one line, to stderr.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("stasis: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger = logging.getLogger("stasis.store")
        logger.addHandler(handler)
        try:
            cfg = config.load()
            store = default_store(cfg)
            name = ns.name or os.path.basename(ns.file).removesuffix(".tar")
            print(import_tar(store, ns.file, name, cfg.limits, trust=ns.trust).name)
        finally:
            logger.removeHandler(handler)
    return 0


def _info(info: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(info).items() if not k.startswith("_")}


def flat_json(obj: dict[str, str | int | float | bool | None]) -> str:
    """``json.dumps(obj)`` of a flat object, through the C encoder under ``json``:
    `stasis checkpoint --json` answers without importing json (and re)."""
    try:
        from _json import encode_basestring_ascii as quote
    except ImportError:  # another Python
        import json

        return json.dumps(obj)
    items = []
    for key, value in obj.items():
        if value is None or isinstance(value, bool):
            text = {None: "null", True: "true", False: "false"}[value]
        elif isinstance(value, str):
            text = quote(value)
        elif isinstance(value, int):
            text = int.__repr__(value)
        elif isinstance(value, float) and value == value and value not in (_INF, -_INF):
            text = float.__repr__(value)
        else:  # NaN, infinities, anything nested: json's own rules
            import json

            return json.dumps(obj)
        items.append(f"{quote(key)}: {text}")
    return "{" + ", ".join(items) + "}"


_INF = float("inf")


def fast_checkpoint_args(argv: list[str]) -> argparse.Namespace | None:
    """What ``_parser().parse_args(argv)`` gives for a plain ``stasis checkpoint``,
    without importing argparse (and re): ~15 ms of every checkpoint, which waits
    for the CLI. None for anything else (other commands, help, abbreviated or
    unknown options, values that look like options, errors): argparse then parses,
    and says what is wrong."""
    top = {
        "address": os.environ.get("CONTAINERD_ADDRESS", DEFAULT_ADDRESS),
        "namespace": os.environ.get("CONTAINERD_NAMESPACE", "default"),
    }
    sub: dict[str, str | bool | None] = {
        "to": None, "name": None, "exit": False, "tcp_established": False, "json": False,
    }  # fmt: skip
    top_valued = {"--address": "address", "-n": "namespace", "--namespace": "namespace"}
    sub_valued = {"--to": "to", "--name": "name"}
    sub_flags = {"--exit": "exit", "--tcp-established": "tcp_established", "--json": "json"}
    container = None
    command = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        valued = sub_valued if command else top_valued
        name, eq, value = arg.partition("=")
        if name in valued:
            if not eq:
                if i == len(argv) or argv[i].startswith("-"):
                    return None
                value = argv[i]
                i += 1
            (sub if command else top)[valued[name]] = value
        elif command and arg in sub_flags:
            sub[sub_flags[arg]] = True
        elif arg.startswith("-") or arg == "":
            return None  # help, --version, abbreviations, "--", unknown options
        elif not command:
            if arg != "checkpoint":
                return None
            command = True
        elif container is None:
            container = arg
        else:
            return None  # a second positional
    if container is None:
        return None
    from types import SimpleNamespace

    ns = SimpleNamespace(**top, command="checkpoint", container=container, **sub)
    return ns  # type: ignore[return-value]  # the attributes argparse would set


def main(argv: list[str] | None = None) -> int:
    """Entry point of `stasis`."""
    args = sys.argv[1:] if argv is None else argv
    ns = fast_checkpoint_args(args) or _parser(_command_in(args)).parse_args(args)
    try:
        code = _run(ns)
    except StasisError as e:
        print(f"stasis: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        return 130
    if argv is None and ns.command == "checkpoint":
        _exit_now(code)
    return code


def _exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown, which takes some 30 ms
    once grpc and asyncio are loaded (containerd's lookup loads them) and which the
    caller of `stasis checkpoint` would wait for. Nothing here needs it: the output
    is flushed now, and the lookup thread (a daemon) has nothing left to do that
    matters (a SetImage cut short is forgotten by the shim)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # stdout closed early, say: as Python's own exit would report
        code = code or 120
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
