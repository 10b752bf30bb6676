"""The commit of an S3 checkpoint, in a child process of the shim.

Guarantees: the shim never imports boto3 or zstandard (importing this module
imports nothing that does), and no upload can take the shim down with it. For an
``s3://`` store ``begin`` starts ``python -m runtime.store.upload`` through the
caller's Spawner and talks to it in JSON lines:

1. shim -> worker (stdin): store URL, S3 config and options (a key by its file's
   path), the name; the secret travels only on this pipe.
2. The worker makes and locks the spool (``runtime.store.spool.new_spool``), writes
   its PID into ``.stasis-upload.pid``, checks the name is free and says ``ready``:
   refused credentials and taken names fail before anything is frozen.
3. The shim dumps into the spool; ``commit`` records ``.stasis-pending.json`` and
   says ``go``; the worker uploads (``S3Store.push_locked``, manifest last) and
   answers ``done`` or ``error`` (a StasisError's code and line), with ``log``
   records between.

A worker that fails or dies fails ``commit`` with one line naming the store,
endpoint and the kept spool (``stasis push SPOOL`` uploads it again). Closing
its stdin before ``go`` removes the spool; SIGTERM during the upload aborts it
and keeps the spool. Local stores commit in the calling process, on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, Protocol

from runtime.capture.digest import KnownDigest
from runtime.errors import Code, Internal, StasisError, Unavailable
from runtime.linux.proc import Completed, Spawner, Stdio
from runtime.store.api import CheckpointWriter, Store
from runtime.store.files import rmtree
from runtime.store.model import CheckpointInfo, check_name

if TYPE_CHECKING:
    from runtime.store.s3 import S3Store, S3Writer

log = logging.getLogger("stasis.upload")

WORKER = "runtime.store.upload"  # python -m WORKER
_MAX_LINE = 64 << 20  # a ``done`` line carries the checkpoint's metadata
_EXIT_WAIT = 10.0  # seconds an abandoned worker gets to exit before SIGTERM


class Writer(Protocol):
    """A checkpoint being written (``CheckpointWriter``), with an awaitable ``commit``."""

    @property
    def name(self) -> str:
        """The checkpoint's name."""
        ...

    def path(self, rel: str, *, directory: bool = False) -> str:
        """Local path for ``rel`` (parents created); with ``directory``, the directory itself."""
        ...

    def add_file(self, rel: str, src_path: str) -> None:
        """Copy the local file ``src_path`` into the checkpoint as ``rel``."""
        ...

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` into the checkpoint as ``rel``."""
        ...

    async def commit(
        self,
        metadata: dict[str, Any] | None = None,
        known: Mapping[str, KnownDigest] | None = None,
    ) -> CheckpointInfo:
        """Publish the checkpoint (see ``CheckpointWriter.commit``)."""
        ...


@contextlib.asynccontextmanager
async def begin(store: Store, name: str, spawner: Spawner) -> AsyncIterator[Writer]:
    """Start writing checkpoint ``name`` into ``store``, as ``store.begin`` does.

    For an S3 store the commit runs in a worker process started through
    ``spawner`` (the module's docstring says how); the block starts once the
    worker is ready (the name is free, the credentials work). Leaving the
    block without ``commit`` aborts.
    """
    if not store.url.startswith("s3://"):
        with store.begin(name) as local:
            yield _InProcess(local)
        return
    from runtime.store.s3 import S3Store, S3Writer

    if not isinstance(store, S3Store):
        raise Internal(f"{store.url}: an s3:// store that is no S3Store ({type(store).__name__})")
    worker = await _Worker.start(store, check_name(name), spawner)
    writer = S3Writer(store, name, worker.spool)  # the worker holds the spool's lock
    try:
        yield _Delegated(writer, worker)
    finally:
        writer.abort()  # a no-op once committed or kept
        await worker.close()


class _Files:
    """What both writers below pass straight to the store's writer."""

    _writer: CheckpointWriter | S3Writer

    @property
    def name(self) -> str:
        """The checkpoint's name."""
        return self._writer.name

    def path(self, rel: str, *, directory: bool = False) -> str:
        """See ``CheckpointWriter.path``."""
        return self._writer.path(rel, directory=directory)

    def add_file(self, rel: str, src_path: str) -> None:
        """See ``CheckpointWriter.add_file``."""
        self._writer.add_file(rel, src_path)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """See ``CheckpointWriter.write_bytes``."""
        self._writer.write_bytes(rel, data)


class _InProcess(_Files):
    """A local store's writer; ``commit`` runs on a thread."""

    _writer: CheckpointWriter

    def __init__(self, writer: CheckpointWriter) -> None:
        self._writer = writer

    async def commit(
        self,
        metadata: dict[str, Any] | None = None,
        known: Mapping[str, KnownDigest] | None = None,
    ) -> CheckpointInfo:
        """Digest, write the manifest last and publish (on a thread)."""
        return await asyncio.to_thread(self._writer.commit, metadata, known)


class _Delegated(_Files):
    """An S3 checkpoint: the caller writes the spool, the worker uploads it."""

    _writer: S3Writer

    def __init__(self, writer: S3Writer, worker: _Worker) -> None:
        self._writer = writer
        self._worker = worker

    @property
    def spool(self) -> str:
        """The local directory the checkpoint is written into."""
        return self._writer.spool

    @property
    def worker_pid(self) -> int:
        """The upload worker's PID (also in the spool's ``.stasis-upload.pid``)."""
        return self._worker.pid

    async def commit(
        self,
        metadata: dict[str, Any] | None = None,
        known: Mapping[str, KnownDigest] | None = None,
    ) -> CheckpointInfo:
        """Record the commit in the spool and wait for the worker's upload.

        ``known`` is not used (the upload hashes while it streams). A failed
        or dead worker raises one line; the spool is kept for ``stasis push``.
        """
        await asyncio.to_thread(self._writer.prepare, metadata)
        try:
            info = await self._worker.upload()
        except BaseException:
            self._writer.finish(False)
            raise
        self._writer.finish(True)
        return info


class _Worker:
    """The shim's end of one upload worker: its pipes, its exit, the protocol."""

    def __init__(self, store: S3Store, name: str, spawner: Spawner) -> None:
        self._store = store
        self._name = name
        self.pid = 0
        self.spool = ""
        in_r, self._in_w = os.pipe()
        out_r, out_w = os.pipe()
        self._child_ends = [in_r, out_w]  # closed here once the child has its copies
        self._out: IO[bytes] = os.fdopen(out_r, "rb", buffering=0)  # the transport's, once made
        argv = [sys.executable, "-P", "-m", WORKER]
        self._exited: asyncio.Future[Completed] = asyncio.ensure_future(
            spawner.run(argv, stdio=Stdio(in_r, out_w, out_w))
        )
        self._exited.add_done_callback(_retrieve)
        self._reader = asyncio.StreamReader(limit=_MAX_LINE)
        self._transport: asyncio.BaseTransport | None = None
        self._went = False  # "go" sent: a failure from now on keeps the spool
        self._finished = False  # "done" or "error" received
        self._closed = False

    @classmethod
    async def start(cls, store: S3Store, name: str, spawner: Spawner) -> _Worker:
        """Start a worker and wait until it is ready (spool made, name free in the bucket)."""
        worker = cls(store, name, spawner)
        try:
            loop = asyncio.get_running_loop()
            worker._transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(worker._reader), worker._out
            )
            worker._send(
                {
                    "url": store.url,
                    "name": name,
                    "s3": dataclasses.asdict(store.s3),
                    "options": store.options(),
                }
            )
            event = await worker._event()
            if event is None or event.get("event") != "ready":
                raise await worker._failure(event, "while it was getting ready")
            worker.spool = str(event["spool"])
            worker.pid = int(event["pid"])
        except BaseException:
            await worker.close()
            raise
        log.info("upload worker %d ready for %s (spool %s)", worker.pid, name, worker.spool)
        return worker

    def _target(self) -> str:
        return f"s3://{self._store.bucket}/{self._store.dir_key(self._name)}"

    def _send(self, message: dict[str, Any]) -> None:
        # One short line into an empty pipe: the write never blocks. A dead
        # worker (EPIPE) shows itself through its exit instead.
        with contextlib.suppress(BrokenPipeError):
            os.write(self._in_w, json.dumps(message).encode() + b"\n")

    def _close_child_ends(self) -> None:
        ends, self._child_ends = self._child_ends, []
        for fd in ends:
            os.close(fd)

    async def _line(self) -> bytes:
        """The worker's next line, b"" at EOF (which needs our copy of its end closed)."""
        read = asyncio.ensure_future(self._reader.readline())
        try:
            if not self._exited.done():
                either: set[asyncio.Future[Any]] = {read, self._exited}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            # It wrote, so it runs (it has its copies); or it is gone.
            self._close_child_ends()
            return await read
        except ValueError as e:  # a line over _MAX_LINE
            raise Internal(f"upload worker {self.pid}: {e}") from e
        finally:
            if not read.done():
                read.cancel()

    async def _event(self) -> dict[str, Any] | None:
        """The worker's next protocol message (its log records logged on the way); None at EOF."""
        while True:
            line = await self._line()
            if not line:
                return None
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict) or not isinstance(event.get("event"), str):
                text = line.decode(errors="replace").rstrip()
                if text:
                    log.warning("upload worker %s: %s", self.pid or "", text[:2000])
                continue
            if event["event"] == "log":
                level = event.get("level")
                log.log(level if isinstance(level, int) else logging.INFO,
                        "upload worker %s: %s", self.pid or "", event.get("message"))  # fmt: skip
                continue
            return event

    async def upload(self) -> CheckpointInfo:
        """Say ``go`` and wait for the upload's outcome."""
        self._went = True
        self._send({"go": True})
        event = await self._event()
        if event is not None and event.get("event") == "done":
            self._finished = True
            return _info(event["info"])
        raise await self._failure(event, "while uploading")

    async def _failure(self, event: dict[str, Any] | None, doing: str) -> StasisError:
        """The error to raise: the worker's own, or how it died."""
        if event is not None and event.get("event") == "error":
            self._finished = True
            return _error(event.get("code"), str(event.get("message")))
        store = self._store
        what = f"checkpoint {self._name} in {store.url}"
        try:
            done = await self._exited
        except Exception as e:  # posix_spawn's OSError, or the spawner's own
            return Unavailable(f"{what}: cannot start the upload worker ({sys.executable}): {e}")
        if event is not None:
            how = f"answered {str(event.get('event'))[:40]!r}"
        elif done.status > 128 and done.status - 128 in signal.valid_signals():
            how = f"was killed by {signal.Signals(done.status - 128).name}"
        else:
            how = f"exited with status {done.status}"
        message = (
            f"{what}: the upload worker (pid {self.pid or '?'}) {how} {doing} "
            f"(to {self._target()} at {store.endpoint})"
        )
        if self._went and self.spool:
            message += (
                f"; the checkpoint's files are kept in {self.spool}: "
                f"`stasis push {self.spool} --to {store.url}` uploads them again"
            )
        return Unavailable(message)

    async def close(self) -> None:
        """Let go of the worker: an abandoned upload gets SIGTERM; wait (bounded) for its exit."""
        if self._closed:
            return
        self._closed = True
        if self._went and not self._finished and not self._exited.done() and self.pid:
            # Not reaped yet (its exit future is pending), so the PID is still its.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        os.close(self._in_w)  # before "go": the worker removes the spool and exits
        self._close_child_ends()
        try:
            await asyncio.wait({self._exited}, timeout=_EXIT_WAIT)
            if not self._exited.done() and self.pid:
                log.warning("upload worker %d did not exit; sending SIGTERM", self.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGTERM)
        finally:
            if self._transport is not None:
                self._transport.close()
            else:
                self._out.close()


def _retrieve(fut: asyncio.Future[Completed]) -> None:
    if not fut.cancelled():
        fut.exception()  # never "exception was never retrieved": _failure reports it


def _info(doc: dict[str, Any]) -> CheckpointInfo:
    try:
        return CheckpointInfo(
            name=str(doc["name"]),
            ref=str(doc["ref"]),
            created=datetime.fromisoformat(doc["created"]),
            size=int(doc["size"]),
            metadata=dict(doc.get("metadata") or {}),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise Internal(f"the upload worker's answer is malformed: {e!r}") from e


def _error(code: object, message: str) -> StasisError:
    classes = {c.code: c for c in _subclasses(StasisError)}
    try:
        cls = classes.get(Code(code), StasisError) if isinstance(code, int) else StasisError
    except ValueError:
        cls = StasisError
    return cls(message)


def _subclasses(cls: type[StasisError]) -> list[type[StasisError]]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return [c for c in out if c.__module__ == "runtime.errors"]


# --------------------------------------------------------------------------- the worker


class _Stopped(BaseException):
    """SIGTERM: the shim gave up on this upload."""


class _Events:
    """JSON lines to the shim; thread-safe (upload threads log); a gone reader is ignored."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._lock = threading.Lock()

    def send(self, event: dict[str, Any]) -> None:
        data = json.dumps(event, default=str).encode() + b"\n"
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._out.write(data)
            self._out.flush()


class _LogHandler(logging.Handler):
    def __init__(self, events: _Events) -> None:
        super().__init__(logging.INFO)
        self._events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        self._events.send({"event": "log", "level": record.levelno, "message": message})


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def main() -> int:
    """The worker: read the request, make the spool, upload it on ``go`` (see the docstring)."""
    events = _Events(sys.stdout.buffer)
    root = logging.getLogger()
    root.handlers[:] = [_LogHandler(events)]
    root.setLevel(logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _stop)
    secret = ""
    try:
        request = json.loads(sys.stdin.buffer.readline() or b"null")
        if not isinstance(request, dict):
            raise Internal("upload worker: no request on stdin")
        secret = str((request.get("s3") or {}).get("secret_access_key") or "")
        return _serve(request, events)
    except StasisError as e:
        events.send({"event": "error", "code": int(e.code), "message": _scrub(str(e), secret)})
    except _Stopped:
        events.send({"event": "error", "code": int(Code.CANCELLED), "message": "stopped (SIGTERM)"})
    except Exception as e:
        message = _scrub(f"upload worker: {type(e).__name__}: {e}", secret)
        events.send({"event": "error", "code": int(Code.INTERNAL), "message": message})
    return 1


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if len(secret) >= 8 else text


def _serve(request: dict[str, Any], events: _Events) -> int:
    from runtime.config import S3Config
    from runtime.store.s3 import S3Store
    from runtime.store.spool import PID_FILE, new_spool

    options = dict(request["options"])
    if options.get("signing") is not None:
        from runtime.store.signing import Signing

        signing = options["signing"]
        options["signing"] = Signing(str(signing["key_file"]), tuple(signing["trusted"]))
    store = S3Store(str(request["url"]), S3Config(**request["s3"]), **options)
    name = check_name(str(request["name"]))
    spool, lock = new_spool(store.spool_dir, name)  # held until this process ends
    committed = False
    try:
        pid_file = os.path.join(spool, PID_FILE)
        with open(pid_file + ".new", "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(pid_file + ".new", pid_file)
        store.check_absent(name)
        events.send({"event": "ready", "spool": spool, "pid": os.getpid()})
        line = sys.stdin.buffer.readline()
        if not line.strip() or not json.loads(line).get("go"):
            return 0  # the shim gave up before committing
        committed = True
        try:
            info = store.push_locked(spool, name)
        except _Stopped:
            raise Unavailable(
                f"checkpoint {name} in {store.url}: upload stopped (SIGTERM); the checkpoint's "
                f"files are kept in {spool}: `stasis push {spool} --to {store.url}` uploads "
                "them again"
            ) from None
        doc = dataclasses.asdict(info)
        doc["created"] = info.created.isoformat()
        events.send({"event": "done", "info": doc})
        return 0
    finally:
        if not committed:
            rmtree(spool)
        os.close(lock)


if __name__ == "__main__":
    sys.exit(main())
