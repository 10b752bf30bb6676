"""The checkpoint format: what a checkpoint's files and ``manifest.json`` are, and the
rules for checkpoint names and the paths inside a checkpoint.

A checkpoint is a directory of files plus ``manifest.json``, which records the sha256
and size of every file (those of the stored, encrypted bytes for an encrypted
checkpoint, with the MAC that authenticates the manifest). ``Manifest.parse`` accepts
only a well-formed manifest of safe relative paths; anything else is DataLoss.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from runtime import boundedjson
from runtime.errors import DataLoss, FailedPrecondition, InvalidArgument, PermissionDenied

if TYPE_CHECKING:
    from runtime.store.crypt import Key, Sealer


MANIFEST = "manifest.json"
MANIFEST_SIG = "manifest.sig"  # runtime.store.signing.SIG_FILE (signing loads cryptography)
SIG_MAX = 4096  # bytes of manifest.sig read
MANIFEST_VERSION = 1
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"

NAME_RE = re.compile(NAME_PATTERN)  # a checkpoint name
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_SMALL_JSON = 16 << 20  # manifest.json / stasis.json read into memory
_MAX_FILES = 100_000  # files one manifest may list (a CRIU dump of 1,000 processes: ~10,000)
_HEX = re.compile(r"[0-9a-f]+")


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
        doc = boundedjson.loads(data, f"{where}: {MANIFEST}", max_bytes=MAX_SMALL_JSON)
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


# --------------------------------------------------------------------------- names


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


def ref(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"
