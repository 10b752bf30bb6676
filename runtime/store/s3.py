"""Checkpoints in an S3-compatible object store: ``s3://bucket/prefix``.

Checkpoint ``N`` lives under ``prefix/N/``::

    prefix/N/data-<random>/checkpoint/pages-1.img.zst   one object per file
    prefix/N/manifest.sig                               its signature (runtime.store.signing)
    prefix/N/manifest.json                              written LAST

``manifest.json`` is the local store's manifest (sha256 and size of every
UNCOMPRESSED file, commit metadata) with, per file, the stored ``key``
(relative to ``prefix/N/``), ``stored_size`` and ``compression``, and the
checkpoint's ``stasis.json`` copied in (``stasis_json``) so that ``list``
needs one GET per checkpoint. A checkpoint without a manifest does not exist:
it is not listed, cannot be opened, and ``gc`` deletes its objects once they
are older than the grace period. Each upload writes under a fresh
``data-<random>/``, so a retry, or a second writer of the same name, never
overwrites objects that a manifest points at.

Writers spool locally: CRIU and runc write into
``<spool_dir>/<name>-<random>/`` (``CheckpointWriter.path``). ``commit``
records the commit in the spool (``.stasis-pending.json``: name, store URL,
metadata, compression), then streams every file through sha256 and
compression (zstd level 3 on all cores by default; ``lz4`` if the package is
installed; ``none``) into parallel multipart uploads (parts of at least
8 MiB; at most ``concurrency + 1`` parts in memory), then writes the
manifest. If the upload fails, its multipart uploads are aborted and its
objects deleted (best effort; ``gc`` gets the rest), no manifest exists, and
the spool is KEPT: the error names it, and ``S3Store.push(spool)`` uploads it
again. The shim does not upload itself: ``runtime.store.upload`` runs the commit in
a child process, whose PID is in the spool's ``.stasis-upload.pid``.

Whoever writes or uploads a spool holds an flock on its directory (a killed
process drops it); ``push`` refuses a spool whose lock is held, and
``gc_spools`` removes only unlocked spools that were never committed, or
that a failed upload kept for this store, once older than the grace period.

Readers download on demand into ``<cache_dir>/<name>-<random>/``: ``file``
fetches big objects with parallel ranged GETs, fed in order straight into
decompression and sha256, and returns a local path only for a verified
file; ``close`` deletes the copies.

botocore errors are mapped here, once, to one-line StasisErrors naming the
operation, bucket, key and endpoint (never the secret): refused credentials
are PermissionDenied, a missing bucket NotFound, an unreachable endpoint or
throttling that outlasted the retries Unavailable. botocore retries each
request ("standard" mode); part uploads and ranged GETs get a few more
attempts of their own, since a body that breaks off mid-stream is not
retried by botocore.

With a key (``key_file``, ``runtime.store.crypt``) every file is compressed, then
encrypted, as it streams up (a fresh salt per attempt; the spool stays as
written and ``.stasis-pending.json`` records the key id, so ``push`` never
uploads it in clear or under another key); the manifest then describes the
ciphertext (objects stored with ``compression`` "none") and carries the
``encryption`` object and its MAC, and readers decrypt verified downloads
into a private ``<name>-plain-*`` directory next to the cache.

With a ``signing`` (stores built from the config have one), ``manifest.sig``,
the node's signature over the manifest's bytes as uploaded, is put before the
manifest, and ``open`` refuses a checkpoint whose signature does not verify.

This module imports boto3 and zstandard when it first needs them (a client,
a codec); ``runtime.store`` imports the module itself only for ``s3://``
URLs. Writing a spool, and ``gc_spools``, need neither.
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
import random
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

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
from runtime.store.local import (
    DISK_FULL,
    MANIFEST,
    MANIFEST_SIG,
    METADATA_FILE,
    NAME_PATTERN,
    NAME_RE,
    SIG_MAX,
    CheckpointInfo,
    Encryption,
    FileEntry,
    LocalFiles,
    Manifest,
    NotRegular,
    check_name,
    check_rel,
    digest_file,
    is_locked,
    new_token,
    newest_mtime,
    open_new,
    problems_message,
    read_small,
    rmtree,
    safe_rel,
    scan_tree,
)

if TYPE_CHECKING:
    from runtime.store.crypt import Key, Sealer
    from runtime.store.signing import Signing

log = logging.getLogger("stasis.s3")

T = TypeVar("T")

MiB = 1 << 20
COMPRESSIONS = ("zstd", "lz4", "none")
DEFAULT_SPOOL_DIR = "/var/lib/stasis/spool"
DEFAULT_CACHE_DIR = "/var/lib/stasis/cache"
PART_SIZE = 8 * MiB  # multipart part (and ranged GET) size; S3 wants >= 5 MiB
PENDING = ".stasis-pending.json"  # in a spool: name, url, metadata, compression for push
PID_FILE = ".stasis-upload.pid"  # in a spool: the PID of the upload worker (runtime.store.upload)
DATA_PREFIX = "data-"

_SPOOL_OWN = frozenset({PENDING, PID_FILE})  # the spool's bookkeeping, never uploaded
_SPOOL_NAME = re.compile(rf"(?:{NAME_PATTERN})-[0-9a-f]{{12}}")
_NEW_SPOOL = re.compile(rf"\.(?:{NAME_PATTERN})-[0-9a-f]{{12}}\.new")

_EXT = {"zstd": ".zst", "lz4": ".lz4", "none": ""}
_READ = 4 * MiB  # input read per compressor call
_MAX_PARTS = 9_000  # S3 allows 10,000; compressed output may exceed the input a little
_MAX_MANIFEST = 64 * MiB
_MAX_STASIS_JSON = 1 * MiB
_DELETE_BATCH = 1000  # DeleteObjects limit

_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "Forbidden",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidSecurity",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
        "UnrecognizedClientException",
    }
)
_THROTTLE_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "RequestThrottled",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
    }
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


# --------------------------------------------------------------------------- codecs


class _Compressor:
    """Streaming compression of one file: ``compress`` chunks, then ``flush`` once."""

    def __init__(self, compression: str, size: int, level: int, threads: int) -> None:
        self._c: Any = None
        self._header = b""
        if compression == "zstd":
            import zstandard

            # Worker threads pay off only for big inputs (each context starts its own).
            cctx = zstandard.ZstdCompressor(level=level, threads=threads if size > _READ else 0)
            self._c = cctx.compressobj(size=size)
        elif compression == "lz4":
            lz4_frame = _lz4()
            self._c = lz4_frame.LZ4FrameCompressor()
            self._header = self._c.begin(source_size=size)

    def compress(self, data: bytes) -> bytes:
        """Compressed output for ``data`` (possibly empty: the codec buffers)."""
        if self._c is None:
            return data
        out = bytes(self._c.compress(data))
        if self._header:
            out, self._header = self._header + out, b""
        return out

    def flush(self) -> bytes:
        """The rest of the compressed stream."""
        if self._c is None:
            return b""
        out = bytes(self._header) + bytes(self._c.flush())
        self._header = b""
        return out


class _Bad(Exception):
    """A stored file does not match its manifest entry (``reason`` says how)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Sink:
    """Decompressed output: hashed, counted (never past the manifest's size), written."""

    def __init__(self, f: IO[bytes], limit: int) -> None:
        self._f = f
        self._limit = limit
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        n = len(data)
        self.size += n
        if self.size > self._limit:
            raise _Bad(f"decompresses to more than the {self._limit} bytes the manifest says")
        self.sha256.update(data)
        self._f.write(data)
        return n


class _Decoder:
    """Streaming decompression into a _Sink."""

    def __init__(self, compression: str, sink: _Sink) -> None:
        self._sink = sink
        self._kind = compression
        self._d: Any = None
        if compression == "zstd":
            import zstandard

            dctx = zstandard.ZstdDecompressor()
            self._d = dctx.stream_writer(cast(IO[bytes], sink), write_size=MiB, closefd=False)
        elif compression == "lz4":
            self._d = _lz4().LZ4FrameDecompressor()

    def feed(self, data: bytes) -> None:
        try:
            if self._kind == "zstd":
                self._d.write(data)
            elif self._kind == "lz4":
                while True:
                    self._sink.write(self._d.decompress(data, max_length=MiB))
                    data = b""
                    if self._d.needs_input or self._d.eof:
                        break
            else:
                self._sink.write(data)
        except _Bad:
            raise
        except Exception as e:  # zstd.ZstdError, RuntimeError from lz4
            raise _Bad(f"cannot be decompressed ({self._kind}): {e}") from e

    def finish(self) -> None:
        if self._kind == "zstd":
            self._d.close()
        elif self._kind == "lz4" and not self._d.eof:
            raise _Bad("the lz4 stream is truncated")


def _lz4() -> Any:
    try:
        import lz4.frame
    except ImportError:
        raise InvalidArgument(
            "lz4 compression needs the lz4 package (pip install lz4); zstd needs nothing more"
        ) from None
    return lz4.frame


def _check_compression(compression: str) -> str:
    if compression not in COMPRESSIONS:
        raise InvalidArgument(
            f"unknown compression {compression!r}: one of {', '.join(COMPRESSIONS)}"
        )
    if compression == "lz4":
        _lz4()
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

    ``compression`` ("zstd", "lz4" or "none") is the default of new writers;
    ``concurrency`` bounds parallel requests (and parts held in memory) per
    upload or download; ``spool_dir`` and ``cache_dir`` hold local copies
    for writers and readers. Safe for concurrent use from several threads.
    """

    def __init__(
        self,
        url: str,
        s3: S3Config | None = None,
        *,
        spool_dir: str = DEFAULT_SPOOL_DIR,
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

    def _checksum_args(self) -> dict[str, str]:
        """Explicit CRC32 for multipart uploads when the SDK adds checksums anyway."""
        if self._cfg.checksum == "when_supported":
            return {"ChecksumAlgorithm": "CRC32"}
        return {}

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
        (it does not retry a body that breaks off mid-stream)."""
        attempt = 1
        while True:
            try:
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

    def _list_keys(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``prefix`` (the listing's dicts: Key, Size, LastModified)."""
        s3 = self.client()
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", prefix, s3.list_objects_v2, **kwargs)
            yield from resp.get("Contents", [])
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                return

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
        try:
            os.makedirs(self.cache_dir, 0o700, exist_ok=True)
            import tempfile

            cache = tempfile.mkdtemp(prefix=f"{name}-", dir=self.cache_dir)
        except OSError as e:
            raise _local_error(e, f"preparing a local copy of {name}", self.cache_dir) from e
        try:
            with open_new(os.path.join(cache, MANIFEST)) as f:
                f.write(remote.raw)
        except OSError as e:
            rmtree(cache)
            raise _local_error(e, f"preparing a local copy of {name}", cache) from e
        return S3Reader(self, name, remote, cache, sealer)

    def list(self) -> builtins.list[CheckpointInfo]:
        """Checkpoints with a valid manifest, oldest first (one GET per checkpoint)."""
        s3 = self.client()
        names: builtins.list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._base, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list", self._base or None, s3.list_objects_v2, **kwargs)
            for p in resp.get("CommonPrefixes", []):
                name = str(p.get("Prefix", ""))[len(self._base) :].rstrip("/")
                if NAME_RE.fullmatch(name):
                    names.append(name)
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token:
                break

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
        s3 = self.client()
        markers: dict[str, str] = {}
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, **markers}
            resp = self._call(
                "list multipart uploads",
                prefix or None,
                s3.list_multipart_uploads,
                **kwargs,
            )
            for u in resp.get("Uploads", []):
                yield str(u["Key"]), str(u["UploadId"]), u["Initiated"].timestamp()
            if not resp.get("IsTruncated"):
                return
            markers = {
                "KeyMarker": resp.get("NextKeyMarker", ""),
                "UploadIdMarker": resp.get("NextUploadIdMarker", ""),
            }

    def _newest_part(self, key: str, upload_id: str) -> float:
        """When the newest part of an unfinished upload arrived (0 if none or gone)."""
        s3 = self.client()
        newest = 0.0
        marker = 0
        while True:
            try:
                resp = self._call(
                    "list parts",
                    key,
                    s3.list_parts,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumberMarker=marker,
                )
            except NotFound:
                return newest
            for p in resp.get("Parts", []):
                if p.get("LastModified") is not None:
                    newest = max(newest, p["LastModified"].timestamp())
            if not resp.get("IsTruncated"):
                return newest
            marker = int(resp.get("NextPartNumberMarker", 0))

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
            if not os.path.lexists(os.path.join(spool, PENDING)):
                raise FailedPrecondition(
                    f"spool {spool} was never committed (no {PENDING}): it is not a checkpoint"
                )
            pending = json.loads(read_small(os.path.join(spool, PENDING), _MAX_STASIS_JSON))
            tree = scan_tree(spool)
        except (OSError, ValueError, NotRegular) as e:
            raise InvalidArgument(f"spool {spool} cannot be read: {e}") from e
        if not isinstance(pending, dict):
            raise InvalidArgument(f"spool {spool}: {PENDING} is not an object")
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
        stored: dict[str, StoredFile] = {}
        entries: dict[str, FileEntry] = {}
        up = _Uploader(self, where)
        failed: BaseException | None = None
        manifest_sent = False
        sealer: Sealer | None = None
        encryption: Encryption | None = None
        if self.key is not None:
            # Compressed, then encrypted, on the way up (a new salt per attempt:
            # the spool stays as CRIU wrote it); the manifest describes the
            # stored ciphertext, so its objects have no compression of their own.
            from runtime.store import crypt

            salt = crypt.new_salt()
            sealer = self.key.derive(salt)
            encryption = Encryption(crypt.ALG, crypt.CHUNK, self.key.id, salt.hex())
            if compression == "lz4":
                compression = "zstd"  # the only compression an encrypted stream records
        kept = "none" if sealer is not None else compression
        try:
            for rel in sorted(files):
                rel_key = f"{data_dir}/{rel}{_EXT[kept]}"
                path = os.path.join(spool, rel)
                entries[rel], size = up.file(
                    path, rel, self._dir_key(name) + rel_key, compression, files[rel], sealer
                )
                stored[rel] = StoredFile(rel_key, size, kept)
            up.finish()
            stasis_json = None
            if METADATA_FILE in files and sealer is None:  # encrypted: stays in its file
                stasis_json = _read_stasis_json(spool)
            manifest = Manifest(name, datetime.now(UTC), entries, metadata)
            if sealer is not None and encryption is not None:
                manifest = replace(manifest, encryption=encryption)
                mac = sealer.mac(manifest.to_json())  # MAC "" while computed
                manifest = replace(manifest, encryption=replace(encryption, mac=mac))
            data = _manifest_bytes(manifest, stored, stasis_json)
            # Whoever published this name while we uploaded wins (no atomic rename in S3).
            if self._get_manifest(name) is not None:
                raise AlreadyExists(f"{where} was written by someone else meanwhile")
            s3 = self.client()
            if self.signing is not None:
                # Before the manifest: a checkpoint is never complete without it.
                sig_key = self._sig_key(name)
                self._retry(
                    "put",
                    sig_key,
                    s3.put_object,
                    Bucket=self.bucket,
                    Key=sig_key,
                    Body=self.signing.sign(data),
                    ContentType="application/json",
                )
            key = self._manifest_key(name)
            manifest_sent = True
            self._retry(
                "put",
                key,
                s3.put_object,
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType="application/json",
            )
        except BaseException as e:
            failed = e
            if manifest_sent:  # it may have landed: never leave it pointing at deleted data
                try:
                    self._call("delete", key, s3.delete_object, Bucket=self.bucket, Key=key)
                except Exception as e2:
                    log.warning("%s; keeping the data its manifest may point at", e2)
                    failed = None  # no cleanup: the data may belong to a listed checkpoint
            raise
        finally:
            up.close(failed)
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
        doc = json.loads(read_small(os.path.join(spool, PENDING), _MAX_STASIS_JSON))
    except (OSError, ValueError, NotRegular):
        return None
    url = doc.get("url") if isinstance(doc, dict) else None
    return url if isinstance(url, str) else None


# --------------------------------------------------------------------------- uploader


@dataclass
class _Multipart:
    key: str
    upload_id: str
    parts: list[Future[dict[str, Any]]] = field(default_factory=list)
    done: bool = False


class _Uploader:
    """The uploads of one commit: a thread pool of PUTs fed by the committing thread.

    At most ``concurrency + 1`` parts are in memory or in flight
    (``_slots``); the first failure of any job stops the feeding. ``close``
    waits for the pool and, after a failure, aborts unfinished multipart
    uploads and deletes the objects written (best effort).
    """

    def __init__(self, store: S3Store, where: str) -> None:
        self._store = store
        self._s3 = store.client()
        self._where = where
        self._pool = ThreadPoolExecutor(
            max_workers=store.concurrency, thread_name_prefix="stasis-s3-up"
        )
        self._slots = threading.Semaphore(store.concurrency + 1)
        self._lock = threading.Lock()
        self._failure: BaseException | None = None  # guarded by _lock
        self._jobs: list[Future[Any]] = []  # committing thread only
        self._multipart: list[_Multipart] = []  # committing thread only
        self._objects: list[str] = []  # keys that may exist now; committing thread only

    def _check(self) -> None:
        with self._lock:
            failure = self._failure
        if failure is not None:
            raise failure

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        self._check()
        self._slots.acquire()  # blocks while too many parts are in memory
        try:
            self._check()
            fut = self._pool.submit(self._run, fn, *args)
        except BaseException:
            self._slots.release()
            raise
        self._jobs.append(fut)
        return fut

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except BaseException as e:
            with self._lock:
                if self._failure is None:
                    self._failure = e
            raise
        finally:
            self._slots.release()

    def file(
        self,
        path: str,
        rel: str,
        key: str,
        compression: str,
        size: int,
        sealer: Sealer | None = None,
    ) -> tuple[FileEntry, int]:
        """Hash, compress and upload one file; returns its entry and stored size.

        With ``sealer`` the compressed stream is encrypted (``runtime.store.crypt``,
        zstd recorded in its header) and the entry is that of the ciphertext.
        The upload may still be running: ``finish`` waits for it.
        """
        store = self._store
        part_size = max(store.part_size, -(-(size // _MAX_PARTS + 1) // MiB) * MiB)
        comp = _Compressor(compression, size, store.zstd_level, store.zstd_threads)
        enc = None
        if sealer is not None:
            from runtime.store import crypt

            flags = crypt.FLAGS_ZSTD if compression == "zstd" else crypt.FLAGS_NONE
            enc = crypt.Encryptor(sealer, rel, flags)
        sha = hashlib.sha256()
        n = stored = 0
        buf = bytearray()  # compressed output not yet submitted: < part_size after _drain
        mpu: _Multipart | None = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise _local_error(e, f"reading {rel}", path) from e
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidArgument(f"{self._where}: {rel} is not a regular file")
            while True:
                try:
                    chunk = f.read(_READ)
                except OSError as e:
                    raise _local_error(e, f"reading {rel}", path) from e
                if not chunk:
                    break
                out = comp.compress(chunk)
                if enc is not None:
                    chunk = out = enc.update(out)
                sha.update(chunk)
                n += len(chunk)
                stored += len(out)
                buf += out
                mpu = self._drain(buf, part_size, mpu, key)
        out = comp.flush()  # multi-threaded zstd may hold back much of its output until here
        if enc is not None:
            out = enc.update(out) + enc.finish()
            sha.update(out)
            n += len(out)
        stored += len(out)
        buf += out
        mpu = self._drain(buf, part_size, mpu, key)
        if mpu is None:
            self._objects.append(key)
            self._submit(self._put, key, bytes(buf))
        elif buf:
            self._part(mpu, bytes(buf))
        return FileEntry(sha.hexdigest(), n), stored

    def _drain(
        self, buf: bytearray, part_size: int, mpu: _Multipart | None, key: str
    ) -> _Multipart | None:
        """Submit whole parts from the front of ``buf`` (starting the multipart upload)."""
        while len(buf) >= part_size:
            mpu = mpu or self._start_multipart(key)
            with memoryview(buf) as view:
                part = bytes(view[:part_size])
            del buf[:part_size]
            self._part(mpu, part)
        return mpu

    def _start_multipart(self, key: str) -> _Multipart:
        store, s3 = self._store, self._s3
        self._check()
        resp = store._call(
            "create multipart upload",
            key,
            s3.create_multipart_upload,
            Bucket=store.bucket,
            Key=key,
            **store._checksum_args(),
        )
        mpu = _Multipart(key, str(resp["UploadId"]))
        self._multipart.append(mpu)
        self._objects.append(key)
        return mpu

    def _part(self, mpu: _Multipart, data: bytes) -> None:
        mpu.parts.append(
            self._submit(self._upload_part, mpu.key, mpu.upload_id, len(mpu.parts) + 1, data)
        )

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        store, s3 = self._store, self._s3
        checksum = store._checksum_args()
        resp = store._retry(
            f"upload part {number} of",
            key,
            s3.upload_part,
            Bucket=store.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            **checksum,
        )
        part: dict[str, Any] = {"PartNumber": number, "ETag": resp["ETag"]}
        if resp.get("ChecksumCRC32"):
            part["ChecksumCRC32"] = resp["ChecksumCRC32"]
        return part

    def _put(self, key: str, data: bytes) -> None:
        store, s3 = self._store, self._s3
        store._retry("put", key, s3.put_object, Bucket=store.bucket, Key=key, Body=data)

    def finish(self) -> None:
        """Wait for every upload, then complete the multipart ones."""
        store, s3 = self._store, self._s3
        wait_futures(self._jobs)
        self._check()
        for mpu in self._multipart:
            parts = [p.result() for p in mpu.parts]
            store._retry(
                "complete multipart upload",
                mpu.key,
                s3.complete_multipart_upload,
                Bucket=store.bucket,
                Key=mpu.key,
                UploadId=mpu.upload_id,
                MultipartUpload={"Parts": parts},
            )
            mpu.done = True

    def close(self, failure: BaseException | None) -> None:
        """Stop the pool; after ``failure``, clean up what was written (never raises)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if failure is None:
            return
        store, s3 = self._store, self._s3
        if _is_unreachable(failure):
            log.warning("%s: endpoint unreachable, leaving partial uploads to gc", self._where)
            return
        for mpu in self._multipart:
            if mpu.done:
                continue
            try:
                store._call(
                    "abort multipart upload",
                    mpu.key,
                    s3.abort_multipart_upload,
                    Bucket=store.bucket,
                    Key=mpu.key,
                    UploadId=mpu.upload_id,
                )
            except Exception as e:
                log.warning("%s (gc will collect it)", e)
        try:
            store._delete(self._objects)
        except Exception as e:
            log.warning("%s (gc will collect it)", e)


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
            with open_new(os.path.join(self.spool, PENDING)) as f:
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

    def __enter__(self) -> S3Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


# --------------------------------------------------------------------------- reader


class S3Reader:
    """A complete checkpoint, downloaded on demand into a private local directory.

    ``path`` is that directory: a file appears there only once ``file`` (or
    ``verify``) fetched and verified it. ``close`` deletes it. Safe for
    concurrent use (downloads are serialized).
    """

    def __init__(
        self, store: S3Store, name: str, remote: _Remote, cache: str, sealer: Sealer | None = None
    ) -> None:
        self._store = store
        self._name = name
        self._remote = remote
        self._cache = cache
        self._lock = threading.Lock()
        self._have: set[str] = set()  # verified local copies; guarded by _lock
        self._closed = False  # guarded by _lock
        # An encrypted checkpoint: ``file`` decrypts the verified downloads into
        # ``_plain`` (a private 0700 directory next to the cache, removed by close).
        self._sealer = sealer
        self._plain: str | None = None  # guarded by _lock
        self._decrypted: set[str] = set()  # guarded by _lock

    @property
    def name(self) -> str:
        """The checkpoint's name."""
        return self._name

    @property
    def path(self) -> str:
        """The local directory the files are downloaded into."""
        return self._cache

    @property
    def manifest(self) -> Manifest:
        """The manifest read when the checkpoint was opened."""
        return self._remote.manifest

    @property
    def stored(self) -> dict[str, StoredFile]:
        """Where each file is stored (key relative to the checkpoint, size, compression)."""
        return dict(self._remote.stored)

    @property
    def metadata(self) -> dict[str, Any]:
        """Commit metadata updated with ``stasis.json``."""
        return self._remote.metadata

    @property
    def info(self) -> CheckpointInfo:
        """Name, creation time, size and metadata."""
        m = self._remote.manifest
        return CheckpointInfo(
            self._name, f"{self._store.url}/{self._name}", m.created, m.size, self.metadata
        )

    def _where(self) -> str:
        return f"checkpoint {self._name} in {self._store.url}"

    def file(self, rel: str) -> str:
        """Local path of file (or directory, e.g. ``checkpoint``) ``rel``, downloaded and verified.

        NotFound if the manifest lists neither the file nor anything under
        the directory; DataLoss naming the file if what is stored differs.
        """
        check_rel(rel)
        files = self._remote.manifest.files
        wanted = [rel] if rel in files else sorted(f for f in files if f.startswith(rel + "/"))
        if not wanted:
            raise NotFound(f"{self._where()}: no file {rel}")
        problems = self._fetch(wanted, recheck=False)
        if problems:
            raise DataLoss(problems_message(self._where(), problems))
        if self._sealer is not None:
            return self._decrypt(rel, wanted)
        return os.path.join(self._cache, rel)

    def stored_file(self, rel: str) -> str:
        """Local path of ``rel`` as stored (encrypted, for an encrypted checkpoint), verified."""
        check_rel(rel)
        if rel not in self._remote.manifest.files:
            raise NotFound(f"{self._where()}: no file {rel}")
        problems = self._fetch([rel], recheck=False)
        if problems:
            raise DataLoss(problems_message(self._where(), problems))
        return os.path.join(self._cache, rel)

    def _decrypt(self, rel: str, wanted: builtins.list[str]) -> str:
        import tempfile

        assert self._sealer is not None
        with self._lock:
            if self._closed:
                raise FailedPrecondition(f"{self._where()}: reader is closed")
            try:
                if self._plain is None:
                    self._plain = tempfile.mkdtemp(
                        prefix=f"{self._name}-plain-", dir=self._store.cache_dir
                    )
                for f in wanted:
                    if f in self._decrypted:
                        continue
                    target = os.path.join(self._plain, f)
                    os.makedirs(os.path.dirname(target), 0o700, exist_ok=True)
                    with open(os.path.join(self._cache, f), "rb") as src, open_new(target) as dst:
                        self._sealer.decrypt(src, dst, f, self._where())
                    self._decrypted.add(f)
            except OSError as e:
                raise _local_error(e, f"decrypting {rel}", self._store.cache_dir) from e
            return os.path.join(self._plain, rel)

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
        """Download the files not here yet (small ones in parallel, big ones with ranged
        GETs); with ``recheck``, re-hash the ones here. Returns problems, one per file."""
        with self._lock:
            if self._closed:
                raise FailedPrecondition(f"{self._where()}: reader is closed")
            problems: dict[str, str] = {}
            files = self._remote.manifest.files
            missing = [r for r in rels if r not in self._have]
            if recheck:
                for rel in (r for r in rels if r in self._have):
                    try:
                        got: FileEntry | None = digest_file(os.path.join(self._cache, rel))
                    except (OSError, NotRegular):
                        got = None
                    if got != files[rel]:
                        self._have.discard(rel)
                        problems[rel] = f"{rel}: the local copy changed or vanished"
            big = [r for r in missing if self._remote.stored[r].stored_size > self._store.part_size]
            small = [r for r in missing if r not in big]
            with ThreadPoolExecutor(
                max_workers=self._store.concurrency, thread_name_prefix="stasis-s3-down"
            ) as pool:
                futures = {rel: pool.submit(self._download, rel, None) for rel in small}
                try:
                    for rel in big:
                        self._note(rel, partial(self._download, rel, pool), problems)
                    for rel, fut in futures.items():
                        self._note(rel, fut.result, problems)
                except BaseException:
                    for fut in futures.values():
                        fut.cancel()
                    raise
            return [problems[r] for r in rels if r in problems]

    def _note(self, rel: str, fetch: Callable[[], None], problems: dict[str, str]) -> None:
        try:
            fetch()
        except _Bad as e:
            problems[rel] = f"{rel}: {e.reason}"
        else:
            self._have.add(rel)

    def _download(self, rel: str, pool: ThreadPoolExecutor | None) -> None:
        """Fetch ``rel`` into the cache through decompression and sha256; _Bad on mismatch."""
        import tempfile

        entry = self._remote.manifest.files[rel]
        stored = self._remote.stored[rel]
        key = self._store._dir_key(self._name) + stored.key
        target = os.path.join(self._cache, rel)
        directory = os.path.dirname(target)
        try:
            os.makedirs(directory, 0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(rel)}.", dir=directory)
        except OSError as e:
            raise _local_error(e, f"downloading {rel}", self._cache) from e
        try:
            with open(fd, "wb") as f:
                sink = _Sink(f, entry.size)
                decoder = _Decoder(stored.compression, sink)
                for chunk in self._chunks(key, stored.stored_size, pool):
                    decoder.feed(chunk)
                decoder.finish()
            if sink.size != entry.size:
                raise _Bad(f"size {sink.size}, manifest says {entry.size}")
            if sink.sha256.hexdigest() != entry.sha256:
                raise _Bad("sha256 mismatch")
            os.replace(tmp, target)
        except OSError as e:
            rmtree(tmp)
            raise _local_error(e, f"downloading {rel}", self._cache) from e
        except BaseException:
            rmtree(tmp)
            raise

    def _chunks(self, key: str, size: int, pool: ThreadPoolExecutor | None) -> Iterator[bytes]:
        """The stored object, in order: one GET, or ranged GETs ``concurrency`` ahead."""
        store = self._store
        if pool is None or size <= store.part_size:
            yield self._get(key, None, size)
            return
        ranges = [(a, min(a + store.part_size, size) - 1) for a in range(0, size, store.part_size)]
        window: deque[Future[bytes]] = deque()
        it = iter(ranges)
        try:
            for r in it:
                window.append(pool.submit(self._get, key, r, size))
                if len(window) >= store.concurrency:
                    break
            while window:
                data = window.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    window.append(pool.submit(self._get, key, nxt, size))
                yield data
        finally:
            for fut in window:
                fut.cancel()

    def _get(self, key: str, byte_range: tuple[int, int] | None, size: int) -> bytes:
        """One GET (of a range); _Bad if the object is missing or not the stored size."""
        from botocore.exceptions import ClientError

        s3 = self._store.client()
        store = self._store

        def get() -> bytes:
            kwargs: dict[str, Any] = {"Bucket": store.bucket, "Key": key}
            if byte_range is not None:
                kwargs["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
            try:
                resp = s3.get_object(**kwargs)
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code"))
                if code in ("NoSuchKey", "404"):
                    raise _Bad(f"stored object s3://{store.bucket}/{key} is missing") from e
                if code == "InvalidRange":
                    raise _Bad(f"stored object is smaller than the manifest's {size} bytes") from e
                raise
            with resp["Body"] as body:
                data = cast(bytes, body.read())
            total = int(resp.get("ContentLength", -1))
            if byte_range is not None:
                total = int(str(resp.get("ContentRange", "")).rpartition("/")[2] or -1)
            if total != size:
                raise _Bad(f"stored object is {total} bytes, the manifest says {size}")
            want = size if byte_range is None else byte_range[1] - byte_range[0] + 1
            if len(data) != want:
                raise ConnectionError(f"short read: {len(data)} of {want} bytes")
            return data

        return store._retry("get", key, get)

    def close(self) -> None:
        """Delete the local copies, decrypted ones included (idempotent)."""
        with self._lock:
            self._closed = True
            self._have.clear()
            self._decrypted.clear()
            plain, self._plain = self._plain, None
        rmtree(self._cache)
        if plain is not None:
            rmtree(plain)

    def __enter__(self) -> S3Reader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
