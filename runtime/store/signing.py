"""Signed checkpoints: Ed25519 signatures over manifests, the keys that make and check them.

Every checkpoint a node commits carries ``manifest.sig`` beside ``manifest.json``:
an Ed25519 signature over the manifest's bytes exactly as stored, made with the
node's key (``[signing] key_file``, by default ``/etc/stasis/signing.key``). The
manifest lists the sha256 of every file, ``stasis.json`` included, so the
signature covers the whole checkpoint. Restores accept a checkpoint only if its
signature verifies under a trusted key: the node's own public key, and those
``[signing] trusted_keys`` names (PEM files, or directories of ``*.pub``/``*.pem``).

Guarantees:

* A private key file must be a regular file owned by root or the current user
  with no group/other access (0600/0400), like an encryption key; trusted
  public key files must not be writable by group or others.
* A node without a key file creates one (0600; its directory 0700 when it is
  created) the first time it signs; reading never creates a key.
* ``verify`` raises PermissionDenied for an unsigned checkpoint or one signed
  by a key nobody trusts, DataLoss for a malformed or wrong signature; each
  names the checkpoint and the reason in one line.
* A grant (``grant``/``check_grant``) is a signature over a checkpoint's
  manifest digest and a Kubernetes namespace: only a holder of a trusted key can
  make one, so an annotation carrying it cannot be forged by a pod's author.

The format of ``manifest.sig`` (at most ``SIG_MAX`` bytes) is one JSON object:
``{"version": 1, "alg": "Ed25519", "key_id": "<16 hex>", "signature": "<base64>"}``;
the signed message is ``MESSAGE_PREFIX`` followed by the manifest bytes. A key
id is the first 16 hex characters of the sha256 of the raw public key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runtime.errors import AlreadyExists, DataLoss, InvalidArgument, NotFound, PermissionDenied
from runtime.store.crypt import read_key_file

log = logging.getLogger("stasis.signing")

ALG = "Ed25519"
SIG_FILE = "manifest.sig"
SIG_VERSION = 1
SIG_MAX = 4096
MESSAGE_PREFIX = b"stasis manifest signature v1\0"
GRANT_PREFIX = b"stasis cross-namespace restore grant v1\0"
DEFAULT_KEY_FILE = "/etc/stasis/signing.key"
PUBLIC_SUFFIX = ".pub"
_KEY_FILE_MAX = 16384
_TRUSTED_SUFFIXES = (".pub", ".pem")


def key_id(public: Ed25519PublicKey) -> str:
    """The id of a public key: 16 hex characters of the sha256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(public: Ed25519PublicKey) -> bytes:
    """``public`` as a PEM SubjectPublicKeyInfo, what ``trusted_keys`` files hold."""
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _open_checked(path: str, where: str, private: bool) -> bytes:
    """Read a key file, refusing what others could change (or, if ``private``, read)."""
    data = read_key_file(path, where, private=private, limit=_KEY_FILE_MAX)
    if len(data) > _KEY_FILE_MAX:
        raise InvalidArgument(f"{where} is too large for a key")
    return data


def load_private(path: str) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path`` (mode 0600/0400, root's or ours)."""
    where = f"signing key file {path}"
    data = _open_checked(path, where, private=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(
            f"{where}: not a PEM private key (`stasis keygen --signing FILE` writes one)"
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"{where}: not an Ed25519 key")
    return key


def load_public(path: str) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM file ``path`` (not writable by group or others)."""
    where = f"trusted key file {path}"
    data = _open_checked(path, where, private=False)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"{where}: not a PEM public key") from e
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidArgument(f"{where}: not an Ed25519 key")
    return key


def write_private(path: str, *, make_dir: bool = False) -> Ed25519PrivateKey:
    """Write a new private key to ``path`` (PEM, 0600) and its public key to ``path.pub``.

    An existing key file is never overwritten (AlreadyExists). With
    ``make_dir``, a missing directory is created 0700.
    """
    if make_dir:
        directory = os.path.dirname(path)
        try:
            os.makedirs(directory, 0o700, exist_ok=True)
        except OSError as e:
            raise PermissionDenied(
                f"cannot create {directory} for signing key {path}: {e.strerror or e}"
            ) from e
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise AlreadyExists(f"{path} exists already: not overwriting a key") from None
    except OSError as e:
        raise PermissionDenied(f"cannot create signing key {path}: {e.strerror or e}") from e
    try:
        with open(fd, "wb") as f:
            os.fchmod(fd, 0o600)
            f.write(pem)
            f.flush()
            os.fsync(fd)
    except BaseException:
        os.unlink(path)
        raise
    _write_public(path + PUBLIC_SUFFIX, key.public_key())
    return key


def _write_public(path: str, public: Ed25519PublicKey) -> None:
    """Write ``public`` to ``path`` (0644) through a temporary file; replaces a stale one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o644)
        with open(fd, "wb") as f:
            os.fchmod(fd, 0o644)
            f.write(public_pem(public))
        os.replace(tmp, path)
    except OSError as e:
        # The public half is a convenience (it can be derived again); never fatal.
        log.warning("could not write public key %s: %s", path, e.strerror or e)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _trusted_files(path: str) -> list[str]:
    """``path`` itself, or the ``*.pub``/``*.pem`` files of directory ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"trusted key {path} (signing.trusted_keys) does not exist") from None
    except OSError as e:
        raise PermissionDenied(f"trusted key {path}: cannot read: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode):
        return [path]
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise PermissionDenied(
            f"trusted key directory {path} has mode {stat.S_IMODE(st.st_mode):04o}: "
            "group and others must not be able to write it"
        )
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise PermissionDenied(f"trusted key directory {path}: {e.strerror or e}") from e
    return [os.path.join(path, n) for n in names if n.endswith(_TRUSTED_SUFFIXES)]


@dataclass(frozen=True)
class Signature:
    """A parsed ``manifest.sig``."""

    key_id: str
    signature: bytes

    def to_bytes(self) -> bytes:
        """As stored in ``manifest.sig``."""
        doc = {
            "version": SIG_VERSION,
            "alg": ALG,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }
        return (json.dumps(doc, sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> Signature:
        """Parse ``manifest.sig``; anything malformed is DataLoss naming ``where``."""
        if len(data) > SIG_MAX:
            raise DataLoss(f"{where}: {SIG_FILE} is larger than {SIG_MAX} bytes")
        try:
            doc = json.loads(data)
        except ValueError as e:  # includes UnicodeDecodeError
            raise DataLoss(f"{where}: {SIG_FILE} is not valid JSON") from e
        if not isinstance(doc, dict) or doc.get("version") != SIG_VERSION:
            raise DataLoss(f"{where}: {SIG_FILE}: not a version {SIG_VERSION} signature")
        if doc.get("alg") != ALG:
            raise DataLoss(f"{where}: {SIG_FILE}: unsupported algorithm {doc.get('alg')!r}")
        kid, sig = doc.get("key_id"), doc.get("signature")
        if (
            not isinstance(kid, str)
            or len(kid) != 16
            or not all(c in "0123456789abcdef" for c in kid)
        ):
            raise DataLoss(f"{where}: {SIG_FILE}: bad key_id")
        try:
            raw = base64.b64decode(sig if isinstance(sig, str) else "", validate=True)
        except (binascii.Error, ValueError) as e:
            raise DataLoss(f"{where}: {SIG_FILE}: bad signature encoding") from e
        if len(raw) != 64:
            raise DataLoss(f"{where}: {SIG_FILE}: an Ed25519 signature is 64 bytes")
        return cls(kid, raw)


@dataclass
class Signing:
    """The node's signing key and the keys it trusts, loaded when first needed.

    ``key_file`` is the node's private key (created on first ``sign`` if
    missing); ``trusted`` are public key files or directories. Thread-safe.
    """

    key_file: str = DEFAULT_KEY_FILE
    trusted: tuple[str, ...] = ()
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _private: Ed25519PrivateKey | None = field(default=None, repr=False, compare=False)
    _keys: dict[str, Ed25519PublicKey] | None = field(default=None, repr=False, compare=False)

    def options(self) -> dict[str, Any]:
        """What rebuilds this object in another process (``Signing(**options)``)."""
        return {"key_file": self.key_file, "trusted": list(self.trusted)}

    def private_key(self) -> Ed25519PrivateKey:
        """The node's key: read, or created (0600, directory 0700) if it does not exist."""
        with self._lock:
            if self._private is None:
                try:
                    self._private = load_private(self.key_file)
                except NotFound:
                    try:
                        self._private = write_private(self.key_file, make_dir=True)
                        log.info("created signing key %s", self.key_file)
                    except AlreadyExists:  # another process made it meanwhile
                        self._private = load_private(self.key_file)
                    self._keys = None
            return self._private

    def trusted_keys(self) -> dict[str, Ed25519PublicKey]:
        """Key id -> public key: the node's own (if its key file exists) and ``trusted``."""
        with self._lock:
            if self._keys is None:
                keys: dict[str, Ed25519PublicKey] = {}
                own = self._private
                if own is None:
                    try:
                        own = load_private(self.key_file)
                    except NotFound:
                        own = None
                if own is not None:
                    keys[key_id(own.public_key())] = own.public_key()
                for entry in self.trusted:
                    for path in _trusted_files(entry):
                        public = load_public(path)
                        keys[key_id(public)] = public
                self._keys = keys
            return dict(self._keys)

    def sign(self, manifest: bytes) -> bytes:
        """The ``manifest.sig`` for manifest bytes ``manifest``, made with the node's key."""
        key = self.private_key()
        return Signature(key_id(key.public_key()), key.sign(MESSAGE_PREFIX + manifest)).to_bytes()

    def verify(self, manifest: bytes, sig: bytes | None, where: str) -> str:
        """Check ``sig`` over ``manifest``; returns the signer's key id.

        PermissionDenied (unsigned, unknown key) or DataLoss (malformed, wrong
        signature), naming ``where``.
        """
        if sig is None:
            raise PermissionDenied(
                f"{where} is unsigned (no {SIG_FILE}): only checkpoints signed by a trusted "
                "key are restored (stasis import --trust vouches for an archive)"
            )
        parsed = Signature.parse(sig, where)
        public = self.trusted_keys().get(parsed.key_id)
        if public is None:
            raise PermissionDenied(
                f"{where} is signed by key {parsed.key_id}, which is not trusted here "
                "(add its public key to signing.trusted_keys)"
            )
        try:
            public.verify(parsed.signature, MESSAGE_PREFIX + manifest)
        except InvalidSignature:
            raise DataLoss(
                f"{where}: bad signature by key {parsed.key_id} ({SIG_FILE} does not match "
                "the manifest: changed or forged)"
            ) from None
        return parsed.key_id

    def grant(self, digest: str, namespace: str) -> str:
        """A grant to restore the checkpoint whose manifest has sha256 ``digest`` into
        Kubernetes namespace ``namespace``: ``KEYID:BASE64``."""
        key = self.private_key()
        raw = key.sign(_grant_message(digest, namespace))
        return f"{key_id(key.public_key())}:{base64.b64encode(raw).decode('ascii')}"

    def check_grant(self, value: str, digest: str, namespace: str) -> bool:
        """Whether ``value`` is a grant by a trusted key for ``digest`` into ``namespace``."""
        kid, _, sig = value.strip().partition(":")
        public = self.trusted_keys().get(kid)
        if public is None or len(sig) > 200:
            return False
        try:
            public.verify(base64.b64decode(sig, validate=True), _grant_message(digest, namespace))
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return True


def _grant_message(digest: str, namespace: str) -> bytes:
    return GRANT_PREFIX + digest.encode() + b"\0" + namespace.encode()


def manifest_digest(manifest: bytes) -> str:
    """The sha256 (hex) a grant names a checkpoint by: of its manifest's ``to_json``."""
    return hashlib.sha256(manifest).hexdigest()
