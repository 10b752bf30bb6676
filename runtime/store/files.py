"""The local checkpoint directory, read and written: files digested and fsynced, the
manifest written LAST (``StagingWriter``), and a complete checkpoint read through one
descriptor of its directory, through no symlink (``DirReader``).

These are the filesystem helpers every store builds on: the local store publishes a
staged directory by renaming it, the S3 store spools and caches its files in one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

from runtime import boundedjson
from runtime.capture.digest import KnownDigest
from runtime.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StasisError,
    Unavailable,
)
from runtime.linux import fsresolve
from runtime.names import METADATA_FILE
from runtime.store.model import (
    MANIFEST,
    MANIFEST_SIG,
    MAX_SMALL_JSON,
    CheckpointInfo,
    Encryption,
    FileEntry,
    Manifest,
    check_rel,
    ref,
)

if TYPE_CHECKING:
    from runtime.store.crypt import Key, Sealer
    from runtime.store.signing import Signing


CHUNK = 1 << 20
_PARALLEL_MIN = 8 << 20  # files this big are hashed on a thread pool (hashlib drops the GIL)
_MAX_WORKERS = 4
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NO_DIR_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
DEFAULT_CACHE_DIR = "/var/lib/stasis/cache"  # decrypted copies (root); others: the temp dir


# --------------------------------------------------------------------------- helpers


def storage_error(e: OSError, doing: str, url: str) -> StasisError:
    """A storage failure as a StasisError naming the store; a full disk is ResourceExhausted."""
    detail = e.strerror or str(e)
    if e.errno in DISK_FULL:
        return ResourceExhausted(f"storage {url} is full: {doing}: {detail}")
    return Unavailable(f"storage {url}: {doing}: {detail}")


def local_error(e: OSError, doing: str, path: str) -> StasisError:
    """A failure of a local copy (a spool, a cache) as a StasisError naming the path; a
    full disk is ResourceExhausted."""
    detail = e.strerror or str(e)
    if e.errno in DISK_FULL:
        return ResourceExhausted(f"local disk is full: {doing} in {path}: {detail}")
    return Unavailable(f"{doing} in {path}: {detail}")


def new_token() -> str:
    """A random suffix for staging, spool and data directory names."""
    return os.urandom(6).hex()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_DIR_FSYNC:  # some network filesystems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def rmtree(path: str) -> None:
    """Remove a file or a tree; never follows symlinks, never raises."""
    import shutil

    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def open_new(path: str) -> IO[bytes]:
    """Open ``path`` for writing (truncating), mode 0600, never through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def copy(src: IO[bytes], dst: IO[bytes]) -> FileEntry:
    """Stream ``src`` into ``dst`` in 1 MiB chunks, digesting on the way."""
    h = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return FileEntry(h.hexdigest(), size)


class NotRegular(Exception):
    """A path that should be a regular file is something else (a symlink, a fifo...)."""


def digest_file(path: str, *, seal: bool = False, dir_fd: int | None = None) -> FileEntry:
    """sha256 and size of the regular file ``path``, read in 1 MiB chunks.

    With ``seal``: also make it 0600 and fsync it (the commit path). With
    ``dir_fd``: ``path`` is relative to it, opened beneath it through no symlink.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags) if dir_fd is None else fsresolve.open_beneath(dir_fd, path, flags)
    with open(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(path)
        if seal and stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        h = hashlib.sha256()
        size = 0
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
        if seal:
            os.fsync(fd)
    return FileEntry(h.hexdigest(), size)


def _seal_known(path: str, known: KnownDigest, *, durable: bool) -> bool:
    """Seal (0600, fsync) a file digested earlier, if it is unchanged since; else False."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not known.matches(st):
            return False
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
        if durable:
            os.fsync(fd)
        return True
    finally:
        os.close(fd)


def _digest_all(
    paths: dict[str, str], sizes: dict[str, int], *, seal: bool, dir_fd: int | None = None
) -> dict[str, FileEntry | BaseException]:
    """Digest many files: the large ones on a small thread pool, the rest inline
    (``dir_fd`` as for ``digest_file``).

    Returns each file's entry, or the exception digesting it raised.
    """
    out: dict[str, FileEntry | BaseException] = {}
    big = [rel for rel in paths if sizes.get(rel, 0) >= _PARALLEL_MIN]
    if len(big) > 1:
        from concurrent.futures import ThreadPoolExecutor

        workers = min(_MAX_WORKERS, len(big), os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stasis-digest") as pool:
            futures = {rel: pool.submit(_try_digest, paths[rel], seal, dir_fd) for rel in big}
            for rel in paths:
                if rel not in futures:
                    out[rel] = _try_digest(paths[rel], seal, dir_fd)
            for rel, fut in futures.items():
                out[rel] = fut.result()
    else:
        for rel, p in paths.items():
            out[rel] = _try_digest(p, seal, dir_fd)
    return {rel: out[rel] for rel in paths}


def _try_digest(path: str, seal: bool, dir_fd: int | None = None) -> FileEntry | BaseException:
    try:
        if dir_fd is None:  # the writers' call, as it was (tests wrap digest_file)
            return digest_file(path, seal=seal)
        return digest_file(path, seal=seal, dir_fd=dir_fd)
    except Exception as e:
        return e


@dataclass
class Tree:
    """What ``scan_tree`` found below a directory."""

    files: dict[str, int] = field(default_factory=dict)  # rel -> size
    dirs: list[str] = field(default_factory=list)  # rel, parents before children
    others: list[str] = field(default_factory=list)  # symlinks, fifos, sockets, devices


def scan_tree(top: str) -> Tree:
    """Every entry under ``top``, without following symlinks."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _scan_at(fd)
    finally:
        os.close(fd)


def _scan_at(dir_fd: int) -> Tree:
    """Every entry beneath directory ``dir_fd``, each directory opened through no symlink."""
    tree = Tree()
    pending = [""]
    while pending:
        rel_dir = pending.pop(0)
        flags = os.O_RDONLY | os.O_DIRECTORY
        fd = fsresolve.open_beneath(dir_fd, rel_dir, flags) if rel_dir else os.dup(dir_fd)
        try:
            with os.scandir(fd) as it:
                entries = sorted(it, key=lambda e: e.name)
                for e in entries:
                    rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                    if e.is_dir(follow_symlinks=False):
                        tree.dirs.append(rel)
                        pending.append(rel)
                    elif e.is_file(follow_symlinks=False):
                        tree.files[rel] = e.stat(follow_symlinks=False).st_size
                    else:
                        tree.others.append(rel)
        finally:
            os.close(fd)
    return tree


def read_small(path: str, limit: int = MAX_SMALL_JSON, *, dir_fd: int | None = None) -> bytes:
    """The whole of regular file ``path`` if it holds at most ``limit`` bytes
    (``dir_fd`` as for ``digest_file``)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags) if dir_fd is None else fsresolve.open_beneath(dir_fd, path, flags)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegular(path)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data


def stasis_json(
    directory: str, manifest: Manifest, sealer: Sealer | None = None, dir_fd: int | None = None
) -> dict[str, Any]:
    """Commit metadata updated with ``stasis.json``; a bad ``stasis.json`` is ignored here
    (``verify`` is what reports corruption).

    An encrypted checkpoint's ``stasis.json`` is read only with its ``sealer``
    (without, the manifest's metadata, authenticated but not encrypted, is all).
    With ``dir_fd`` (the checkpoint directory), it is read beneath that, through no symlink.
    """
    metadata = dict(manifest.metadata)
    entry = manifest.files.get(METADATA_FILE)
    if entry is not None:
        path = os.path.join(directory, METADATA_FILE) if dir_fd is None else METADATA_FILE
        try:
            if manifest.encryption is None:
                data = read_small(path, 1 << 20, dir_fd=dir_fd)
            elif sealer is None or entry.size > 2 << 20:
                return metadata
            else:
                import io

                out = io.BytesIO()
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = (
                    os.open(path, flags)
                    if dir_fd is None
                    else fsresolve.open_beneath(dir_fd, path, flags)
                )
                with open(fd, "rb") as f:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise NotRegular(path)
                    sealer.decrypt(f, out, METADATA_FILE, directory)
                data = out.getvalue()
            doc = boundedjson.loads(data, METADATA_FILE, max_bytes=1 << 20)
        except (OSError, ValueError, NotRegular, DataLoss):
            return metadata
        if isinstance(doc, dict):
            metadata.update(doc)
    return metadata


def problems_message(what: str, problems: list[str]) -> str:
    """One line: ``what`` and the first ten problems (and how many more)."""
    shown = problems[:10]
    more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return f"{what}: " + "; ".join(shown) + more


def is_locked(path: str) -> bool:
    """Whether a live writer holds the flock on directory ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops our lock, if we took it
    return False


def newest_mtime(path: str) -> float:
    """The newest mtime of ``path`` and everything below it (0 if it is gone)."""
    try:
        newest = os.lstat(path).st_mtime
    except OSError:
        return 0.0
    for dirpath, dirnames, filenames in os.walk(path):
        for n in (*dirnames, *filenames):
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, n)).st_mtime)
            except OSError:
                continue
    return newest


# --------------------------------------------------------------------------- reader


def _default_cache_dir() -> str:
    """Where readers put decrypted copies: Stasis's cache as root, else the temp dir."""
    import tempfile

    return DEFAULT_CACHE_DIR if os.geteuid() == 0 else tempfile.gettempdir()


class HashingReader:
    """A file wrapper that digests what tarfile reads through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha256.update(data)
        return data


class DirReader:
    """A complete checkpoint in a local directory (the store's own, or a local copy).

    What the reader reads itself (manifest, ``stasis.json``, the files it hashes
    or decrypts) it opens beneath one descriptor of the checkpoint directory,
    ``dir_fd``, through no symlink: the directory checked when the checkpoint
    was opened is the one read, whatever is renamed or linked afterwards.
    ``file`` hands out paths (runc, CRIU and tar need them), only for files
    with no symlink on the way beneath that directory.
    """

    def __init__(
        self,
        name: str,
        path: str,
        manifest: Manifest,
        store_url: str,
        cleanup: Callable[[], None] | None = None,
        sealer: Sealer | None = None,
        cache_dir: str | None = None,
        dir_fd: int | None = None,
    ) -> None:
        self._name = name
        self._path = path
        self._manifest = manifest
        self._url = store_url
        self._cleanup = cleanup
        # An encrypted checkpoint: ``file`` decrypts into ``_plain`` (a private
        # 0700 directory under ``cache_dir``, made on first use, removed by close).
        self._sealer = sealer
        self._cache_dir = cache_dir
        self._plain: str | None = None
        self._decrypted: set[str] = set()
        # The reader owns ``dir_fd`` once made (without one: ``path``, a private
        # copy, is opened). close() must not close it under a thread still using
        # it (the restore gate verifies on a thread): the number could name
        # another directory by then. Guarded by _fd_lock: _fd, _fd_users, _fd_orphan.
        given = dir_fd
        if dir_fd is None:
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._metadata = stasis_json(path, manifest, sealer, dir_fd)
        except BaseException:
            if given is None:
                os.close(dir_fd)
            raise
        self._fd_lock = threading.Lock()
        self._fd: int | None = dir_fd
        self._fd_users = 0
        self._fd_orphan: int | None = None

    @property
    def name(self) -> str:
        """The checkpoint's name."""
        return self._name

    @property
    def path(self) -> str:
        """The local directory holding the checkpoint's files."""
        return self._path

    @property
    def manifest(self) -> Manifest:
        """The manifest read when the checkpoint was opened."""
        return self._manifest

    @property
    def metadata(self) -> dict[str, Any]:
        """Commit metadata updated with ``stasis.json``."""
        return dict(self._metadata)

    @property
    def info(self) -> CheckpointInfo:
        """Name, creation time, size and metadata."""
        return CheckpointInfo(
            self._name,
            ref(self._url, self._name),
            self._manifest.created,
            self._manifest.size,
            self.metadata,
        )

    def _where(self) -> str:
        return f"checkpoint {self._name} in {self._url}"

    @contextlib.contextmanager
    def _at(self) -> Iterator[int]:
        """The checkpoint directory's descriptor, kept open while the block runs."""
        with self._fd_lock:
            if self._fd is None:
                raise FailedPrecondition(f"{self._where()}: reader is closed")
            self._fd_users += 1
            fd = self._fd
        try:
            yield fd
        finally:
            with self._fd_lock:
                self._fd_users -= 1
                orphan = self._fd_orphan if self._fd_users == 0 else None
                if orphan is not None:
                    self._fd_orphan = None
            if orphan is not None:
                os.close(orphan)

    def _close_fd(self) -> None:
        with self._fd_lock:
            fd, self._fd = self._fd, None
            if fd is not None and self._fd_users:
                self._fd_orphan, fd = fd, None  # the last user closes it
        if fd is not None:
            os.close(fd)

    def verify(self, only: Callable[[str], bool] | None = None) -> None:
        """Check sha256 and size of every file in the manifest, and that no file is extra
        (with ``only``, hash just the files it selects).

        Raises DataLoss naming the checkpoint and each file at fault.
        """
        with self._at() as dir_fd:
            self._verify(dir_fd, only)

    def _verify(self, dir_fd: int, only: Callable[[str], bool] | None) -> None:
        where = self._where()
        try:
            on_disk = Manifest.parse(read_small(MANIFEST, dir_fd=dir_fd), where)
        except FileNotFoundError:
            raise DataLoss(f"{where}: {MANIFEST} is missing") from None
        except (OSError, ValueError, NotRegular) as e:
            raise DataLoss(f"{where}: {MANIFEST} cannot be read: {e}") from e
        if on_disk != self._manifest:
            raise DataLoss(f"{where}: {MANIFEST} changed since the checkpoint was opened")
        try:
            tree = _scan_at(dir_fd)
        except OSError as e:
            raise storage_error(e, f"reading {where}", self._url) from e
        expected = self._manifest.files
        actual = {
            rel: size for rel, size in tree.files.items() if rel not in (MANIFEST, MANIFEST_SIG)
        }
        problems = [f"{rel}: not a regular file" for rel in tree.others]
        problems += [f"{rel}: missing" for rel in sorted(expected.keys() - actual.keys())]
        problems += [f"{rel}: not in the manifest" for rel in sorted(actual.keys() - expected)]
        to_hash: dict[str, str] = {}
        for rel in sorted(expected.keys() & actual.keys()):
            if actual[rel] != expected[rel].size:
                problems.append(f"{rel}: size {actual[rel]}, manifest says {expected[rel].size}")
            elif only is None or only(rel):
                to_hash[rel] = rel
        for rel, got in _digest_all(to_hash, actual, seal=False, dir_fd=dir_fd).items():
            if isinstance(got, BaseException):
                problems.append(f"{rel}: cannot be read: {got}")
            elif got != expected[rel]:
                problems.append(f"{rel}: sha256 mismatch (size {got.size})")
        if problems:
            raise DataLoss(problems_message(where, problems))

    def file(self, rel: str) -> str:
        """Local path of checkpoint file (or directory, e.g. ``checkpoint``) ``rel``.

        InvalidArgument if ``rel`` would leave the checkpoint; NotFound if the
        manifest lists neither that file nor any file under that directory.
        For an encrypted checkpoint, the path of a decrypted copy (each file
        checked against the manifest as it is decrypted; DataLoss otherwise).
        """
        path = self.stored_file(rel)
        if self._sealer is None:
            return path
        try:
            return self._decrypt(rel)
        except OSError as e:
            raise storage_error(e, f"decrypting {rel} of {self._where()}", self._url) from e

    def stored_file(self, rel: str) -> str:
        """Local path of ``rel`` as stored (encrypted, for an encrypted checkpoint).

        InvalidArgument if a symlink is on the way to it beneath the checkpoint.
        """
        check_rel(rel)
        files = self._manifest.files
        if rel not in files and not any(f.startswith(rel + "/") for f in files):
            raise NotFound(f"{self._where()}: no file {rel}")
        # A path, not a descriptor, leaves here (for runc, CRIU, tar): ``_path``
        # is the kernel's name for the directory checked at open (LocalStore.open),
        # and beneath it ``rel`` has no symlink now. The store is writable only by
        # root, so what is checked here is what the path names when it is used.
        with self._at() as dir_fd:
            try:
                os.close(fsresolve.open_beneath(dir_fd, rel, os.O_PATH))
            except FileNotFoundError:
                pass  # verify names it missing; the caller's open fails
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise InvalidArgument(
                        f"{self._where()}: {rel} leads out of the checkpoint (a symlink)"
                    ) from e
                raise storage_error(e, f"reading {rel} of {self._where()}", self._url) from e
        return os.path.join(self._path, rel)

    def _decrypt(self, rel: str) -> str:
        assert self._sealer is not None
        if self._plain is None:
            import tempfile

            cache = self._cache_dir or _default_cache_dir()
            os.makedirs(cache, 0o700, exist_ok=True)
            self._plain = tempfile.mkdtemp(prefix=f"{self._name}-", dir=cache)  # 0700
        files = self._manifest.files
        wanted = [rel] if rel in files else sorted(f for f in files if f.startswith(rel + "/"))
        for f in wanted:
            if f in self._decrypted:
                continue
            target = os.path.join(self._plain, f)
            os.makedirs(os.path.dirname(target), 0o700, exist_ok=True)
            with self._at() as dir_fd:
                src_fd = fsresolve.open_beneath(dir_fd, f, os.O_RDONLY | os.O_NONBLOCK)
            with open(src_fd, "rb") as src, open_new(target) as dst:
                if not stat.S_ISREG(os.fstat(src_fd).st_mode):
                    raise DataLoss(f"{self._where()}: {f}: not a regular file")
                hashing = HashingReader(src)
                self._sealer.decrypt(hashing, dst, f, self._where())  # type: ignore[arg-type]
                if hashing.read(1) or hashing.sha256.hexdigest() != files[f].sha256:
                    raise DataLoss(f"{self._where()}: {f}: sha256 mismatch")
            self._decrypted.add(f)
        return os.path.join(self._plain, rel)

    def close(self) -> None:
        """Release the local copy, if the store made one, and any decrypted files."""
        self._close_fd()
        plain, self._plain = self._plain, None
        self._decrypted.clear()
        if plain is not None:
            rmtree(plain)
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- writer


class LocalFiles:
    """Writing a checkpoint's files into a local directory (for CRIU and runc to write).

    Shared by the local store's writers and the S3 writer's spool; subclasses
    say where (``_target``), whether writing is allowed (``_check_open``) and
    how a write failure is reported (``_fail``).
    """

    _name: str
    _url: str  # the store's, for messages
    _state: str  # "open" while files may be written

    @property
    def name(self) -> str:
        """The checkpoint's name."""
        return self._name

    def _check_open(self) -> None:
        if self._state != "open":
            raise FailedPrecondition(
                f"checkpoint {self._name} in {self._url}: writer is {self._state}"
            )

    def _target(self, rel: str) -> str:
        raise NotImplementedError

    def _fail(self, e: OSError, doing: str) -> StasisError:
        raise NotImplementedError

    def abort(self) -> None:
        """Throw the unfinished checkpoint away (idempotent)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    def path(self, rel: str, *, directory: bool = False) -> str:
        """Local path for ``rel``, for CRIU and runc to write.

        Parent directories are created (0700); with ``directory``, ``rel`` itself too.
        """
        self._check_open()
        target = self._target(rel)
        try:
            os.makedirs(target if directory else os.path.dirname(target), 0o700, exist_ok=True)
        except OSError as e:
            raise self._fail(e, f"creating the directory for {rel}") from e
        return target

    def add_file(self, rel: str, src_path: str) -> None:
        """Copy the local file ``src_path`` into the checkpoint as ``rel`` (mode 0600)."""
        target = self.path(rel)
        try:
            src = open(src_path, "rb")  # noqa: SIM115 - closed below, distinct errors
        except FileNotFoundError:
            raise NotFound(f"checkpoint {self._name}: {src_path} does not exist") from None
        except OSError as e:
            raise InvalidArgument(f"checkpoint {self._name}: cannot read {src_path}: {e}") from e
        with src:
            try:
                with open_new(target) as dst:
                    copy(src, dst)
            except OSError as e:
                raise self._fail(e, f"writing {rel}") from e

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` into the checkpoint as ``rel`` (mode 0600)."""
        target = self.path(rel)
        try:
            with open_new(target) as dst:
                dst.write(data)
        except OSError as e:
            raise self._fail(e, f"writing {rel}") from e


def _encrypt_in_place(sealer: Sealer, path: str, rel: str, where: str, durable: bool) -> FileEntry:
    """Replace the staged file ``path`` by its encryption (temp file + rename)."""
    tmp = f"{path}.stasis-encrypting"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidArgument(f"{where}: {rel} is not a regular file") from e
        raise
    try:
        with open(fd, "rb") as src:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidArgument(f"{where}: {rel} is not a regular file")
            with open_new(tmp) as dst:
                sha256, size = sealer.encrypt(src, dst, rel)
                dst.flush()
                if durable:
                    os.fsync(dst.fileno())
        os.replace(tmp, path)
    except BaseException:
        rmtree(tmp)
        raise
    return FileEntry(sha256, size)


class StagingWriter(LocalFiles):
    """Writes a checkpoint into a local staging directory; subclasses publish it.

    State: "open" -> "committed" | "aborted"; every write method checks it.
    """

    _durable = True  # fsync files and directories at commit

    def __init__(
        self,
        name: str,
        staging: str,
        store_url: str,
        key: Key | None = None,
        signing: Signing | None = None,
    ) -> None:
        self._name = name
        self._staging = staging
        self._url = store_url
        self._state = "open"
        self._key = key  # with a key, _seal encrypts every file (runtime.store.crypt)
        self._signing = signing  # with it, _seal writes manifest.sig (runtime.store.signing)
        self._signature: bytes | None = None
        self._sealer: Sealer | None = None
        # An imported encrypted checkpoint: its files are stored as they came
        # and its authenticated manifest is kept verbatim (see import_tar).
        self.preserve: Manifest | None = None

    def _fail(self, e: OSError, doing: str) -> StasisError:
        """Map a write failure; a full disk also throws the partial checkpoint away."""
        err = storage_error(e, f"checkpoint {self._name}: {doing}", self._url)
        if isinstance(err, ResourceExhausted):
            self.abort()
        return err

    def _target(self, rel: str) -> str:
        check_rel(rel)
        if rel in (MANIFEST, MANIFEST_SIG):
            raise InvalidArgument(f"{rel} is written by commit, not by the caller")
        return os.path.join(self._staging, rel)

    def commit(
        self,
        metadata: dict[str, Any] | None = None,
        known: Mapping[str, KnownDigest] | None = None,
    ) -> CheckpointInfo:
        """Digest and fsync every file, write ``manifest.json`` last, then publish.

        On any failure the partial checkpoint is removed: no manifest, nothing listed.
        """
        self._check_open()
        metadata = {} if metadata is None else metadata
        try:
            if not isinstance(metadata, dict):
                raise TypeError(f"a dict is needed, not {type(metadata).__name__}")
            # A deep copy in JSON's own types: what list() shows later is what was stored.
            metadata = json.loads(json.dumps(metadata))
        except (TypeError, ValueError) as e:
            self.abort()
            raise InvalidArgument(f"checkpoint {self._name}: bad metadata: {e}") from e
        try:
            manifest = self._seal(metadata, known or {})
            info = CheckpointInfo(
                self._name,
                ref(self._url, self._name),
                manifest.created,
                manifest.size,
                stasis_json(self._staging, manifest, self._sealer),
            )
            self._publish(manifest)
        except OSError as e:
            self.abort()
            raise storage_error(e, f"committing checkpoint {self._name}", self._url) from e
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self._release()
        return info

    def _seal(self, metadata: dict[str, Any], known: Mapping[str, KnownDigest]) -> Manifest:
        """Digest (and fsync, 0600) every file, then write the manifest; fsync the tree."""
        tree = scan_tree(self._staging)
        where = f"checkpoint {self._name} in {self._url}"
        if tree.others:
            raise InvalidArgument(f"{where}: {tree.others[0]} is not a regular file or directory")
        for own in (MANIFEST, MANIFEST_SIG):
            if own in tree.files:
                raise InvalidArgument(f"{where}: {own} was written by the caller")
        paths = {rel: os.path.join(self._staging, rel) for rel in tree.files}
        files: dict[str, FileEntry] = {}
        encryption: Encryption | None = None
        if self._key is not None and self.preserve is None:
            # Encrypted in place before digesting: the manifest describes the
            # stored bytes (verify needs no key); the plaintext digests of
            # ``known`` describe nothing stored and are ignored.
            encryption, self._sealer = Encryption.new(self._key)
            for rel, staged in paths.items():
                files[rel] = _encrypt_in_place(self._sealer, staged, rel, where, self._durable)
            paths = {}
        for rel, k in known.items():
            path = paths.get(rel)
            if path is not None and _seal_known(path, k, durable=self._durable):
                files[rel] = FileEntry(k.sha256, k.size)
                del paths[rel]
        for rel, got in _digest_all(paths, tree.files, seal=self._durable).items():
            if isinstance(got, NotRegular):
                raise InvalidArgument(f"{where}: {rel} is not a regular file")
            if isinstance(got, BaseException):
                raise got
            files[rel] = got
        manifest = Manifest(self._name, datetime.now(UTC), files, metadata)
        if self.preserve is not None:
            if files != self.preserve.files:
                raise DataLoss(f"{where}: files differ from the imported {MANIFEST}")
            manifest = self.preserve
        elif encryption is not None and self._sealer is not None:
            manifest = manifest.sealed(encryption, self._sealer)
        data = manifest.to_json()
        if self._signing is not None:
            # The signature goes in before the manifest: no complete checkpoint without it.
            self._signature = self._signing.sign(data)
            with open_new(os.path.join(self._staging, MANIFEST_SIG)) as f:
                f.write(self._signature)
                f.flush()
                if self._durable:
                    os.fsync(f.fileno())
        # The manifest goes in LAST: with it present the checkpoint is complete.
        with open_new(os.path.join(self._staging, MANIFEST)) as f:
            f.write(data)
            f.flush()
            if self._durable:
                os.fsync(f.fileno())
        for rel in reversed(tree.dirs):
            d = os.path.join(self._staging, rel)
            os.chmod(d, 0o700)
            if self._durable:
                fsync_dir(d)
        if self._durable:
            fsync_dir(self._staging)
        return manifest

    def _publish(self, manifest: Manifest) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """Drop whatever the writer holds besides the staging directory."""

    def abort(self) -> None:
        """Remove the partial checkpoint; idempotent, and a no-op after commit."""
        if self._state != "open":
            return
        self._state = "aborted"
        rmtree(self._staging)
        self._release()
