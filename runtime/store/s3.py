"""Checkpoints in an S3-compatible object store (``s3://bucket/prefix``): a transport
for the local checkpoint format (``runtime.store.files``), not a second one.

Checkpoint ``N`` is ``prefix/N/``: one object per file under a fresh
``data-<random>/`` (``.zst`` when compressed), ``manifest.sig`` with signing, and
``manifest.json``, the local manifest plus each file's stored ``key``,
``stored_size`` and ``compression`` (and ``stasis.json`` copied in), written LAST.

* A checkpoint without a manifest does not exist: it is not listed, cannot be
  opened, and ``gc`` deletes its objects after the grace period. A failed upload
  aborts its multipart uploads and deletes its objects; a retry or a second
  writer never overwrites objects a manifest names.
* Writers spool locally (``<spool_dir>/<name>-<random>/``, flocked while in
  use); ``commit`` records ``.stasis-pending.json`` first and keeps the spool if
  the upload fails, for ``push``. ``runtime.store.upload`` runs it in a child of
  the shim.
* Readers download on demand into ``<cache_dir>/<name>-<random>/`` and hand out
  a path only for a file verified against the manifest; the local reader then
  decrypts (``runtime.store.crypt``) and serves it.
* Transfers go through s3transfer, fed by file objects: hash -> zstd -> encrypt
  on the way up (the manifest hashes the plaintext, or the ciphertext when
  encrypted), decompress -> hash on the way down. Part uploads, PUTs and GETs get
  ``part_attempts`` on top of botocore's retries.
* botocore errors become one-line StasisErrors naming the operation, bucket, key
  and endpoint, never the secret.

boto3, s3transfer and zstandard are imported on first use: writing a spool and
``gc_spools`` need none of them.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import random
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar, cast

from runtime.capture.digest import KnownDigest
from runtime.config import S3Config
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
from runtime.names import METADATA_FILE, SPOOL_DIR, SPOOL_PENDING
from runtime.store.files import (
    DISK_FULL,
    DirReader,
    LocalFiles,
    NotRegular,
    digest_file,
    is_locked,
    new_token,
    newest_mtime,
    open_new,
    problems_message,
    read_small,
    rmtree,
    scan_tree,
)
from runtime.store.model import (
    MANIFEST,
    MANIFEST_SIG,
    NAME_PATTERN,
    NAME_RE,
    SIG_MAX,
    CheckpointInfo,
    Encryption,
    FileEntry,
    Manifest,
    check_name,
    check_rel,
    safe_rel,
)

if TYPE_CHECKING:
    from runtime.store.crypt import Key, Sealer
    from runtime.store.signing import Signing

log = logging.getLogger("stasis.s3")

T = TypeVar("T")

MiB = 1 << 20
COMPRESSIONS = ("zstd", "none")
DEFAULT_CACHE_DIR = "/var/lib/stasis/cache"
PART_SIZE = 8 * MiB  # multipart part (and ranged GET) size; S3 wants >= 5 MiB
PID_FILE = ".stasis-upload.pid"  # in a spool: the PID of the upload worker (runtime.store.upload)
DATA_PREFIX = "data-"

_SPOOL_OWN = frozenset({SPOOL_PENDING, PID_FILE})  # the spool's bookkeeping, never uploaded
_SPOOL_NAME = re.compile(rf"(?:{NAME_PATTERN})-[0-9a-f]{{12}}")
_NEW_SPOOL = re.compile(rf"\.(?:{NAME_PATTERN})-[0-9a-f]{{12}}\.new")

_EXT = {"zstd": ".zst", "none": ""}
_READ = 4 * MiB  # input read per compressor call
_IO_CHUNK = 256 << 10  # download writes into the decoder
_MAX_PARTS = 9_000  # S3 allows 10,000; compressed output may exceed the input a little
_MAX_MANIFEST = 64 * MiB
_MAX_STASIS_JSON = 1 * MiB
_DELETE_BATCH = 1000  # DeleteObjects limit

_AUTH_CODES = frozenset(
    {"AccessDenied", "AccountProblem", "AllAccessDisabled", "ExpiredToken", "Forbidden"}
    | {"InvalidAccessKeyId", "InvalidClientTokenId", "InvalidSecurity", "InvalidToken"}
    | {"SignatureDoesNotMatch", "TokenRefreshRequired", "UnrecognizedClientException"}
)
_THROTTLE_CODES = frozenset(
    {"RequestLimitExceeded", "RequestThrottled", "ServiceUnavailable", "SlowDown"}
    | {"Throttling", "ThrottlingException", "TooManyRequests"}
)
_TRANSIENT_CODES = _THROTTLE_CODES | {"InternalError", "RequestTimeout", "RequestTimeTooSkewed"}
_REGION_CODES = frozenset(
    {"AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "PermanentRedirect"}
)
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


# --------------------------------------------------------------------------- urls


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ("bucket", "a/b"); InvalidArgument if it is not one."""
    if not url.startswith("s3://"):
        raise InvalidArgument(f"{url!r} is not an s3:// URL")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket or any(c in bucket for c in "?#@:\\ ") or bucket in (".", ".."):
        raise InvalidArgument(f"{url!r} names no valid bucket (s3://bucket/prefix)")
    prefix = prefix.strip("/")
    if prefix and safe_rel(prefix) != prefix:
        raise InvalidArgument(f"{url!r}: the prefix may not contain '//', '.' or '..'")
    return bucket, prefix


def split_ref(ref: str) -> tuple[str, str]:
    """``s3://bucket/prefix/name`` -> ("s3://bucket/prefix", "name")."""
    bucket, path = parse_url(ref)
    store_prefix, _, name = path.rpartition("/")
    if not name:
        raise InvalidArgument(f"{ref!r} names no checkpoint (s3://bucket/prefix/name)")
    check_name(name)
    return f"s3://{bucket}/{store_prefix}" if store_prefix else f"s3://{bucket}", name


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class StoredFile:
    """Where and how one checkpoint file is stored: ``key`` is relative to ``prefix/N/``."""

    key: str
    stored_size: int
    compression: str


@dataclass(frozen=True)
class _Remote:
    """A parsed S3 manifest: the plain manifest plus storage details."""

    manifest: Manifest
    stored: dict[str, StoredFile]
    stasis_json: dict[str, Any] | None
    raw: bytes

    @property
    def metadata(self) -> dict[str, Any]:
        """Commit metadata updated with ``stasis.json`` (as CheckpointInfo has it)."""
        metadata = dict(self.manifest.metadata)
        if self.stasis_json is not None:
            metadata.update(self.stasis_json)
        return metadata


def _manifest_bytes(
    manifest: Manifest, stored: dict[str, StoredFile], stasis_json: dict[str, Any] | None
) -> bytes:
    doc = json.loads(manifest.to_json())
    for rel, s in stored.items():
        doc["files"][rel].update(key=s.key, stored_size=s.stored_size, compression=s.compression)
    if stasis_json is not None:
        doc["stasis_json"] = stasis_json
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _parse_manifest(data: bytes, where: str) -> _Remote:
    """Parse an S3 manifest; anything malformed is DataLoss naming ``where``."""
    manifest = Manifest.parse(data, where)
    doc = json.loads(data)  # valid: Manifest.parse checked it
    stored: dict[str, StoredFile] = {}
    for rel in manifest.files:
        entry = doc["files"][rel]
        key, size, comp = (entry.get(k) for k in ("key", "stored_size", "compression"))
        if not isinstance(key, str) or safe_rel(key) != key or key == MANIFEST:
            raise DataLoss(f"{where}: {MANIFEST}: {rel}: bad stored key")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise DataLoss(f"{where}: {MANIFEST}: {rel}: bad stored_size")
        if comp not in COMPRESSIONS:
            raise DataLoss(f"{where}: {MANIFEST}: {rel}: unknown compression {comp!r}")
        stored[rel] = StoredFile(key, size, comp)
    extra = doc.get("stasis_json")
    if extra is not None and not isinstance(extra, dict):
        raise DataLoss(f"{where}: {MANIFEST}: 'stasis_json' is not an object")
    return _Remote(manifest, stored, extra, data)


# --------------------------------------------------------------------------- streams


class _Stage(Protocol):
    """One step of a stream: ``update`` per chunk, then ``finish`` once."""

    def update(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class _Digest:
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


class _Zstd:
    """A stage that compresses with zstd (worker threads only for big inputs)."""

    def __init__(self, size: int, level: int, threads: int) -> None:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=level, threads=threads if size > _READ else 0)
        self._c = cctx.compressobj(size=size)

    def update(self, data: bytes) -> bytes:
        return bytes(self._c.compress(data))

    def finish(self) -> bytes:
        return bytes(self._c.flush())


class _Encoded:
    """A spooled file read through ``stages``, as s3transfer uploads it.

    The file is opened, and the stages made, on the first read (every file of
    a commit is queued at once). ``read(n)`` returns ``n`` bytes until the end:
    multipart parts must be whole. ``stored`` counts the bytes read out; after
    ``stop`` it reads as ended, so a cancelled upload stops reading.
    """

    def __init__(
        self, path: str, rel: str, where: str, stages: Callable[[], builtins.list[_Stage]]
    ) -> None:
        self._path = path
        self._rel = rel
        self._where = where
        self._make_stages = stages
        self._stages: builtins.list[_Stage] = []
        self._src: IO[bytes] | None = None
        self._buf = bytearray()
        self._ended = False
        self.stored = 0

    def _open(self) -> IO[bytes]:
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise _local_error(e, f"reading {self._rel}", self._path) from e
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
            raise _local_error(e, f"reading {self._rel}", self._path) from e
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


class _Bad(Exception):
    """A stored file does not match its manifest entry (``reason`` says how)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Sink:
    """Plaintext of one file, written beside ``target``: hashed, never past the
    manifest's size; ``finish`` moves it into place only if it matches the
    manifest (_Bad otherwise), ``discard`` removes what is left."""

    def __init__(self, target: str, entry: FileEntry) -> None:
        self._target = target
        self._entry = entry
        self._f: IO[bytes] | None = None
        self._tmp: str | None = None
        self._digest = _Digest()

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
            raise _Bad(f"decompresses to more than the {self._entry.size} bytes the manifest says")
        return self._file().write(self._digest.update(data))

    def finish(self) -> None:
        """Check the file against the manifest and move it into place."""
        self._file().close()
        got = self._digest.entry
        if got.size != self._entry.size:
            raise _Bad(f"size {got.size}, manifest says {self._entry.size}")
        if got.sha256 != self._entry.sha256:
            raise _Bad("sha256 mismatch")
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


class _Decoded:
    """Where s3transfer writes one stored object, in order: counted against the
    stored size and decompressed into a _Sink. Local failures are StasisErrors,
    mismatches _Bad."""

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
            raise _Bad(f"stored object is larger than the manifest's {size} bytes")
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
        except _Bad:
            raise
        except OSError as e:
            raise _local_error(e, f"downloading {self._rel}", self._cache) from e
        except Exception as e:  # zstandard.ZstdError
            raise _Bad(f"cannot be decompressed (zstd): {e}") from e
        return len(data)

    def finish(self) -> None:
        """Check the whole object against the manifest and move it into place."""
        size = self._stored.stored_size
        if self._received != size:
            raise _Bad(f"stored object is {self._received} bytes, the manifest says {size}")
        try:
            if self._zstd is not None:
                self._zstd.close()
            self.sink.finish()
        except OSError as e:
            raise _local_error(e, f"downloading {self._rel}", self._cache) from e


def _check_compression(compression: str) -> str:
    if compression not in COMPRESSIONS:
        raise InvalidArgument(
            f"unknown compression {compression!r}: one of {', '.join(COMPRESSIONS)}"
        )
    return compression


# --------------------------------------------------------------------------- errors


def _is_transient(e: BaseException) -> bool:
    """Whether trying the same request again may help (network, 5xx, throttling)."""
    from botocore import exceptions as bx

    if isinstance(e, bx.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError | bx.ConnectTimeoutError):
        return False  # a black-holed endpoint: botocore's attempts took long enough
    return isinstance(
        e,
        bx.ConnectionError
        | bx.HTTPClientError
        | bx.ReadTimeoutError
        | bx.ResponseStreamingError
        | bx.IncompleteReadError
        | ConnectionError
        | TimeoutError,
    )


def _is_unreachable(e: BaseException) -> bool:
    from botocore import exceptions as bx

    cause = e.__cause__ if isinstance(e, StasisError) else e
    return isinstance(cause, bx.ConnectionError)


# --------------------------------------------------------------------------- store


class S3Store:
    """Checkpoints under ``s3://bucket/prefix`` on AWS S3 or an S3-compatible server.

    Credentials, region, endpoint and checksum mode come from ``s3``
    (``[storage.s3]`` / ``STASIS_S3_*``); what it leaves unset comes from
    boto3's default chain (``AWS_*`` variables, ``~/.aws``, instance roles).
    With an endpoint, requests use path-style addressing. Nothing touches the
    network before the first operation.

    ``compression`` ("zstd" or "none") is the default of new writers;
    ``concurrency`` bounds parallel requests (and parts held in memory) per
    upload or download; ``spool_dir`` and ``cache_dir`` hold local copies
    for writers and readers. Safe for concurrent use from several threads.
    """

    def __init__(
        self,
        url: str,
        s3: S3Config | None = None,
        *,
        spool_dir: str = SPOOL_DIR,
        cache_dir: str = DEFAULT_CACHE_DIR,
        compression: str = "zstd",
        zstd_level: int = 3,
        zstd_threads: int = -1,
        part_size: int = PART_SIZE,
        concurrency: int = 8,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
        part_attempts: int = 4,
        retry_delay: float = 0.5,
        key_file: str | None = None,
        signing: Signing | None = None,
    ) -> None:
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._cfg = s3 if s3 is not None else S3Config()
        if (self._cfg.access_key_id is None) != (self._cfg.secret_access_key is None):
            given, missing = (
                ("access_key_id", "secret_access_key")
                if self._cfg.secret_access_key is None
                else ("secret_access_key", "access_key_id")
            )
            raise InvalidArgument(
                f"storage {self.url}: storage.s3.{given} is set but {missing} is not"
            )
        if part_size < 5 * MiB:
            raise InvalidArgument(f"S3 part size must be at least 5 MiB, not {part_size}")
        if concurrency < 1:
            raise InvalidArgument(f"S3 concurrency must be at least 1, not {concurrency}")
        self.compression = _check_compression(compression)
        self.spool_dir = os.path.abspath(spool_dir)
        self.cache_dir = os.path.abspath(cache_dir)
        self.zstd_level = zstd_level
        self.zstd_threads = zstd_threads
        self.part_size = part_size
        self.concurrency = concurrency
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_attempts = max_attempts
        self._part_attempts = max(1, part_attempts)
        self._retry_delay = retry_delay
        # With a key, uploads are encrypted and encrypted checkpoints can be read
        # (the key file travels to the upload worker by path, in ``options``).
        self.key_file = key_file
        self.key: Key | None = None
        if key_file is not None:
            from runtime.store.crypt import load_key

            self.key = load_key(key_file)
        # With signing, uploads put manifest.sig and open verifies it (the worker
        # gets the key files' paths, in ``options``).
        self.signing = signing
        self.endpoint = _show_endpoint(self._cfg.endpoint)
        self._base = f"{self.prefix}/" if self.prefix else ""
        self._client_lock = threading.Lock()
        self._s3: Any = None  # guarded by _client_lock; botocore clients are thread-safe

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint!r})"

    # ------------------------------------------------------------------ plumbing

    def client(self) -> Any:
        """The boto3 S3 client (created on first use)."""
        with self._client_lock:
            if self._s3 is None:
                try:
                    self._s3 = self._make_client()
                except StasisError:
                    raise
                except Exception as e:  # botocore loads credentials here
                    raise self.error(e, "connect to") from e
            return self._s3

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config as BotoConfig

        cfg = self._cfg
        session = boto3.session.Session()
        region = cfg.region or session.region_name or "us-east-1"
        options: dict[str, Any] = {
            "region_name": region,
            "signature_version": "s3v4",
            "retries": {"mode": "standard", "max_attempts": self._max_attempts},
            "connect_timeout": self._connect_timeout,
            "read_timeout": self._read_timeout,
            "max_pool_connections": 2 * self.concurrency + 4,
            "tcp_keepalive": True,
        }
        if cfg.endpoint:
            options["s3"] = {"addressing_style": "path"}
        if "request_checksum_calculation" in BotoConfig.OPTION_DEFAULTS:  # botocore >= 1.36
            options["request_checksum_calculation"] = cfg.checksum
            options["response_checksum_validation"] = cfg.checksum
        if not cfg.endpoint:
            self.endpoint = f"AWS S3 ({region})"
        try:
            return session.client(
                "s3",
                endpoint_url=cfg.endpoint,
                aws_access_key_id=cfg.access_key_id,
                aws_secret_access_key=cfg.secret_access_key,
                config=BotoConfig(**options),
            )
        except ValueError as e:
            raise InvalidArgument(f"storage {self.url} at {self.endpoint}: {self._clean(e)}") from e

    def _clean(self, what: object) -> str:
        """One line of server or SDK text, never the secret."""
        text = " ".join(str(what).split())
        secret = self._cfg.secret_access_key
        if secret and len(secret) >= 8:  # a shorter one would mangle words, and is no secret
            text = text.replace(secret, "***")
        return text if len(text) <= 300 else text[:297] + "..."

    def error(self, e: BaseException, op: str, key: str | None = None) -> StasisError:
        """``e`` (from boto3/botocore) as one-line StasisError naming op, bucket, key, endpoint."""
        if isinstance(e, StasisError):
            return e
        from botocore import exceptions as bx

        target = f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket}"
        head = f"S3 {op} {target} at {self.endpoint}"
        if isinstance(e, bx.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = err.get("Message")
            detail = self._clean(f"{code}: {message}" if message else code or f"HTTP {status}")
            if code == "NoSuchBucket":
                return NotFound(f"{head}: bucket {self.bucket} does not exist ({detail})")
            if code in _REGION_CODES or status == 301:
                return Unavailable(
                    f"{head}: the bucket is in another region or behind another endpoint; "
                    f"set storage.s3.region/endpoint ({detail})"
                )
            if code in _AUTH_CODES or status == 403:
                return PermissionDenied(
                    f"{head}: access refused, check the credentials and the bucket's "
                    f"permissions ({detail})"
                )
            if code in _MISSING_KEY_CODES or status == 404:
                return NotFound(f"{head}: no such object ({detail})")
            if code in _THROTTLE_CODES or status in (429, 503):
                return Unavailable(f"{head}: throttled, still after retries ({detail})")
            if code == "InvalidBucketName":
                return InvalidArgument(f"{head}: invalid bucket name ({detail})")
            return Unavailable(f"{head}: {detail} (HTTP {status})")
        if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
            return PermissionDenied(
                f"{head}: no usable S3 credentials: set storage.s3.access_key_id and "
                "secret_access_key (or STASIS_S3_*), or the AWS variables or files"
            )
        if isinstance(e, bx.CredentialRetrievalError):
            return PermissionDenied(f"{head}: cannot load S3 credentials ({self._clean(e)})")
        if isinstance(e, bx.ConnectTimeoutError):
            return Unavailable(f"{head}: cannot reach the endpoint (connect timed out)")
        if isinstance(e, bx.ConnectionError):
            return Unavailable(f"{head}: cannot reach the endpoint ({type(e).__name__})")
        if isinstance(e, bx.ReadTimeoutError):
            return Unavailable(f"{head}: the endpoint stopped answering (read timed out)")
        return Unavailable(f"{head}: {type(e).__name__}: {self._clean(e)}")

    def _call(self, op: str, key: str | None, fn: Callable[..., T], **kwargs: Any) -> T:
        """``fn(**kwargs)``, its failure mapped (botocore retries the request itself)."""
        try:
            return fn(**kwargs)
        except StasisError:
            raise
        except Exception as e:
            raise self.error(e, op, key) from e

    def _retry(self, op: str, key: str, fn: Callable[..., T], **kwargs: Any) -> T:
        """``fn(**kwargs)`` with a few more attempts than botocore's for transient failures
        (it does not retry a body that breaks off mid-stream); a file-like body is rewound."""
        attempt = 1
        while True:
            try:
                if attempt > 1 and hasattr(kwargs.get("Body"), "seek"):
                    kwargs["Body"].seek(0)
                return fn(**kwargs)
            except (StasisError, _Bad):
                raise
            except Exception as e:
                if attempt >= self._part_attempts or not _is_transient(e):
                    raise self.error(e, op, key) from e
                delay = self._retry_delay * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
                log.warning(
                    "%s (attempt %d of %d); retrying in %.1fs",
                    self.error(e, op, key),
                    attempt,
                    self._part_attempts,
                    delay,
                )
                time.sleep(delay)
                attempt += 1

    def _where(self, name: str) -> str:
        return f"checkpoint {name} in {self.url}"

    def _dir_key(self, name: str) -> str:
        return f"{self._base}{name}/"

    def _manifest_key(self, name: str) -> str:
        return f"{self._base}{name}/{MANIFEST}"

    def _sig_key(self, name: str) -> str:
        return f"{self._base}{name}/{MANIFEST_SIG}"

    def _get_manifest(self, name: str) -> bytes | None:
        """The raw manifest of ``name``; None if there is none (NotFound for a missing bucket)."""
        return self._get_small(name, self._manifest_key(name), MANIFEST, _MAX_MANIFEST)

    def _get_small(self, name: str, key: str, what: str, limit: int) -> bytes | None:
        """A small object of checkpoint ``name`` (``what`` says which); None if there is none."""
        from botocore.exceptions import ClientError

        s3 = self.client()

        def get() -> bytes | None:
            try:
                resp = s3.get_object(Bucket=self.bucket, Key=key)
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
                    return None
                raise
            with resp["Body"] as body:
                data = cast(bytes, body.read(limit + 1))
                if int(resp.get("ContentLength", 0)) > limit or len(data) > limit:
                    raise DataLoss(f"{self._where(name)}: {what} is too large")
                return data

        # No retries of our own: a manifest is small, botocore's suffice, and an
        # unreachable endpoint should fail fast.
        return self._call("get", key, get)

    def _load(self, name: str) -> _Remote:
        """The parsed manifest of ``name``: NotFound, or DataLoss if malformed."""
        data = self._get_manifest(check_name(name))
        if data is None:
            raise NotFound(f"{self._where(name)} does not exist")
        return _parse_manifest(data, self._where(name))

    def _pages(self, op: str, what: str | None, method: str, **kwargs: Any) -> Iterator[Any]:
        """The pages of a paginated listing (``method`` of the client), failures mapped."""
        pages = iter(self.client().get_paginator(method).paginate(Bucket=self.bucket, **kwargs))
        while True:
            try:
                page = next(pages)
            except StopIteration:
                return
            except Exception as e:
                raise self.error(e, op, what) from e
            yield page

    def _list_keys(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``prefix`` (the listing's dicts: Key, Size, LastModified)."""
        for page in self._pages("list", prefix, "list_objects_v2", Prefix=prefix):
            yield from page.get("Contents", [])

    def _delete(self, keys: builtins.list[str]) -> None:
        """Delete objects in batches; Unavailable naming the first key that stayed."""
        s3 = self.client()
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            resp = self._call(
                "delete",
                batch[0],
                s3.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise Unavailable(
                    f"S3 delete s3://{self.bucket}/{first.get('Key')} at {self.endpoint}: "
                    f"{self._clean(first.get('Code'))}: {self._clean(first.get('Message'))}"
                    + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
                )

    # ------------------------------------------------------------------ Store

    def begin(self, name: str) -> S3Writer:
        """Start writing ``name`` into a local spool (AlreadyExists if it is in the bucket)."""
        self.check_absent(name)
        spool, lock = new_spool(self.spool_dir, name)
        return S3Writer(self, name, spool, lock)

    def check_absent(self, name: str) -> None:
        """AlreadyExists if checkpoint ``name`` is in the bucket (a GET of its manifest)."""
        if self._get_manifest(check_name(name)) is not None:
            raise AlreadyExists(f"{self._where(name)} exists already")

    def options(self) -> dict[str, Any]:
        """The keyword arguments that build a store like this one (but its ``s3`` config)."""
        return {
            "spool_dir": self.spool_dir,
            "cache_dir": self.cache_dir,
            "compression": self.compression,
            "zstd_level": self.zstd_level,
            "zstd_threads": self.zstd_threads,
            "part_size": self.part_size,
            "concurrency": self.concurrency,
            "connect_timeout": self._connect_timeout,
            "read_timeout": self._read_timeout,
            "max_attempts": self._max_attempts,
            "part_attempts": self._part_attempts,
            "retry_delay": self._retry_delay,
            "key_file": self.key_file,
            "signing": None if self.signing is None else self.signing.options(),
        }

    @property
    def s3(self) -> S3Config:
        """The credentials and endpoint given to the store."""
        return self._cfg

    def open(self, name: str) -> S3Reader:
        """Read ``name``'s manifest (NotFound / DataLoss) and prepare a local cache."""
        remote = self._load(name)
        if self.signing is not None:
            sig = self._get_small(name, self._sig_key(name), MANIFEST_SIG, SIG_MAX)
            self.signing.verify(remote.raw, sig, self._where(name))
        sealer = remote.manifest.open_with(self.key, self._where(name))
        import tempfile

        try:
            os.makedirs(self.cache_dir, 0o700, exist_ok=True)
            cache = tempfile.mkdtemp(prefix=f"{name}-", dir=self.cache_dir)
        except OSError as e:
            raise _local_error(e, f"preparing a local copy of {name}", self.cache_dir) from e
        try:
            with open_new(os.path.join(cache, MANIFEST)) as f:
                f.write(remote.raw)
            return S3Reader(self, name, remote, cache, sealer)
        except OSError as e:
            rmtree(cache)
            raise _local_error(e, f"preparing a local copy of {name}", cache) from e
        except BaseException:
            rmtree(cache)
            raise

    def list(self) -> builtins.list[CheckpointInfo]:
        """Checkpoints with a valid manifest, oldest first (one GET per checkpoint)."""
        names: builtins.list[str] = []
        listing = {"Prefix": self._base, "Delimiter": "/"}
        for page in self._pages("list", self._base or None, "list_objects_v2", **listing):
            for p in page.get("CommonPrefixes", []):
                name = str(p.get("Prefix", ""))[len(self._base) :].rstrip("/")
                if NAME_RE.fullmatch(name):
                    names.append(name)

        def info(name: str) -> CheckpointInfo | None:
            try:
                remote = self._load(name)
            except NotFound:
                return None
            except DataLoss as e:
                log.warning("stasis: warning: %s: skipping checkpoint %s: %s", self.url, name, e)
                return None
            m = remote.manifest
            return CheckpointInfo(name, f"{self.url}/{name}", m.created, m.size, remote.metadata)

        if not names:
            return []
        with ThreadPoolExecutor(
            max_workers=min(self.concurrency, len(names)), thread_name_prefix="stasis-s3-list"
        ) as pool:
            infos = [i for i in pool.map(info, names) if i is not None]
        return sorted(infos, key=lambda i: (i.created, i.name))

    def remove(self, name: str) -> None:
        """Delete ``name``: the manifest first (it vanishes in one step), then its objects.

        Objects under ``prefix/name/`` without a manifest are removed too;
        whatever a failure leaves behind is for ``gc``.
        """
        check_name(name)
        keys = [str(o["Key"]) for o in self._list_keys(self._dir_key(name))]
        if not keys:
            raise NotFound(f"{self._where(name)} does not exist")
        manifest = self._manifest_key(name)
        if manifest in keys:
            self._delete([manifest])
        self._delete([k for k in keys if k != manifest])

    def gc(self, grace_seconds: float) -> builtins.list[str]:
        """Delete leftovers older than ``grace_seconds``; returns their keys (below the prefix).

        Leftovers are: every object under a ``prefix/N/`` without a manifest,
        objects under a complete checkpoint that its manifest does not name,
        and unfinished multipart uploads under the prefix (their newest part
        counts for their age). A prefix with a malformed manifest is left
        alone. The grace period must outlast the longest single-file upload.
        """
        if grace_seconds < 0:
            raise InvalidArgument(f"gc grace period must be >= 0, not {grace_seconds}")
        deadline = time.time() - grace_seconds
        s3 = self.client()
        groups: dict[str, builtins.list[tuple[str, float]]] = {}
        for obj in self._list_keys(self._base):
            key = str(obj["Key"])
            name, sep, _ = key[len(self._base) :].partition("/")
            if sep and NAME_RE.fullmatch(name):
                groups.setdefault(name, []).append((key, obj["LastModified"].timestamp()))
        uploads = list(self._uploads(self._base))
        active: dict[str, float] = {}  # checkpoint name -> newest upload activity
        stale: builtins.list[tuple[str, str]] = []
        for key, upload_id, initiated in uploads:
            newest = initiated
            if initiated <= deadline:
                newest = max(initiated, self._newest_part(key, upload_id))
            if newest <= deadline:
                stale.append((key, upload_id))
            name = key[len(self._base) :].partition("/")[0]
            active[name] = max(active.get(name, 0.0), newest)
        removed: builtins.list[str] = []
        for key, upload_id in stale:
            try:
                self._call(
                    "abort multipart upload",
                    key,
                    s3.abort_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                )
            except NotFound:
                continue  # finished or aborted meanwhile
            removed.append(f"{key[len(self._base) :]} (unfinished upload)")
        doomed: builtins.list[str] = []
        for name, objects in sorted(groups.items()):
            manifest_key = self._manifest_key(name)
            if any(k == manifest_key for k, _ in objects):
                try:
                    remote = self._load(name)
                except NotFound:
                    remote = None  # removed meanwhile: judge as leftovers
                except DataLoss:
                    continue
                if remote is not None:
                    keep = {manifest_key, self._sig_key(name)} | {
                        self._dir_key(name) + s.key for s in remote.stored.values()
                    }
                    doomed += [k for k, t in objects if k not in keep and t <= deadline]
                    continue
            newest = max([t for _, t in objects] + [active.get(name, 0.0)])
            if newest <= deadline:
                doomed += [k for k, _ in objects]
        self._delete(doomed)
        removed += [k[len(self._base) :] for k in doomed]
        return removed

    def _uploads(self, prefix: str) -> Iterator[tuple[str, str, float]]:
        """Unfinished multipart uploads under ``prefix``: (key, upload id, initiated)."""
        op = "list multipart uploads"
        for page in self._pages(op, prefix or None, "list_multipart_uploads", Prefix=prefix):
            for u in page.get("Uploads", []):
                yield str(u["Key"]), str(u["UploadId"]), u["Initiated"].timestamp()

    def _newest_part(self, key: str, upload_id: str) -> float:
        """When the newest part of an unfinished upload arrived (0 if none or gone)."""
        newest = 0.0
        with contextlib.suppress(NotFound):
            for page in self._pages("list parts", key, "list_parts", Key=key, UploadId=upload_id):
                for p in page.get("Parts", []):
                    if p.get("LastModified") is not None:
                        newest = max(newest, p["LastModified"].timestamp())
        return newest

    # ------------------------------------------------------------------ uploads

    def push(self, spool: str, name: str | None = None) -> CheckpointInfo:
        """Upload a spool that a failed ``commit`` kept; the spool is deleted on success.

        ``name`` defaults to the one the writer had. Fails like ``commit``,
        keeping the spool again; FailedPrecondition while another process
        (a writer, an upload worker) holds the spool.
        """
        spool = os.path.abspath(spool)
        with spool_lock(spool):
            return self.push_locked(spool, name)

    def gc_spools(self, grace_seconds: float) -> builtins.list[str]:
        """``collect_spools`` in this store's spool directory: returns the paths removed."""
        return collect_spools(self.spool_dir, self.url, grace_seconds)

    def push_locked(self, spool: str, name: str | None = None) -> CheckpointInfo:
        """``push``, by a caller that holds the spool's lock already (the upload worker)."""
        spool = os.path.abspath(spool)
        pending: dict[str, Any] = {}
        try:
            if not os.path.isdir(spool):
                raise NotFound(f"spool {spool} does not exist")
            # Only a commit writes the pending record, after the dump finished:
            # a spool without it (a writer killed mid-dump) is no checkpoint.
            if not os.path.lexists(os.path.join(spool, SPOOL_PENDING)):
                raise FailedPrecondition(
                    f"spool {spool} was never committed (no {SPOOL_PENDING}): "
                    "it is not a checkpoint"
                )
            pending = json.loads(read_small(os.path.join(spool, SPOOL_PENDING), _MAX_STASIS_JSON))
            tree = scan_tree(spool)
        except (OSError, ValueError, NotRegular) as e:
            raise InvalidArgument(f"spool {spool} cannot be read: {e}") from e
        if not isinstance(pending, dict):
            raise InvalidArgument(f"spool {spool}: {SPOOL_PENDING} is not an object")
        name = name or pending.get("name") or os.path.basename(spool).rpartition("-")[0]
        check_name(str(name))
        metadata = pending.get("metadata", {})
        compression = _check_compression(str(pending.get("compression", self.compression)))
        key_id = pending.get("key_id")
        if key_id is not None and (self.key is None or self.key.id != key_id):
            configured = "no key" if self.key is None else f"key id {self.key.id}"
            raise FailedPrecondition(
                f"spool {spool} is to be encrypted with key id {key_id}, but {configured} "
                "is configured (encryption.key_file): it is uploaded neither in clear nor "
                "with another key"
            )
        if tree.others:
            raise InvalidArgument(f"spool {spool}: {tree.others[0]} is not a regular file")
        files = {rel: size for rel, size in tree.files.items() if rel not in _SPOOL_OWN}
        if MANIFEST in files or not isinstance(metadata, dict):
            raise InvalidArgument(f"spool {spool} was not written by a checkpoint writer")
        info = self._upload_kept(spool, str(name), metadata, compression, files)
        rmtree(spool)
        return info

    def _upload_kept(
        self,
        spool: str,
        name: str,
        metadata: dict[str, Any],
        compression: str,
        files: dict[str, int],
    ) -> CheckpointInfo:
        """``_upload``; on failure the error also says that the spool is kept."""
        try:
            return self._upload(spool, name, metadata, compression, files)
        except StasisError as e:
            raise type(e)(
                f"{e}; the checkpoint's files are kept in {spool}: "
                f"`stasis push {spool} --to {self.url}` uploads them again"
            ) from e

    def _upload(
        self,
        spool: str,
        name: str,
        metadata: dict[str, Any],
        compression: str,
        files: dict[str, int],
    ) -> CheckpointInfo:
        """Upload every file under a fresh ``data-<random>/``, then the manifest (LAST)."""
        where = self._where(name)
        if self._get_manifest(name) is not None:
            raise AlreadyExists(f"{where} exists already")
        start = time.monotonic()
        data_dir = f"{DATA_PREFIX}{new_token()}"
        encryption: Encryption | None = None
        sealer: Sealer | None = None
        if self.key is not None:
            # Compressed, then encrypted (a new salt per attempt: the spool stays as
            # CRIU wrote it); the manifest describes the ciphertext, stored as it is.
            encryption, sealer = Encryption.new(self.key)
        kept = "none" if sealer is not None else compression
        stored_keys = {rel: f"{data_dir}/{rel}{_EXT[kept]}" for rel in sorted(files)}
        digests = {rel: _Digest() for rel in stored_keys}
        streams = {
            rel: _Encoded(
                os.path.join(spool, rel),
                rel,
                where,
                partial(self._stages, rel, files[rel], compression, sealer, digests[rel]),
            )
            for rel in stored_keys
        }
        client = _Client(self)
        key = self._manifest_key(name)
        manifest_sent = False
        try:
            self._send(
                client,
                {
                    self._dir_key(name) + k: (streams[rel], files[rel])
                    for rel, k in stored_keys.items()
                },
            )
            entries = {rel: d.entry for rel, d in digests.items()}
            stored = {
                rel: StoredFile(k, streams[rel].stored, kept) for rel, k in stored_keys.items()
            }
            stasis_json = None
            if METADATA_FILE in files and sealer is None:  # encrypted: stays in its file
                stasis_json = _read_stasis_json(spool)
            manifest = Manifest(name, datetime.now(UTC), entries, metadata)
            if encryption is not None and sealer is not None:
                manifest = manifest.sealed(encryption, sealer)
            data = _manifest_bytes(manifest, stored, stasis_json)
            # Whoever published this name while we uploaded wins (no atomic rename in S3).
            if self._get_manifest(name) is not None:
                raise AlreadyExists(f"{where} was written by someone else meanwhile")
            if self.signing is not None:
                # Before the manifest: a checkpoint is never complete without it.
                client.put_object(
                    Bucket=self.bucket,
                    Key=self._sig_key(name),
                    Body=self.signing.sign(data),
                    ContentType="application/json",
                )
            manifest_sent = True
            client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType="application/json"
            )
        except BaseException as e:
            keys = [self._dir_key(name) + k for k in stored_keys.values()]
            if manifest_sent:  # it may have landed: never leave it pointing at deleted data
                try:
                    self._call("delete", key, client.delete_object, Bucket=self.bucket, Key=key)
                except Exception as e2:
                    log.warning("%s; keeping the data its manifest may point at", e2)
                    keys = []  # the data may belong to a listed checkpoint
            if keys and (client.unreachable or _is_unreachable(e)):
                log.warning("%s: endpoint unreachable, leaving partial uploads to gc", where)
            elif keys:
                try:
                    self._delete(keys)
                except Exception as e2:
                    log.warning("%s (gc will collect it)", e2)
            raise
        elapsed = time.monotonic() - start
        total = manifest.size
        log.info(
            "uploaded %s: %d files, %.1f MiB (%.1f MiB stored, %s) in %.2fs, %.1f MiB/s",
            where,
            len(entries),
            total / MiB,
            sum(s.stored_size for s in stored.values()) / MiB,
            compression,
            elapsed,
            total / MiB / max(elapsed, 1e-9),
        )
        info_metadata = dict(metadata)
        if stasis_json is not None:
            info_metadata.update(stasis_json)
        return CheckpointInfo(name, f"{self.url}/{name}", manifest.created, total, info_metadata)

    def _stages(
        self, rel: str, size: int, compression: str, sealer: Sealer | None, digest: _Digest
    ) -> builtins.list[_Stage]:
        """hash -> zstd, or with a key zstd -> encrypt -> hash (the manifest hashes what is
        stored then)."""
        squeeze: builtins.list[_Stage] = []
        if compression == "zstd":
            squeeze.append(_Zstd(size, self.zstd_level, self.zstd_threads))
        if sealer is None:
            return [digest, *squeeze]
        from runtime.store import crypt

        flags = crypt.FLAGS_ZSTD if compression == "zstd" else crypt.FLAGS_NONE
        return [*squeeze, crypt.Encryptor(sealer, rel, flags), digest]

    def _transfers(self, client: _Client, readers: int) -> Any:
        """An s3transfer TransferManager with the store's part size and concurrency;
        ``readers`` streams are read (uploads) or started (downloads) at once."""
        from s3transfer.manager import TransferConfig, TransferManager

        config = TransferConfig(
            multipart_threshold=self.part_size,
            multipart_chunksize=self.part_size,
            max_request_concurrency=self.concurrency,
            max_submission_concurrency=readers,
            max_in_memory_upload_chunks=self.concurrency,
            max_in_memory_download_chunks=self.concurrency,
            num_download_attempts=self._part_attempts,
            io_chunksize=_IO_CHUNK,
            # writes queued for the downloads' decoders: ``concurrency`` parts
            max_io_queue_size=self.concurrency * self.part_size // _IO_CHUNK,
        )
        return TransferManager(client, config)

    def _send(self, client: _Client, uploads: dict[str, tuple[_Encoded, int]]) -> None:
        """Upload each stream to its key (key -> stream, file size), one file read at a
        time; the first failure cancels the rest (s3transfer aborts their multipart
        uploads)."""
        done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        huge = self.part_size * _MAX_PARTS
        with self._transfers(client, readers=1) as mgr:
            futures = []
            try:
                for key, (stream, size) in uploads.items():
                    bound = size + size // 64 + MiB if size >= huge else None
                    watch = _Watch(done, bound)
                    futures.append(mgr.upload(stream, self.bucket, key, subscribers=[watch]))
                for _ in futures:
                    future = done.get()
                    self._result(future, "put")
            except BaseException:
                for future in futures:
                    future.cancel()
                for stream, _ in uploads.values():
                    stream.stop()
                raise

    def _result(self, future: Any, op: str) -> None:
        """The outcome of an s3transfer transfer, its failure mapped (a stored object
        missing for a "get": _Bad)."""
        from botocore.exceptions import ClientError
        from s3transfer.exceptions import RetriesExceededError

        key = str(future.meta.call_args.key)
        try:
            future.result()
        except (StasisError, _Bad):
            raise
        except ClientError as e:
            if op == "get" and str(e.response.get("Error", {}).get("Code")) in _MISSING_KEY_CODES:
                raise _Bad(f"stored object s3://{self.bucket}/{key} is missing") from e
            raise self.error(e, op, key) from e
        except RetriesExceededError as e:
            raise self.error(e.last_exception, op, key) from e
        except Exception as e:
            raise self.error(e, op, key) from e

    def _receive(
        self, name: str, remote: _Remote, rels: builtins.list[str], cache: str
    ) -> dict[str, str]:
        """Download ``rels`` of ``name`` into ``cache`` (big objects with parallel ranged
        GETs); a file lands only verified. Returns a problem per file that differs."""
        files, stored = remote.manifest.files, remote.stored
        decoded = {
            rel: _Decoded(rel, os.path.join(cache, rel), files[rel], stored[rel], cache)
            for rel in rels
        }
        problems: dict[str, str] = {}
        done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        try:
            with self._transfers(_Client(self), readers=self.concurrency) as mgr:
                futures = {
                    mgr.download(
                        self.bucket,
                        self._dir_key(name) + stored[rel].key,
                        d,
                        subscribers=[_Watch(done)],
                    ): rel
                    for rel, d in decoded.items()
                }
                for _ in futures:
                    future = done.get()
                    rel = futures[future]
                    try:
                        self._result(future, "get")
                        decoded[rel].finish()
                    except _Bad as e:
                        problems[rel] = f"{rel}: {e.reason}"
        finally:
            for d in decoded.values():
                d.sink.discard()
        return problems


def _read_stasis_json(spool: str) -> dict[str, Any] | None:
    """The spool's ``stasis.json`` if it is a small JSON object (else None, as the local store)."""
    try:
        doc = json.loads(read_small(os.path.join(spool, METADATA_FILE), _MAX_STASIS_JSON))
    except (OSError, ValueError, NotRegular):
        return None
    return doc if isinstance(doc, dict) else None


def _show_endpoint(endpoint: str | None) -> str:
    """The endpoint for messages: user:password@ never shown."""
    if not endpoint:
        return "AWS S3"
    scheme, sep, rest = endpoint.partition("://")
    host, slash, path = rest.partition("/")
    host = host.rpartition("@")[2]
    return f"{scheme}{sep}{host}{slash}{path}".rstrip("/")


def _local_error(e: OSError, doing: str, path: str) -> StasisError:
    detail = e.strerror or str(e)
    if e.errno in DISK_FULL:
        return ResourceExhausted(f"local disk is full: {doing} in {path}: {detail}")
    return Unavailable(f"{doing} in {path}: {detail}")


# --------------------------------------------------------------------------- spools


def new_spool(spool_dir: str, name: str) -> tuple[str, int]:
    """Create ``<spool_dir>/<name>-<random>/`` (0700) and lock it; returns its path and
    the lock's descriptor (closing it releases the lock).

    The directory is made and locked under a hidden name, then renamed into
    place: ``collect_spools`` never finds it unlocked while its writer lives.
    """
    check_name(name)
    token = new_token()
    spool = os.path.join(spool_dir, f"{name}-{token}")
    new = os.path.join(spool_dir, f".{name}-{token}.new")
    doing = f"creating the spool for checkpoint {name}"
    try:
        os.makedirs(spool_dir, 0o700, exist_ok=True)
        os.mkdir(new, 0o700)
    except OSError as e:
        raise _local_error(e, doing, spool_dir) from e
    try:
        os.chmod(new, 0o700)
        lock = os.open(new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        rmtree(new)
        raise _local_error(e, doing, spool_dir) from e
    # Where flock is not supported the grace period alone protects the spool.
    with contextlib.suppress(OSError):
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        os.rename(new, spool)
    except OSError as e:
        os.close(lock)
        rmtree(new)
        raise _local_error(e, doing, spool_dir) from e
    return spool, lock


def spool_worker(spool: str) -> int | None:
    """The PID recorded in the spool's ``.stasis-upload.pid`` (the upload worker that
    has or had it), or None."""
    try:
        return int(read_small(os.path.join(spool, PID_FILE), 64))
    except (OSError, ValueError, NotRegular):
        return None


@contextlib.contextmanager
def spool_lock(spool: str) -> Iterator[None]:
    """Hold the spool's lock for the block: FailedPrecondition if another process
    (a writer, an upload) holds it, NotFound if there is no such directory."""
    try:
        fd = os.open(spool, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"spool {spool} does not exist") from None
    except OSError as e:
        raise InvalidArgument(f"spool {spool} cannot be read: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = spool_worker(spool)
            holder = f" (its upload worker is pid {pid})" if pid else ""
            raise FailedPrecondition(
                f"spool {spool} is in use by another process{holder}: "
                "a checkpoint is still writing or uploading it"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise InvalidArgument(f"spool {spool} cannot be locked: {e.strerror}") from e
        yield
    finally:
        os.close(fd)  # drops the lock


def collect_spools(spool_dir: str, url: str, grace_seconds: float) -> builtins.list[str]:
    """Remove spools untouched for ``grace_seconds`` that no live process holds: the
    ones never committed (their writer died during the dump) and the ones a failed
    upload kept for store ``url`` (or whose store is not recorded). Returns their paths.

    A kept spool of another store stays: ``gc`` of that store collects it.
    """
    if grace_seconds < 0:
        raise InvalidArgument(f"gc grace period must be >= 0, not {grace_seconds}")
    deadline = time.time() - grace_seconds
    try:
        with os.scandir(spool_dir) as it:
            entries = sorted(
                (e.path, e.name)
                for e in it
                if e.is_dir(follow_symlinks=False)
                and (_SPOOL_NAME.fullmatch(e.name) or _NEW_SPOOL.fullmatch(e.name))
            )
    except FileNotFoundError:
        return []
    except OSError as e:
        raise _local_error(e, "collecting spools", spool_dir) from e
    removed: builtins.list[str] = []
    for path, name in entries:
        if is_locked(path) or newest_mtime(path) > deadline:
            continue
        if not name.startswith(".") and _kept_for(path) not in (None, url):
            continue
        rmtree(path)
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def _kept_for(spool: str) -> str | None:
    """The store URL a committed spool records (None: not committed, or not recorded)."""
    try:
        doc = json.loads(read_small(os.path.join(spool, SPOOL_PENDING), _MAX_STASIS_JSON))
    except (OSError, ValueError, NotRegular):
        return None
    url = doc.get("url") if isinstance(doc, dict) else None
    return url if isinstance(url, str) else None


# --------------------------------------------------------------------------- transfers


class _Client:
    """The client s3transfer calls: PUTs, part uploads and completions get the
    store's own retries (botocore does not retry a body that broke off
    mid-stream), every failure is mapped, and once the endpoint proved
    unreachable no abort is attempted (``gc`` collects the rest)."""

    def __init__(self, store: S3Store) -> None:
        self._store = store
        self._s3 = store.client()
        self.unreachable = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s3, name)

    def _run(self, op: str, retry: bool, kwargs: dict[str, Any], name: str) -> Any:
        store, key = self._store, str(kwargs.get("Key"))
        try:
            if retry:
                return store._retry(op, key, getattr(self._s3, name), **kwargs)
            return store._call(op, key, getattr(self._s3, name), **kwargs)
        except StasisError as e:
            self.unreachable = self.unreachable or _is_unreachable(e)
            raise

    def put_object(self, **kwargs: Any) -> Any:
        return self._run("put", True, kwargs, "put_object")

    def upload_part(self, **kwargs: Any) -> Any:
        return self._run(f"upload part {kwargs['PartNumber']} of", True, kwargs, "upload_part")

    def create_multipart_upload(self, **kwargs: Any) -> Any:
        return self._run("create multipart upload", False, kwargs, "create_multipart_upload")

    def complete_multipart_upload(self, **kwargs: Any) -> Any:
        return self._run("complete multipart upload", True, kwargs, "complete_multipart_upload")

    def abort_multipart_upload(self, **kwargs: Any) -> Any:
        if self.unreachable:
            raise Unavailable(f"{kwargs.get('Key')}: endpoint unreachable, left for gc")
        return self._run("abort multipart upload", False, kwargs, "abort_multipart_upload")


class _Watch:
    """An s3transfer subscriber: queues the transfer's future once it is done, and
    gives an upload whose parts would outnumber S3's limit an upper bound of its
    size (s3transfer then picks bigger parts)."""

    def __init__(self, done: queue.SimpleQueue[Any], size_bound: int | None = None) -> None:
        self._done = done
        self._size_bound = size_bound

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        if self._size_bound is not None:
            future.meta.provide_transfer_size(self._size_bound)

    def on_done(self, future: Any, **kwargs: Any) -> None:
        self._done.put(future)


# --------------------------------------------------------------------------- writer


class S3Writer(LocalFiles):
    """A checkpoint spooled locally, uploaded by ``commit``.

    States: "open" -> "uploading" -> "committed" | "failed" (upload failed:
    the spool at ``spool`` is kept for ``S3Store.push``; ``abort`` leaves
    it), or "open" -> "aborted". ``compression`` may be changed until
    ``commit``. The writer holds the spool's lock (``lock``, if given) until
    it is done. Not safe for concurrent use from several threads.

    ``runtime.store.upload`` splits ``commit`` across processes: ``prepare`` here,
    the upload in a worker, ``finish`` when the worker is done.
    """

    def __init__(self, store: S3Store, name: str, spool: str, lock: int | None = None) -> None:
        self._store = store
        self._url = store.url
        self._name = name
        self.spool = spool
        self.compression = store.compression
        self._state = "open"
        self._lock = lock

    def _fail(self, e: OSError, doing: str) -> StasisError:
        err = _local_error(e, f"checkpoint {self._name}: {doing}", self.spool)
        if isinstance(err, ResourceExhausted):
            self.abort()
        return err

    def _target(self, rel: str) -> str:
        check_rel(rel)
        if rel == MANIFEST or rel in _SPOOL_OWN:
            raise InvalidArgument(f"{rel} is written by commit, not by the caller")
        return os.path.join(self.spool, rel)

    def commit(
        self,
        metadata: dict[str, Any] | None = None,
        known: Mapping[str, KnownDigest] | None = None,
    ) -> CheckpointInfo:
        """Upload every file (hashed, compressed), then ``manifest.json``; delete the spool.

        ``known`` is not used: the upload reads every file anyway and hashes
        while it streams.

        A bad file tree or metadata aborts (InvalidArgument). A failed upload
        leaves no manifest, and keeps the spool (state "failed"): the error
        says where; ``S3Store.push`` retries.
        """
        metadata, compression, files = self.prepare(metadata)
        try:
            info = self._store._upload_kept(self.spool, self._name, metadata, compression, files)
        except BaseException:
            self.finish(False)
            raise
        self.finish(True)
        return info

    def prepare(
        self, metadata: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], str, dict[str, int]]:
        """Check the tree and record the commit (``.stasis-pending.json``); state "uploading".

        Returns the metadata (a JSON copy), the compression and the files to
        upload (rel -> size). Anything wrong aborts: the spool goes.
        """
        self._check_open()
        where = f"checkpoint {self._name} in {self._store.url}"
        try:
            if not isinstance(metadata, dict | None):
                raise TypeError(f"a dict is needed, not {type(metadata).__name__}")
            metadata = json.loads(json.dumps(metadata or {}))
            compression = _check_compression(self.compression)
        except (TypeError, ValueError) as e:
            self.abort()
            raise InvalidArgument(f"{where}: bad metadata: {e}") from e
        except BaseException:
            self.abort()
            raise
        assert isinstance(metadata, dict)
        try:
            tree = scan_tree(self.spool)
            if tree.others:
                raise InvalidArgument(
                    f"{where}: {tree.others[0]} is not a regular file or directory"
                )
            files = {rel: size for rel, size in tree.files.items() if rel not in _SPOOL_OWN}
            if MANIFEST in files:
                raise InvalidArgument(f"{where}: {MANIFEST} was written by the caller")
            key = self._store.key
            pending = {
                "name": self._name,
                "url": self._store.url,
                "metadata": metadata,
                "compression": compression,
                # push refuses to upload it in clear, or under another key
                "key_id": key.id if key is not None else None,
            }
            with open_new(os.path.join(self.spool, SPOOL_PENDING)) as f:
                f.write(json.dumps(pending).encode())
        except OSError as e:
            self.abort()
            raise _local_error(e, f"committing checkpoint {self._name}", self.spool) from e
        except BaseException:
            self.abort()
            raise
        self._state = "uploading"
        return metadata, compression, files

    def finish(self, uploaded: bool) -> None:
        """The upload is over: "committed" (the spool goes) or "failed" (it stays)."""
        if self._state != "uploading":
            raise FailedPrecondition(f"{self._where()}: writer is {self._state}")
        self._state = "committed" if uploaded else "failed"
        if uploaded:
            rmtree(self.spool)
        self._release()

    def _where(self) -> str:
        return f"checkpoint {self._name} in {self._url}"

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)

    def abort(self) -> None:
        """Remove the spool; idempotent; a no-op after commit or a failed upload."""
        if self._state != "open":
            return
        self._state = "aborted"
        rmtree(self.spool)
        self._release()


# --------------------------------------------------------------------------- reader


class S3Reader(DirReader):
    """A complete checkpoint, read as a local one from a private directory (``path``)
    that it is downloaded into on demand.

    A file appears there only once ``file``, ``stored_file`` or ``verify``
    fetched and verified it; an encrypted one is then decrypted as a local
    reader does. ``close`` deletes both copies. Safe for concurrent use
    (downloads are serialized).
    """

    def __init__(
        self, store: S3Store, name: str, remote: _Remote, cache: str, sealer: Sealer | None = None
    ) -> None:
        super().__init__(
            name,
            cache,
            remote.manifest,
            store.url,
            partial(rmtree, cache),
            sealer=sealer,
            cache_dir=store.cache_dir,
        )
        self._store = store
        self._remote = remote
        self._metadata = remote.metadata
        self._lock = threading.RLock()
        self._have: set[str] = set()  # verified local copies; guarded by _lock

    @property
    def stored(self) -> dict[str, StoredFile]:
        """Where each file is stored (key relative to the checkpoint, size, compression)."""
        return dict(self._remote.stored)

    def file(self, rel: str) -> str:
        """Local path of file (or directory, e.g. ``checkpoint``) ``rel``, downloaded and
        verified (decrypted, for an encrypted checkpoint).

        NotFound if the manifest lists neither the file nor anything under
        the directory; DataLoss naming the file if what is stored differs.
        """
        with self._lock:
            return super().file(rel)

    def stored_file(self, rel: str) -> str:
        """Local path of ``rel`` as stored (encrypted, for an encrypted checkpoint), verified."""
        check_rel(rel)
        files = self._remote.manifest.files
        wanted = [rel] if rel in files else sorted(f for f in files if f.startswith(rel + "/"))
        if not wanted:
            raise NotFound(f"{self._where()}: no file {rel}")
        problems = self._fetch(wanted, recheck=False)
        if problems:
            raise DataLoss(problems_message(self._where(), problems))
        return super().stored_file(rel)

    def verify(self, only: Callable[[str], bool] | None = None) -> None:
        """Check the manifest is unchanged and every file matches it (downloading what is
        not here yet, re-hashing what is; all of them, whatever ``only`` selects);
        DataLoss naming the checkpoint and each file."""
        where = self._where()
        data = self._store._get_manifest(self._name)
        if data is None:
            raise DataLoss(f"{where}: {MANIFEST} is missing")
        if data != self._remote.raw:
            raise DataLoss(f"{where}: {MANIFEST} changed since the checkpoint was opened")
        problems = self._fetch(sorted(self._remote.manifest.files), recheck=True)
        if problems:
            raise DataLoss(problems_message(where, problems))

    def _fetch(self, rels: builtins.list[str], *, recheck: bool) -> builtins.list[str]:
        """Download the files not here yet; with ``recheck``, re-hash the ones here.
        Returns problems, one per file."""
        with self._lock:
            if self._fd is None:
                raise FailedPrecondition(f"{self._where()}: reader is closed")
            problems: dict[str, str] = {}
            missing = [r for r in rels if r not in self._have]
            if recheck:
                for rel in (r for r in rels if r in self._have):
                    try:
                        got: FileEntry | None = digest_file(os.path.join(self.path, rel))
                    except (OSError, NotRegular):
                        got = None
                    if got != self._remote.manifest.files[rel]:
                        self._have.discard(rel)
                        problems[rel] = f"{rel}: the local copy changed or vanished"
            if missing:
                bad = self._store._receive(self._name, self._remote, missing, self.path)
                problems.update(bad)
                self._have.update(r for r in missing if r not in bad)
            return [problems[r] for r in rels if r in problems]

    def close(self) -> None:
        """Delete the local copies, decrypted ones included (idempotent)."""
        with self._lock:
            self._have.clear()
            super().close()
