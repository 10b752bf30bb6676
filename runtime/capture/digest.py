"""Digesting checkpoint files while CRIU is still writing them.

CRIU writes its image files front to back. A ``TailDigester`` follows a
directory from a thread, hashing what has been appended since its last look
(from the page cache, while it is hot), while a second thread asks the kernel
to start writing back what was written (sync_file_range, which can block on a
busy device: the hashing never waits for it), so that the commit after the dump
neither re-reads the images nor waits for all of their writeback. Only files
that only ever grew are trusted: the commit re-digests any file whose size,
mtime or inode changed after the digester's final look, and small files are
always digested at commit.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("stasis.digest")

_CHUNK = 4 << 20
_MIN_SIZE = 4 << 20  # smaller files are cheap to digest at commit
_SYNC_FILE_RANGE_WRITE = 2


@dataclass(frozen=True)
class KnownDigest:
    """A file's sha256 and the stat it had when it was digested."""

    sha256: str
    size: int
    mtime_ns: int
    ino: int

    def matches(self, st: os.stat_result) -> bool:
        """Whether the file is still exactly what was digested."""
        return (st.st_size, st.st_mtime_ns, st.st_ino) == (self.size, self.mtime_ns, self.ino)


class _Follow:
    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.hash = hashlib.sha256()
        self.offset = 0
        self.broken = False
        self.synced = 0  # writeback started up to here


def _sync_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):
        return None


class TailDigester:
    """Follows the regular files directly under ``root`` until ``finish()``."""

    def __init__(self, root: str, *, poll: float = 0.02) -> None:
        self.root = root
        self.poll = poll
        self._files: dict[str, _Follow] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stasis-digest", daemon=True)
        self._sync = _sync_range()
        # Writeback is started from a thread of its own: sync_file_range blocks while
        # the device's queue is full, and hashing must not wait for that.
        self._syncer = threading.Thread(target=self._sync_run, name="stasis-sync", daemon=True)
        self._lock = threading.Lock()  # guards _files between the two threads
        self._error: BaseException | None = None

    def start(self) -> TailDigester:
        """Begin following (call before the writer starts)."""
        self._thread.start()
        if self._sync is not None:
            self._syncer.start()
        return self

    def _sync_run(self) -> None:
        sync = self._sync
        assert sync is not None
        try:
            while True:
                done = self._done.is_set()
                with self._lock:
                    files = list(self._files.values())
                for f in files:
                    size = os.fstat(f.fd).st_size
                    if size > f.synced:
                        # Start writeback now: the commit's fsync then mostly waits
                        # for I/O that is already under way.
                        sync(f.fd, f.synced, size - f.synced, _SYNC_FILE_RANGE_WRITE)
                        f.synced = size
                if done:
                    return
                self._done.wait(self.poll)
        except OSError as e:  # only an optimisation: the commit's fsync does it all
            log.debug("early writeback stopped: %s", e)

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                if not self._pass():
                    self._done.wait(self.poll)
        except BaseException as e:  # reported by finish(); the commit digests instead
            self._error = e

    def _pass(self) -> bool:
        """Read what was appended; True when anything was."""
        progressed = False
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return False
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            f = self._files.get(entry.name)
            if f is None:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                f = _Follow(entry.path, fd)
                with self._lock:
                    self._files[entry.name] = f
            if not f.broken and self._advance(f):
                progressed = True
        return progressed

    def _advance(self, f: _Follow) -> bool:
        size = os.fstat(f.fd).st_size
        if size < f.offset:
            f.broken = True  # truncated: not append-only, digest it at commit
            return False
        start = f.offset
        while f.offset < size:
            data = os.pread(f.fd, min(_CHUNK, size - f.offset), f.offset)
            if not data:
                break
            f.hash.update(data)
            f.offset += len(data)
        return f.offset > start

    def finish(self) -> dict[str, KnownDigest]:
        """The writer is done: read what is left and return digests of whole files.

        Files that shrank, or were too small to matter, are left out (the
        commit digests them itself).
        """
        self._done.set()
        self._thread.join()
        if self._syncer.is_alive():
            self._syncer.join()
        out: dict[str, KnownDigest] = {}
        try:
            if self._error is None:
                self._pass()
            for name, f in self._files.items():
                st = os.fstat(f.fd)
                if self._error is None and not f.broken and st.st_size == f.offset >= _MIN_SIZE:
                    out[name] = KnownDigest(f.hash.hexdigest(), f.offset, st.st_mtime_ns, st.st_ino)
        except OSError as e:
            log.debug("tail digests dropped: %s", e)
            out = {}
        finally:
            for f in self._files.values():
                os.close(f.fd)
            self._files.clear()
        if self._error is not None:
            log.debug("tail digester failed: %s", self._error)
        return out
