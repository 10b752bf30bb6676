"""The streams a checkpoint file passes through between a local directory and S3:
hash -> zstd, or with a key zstd -> encrypt -> hash, on the way up (``Encoded``, read
by s3transfer); decompress -> hash on the way down (``Decoded``).

A downloaded file is moved into place only once its size and sha256 match the
manifest (``Bad`` otherwise), and never grows past the manifest's size. zstandard is
imported on first use.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import stat
from collections.abc import Callable
from typing import IO, Any, Protocol, cast

from runtime.errors import InvalidArgument
from runtime.store.files import local_error, rmtree
from runtime.store.model import FileEntry
from runtime.store.s3layout import StoredFile

MiB = 1 << 20
_READ = 4 * MiB  # input read per compressor call


class Stage(Protocol):
    """One step of a stream: ``update`` per chunk, then ``finish`` once."""

    def update(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class Digest:
    """A stage that passes data through and records its sha256 and size."""

    def __init__(self) -> None:
        self._sha256 = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> bytes:
        self._sha256.update(data)
        self.size += len(data)
        return data

    def finish(self) -> bytes:
        return b""

    @property
    def entry(self) -> FileEntry:
        """The manifest entry of what passed."""
        return FileEntry(self._sha256.hexdigest(), self.size)


class Zstd:
    """A stage that compresses with zstd (worker threads only for big inputs)."""

    def __init__(self, size: int, level: int, threads: int) -> None:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=level, threads=threads if size > _READ else 0)
        self._c = cctx.compressobj(size=size)

    def update(self, data: bytes) -> bytes:
        return bytes(self._c.compress(data))

    def finish(self) -> bytes:
        return bytes(self._c.flush())


class Encoded:
    """A spooled file read through ``stages``, as s3transfer uploads it.

    The file is opened, and the stages made, on the first read (every file of
    a commit is queued at once). ``read(n)`` returns ``n`` bytes until the end:
    multipart parts must be whole. ``stored`` counts the bytes read out; after
    ``stop`` it reads as ended, so a cancelled upload stops reading.
    """

    def __init__(
        self, path: str, rel: str, where: str, stages: Callable[[], builtins.list[Stage]]
    ) -> None:
        self._path = path
        self._rel = rel
        self._where = where
        self._make_stages = stages
        self._stages: builtins.list[Stage] = []
        self._src: IO[bytes] | None = None
        self._buf = bytearray()
        self._ended = False
        self.stored = 0

    def _open(self) -> IO[bytes]:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise local_error(e, f"reading {self._rel}", self._path) from e
        f = open(fd, "rb")  # noqa: SIM115 - closed at the end of the stream
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            raise InvalidArgument(f"{self._where}: {self._rel} is not a regular file")
        return f

    def _fill(self) -> None:
        if self._src is None:
            self._src = self._open()
            self._stages = self._make_stages()
        try:
            chunk = self._src.read(_READ)
        except OSError as e:
            raise local_error(e, f"reading {self._rel}", self._path) from e
        if chunk:
            for stage in self._stages:
                chunk = stage.update(chunk)
        else:
            self._ended = True
            for stage in self._stages:
                chunk = stage.update(chunk) + stage.finish()
        self._buf += chunk

    def read(self, n: int = -1) -> bytes:
        """The next ``n`` bytes of the stream (all the rest for ``n`` < 0)."""
        while not self._ended and (n < 0 or len(self._buf) < n):
            self._fill()
        if self._ended and self._src is not None:
            self._src.close()
            self._src = None
        n = len(self._buf) if n < 0 else min(n, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.stored += n
        return out

    def stop(self) -> None:
        """End the stream at the next read (from any thread)."""
        self._ended = True


class Bad(Exception):
    """A stored file does not match its manifest entry (``reason`` says how)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Sink:
    """Plaintext of one file, written beside ``target``: hashed, never past the
    manifest's size; ``finish`` moves it into place only if it matches the
    manifest (Bad otherwise), ``discard`` removes what is left."""

    def __init__(self, target: str, entry: FileEntry) -> None:
        self._target = target
        self._entry = entry
        self._f: IO[bytes] | None = None
        self._tmp: str | None = None
        self._digest = Digest()

    def _file(self) -> IO[bytes]:
        import tempfile

        if self._f is None:
            directory = os.path.dirname(self._target)
            os.makedirs(directory, 0o700, exist_ok=True)
            prefix = f".{os.path.basename(self._target)}."
            fd, self._tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
            self._f = open(fd, "wb")  # noqa: SIM115 - closed by finish or discard
        return self._f

    def write(self, data: bytes) -> int:
        """Take the next plaintext bytes."""
        if self._digest.size + len(data) > self._entry.size:
            raise Bad(f"decompresses to more than the {self._entry.size} bytes the manifest says")
        return self._file().write(self._digest.update(data))

    def finish(self) -> None:
        """Check the file against the manifest and move it into place."""
        self._file().close()
        got = self._digest.entry
        if got.size != self._entry.size:
            raise Bad(f"size {got.size}, manifest says {self._entry.size}")
        if got.sha256 != self._entry.sha256:
            raise Bad("sha256 mismatch")
        assert self._tmp is not None
        os.replace(self._tmp, self._target)
        self._tmp = None

    def discard(self) -> None:
        """Remove the partial file, if any (never raises)."""
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.close()
        if self._tmp is not None:
            rmtree(self._tmp)
            self._tmp = None


class Decoded:
    """Where s3transfer writes one stored object, in order: counted against the
    stored size and decompressed into a _Sink. Local failures are StasisErrors,
    mismatches Bad."""

    def __init__(
        self, rel: str, target: str, entry: FileEntry, stored: StoredFile, cache: str
    ) -> None:
        self.sink = _Sink(target, entry)
        self._rel = rel
        self._stored = stored
        self._cache = cache
        self._received = 0
        self._zstd: Any = None  # made on the first write: thousands are queued at once

    def write(self, data: bytes) -> int:
        """Take the next bytes of the stored object."""
        self._received += len(data)
        size = self._stored.stored_size
        if self._received > size:
            raise Bad(f"stored object is larger than the manifest's {size} bytes")
        try:
            if self._stored.compression != "zstd":
                self.sink.write(data)
                return len(data)
            if self._zstd is None:
                import zstandard

                sink = cast(IO[bytes], self.sink)
                self._zstd = zstandard.ZstdDecompressor().stream_writer(
                    sink, write_size=MiB, closefd=False
                )
            self._zstd.write(data)
        except Bad:
            raise
        except OSError as e:
            raise local_error(e, f"downloading {self._rel}", self._cache) from e
        except Exception as e:  # zstandard.ZstdError
            raise Bad(f"cannot be decompressed (zstd): {e}") from e
        return len(data)

    def finish(self) -> None:
        """Check the whole object against the manifest and move it into place."""
        size = self._stored.stored_size
        if self._received != size:
            raise Bad(f"stored object is {self._received} bytes, the manifest says {size}")
        try:
            if self._zstd is not None:
                self._zstd.close()
            self.sink.finish()
        except OSError as e:
            raise local_error(e, f"downloading {self._rel}", self._cache) from e
