"""How a checkpoint lies in a bucket: ``s3://bucket/prefix`` URLs and references, and the
S3 manifest, the checkpoint's manifest (``runtime.store.model``) plus each file's
stored ``key``, ``stored_size`` and ``compression`` (and ``stasis.json`` copied in).

``parse_manifest`` accepts only stored keys inside the checkpoint and known
compressions: anything else is DataLoss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from runtime.errors import DataLoss, InvalidArgument
from runtime.store.model import MANIFEST, Manifest, check_name, safe_rel

COMPRESSIONS = ("zstd", "none")


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
class Remote:
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


def manifest_bytes(
    manifest: Manifest, stored: dict[str, StoredFile], stasis_json: dict[str, Any] | None
) -> bytes:
    doc = json.loads(manifest.to_json())
    for rel, s in stored.items():
        doc["files"][rel].update(key=s.key, stored_size=s.stored_size, compression=s.compression)
    if stasis_json is not None:
        doc["stasis_json"] = stasis_json
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def parse_manifest(data: bytes, where: str) -> Remote:
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
    return Remote(manifest, stored, extra, data)


def check_compression(compression: str) -> str:
    if compression not in COMPRESSIONS:
        raise InvalidArgument(
            f"unknown compression {compression!r}: one of {', '.join(COMPRESSIONS)}"
        )
    return compression
