"""Checkpoints in an S3-compatible object store (``s3://bucket/prefix``): a transport
for the local checkpoint format (``runtime.store.files``), not a second one.

Checkpoint ``N`` is ``prefix/N/``: one object per file under a fresh
``data-<random>/`` (``.zst`` when compressed), ``manifest.sig`` with signing, and
``manifest.json`` (``runtime.store.s3layout``), written LAST.

* A checkpoint without a manifest does not exist: it is not listed, cannot be
  opened, and ``gc`` deletes its objects after the grace period. A failed upload
  aborts its multipart uploads and deletes its objects; a retry or a second
  writer never overwrites objects a manifest names.
* Writers write a local spool (``runtime.store.spool``); ``commit`` records
  ``.stasis-pending.json`` first and keeps the spool if the upload fails, for
  ``push``. ``runtime.store.upload`` runs it in a child of the shim.
* Readers download on demand into ``<cache_dir>/<name>-<random>/`` and hand out
  a path only for a file verified against the manifest; the local reader then
  decrypts (``runtime.store.crypt``) and serves it.
* Transfers go through s3transfer, fed by file objects (``runtime.store.streams``):
  the manifest hashes the plaintext, or the ciphertext when encrypted. Part
  uploads, PUTs and GETs get ``part_attempts`` on top of botocore's retries;
  botocore's errors become one-line StasisErrors (``runtime.store.s3client``).

boto3, s3transfer and zstandard are imported on first use: writing a spool and
``gc_spools`` need none of them.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar, cast

from runtime.capture.digest import KnownDigest
from runtime.config import S3Config
from runtime.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StasisError,
    Unavailable,
)
from runtime.names import METADATA_FILE, SPOOL_DIR, SPOOL_PENDING
from runtime.store.files import (
    DEFAULT_CACHE_DIR,
    DirReader,
    LocalFiles,
    NotRegular,
    digest_file,
    local_error,
    new_token,
    open_new,
    problems_message,
    read_small,
    rmtree,
    scan_tree,
)
from runtime.store.model import (
    MANIFEST,
    MANIFEST_SIG,
    NAME_RE,
    SIG_MAX,
    CheckpointInfo,
    Encryption,
    FileEntry,
    Manifest,
    check_name,
    check_rel,
)
from runtime.store.s3client import (
    MISSING_KEY_CODES,
    Client,
    Watch,
    clean,
    is_transient,
    is_unreachable,
    stasis_error,
)
from runtime.store.s3layout import (
    Remote,
    StoredFile,
    check_compression,
    manifest_bytes,
    parse_manifest,
    parse_url,
)
from runtime.store.spool import (
    MAX_STASIS_JSON,
    SPOOL_OWN,
    collect_spools,
    new_spool,
    read_stasis_json,
    spool_lock,
)
from runtime.store.streams import Bad, Decoded, Digest, Encoded, MiB, Stage, Zstd

if TYPE_CHECKING:
    from runtime.store.crypt import Key, Sealer
    from runtime.store.signing import Signing


log = logging.getLogger("stasis.s3")

T = TypeVar("T")

PART_SIZE = 8 * MiB  # multipart part (and ranged GET) size; S3 wants >= 5 MiB
DATA_PREFIX = "data-"

_EXT = {"zstd": ".zst", "none": ""}
_IO_CHUNK = 256 << 10  # download writes into the decoder
_MAX_PARTS = 9_000  # S3 allows 10,000; compressed output may exceed the input a little
_MAX_MANIFEST = 64 * MiB
_DELETE_BATCH = 1000  # DeleteObjects limit


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
        self.compression = check_compression(compression)
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
        return clean(what, self._cfg.secret_access_key)

    def error(self, e: BaseException, op: str, key: str | None = None) -> StasisError:
        """``e`` (from boto3/botocore) as one-line StasisError naming op, bucket, key, endpoint."""
        if isinstance(e, StasisError):
            return e
        target = f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket}"
        head = f"S3 {op} {target} at {self.endpoint}"
        return stasis_error(e, head, self.bucket, self._cfg.secret_access_key)

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
            except (StasisError, Bad):
                raise
            except Exception as e:
                if attempt >= self._part_attempts or not is_transient(e):
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

    def dir_key(self, name: str) -> str:
        """The key prefix of checkpoint ``name``'s objects."""
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

    def _load(self, name: str) -> Remote:
        """The parsed manifest of ``name``: NotFound, or DataLoss if malformed."""
        data = self._get_manifest(check_name(name))
        if data is None:
            raise NotFound(f"{self._where(name)} does not exist")
        return parse_manifest(data, self._where(name))

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
            raise local_error(e, f"preparing a local copy of {name}", self.cache_dir) from e
        try:
            with open_new(os.path.join(cache, MANIFEST)) as f:
                f.write(remote.raw)
            return S3Reader(self, name, remote, cache, sealer)
        except OSError as e:
            rmtree(cache)
            raise local_error(e, f"preparing a local copy of {name}", cache) from e
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
        keys = [str(o["Key"]) for o in self._list_keys(self.dir_key(name))]
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
                        self.dir_key(name) + s.key for s in remote.stored.values()
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
            pending = json.loads(read_small(os.path.join(spool, SPOOL_PENDING), MAX_STASIS_JSON))
            tree = scan_tree(spool)
        except (OSError, ValueError, NotRegular) as e:
            raise InvalidArgument(f"spool {spool} cannot be read: {e}") from e
        if not isinstance(pending, dict):
            raise InvalidArgument(f"spool {spool}: {SPOOL_PENDING} is not an object")
        name = name or pending.get("name") or os.path.basename(spool).rpartition("-")[0]
        check_name(str(name))
        metadata = pending.get("metadata", {})
        compression = check_compression(str(pending.get("compression", self.compression)))
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
        files = {rel: size for rel, size in tree.files.items() if rel not in SPOOL_OWN}
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
        digests = {rel: Digest() for rel in stored_keys}
        streams = {
            rel: Encoded(
                os.path.join(spool, rel),
                rel,
                where,
                partial(self._stages, rel, files[rel], compression, sealer, digests[rel]),
            )
            for rel in stored_keys
        }
        client = Client(self.client(), self._call, self._retry)
        key = self._manifest_key(name)
        manifest_sent = False
        try:
            self._send(
                client,
                {
                    self.dir_key(name) + k: (streams[rel], files[rel])
                    for rel, k in stored_keys.items()
                },
            )
            entries = {rel: d.entry for rel, d in digests.items()}
            stored = {
                rel: StoredFile(k, streams[rel].stored, kept) for rel, k in stored_keys.items()
            }
            stasis_json = None
            if METADATA_FILE in files and sealer is None:  # encrypted: stays in its file
                stasis_json = read_stasis_json(spool)
            manifest = Manifest(name, datetime.now(UTC), entries, metadata)
            if encryption is not None and sealer is not None:
                manifest = manifest.sealed(encryption, sealer)
            data = manifest_bytes(manifest, stored, stasis_json)
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
            keys = [self.dir_key(name) + k for k in stored_keys.values()]
            if manifest_sent:  # it may have landed: never leave it pointing at deleted data
                try:
                    self._call("delete", key, client.delete_object, Bucket=self.bucket, Key=key)
                except Exception as e2:
                    log.warning("%s; keeping the data its manifest may point at", e2)
                    keys = []  # the data may belong to a listed checkpoint
            if keys and (client.unreachable or is_unreachable(e)):
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
        self, rel: str, size: int, compression: str, sealer: Sealer | None, digest: Digest
    ) -> builtins.list[Stage]:
        """hash -> zstd, or with a key zstd -> encrypt -> hash (the manifest hashes what is
        stored then)."""
        squeeze: builtins.list[Stage] = []
        if compression == "zstd":
            squeeze.append(Zstd(size, self.zstd_level, self.zstd_threads))
        if sealer is None:
            return [digest, *squeeze]
        from runtime.store import crypt

        flags = crypt.FLAGS_ZSTD if compression == "zstd" else crypt.FLAGS_NONE
        return [*squeeze, crypt.Encryptor(sealer, rel, flags), digest]

    def _transfers(self, client: Client, readers: int) -> Any:
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

    def _send(self, client: Client, uploads: dict[str, tuple[Encoded, int]]) -> None:
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
                    watch = Watch(done, bound)
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
        missing for a "get": Bad)."""
        from botocore.exceptions import ClientError
        from s3transfer.exceptions import RetriesExceededError

        key = str(future.meta.call_args.key)
        try:
            future.result()
        except (StasisError, Bad):
            raise
        except ClientError as e:
            if op == "get" and str(e.response.get("Error", {}).get("Code")) in MISSING_KEY_CODES:
                raise Bad(f"stored object s3://{self.bucket}/{key} is missing") from e
            raise self.error(e, op, key) from e
        except RetriesExceededError as e:
            raise self.error(e.last_exception, op, key) from e
        except Exception as e:
            raise self.error(e, op, key) from e

    def _receive(
        self, name: str, remote: Remote, rels: builtins.list[str], cache: str
    ) -> dict[str, str]:
        """Download ``rels`` of ``name`` into ``cache`` (big objects with parallel ranged
        GETs); a file lands only verified. Returns a problem per file that differs."""
        files, stored = remote.manifest.files, remote.stored
        decoded = {
            rel: Decoded(rel, os.path.join(cache, rel), files[rel], stored[rel], cache)
            for rel in rels
        }
        problems: dict[str, str] = {}
        done: queue.SimpleQueue[Any] = queue.SimpleQueue()
        try:
            with self._transfers(
                Client(self.client(), self._call, self._retry), readers=self.concurrency
            ) as mgr:
                futures = {
                    mgr.download(
                        self.bucket,
                        self.dir_key(name) + stored[rel].key,
                        d,
                        subscribers=[Watch(done)],
                    ): rel
                    for rel, d in decoded.items()
                }
                for _ in futures:
                    future = done.get()
                    rel = futures[future]
                    try:
                        self._result(future, "get")
                        decoded[rel].finish()
                    except Bad as e:
                        problems[rel] = f"{rel}: {e.reason}"
        finally:
            for d in decoded.values():
                d.sink.discard()
        return problems


def _show_endpoint(endpoint: str | None) -> str:
    """The endpoint for messages: user:password@ never shown."""
    if not endpoint:
        return "AWS S3"
    scheme, sep, rest = endpoint.partition("://")
    host, slash, path = rest.partition("/")
    host = host.rpartition("@")[2]
    return f"{scheme}{sep}{host}{slash}{path}".rstrip("/")


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
        err = local_error(e, f"checkpoint {self._name}: {doing}", self.spool)
        if isinstance(err, ResourceExhausted):
            self.abort()
        return err

    def _target(self, rel: str) -> str:
        check_rel(rel)
        if rel == MANIFEST or rel in SPOOL_OWN:
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
            compression = check_compression(self.compression)
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
            files = {rel: size for rel, size in tree.files.items() if rel not in SPOOL_OWN}
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
            raise local_error(e, f"committing checkpoint {self._name}", self.spool) from e
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
        self, store: S3Store, name: str, remote: Remote, cache: str, sealer: Sealer | None = None
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
