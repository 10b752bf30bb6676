"""Where checkpoints live: one interface, a local (any POSIX path) and an in-memory store.

A checkpoint is a directory of files plus ``manifest.json``, which records the sha256
and size of every file and is written LAST: a checkpoint without a valid manifest does
not exist, so a crash or a full disk half-way through writing never leaves something
that looks restorable. A store given a ``Signing`` writes ``manifest.sig`` before the
manifest, and ``open`` refuses a checkpoint whose signature does not verify.

The local store writes into a hidden ``<root>/.partial-<name>-<random>/`` directory,
fsyncs every file and directory, writes the manifest, and renames the directory to
``<root>/<name>`` in one step; ``gc`` removes what crashed writers left. A local
checkpoint is opened once, through no symlink below its store, and read through that
descriptor.

The manifest, the file helpers, the directory reader and the writers' file
calls are public: ``runtime.store.s3`` is a transport for this format and uses them.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Protocol, Self

from runtime import boundedjson
from runtime.capture.digest import KnownDigest
from runtime.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StasisError,
    Unavailable,
)
from runtime.linux import fsresolve
from runtime.names import METADATA_FILE

if TYPE_CHECKING:
    from runtime.store.crypt import Key, Sealer
    from runtime.store.signing import Signing


MANIFEST = "manifest.json"
MANIFEST_SIG = "manifest.sig"  # runtime.store.signing.SIG_FILE (signing loads cryptography)
SIG_MAX = 4096  # bytes of manifest.sig read
MANIFEST_VERSION = 1
PARTIAL_PREFIX = ".partial-"
CHUNK = 1 << 20
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"

NAME_RE = re.compile(NAME_PATTERN)  # a checkpoint name
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PARALLEL_MIN = 8 << 20  # files this big are hashed on a thread pool (hashlib drops the GIL)
_MAX_WORKERS = 4
_MAX_SMALL_JSON = 16 << 20  # manifest.json / stasis.json read into memory
_MAX_FILES = 100_000  # files one manifest may list (a CRIU dump of 1,000 processes: ~10,000)
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NO_DIR_FSYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
_HEX = re.compile(r"[0-9a-f]+")
DEFAULT_CACHE_DIR = "/var/lib/stasis/cache"  # decrypted copies (root); others: the temp dir

log = logging.getLogger("stasis.store")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class FileEntry:
    """The sha256 (hex) and size in bytes of one checkpoint file."""

    sha256: str
    size: int


@dataclass(frozen=True)
class Encryption:
    """How an encrypted checkpoint was sealed (``runtime.store.crypt``); in ``manifest.json``.

    ``salt`` (hex) derives the checkpoint's keys from the key ``key_id`` names;
    ``mac`` (hex) is HMAC-SHA256, with the derived MAC key, of the manifest as
    serialized with ``mac`` = "".
    """

    alg: str
    chunk: int
    key_id: str
    salt: str
    mac: str = ""

    def to_doc(self) -> dict[str, Any]:
        """The JSON object stored under ``encryption``."""
        return {
            "alg": self.alg,
            "chunk": self.chunk,
            "key_id": self.key_id,
            "salt": self.salt,
            "mac": self.mac,
        }

    @classmethod
    def new(cls, key: Key) -> tuple[Encryption, Sealer]:
        """A fresh salt for one checkpoint: its ``encryption`` (MAC still "") and sealer."""
        from runtime.store import crypt

        salt = crypt.new_salt()
        return cls(crypt.ALG, crypt.CHUNK, key.id, salt.hex()), key.derive(salt)

    @classmethod
    def parse(cls, doc: object, where: str) -> Encryption:
        """Check the ``encryption`` object; anything malformed is DataLoss."""
        if not isinstance(doc, dict):
            raise DataLoss(f"{where}: {MANIFEST}: 'encryption' is not an object")
        alg, chunk, key_id, salt, mac = (
            doc.get(k) for k in ("alg", "chunk", "key_id", "salt", "mac")
        )
        if not isinstance(alg, str) or not isinstance(chunk, int) or isinstance(chunk, bool):
            raise DataLoss(f"{where}: {MANIFEST}: 'encryption' has a bad alg or chunk")
        for what, value in (("key_id", key_id), ("salt", salt), ("mac", mac)):
            if not isinstance(value, str) or not _HEX.fullmatch(value):
                raise DataLoss(f"{where}: {MANIFEST}: 'encryption': bad {what}")
        assert isinstance(key_id, str) and isinstance(salt, str) and isinstance(mac, str)
        return cls(alg, chunk, key_id, salt, mac)


@dataclass(frozen=True)
class Manifest:
    """The contents of ``manifest.json``: every file of a checkpoint, with its digest.

    For an encrypted checkpoint (``encryption`` set) the digests and sizes are
    those of the stored, encrypted files, so ``verify`` needs no key.
    """

    name: str
    created: datetime
    files: dict[str, FileEntry]
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = MANIFEST_VERSION
    encryption: Encryption | None = None

    @property
    def size(self) -> int:
        """Total size of the checkpoint's files (the manifest itself not counted)."""
        return sum(e.size for e in self.files.values())

    def to_json(self) -> bytes:
        """Serialize as stored in ``manifest.json``."""
        doc = {
            "version": self.version,
            "name": self.name,
            "created": _format_time(self.created),
            "files": {
                rel: {"sha256": e.sha256, "size": e.size} for rel, e in sorted(self.files.items())
            },
            "metadata": self.metadata,
        }
        if self.encryption is not None:
            doc["encryption"] = self.encryption.to_doc()
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> Manifest:
        """Parse and check ``manifest.json``; anything malformed is DataLoss naming ``where``."""
        doc = boundedjson.loads(data, f"{where}: {MANIFEST}", max_bytes=_MAX_SMALL_JSON)
        if not isinstance(doc, dict):
            raise DataLoss(f"{where}: {MANIFEST} is not a JSON object")
        if doc.get("version") != MANIFEST_VERSION:
            raise DataLoss(f"{where}: {MANIFEST} has unsupported version {doc.get('version')!r}")
        name, created, files, metadata = (
            doc.get(k) for k in ("name", "created", "files", "metadata")
        )
        if not isinstance(name, str):
            raise DataLoss(f"{where}: {MANIFEST}: 'name' is not a string")
        if not isinstance(metadata, dict):
            raise DataLoss(f"{where}: {MANIFEST}: 'metadata' is not an object")
        try:
            when = _parse_time(created)
        except (TypeError, ValueError) as e:
            raise DataLoss(f"{where}: {MANIFEST}: 'created' is not a timestamp") from e
        if not isinstance(files, dict):
            raise DataLoss(f"{where}: {MANIFEST}: 'files' is not an object")
        if len(files) > _MAX_FILES:
            raise DataLoss(f"{where}: {MANIFEST} lists {len(files)} files (at most {_MAX_FILES})")
        entries: dict[str, FileEntry] = {}
        for rel, entry in files.items():
            if safe_rel(rel) != rel or rel in (MANIFEST, MANIFEST_SIG):
                raise DataLoss(f"{where}: {MANIFEST} lists an unsafe path {rel!r}")
            digest = entry.get("sha256") if isinstance(entry, dict) else None
            size = entry.get("size") if isinstance(entry, dict) else None
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise DataLoss(f"{where}: {MANIFEST}: {rel}: bad sha256")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise DataLoss(f"{where}: {MANIFEST}: {rel}: bad size")
            entries[rel] = FileEntry(digest, size)
        encryption = None
        if "encryption" in doc:
            encryption = Encryption.parse(doc["encryption"], where)
        return cls(name=name, created=when, files=entries, metadata=metadata, encryption=encryption)

    def sealed(self, encryption: Encryption, sealer: Sealer) -> Manifest:
        """This manifest carrying ``encryption`` and its MAC (computed with ``mac`` = "")."""
        manifest = dataclasses.replace(self, encryption=encryption)
        mac = sealer.mac(manifest.unsealed())
        return dataclasses.replace(manifest, encryption=dataclasses.replace(encryption, mac=mac))

    def unsealed(self) -> bytes:
        """What the manifest's MAC covers: ``to_json`` with the MAC blanked."""
        assert self.encryption is not None
        return dataclasses.replace(
            self, encryption=dataclasses.replace(self.encryption, mac="")
        ).to_json()

    def open_with(self, key: Key | None, where: str) -> Sealer | None:
        """The sealer for an encrypted checkpoint, its manifest authenticated; None if plain.

        FailedPrecondition without a key, PermissionDenied for another key,
        DataLoss if the manifest fails authentication.
        """
        enc = self.encryption
        if enc is None:
            return None
        if key is None:
            raise FailedPrecondition(
                f"{where} is encrypted (key id {enc.key_id}): configure encryption.key_file "
                "(or STASIS_ENCRYPTION_KEY_FILE) with its key"
            )
        if key.id != enc.key_id:
            raise PermissionDenied(
                f"{where} is encrypted with key id {enc.key_id}, but the configured key "
                f"({key.source or 'given'}) has key id {key.id}"
            )
        from runtime.store import crypt

        if enc.alg != crypt.ALG or enc.chunk != crypt.CHUNK:
            raise DataLoss(f"{where}: unsupported encryption {enc.alg} with chunk {enc.chunk}")
        try:
            sealer = key.derive(bytes.fromhex(enc.salt))
        except ValueError as e:
            raise DataLoss(f"{where}: {MANIFEST}: bad encryption salt") from e
        if not sealer.check_mac(self.unsealed(), enc.mac):
            raise DataLoss(f"{where}: {MANIFEST} authentication failed (changed or forged)")
        return sealer


@dataclass(frozen=True)
class CheckpointInfo:
    """What ``list`` shows of one complete checkpoint.

    ``ref`` is a reference ``resolve`` accepts anywhere (``file:///root/name``).
    ``size`` is the total of the files' sizes. ``metadata`` is the metadata
    given to ``commit``, updated with the checkpoint's ``stasis.json`` (a JSON
    object) when it has one.
    """

    name: str
    ref: str
    created: datetime
    size: int
    metadata: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- interface


class CheckpointWriter(Protocol):
    """A checkpoint being written; nothing is visible until ``commit`` returns.

    Use it as a context manager: leaving the block without ``commit`` (an
    exception included) aborts. Not safe for concurrent use from several threads.
    """

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

    def commit(
        self,
        metadata: dict[str, Any] | None = None,
        known: Mapping[str, KnownDigest] | None = None,
    ) -> CheckpointInfo:
        """Digest every file, write the manifest last, and publish the checkpoint atomically.

        ``known``: digests taken while the files were written (by rel path);
        a store may use those whose file is unchanged instead of re-reading it.
        """
        ...

    def abort(self) -> None:
        """Throw the partial checkpoint away (idempotent; a no-op after commit)."""
        ...

    def __enter__(self) -> CheckpointWriter: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class CheckpointReader(Protocol):
    """A complete checkpoint, readable through local paths; ``close`` when done."""

    @property
    def name(self) -> str:
        """The checkpoint's name."""
        ...

    @property
    def path(self) -> str:
        """The local directory holding the checkpoint's files."""
        ...

    @property
    def manifest(self) -> Manifest:
        """The manifest read when the checkpoint was opened."""
        ...

    @property
    def metadata(self) -> dict[str, Any]:
        """Commit metadata updated with ``stasis.json``, as in CheckpointInfo."""
        ...

    @property
    def info(self) -> CheckpointInfo:
        """Name, creation time, size and metadata."""
        ...

    def verify(self, only: Callable[[str], bool] | None = None) -> None:
        """Check every file against the manifest; any difference raises DataLoss.

        With ``only``, just the files it selects are hashed (names, sizes and the
        manifest are always checked); a store may hash more than asked.
        """
        ...

    def file(self, rel: str) -> str:
        """Local path of the checkpoint file ``rel`` (InvalidArgument if it escapes)."""
        ...

    def close(self) -> None:
        """Release local copies (if the store made any)."""
        ...

    def __enter__(self) -> CheckpointReader: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Store(Protocol):
    """Where checkpoints live (local directory, memory, S3: ``runtime.store.s3``)."""

    @property
    def url(self) -> str:
        """The store's URL, without credentials (for messages)."""
        ...

    def begin(self, name: str) -> CheckpointWriter:
        """Start writing checkpoint ``name`` (AlreadyExists if a complete one has it)."""
        ...

    def open(self, name: str) -> CheckpointReader:
        """Open complete checkpoint ``name`` (NotFound if there is none)."""
        ...

    def list(self) -> builtins.list[CheckpointInfo]:
        """The complete checkpoints, oldest first."""
        ...

    def remove(self, name: str) -> None:
        """Delete checkpoint ``name`` (NotFound if there is none)."""
        ...

    def gc(self, grace_seconds: float) -> builtins.list[str]:
        """Delete partial leftovers older than ``grace_seconds``; returns what was removed."""
        ...


# --------------------------------------------------------------------------- helpers


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid checkpoint name, else raise InvalidArgument."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{name!r} is not a valid checkpoint name: 1 to 128 of letters, digits, "
            "'_', '.' and '-', starting with a letter or digit"
        )
    return name


def safe_rel(rel: object) -> str | None:
    """``rel`` if it is a plain relative path inside the checkpoint, else None."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\0" in rel:
        return None
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return None
    return rel


def check_rel(rel: str) -> str:
    """Return ``rel`` if it is a normalized relative path that stays inside a checkpoint."""
    if safe_rel(rel) is None:
        raise InvalidArgument(
            f"{rel!r} is not a path inside a checkpoint (relative, no '..', '.' or '//')"
        )
    return rel


def _format_time(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: object) -> datetime:
    if not isinstance(value, str):
        raise TypeError("not a string")
    when = datetime.fromisoformat(value)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _storage_error(e: OSError, doing: str, url: str) -> StasisError:
    """A storage failure as a StasisError naming the store; a full disk is ResourceExhausted."""
    detail = e.strerror or str(e)
    if e.errno in DISK_FULL:
        return ResourceExhausted(f"storage {url} is full: {doing}: {detail}")
    return Unavailable(f"storage {url}: {doing}: {detail}")


def _ref(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


def new_token() -> str:
    """A random suffix for staging, spool and data directory names."""
    return os.urandom(6).hex()


def _fsync_dir(path: str) -> None:
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


def _copy(src: IO[bytes], dst: IO[bytes]) -> FileEntry:
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


def read_small(path: str, limit: int = _MAX_SMALL_JSON, *, dir_fd: int | None = None) -> bytes:
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


def _stasis_json(
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


def _skipped(name: str, url: str, e: StasisError) -> None:
    """``list`` leaves out a broken checkpoint and says so (on stderr, for the CLI)."""
    import logging  # only on this path: most commands never log

    logging.getLogger("stasis.store").warning(
        "stasis: warning: %s: skipping checkpoint %s: %s", url, name, e
    )


def problems_message(what: str, problems: list[str]) -> str:
    """One line: ``what`` and the first ten problems (and how many more)."""
    shown = problems[:10]
    more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    return f"{what}: " + "; ".join(shown) + more


# --------------------------------------------------------------------------- reader


def _default_cache_dir() -> str:
    """Where readers put decrypted copies: Stasis's cache as root, else the temp dir."""
    import tempfile

    return DEFAULT_CACHE_DIR if os.geteuid() == 0 else tempfile.gettempdir()


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
            self._metadata = _stasis_json(path, manifest, sealer, dir_fd)
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
            _ref(self._url, self._name),
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
            raise _storage_error(e, f"reading {where}", self._url) from e
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
            raise _storage_error(e, f"decrypting {rel} of {self._where()}", self._url) from e

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
                raise _storage_error(e, f"reading {rel} of {self._where()}", self._url) from e
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
                hashing = _HashingReader(src)
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
                    _copy(src, dst)
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


class _StagingWriter(LocalFiles):
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
        self._preserve: Manifest | None = None

    def _fail(self, e: OSError, doing: str) -> StasisError:
        """Map a write failure; a full disk also throws the partial checkpoint away."""
        err = _storage_error(e, f"checkpoint {self._name}: {doing}", self._url)
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
                _ref(self._url, self._name),
                manifest.created,
                manifest.size,
                _stasis_json(self._staging, manifest, self._sealer),
            )
            self._publish(manifest)
        except OSError as e:
            self.abort()
            raise _storage_error(e, f"committing checkpoint {self._name}", self._url) from e
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
        if self._key is not None and self._preserve is None:
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
        if self._preserve is not None:
            if files != self._preserve.files:
                raise DataLoss(f"{where}: files differ from the imported {MANIFEST}")
            manifest = self._preserve
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
                _fsync_dir(d)
        if self._durable:
            _fsync_dir(self._staging)
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


# --------------------------------------------------------------------------- local store


@dataclass(frozen=True)
class _Anchor:
    """Where a store named by a restore reference must be reached from."""

    root: str  # an allowed store's directory, realpath'd (trusted configuration)
    allowed: str  # the allowed stores, for messages


class LocalStore:
    """Checkpoints as directories under ``root``, on any POSIX filesystem (a NAS mount too).

    With ``create`` (the default, for Stasis's own store), ``begin`` creates a
    missing root 0700; ``resolve`` passes ``create=False`` for a directory a
    user named. Nothing is created or changed before a write, and Stasis sets
    the mode only of a directory it has just made itself: never one that
    exists (think ``stasis list --store /tmp``), never through a symlink.
    Checkpoint directories are 0700 and their files 0600 either way.

    A checkpoint is opened once, through no symlink below the root (a name that
    is a symlink in the store is refused, PermissionDenied), and read through
    that descriptor (``DirReader``). The root itself may be reached through
    symlinks: it is trusted configuration, or a path a user typed. With
    ``anchor`` (``resolve_source``), the root is opened beneath an allowed
    store's directory through no symlink as well.

    With ``key`` (``runtime.store.crypt``), new checkpoints are encrypted and
    encrypted ones can be opened (decrypted copies go under ``cache_dir``);
    without, encrypted checkpoints are listed but not opened.
    """

    def __init__(
        self,
        root: str,
        *,
        create: bool = True,
        key: Key | None = None,
        cache_dir: str | None = None,
        signing: Signing | None = None,
        anchor: _Anchor | None = None,
    ) -> None:
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root
        self.key = key
        self.cache_dir = cache_dir
        self.signing = signing
        self._anchor = anchor
        self._create = create

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def _prepare(self) -> None:
        """Create the root 0700 if it is missing (before a write); leave an existing one
        as it is."""
        parent = os.path.dirname(self.root)
        try:
            os.makedirs(parent, exist_ok=True)
            try:
                os.mkdir(self.root, 0o700)
            except FileExistsError:
                pass
            else:
                # Ours: 0700 whatever the umask, through a descriptor of what
                # mkdir made (O_NOFOLLOW: never a symlink put in its place).
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fchmod(fd, 0o700)
                finally:
                    os.close(fd)
            if not os.path.isdir(self.root):
                raise Unavailable(f"storage {self.url}: not a directory")
        except OSError as e:
            raise _storage_error(e, "creating the store directory (0700)", self.url) from e

    def _dir(self, name: str) -> str:
        return os.path.join(self.root, check_name(name))

    def _root_fd(self) -> int:
        """An ``O_PATH`` descriptor of the root; OSError as opening says."""
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        if self._anchor is None:
            return os.open(self.root, flags)
        top = os.open(self._anchor.root, flags)
        rel = os.path.relpath(self.root, self._anchor.root)
        if rel == ".":
            return top
        try:
            return fsresolve.open_beneath(top, rel, flags)
        finally:
            os.close(top)

    def _open_dir(self, name: str) -> int:
        """A descriptor of checkpoint directory ``name``, reached through no symlink.

        NotFound if it is missing; PermissionDenied if a symlink (or ``..``) is
        on the way from the root (from the anchor, with one).
        """
        check_name(name)
        where = f"checkpoint {name} in {self.url}"
        try:
            root = self._root_fd()
            try:
                return fsresolve.open_beneath(root, name, os.O_RDONLY | os.O_DIRECTORY)
            finally:
                os.close(root)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{where} does not exist") from None
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EXDEV):
                raise _storage_error(e, f"opening {where}", self.url) from e
            if self._anchor is None:
                raise PermissionDenied(
                    f"{where} is a symlink: a checkpoint is read only from a real "
                    "directory of its store"
                ) from e
            raise PermissionDenied(
                f"{where}: a symlink is on the way to it from {self._anchor.root}; restores "
                "read only real directories of the stores they may read "
                f"(storage.url, storage.restore_sources: {self._anchor.allowed})"
            ) from e

    def _load_at(self, dir_fd: int, name: str, *, check: bool = False) -> Manifest:
        """The manifest in checkpoint directory ``dir_fd``: NotFound, or DataLoss if
        malformed; with ``check`` and a ``signing``, the bytes parsed are the ones whose
        ``manifest.sig`` was verified (PermissionDenied / DataLoss else)."""
        where = f"checkpoint {name} in {self.url}"
        try:
            data = read_small(MANIFEST, dir_fd=dir_fd)
        except FileNotFoundError:
            raise NotFound(f"{where} does not exist") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DataLoss(f"{where}: {MANIFEST} is a symlink") from e
            raise _storage_error(e, f"reading {where}", self.url) from e
        except (ValueError, NotRegular) as e:
            raise DataLoss(
                f"{where}: {MANIFEST} is not a regular file of at most {_MAX_SMALL_JSON} bytes"
            ) from e
        manifest = Manifest.parse(data, where)
        if check and self.signing is not None:
            try:
                sig: bytes | None = read_small(MANIFEST_SIG, SIG_MAX, dir_fd=dir_fd)
            except FileNotFoundError:
                sig = None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise DataLoss(f"{where}: {MANIFEST_SIG} is a symlink") from e
                raise _storage_error(e, f"reading {where}", self.url) from e
            except (ValueError, NotRegular) as e:
                raise DataLoss(f"{where}: {MANIFEST_SIG} is not a small regular file") from e
            self.signing.verify(data, sig, where)
        return manifest

    def _load(self, name: str) -> Manifest:
        """The manifest of complete checkpoint ``name``: NotFound, PermissionDenied (a
        symlink), or DataLoss if malformed."""
        fd = self._open_dir(name)
        try:
            return self._load_at(fd, name)
        finally:
            os.close(fd)

    def _complete(self, name: str) -> bool:
        try:
            self._load(name)
        except (NotFound, DataLoss, PermissionDenied):
            return False  # a symlink under the name is no checkpoint either
        return True

    def begin(self, name: str) -> _LocalWriter:
        """Start writing ``name`` in ``<root>/.partial-<name>-<random>/``."""
        check_name(name)
        if self._create:
            self._prepare()
        if self._complete(name):
            raise AlreadyExists(f"checkpoint {name} in {self.url} exists already")
        staging = os.path.join(self.root, f"{PARTIAL_PREFIX}{name}-{new_token()}")
        try:
            os.mkdir(staging, 0o700)
        except FileNotFoundError:
            raise NotFound(f"storage {self.url} does not exist") from None
        except OSError as e:
            raise _storage_error(e, f"starting checkpoint {name}", self.url) from e
        try:
            os.chmod(staging, 0o700)
            lock = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            rmtree(staging)
            raise _storage_error(e, f"starting checkpoint {name}", self.url) from e
        # gc skips directories whose lock is held; where flock is not supported
        # (some network filesystems) the grace period alone protects the writer.
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return _LocalWriter(self, name, staging, lock)

    def open(self, name: str) -> DirReader:
        """Open complete checkpoint ``name`` in place (an encrypted one: authenticated;
        with ``signing``, its signature verified).

        The reader reads through the directory descriptor checked here; its
        ``path`` is the kernel's name for that directory (no symlink in it).
        """
        fd = self._open_dir(name)
        try:
            manifest = self._load_at(fd, name, check=True)
            sealer = manifest.open_with(self.key, f"checkpoint {name} in {self.url}")
            try:
                path = fsresolve.fd_path(fd)
            except OSError as e:
                raise _storage_error(e, f"opening checkpoint {name}", self.url) from e
            return DirReader(
                name, path, manifest, self.url, sealer=sealer, cache_dir=self.cache_dir, dir_fd=fd
            )
        except BaseException:
            os.close(fd)
            raise

    def vouch(self, name: str) -> None:
        """Sign complete checkpoint ``name`` with this store's key on the caller's word:
        one its key did not sign (written before checkpoints were signed, or by an
        untrusted node). Every file is first checked against the manifest (DataLoss
        otherwise), and the signature covers those very manifest bytes."""
        if self.signing is None:
            raise FailedPrecondition(f"{self.url}: this store has no signing key to vouch with")
        where = f"checkpoint {name} in {self.url}"
        fd = self._open_dir(name)
        try:
            data = read_small(MANIFEST, dir_fd=fd)
            manifest = Manifest.parse(data, where)
            reader = DirReader(
                name, fsresolve.fd_path(fd), manifest, self.url, cache_dir=self.cache_dir,
                dir_fd=os.dup(fd),
            )  # fmt: skip
            with reader:
                reader.verify()
            sig = self.signing.sign(data)
            tmp = f".{MANIFEST_SIG}.{new_token()}"
            out = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd
            )
            with open(out, "wb") as f:
                f.write(sig)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, MANIFEST_SIG, src_dir_fd=fd, dst_dir_fd=fd)
            with contextlib.suppress(OSError):
                os.fsync(fd)
        except OSError as e:
            raise _storage_error(e, f"signing {where}", self.url) from e
        finally:
            os.close(fd)
        log.warning("checkpoint %s in %s signed by this node on the user's word", name, self.url)

    def list(self) -> builtins.list[CheckpointInfo]:
        """The complete checkpoints (valid manifest), oldest first; partials are never listed."""
        try:
            with os.scandir(self.root) as it:
                names = sorted(
                    e.name
                    for e in it
                    if NAME_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                )
        except FileNotFoundError:
            return []
        except OSError as e:
            raise _storage_error(e, "listing checkpoints", self.url) from e
        infos = []
        for name in names:
            try:
                fd = self._open_dir(name)
            except NotFound:
                continue  # removed meanwhile
            except StasisError as e:  # a symlink under the name, say
                _skipped(name, self.url, e)
                continue
            try:
                manifest = self._load_at(fd, name)
                metadata = _stasis_json(self._dir(name), manifest, dir_fd=fd)
            except NotFound:
                continue  # removed meanwhile
            except StasisError as e:
                _skipped(name, self.url, e)
                continue
            finally:
                os.close(fd)
            infos.append(
                CheckpointInfo(
                    name, _ref(self.url, name), manifest.created, manifest.size, metadata
                )
            )
        return sorted(infos, key=lambda i: (i.created, i.name))

    def remove(self, name: str) -> None:
        """Delete ``name``: renamed out of sight first, so it vanishes in one step.

        A directory of that name without a valid manifest is removed too.
        """
        target = self._dir(name)
        if not os.path.lexists(target):
            raise NotFound(f"checkpoint {name} in {self.url} does not exist")
        aside = os.path.join(self.root, f"{PARTIAL_PREFIX}{name}-removed-{new_token()}")
        try:
            os.rename(target, aside)
            _fsync_dir(self.root)
        except FileNotFoundError:
            raise NotFound(f"checkpoint {name} in {self.url} does not exist") from None
        except OSError as e:
            raise _storage_error(e, f"removing checkpoint {name}", self.url) from e
        rmtree(aside)  # what survives is a partial leftover for gc

    def gc(self, grace_seconds: float) -> builtins.list[str]:
        """Remove ``.partial-*`` leftovers untouched for ``grace_seconds``; returns their names.

        A partial directory whose writer still holds its lock is kept whatever
        its age; the newest mtime anywhere inside counts, so a long CRIU dump
        that keeps writing is not collected.
        """
        if grace_seconds < 0:
            raise InvalidArgument(f"gc grace period must be >= 0, not {grace_seconds}")
        deadline = time.time() - grace_seconds
        try:
            with os.scandir(self.root) as it:
                leftovers = sorted(e.path for e in it if e.name.startswith(PARTIAL_PREFIX))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise _storage_error(e, "collecting partial checkpoints", self.url) from e
        removed = []
        for path in leftovers:
            if is_locked(path) or newest_mtime(path) > deadline:
                continue
            rmtree(path)
            if not os.path.lexists(path):
                removed.append(os.path.basename(path))
        return removed


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


class _LocalWriter(_StagingWriter):
    """Writes ``<root>/.partial-<name>-<random>/`` and renames it to ``<root>/<name>``."""

    def __init__(self, store: LocalStore, name: str, staging: str, lock: int) -> None:
        super().__init__(name, staging, store.url, store.key, store.signing)
        self._store = store
        self._lock: int | None = lock  # flock held while writing; gc skips locked partials

    def _publish(self, manifest: Manifest) -> None:
        root = self._store.root
        target = os.path.join(root, self._name)
        try:
            os.rename(self._staging, target)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            if self._store._complete(self._name):
                raise AlreadyExists(
                    f"checkpoint {self._name} in {self._store.url} exists already"
                ) from e
            # Something incomplete holds the name (it "does not exist"): move it
            # aside for gc and take the name.
            os.rename(
                target, os.path.join(root, f"{PARTIAL_PREFIX}{self._name}-stale-{new_token()}")
            )
            os.rename(self._staging, target)
        # Published. Should the fsync below fail, commit's abort removes the
        # checkpoint again: a commit that raised leaves nothing behind.
        self._staging = target
        _fsync_dir(root)

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)


# --------------------------------------------------------------------------- memory store


@dataclass(frozen=True)
class _Stored:
    manifest: Manifest
    files: dict[str, bytes]
    signature: bytes | None = None


class MemoryStore:
    """Checkpoints kept as bytes in memory, for tests.

    Writers stage files in a private temporary directory (CRIU needs real
    paths); ``commit`` reads them into memory and deletes the directory.
    Readers get a private local copy, deleted by ``close``. ``key`` as for LocalStore.
    """

    def __init__(self, key: Key | None = None, signing: Signing | None = None) -> None:
        self.url = f"memory://{id(self):x}"
        self.key = key
        self.signing = signing
        self._lock = threading.Lock()
        self._checkpoints: dict[str, _Stored] = {}  # guarded by _lock

    def begin(self, name: str) -> _MemoryWriter:
        """Start writing ``name`` in a private temporary directory."""
        import tempfile

        check_name(name)
        with self._lock:
            if name in self._checkpoints:
                raise AlreadyExists(f"checkpoint {name} in {self.url} exists already")
        return _MemoryWriter(self, name, tempfile.mkdtemp(prefix=f"stasis-{name}-"))

    def _get(self, name: str) -> _Stored:
        check_name(name)
        with self._lock:
            stored = self._checkpoints.get(name)
        if stored is None:
            raise NotFound(f"checkpoint {name} in {self.url} does not exist")
        return stored

    def open(self, name: str) -> DirReader:
        """Open ``name`` through a private local copy of its files (``close`` deletes it)."""
        import tempfile

        stored = self._get(name)
        if self.signing is not None:
            self.signing.verify(
                stored.manifest.to_json(), stored.signature, f"checkpoint {name} in {self.url}"
            )
        sealer = stored.manifest.open_with(self.key, f"checkpoint {name} in {self.url}")
        copy = tempfile.mkdtemp(prefix=f"stasis-{name}-")
        try:
            for rel, data in [*stored.files.items(), (MANIFEST, stored.manifest.to_json())]:
                target = os.path.join(copy, rel)
                os.makedirs(os.path.dirname(target), 0o700, exist_ok=True)
                with open_new(target) as f:
                    f.write(data)
        except BaseException:
            rmtree(copy)
            raise
        return DirReader(name, copy, stored.manifest, self.url, lambda: rmtree(copy), sealer=sealer)

    def list(self) -> builtins.list[CheckpointInfo]:
        """The checkpoints, oldest first."""
        with self._lock:
            items = builtins.list(self._checkpoints.items())
        infos = []
        for name, stored in items:
            metadata = dict(stored.manifest.metadata)
            raw = stored.files.get(METADATA_FILE) if stored.manifest.encryption is None else None
            try:
                doc = boundedjson.loads(raw, METADATA_FILE) if raw is not None else None
            except DataLoss:
                doc = None
            if isinstance(doc, dict):
                metadata.update(doc)
            infos.append(
                CheckpointInfo(
                    name,
                    _ref(self.url, name),
                    stored.manifest.created,
                    stored.manifest.size,
                    metadata,
                )
            )
        return sorted(infos, key=lambda i: (i.created, i.name))

    def remove(self, name: str) -> None:
        """Forget ``name``."""
        check_name(name)
        with self._lock:
            if self._checkpoints.pop(name, None) is None:
                raise NotFound(f"checkpoint {name} in {self.url} does not exist")

    def gc(self, grace_seconds: float) -> builtins.list[str]:
        """Nothing to collect: uncommitted writers never reach the store."""
        if grace_seconds < 0:
            raise InvalidArgument(f"gc grace period must be >= 0, not {grace_seconds}")
        return []

    def _add(self, name: str, stored: _Stored) -> None:
        with self._lock:
            if name in self._checkpoints:
                raise AlreadyExists(f"checkpoint {name} in {self.url} exists already")
            self._checkpoints[name] = stored


class _MemoryWriter(_StagingWriter):
    _durable = False  # the staging directory is thrown away anyway

    def __init__(self, store: MemoryStore, name: str, staging: str) -> None:
        super().__init__(name, staging, store.url, store.key, store.signing)
        self._store = store

    def _publish(self, manifest: Manifest) -> None:
        files = {}
        for rel in manifest.files:
            with open(os.path.join(self._staging, rel), "rb") as f:
                files[rel] = f.read()
        self._store._add(self._name, _Stored(manifest, files, self._signature))
        rmtree(self._staging)


class _HashingReader:
    """A file wrapper that digests what tarfile reads through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha256.update(data)
        return data
