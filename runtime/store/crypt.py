"""Client-side encryption of checkpoints at rest: keys, key derivation, file streams.

Pure functions and small classes over ``cryptography``; ``runtime.store``
decides when to use them. The format:

* A key is 32 bytes (AES-256), read from a file (``load_key``): 32 raw bytes,
  64 hex characters, or base64 of 32 bytes, a trailing newline allowed. Its
  id, stored in every manifest it sealed, is the first 16 hex characters of
  HMAC-SHA256(key, b"stasis key id"): it tells keys apart without revealing them.
* Each checkpoint gets a random 16-byte salt; HKDF-SHA256(key, salt) derives a
  data key (info ``b"stasis data v1"``) and a MAC key (``b"stasis manifest v1"``),
  so no two checkpoints share a data key and a file cannot move between them.
* Each file is a stream: a header (``MAGIC``, format version, flags, a random
  8-byte nonce prefix), then chunks of up to ``CHUNK`` plaintext bytes, each
  sealed with AES-256-GCM (16-byte tag). Nonce = prefix || 4-byte chunk counter;
  associated data = header || the file's relative path || counter || a
  final-chunk flag. So chunks cannot be reordered, dropped, truncated away or
  swapped between files or checkpoints; an empty file still has its one (empty)
  final chunk, and every chunk but the last holds exactly ``CHUNK`` bytes.

Streams are processed a chunk at a time, never whole files in memory. Any
decryption failure is DataLoss naming the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stat
import struct
from dataclasses import dataclass
from typing import IO, Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from runtime.errors import AlreadyExists, DataLoss, InvalidArgument, NotFound, PermissionDenied

ALG = "AES-256-GCM"
KEY_SIZE = 32
SALT_SIZE = 16
CHUNK = 1 << 20  # plaintext bytes per sealed chunk
TAG = 16
MAGIC = b"STSE"
FORMAT = 1
FLAGS_NONE = 0  # the plaintext as it is
FLAGS_ZSTD = 1  # the plaintext was compressed with zstd before it was encrypted
FLAGS = (FLAGS_NONE, FLAGS_ZSTD)
NONCE_PREFIX = 8
HEADER = struct.Struct(">4sBB8s")  # magic, format, flags, nonce prefix
_MAX_CHUNKS = 1 << 32
_KEY_FILE_MAX = 4096


def _mask(raw: bytes) -> str:
    return hmac.new(raw, b"stasis key id", hashlib.sha256).hexdigest()[:16]


class Key:
    """An AES-256 key and where it came from; never printed (the repr shows the id)."""

    __slots__ = ("id", "raw", "source")

    def __init__(self, raw: bytes, source: str = "") -> None:
        if len(raw) != KEY_SIZE:
            raise InvalidArgument(f"an encryption key is {KEY_SIZE} bytes, not {len(raw)}")
        self.raw = bytes(raw)
        self.id = _mask(self.raw)
        self.source = source

    def __repr__(self) -> str:
        return f"Key(id={self.id!r}, source={self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and hmac.compare_digest(self.raw, other.raw)

    def __hash__(self) -> int:
        return hash(self.id)

    def derive(self, salt: bytes) -> Sealer:
        """The per-checkpoint data and MAC keys for ``salt``."""
        if len(salt) != SALT_SIZE:
            raise DataLoss(f"encryption salt is {len(salt)} bytes, not {SALT_SIZE}")
        return Sealer(
            _hkdf(self.raw, salt, b"stasis data v1"), _hkdf(self.raw, salt, b"stasis manifest v1")
        )


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(key)


def new_salt() -> bytes:
    """A fresh random per-checkpoint salt."""
    return os.urandom(SALT_SIZE)


def parse_key(data: bytes, where: str) -> bytes:
    """The 32-byte key a key file holds: raw, hex (64 chars) or base64; InvalidArgument else."""
    if len(data) == KEY_SIZE:
        return data
    text = data.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) == KEY_SIZE:
        return raw
    raise InvalidArgument(
        f"{where}: not an encryption key: want {KEY_SIZE} raw bytes, {2 * KEY_SIZE} hex "
        f"characters or base64 of {KEY_SIZE} bytes (`stasis keygen FILE` writes one)"
    )


def read_key_file(path: str, where: str, *, private: bool, limit: int) -> bytes:
    """The first ``limit`` + 1 bytes of key file ``path``, refusing one that others could
    change or, if ``private``, read: it must be a regular file (a Kubernetes Secret's
    symlinked file too) owned by root or the current user, 0600/0400 when ``private``,
    not writable by group or others otherwise. ``where`` names it in errors."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NotFound(f"{where} does not exist") from None
    except OSError as e:
        raise PermissionDenied(f"{where}: cannot read: {e.strerror or e}") from e
    with open(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"{where} is not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise PermissionDenied(
                f"{where} is owned by uid {st.st_uid}: it must belong to root or uid {os.geteuid()}"
            )
        mode = stat.S_IMODE(st.st_mode)
        if private and mode & 0o077:
            raise PermissionDenied(
                f"{where} has mode {mode:04o}: group and others must have no access "
                "(chmod 600; for a Kubernetes Secret, defaultMode: 0400)"
            )
        if mode & 0o022:
            raise PermissionDenied(
                f"{where} has mode {mode:04o}: group and others must not be able to write it"
            )
        return f.read(limit + 1)


def load_key(path: str) -> Key:
    """Read the key file ``path``; refuse one that others could read or change.

    The file (a Kubernetes Secret's symlinked file too) must be owned by root
    or the current user and give nothing to group or others (0600/0400).
    """
    where = f"encryption key file {path}"
    data = read_key_file(path, where, private=True, limit=_KEY_FILE_MAX)
    return Key(parse_key(data, where), path)


def write_key_file(path: str) -> Key:
    """Write a new random key to ``path`` (64 hex characters and a newline, mode 0600).

    An existing file is never overwritten (AlreadyExists).
    """
    raw = os.urandom(KEY_SIZE)
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        raise AlreadyExists(f"{path} exists already: not overwriting a key") from None
    with open(fd, "wb") as f:
        os.fchmod(fd, 0o600)
        f.write(raw.hex().encode() + b"\n")
        f.flush()
        os.fsync(fd)
    return Key(raw, path)


@dataclass(frozen=True, repr=False)
class Sealer:
    """One checkpoint's derived keys: encrypts and decrypts its files, MACs its manifest."""

    data_key: bytes
    mac_key: bytes

    def __repr__(self) -> str:
        return "Sealer(***)"

    def mac(self, data: bytes) -> str:
        """HMAC-SHA256 of ``data`` with the MAC key, hex."""
        return hmac.new(self.mac_key, data, hashlib.sha256).hexdigest()

    def check_mac(self, data: bytes, mac: str) -> bool:
        """Whether ``mac`` authenticates ``data`` (constant time)."""
        return hmac.compare_digest(self.mac(data), mac)

    def encrypt(
        self, src: IO[bytes], dst: IO[bytes], rel: str, flags: int = FLAGS_NONE
    ) -> tuple[str, int]:
        """Encrypt ``src`` into ``dst`` as file ``rel``; returns the output's sha256 (hex), size.

        ``flags`` records how ``src`` is already transformed (``FLAGS_ZSTD``).
        """
        enc = Encryptor(self, rel, flags)
        h = hashlib.sha256()
        size = 0
        while True:
            data = src.read(CHUNK)
            out = enc.update(data) if data else enc.finish()
            h.update(out)
            dst.write(out)
            size += len(out)
            if not data:
                return h.hexdigest(), size

    def decrypt(self, src: IO[bytes], dst: IO[bytes], rel: str, where: str) -> int:
        """Decrypt file ``rel`` from ``src`` into ``dst`` (undoing the stream's zstd, if
        any); returns the plaintext size.

        DataLoss naming ``where`` and ``rel`` if anything was changed, cut or moved.
        """
        dec = Decryptor(self, rel, where)
        out = _Counting(dst)
        sink: Any = None
        while True:
            data = src.read(CHUNK + TAG)
            plain = dec.update(data) if data else dec.finish()
            if sink is None and dec.flags is not None:
                sink = _unzstd(out) if dec.flags == FLAGS_ZSTD else out
            if plain:
                assert sink is not None
                try:
                    sink.write(plain)
                except DataLoss:
                    raise
                except Exception as e:  # zstd.ZstdError: authenticated, so never expected
                    raise DataLoss(f"{where}: {rel}: cannot be decompressed: {e}") from e
            if not data:
                if sink is not None and sink is not out:
                    sink.close()
                return out.size


class _Counting:
    """A file wrapper that counts what is written through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.size = 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self.size += len(data)
        return len(data)


def _unzstd(dst: _Counting) -> Any:
    """A zstd decompressor writing into ``dst`` a CHUNK at most at a time (no bombs)."""
    import zstandard

    return zstandard.ZstdDecompressor().stream_writer(
        cast(IO[bytes], dst), write_size=CHUNK, closefd=False
    )


class Encryptor:
    """Push-style encryption of one file: ``update`` with plaintext, then ``finish`` once.

    Every chunk but the last holds exactly CHUNK plaintext bytes, so a full
    chunk is sealed only once more data shows it is not the last one.
    """

    def __init__(self, sealer: Sealer, rel: str, flags: int = FLAGS_NONE) -> None:
        if flags not in FLAGS:
            raise InvalidArgument(f"unknown encryption stream flags {flags}")
        self._aead = AESGCM(sealer.data_key)
        self._header = HEADER.pack(MAGIC, FORMAT, flags, os.urandom(NONCE_PREFIX))
        self._aad = _path_aad(self._header, rel)
        self._rel = rel
        self._buf = bytearray()
        self._counter = 0
        self._started = False

    def _seal(self, data: bytes, final: bool) -> bytes:
        if self._counter >= _MAX_CHUNKS:
            raise InvalidArgument(f"{self._rel}: too large to encrypt ({_MAX_CHUNKS} chunks)")
        counter = struct.pack(">I", self._counter)
        self._counter += 1
        sealed = self._aead.encrypt(
            self._header[-NONCE_PREFIX:] + counter, data, self._aad + counter + bytes([final])
        )
        return sealed

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return self._header

    def update(self, data: bytes) -> bytes:
        """Ciphertext for what is known not to be the end (possibly empty)."""
        out = [self._start()]
        self._buf += data
        while len(self._buf) > CHUNK:
            with memoryview(self._buf) as view:
                piece = bytes(view[:CHUNK])
            del self._buf[:CHUNK]
            out.append(self._seal(piece, False))
        return b"".join(out)

    def finish(self) -> bytes:
        """The rest: the final chunk (empty for an empty file)."""
        out = self._start() + self._seal(bytes(self._buf), True)
        self._buf.clear()
        return out


class Decryptor:
    """Push-style decryption of one file: ``update`` with ciphertext, then ``finish`` once.

    DataLoss naming ``where`` and the file on any mismatch; ``flags`` is the
    header's (known once the header arrived).
    """

    def __init__(self, sealer: Sealer, rel: str, where: str) -> None:
        self._aead = AESGCM(sealer.data_key)
        self._rel = rel
        self._where = where
        self._buf = bytearray()
        self._aad = b""
        self._prefix = b""
        self._counter = 0
        self.flags: int | None = None

    def _fail(self, why: str) -> DataLoss:
        return DataLoss(f"{self._where}: {self._rel}: {why}")

    def _open(self, data: bytes, final: bool) -> bytes:
        counter = struct.pack(">I", self._counter)
        try:
            plain = self._aead.decrypt(
                self._prefix + counter, data, self._aad + counter + bytes([final])
            )
        except InvalidTag:
            raise self._fail(
                f"decryption failed at chunk {self._counter} "
                "(the file was changed, truncated or moved)"
            ) from None
        self._counter += 1
        if self._counter >= _MAX_CHUNKS:
            raise self._fail("too many chunks")
        return plain

    def _header(self) -> bool:
        if self.flags is not None:
            return True
        if len(self._buf) < HEADER.size:
            return False
        header = bytes(self._buf[: HEADER.size])
        del self._buf[: HEADER.size]
        magic, version, flags, prefix = HEADER.unpack(header)
        if magic != MAGIC:
            raise self._fail("not an encrypted checkpoint file (bad magic)")
        if version != FORMAT or flags not in FLAGS:
            raise self._fail(f"unsupported encryption format {version}/{flags}")
        self.flags, self._prefix, self._aad = flags, prefix, _path_aad(header, self._rel)
        return True

    def update(self, data: bytes) -> bytes:
        """Plaintext of the chunks known not to be the last one."""
        self._buf += data
        if not self._header():
            return b""
        out = []
        while len(self._buf) > CHUNK + TAG:
            with memoryview(self._buf) as view:
                piece = bytes(view[: CHUNK + TAG])
            del self._buf[: CHUNK + TAG]
            out.append(self._open(piece, False))
        return b"".join(out)

    def finish(self) -> bytes:
        """The final chunk's plaintext; DataLoss if the stream was cut."""
        if not self._header():
            raise self._fail("encrypted file is truncated (no header)")
        if len(self._buf) < TAG:
            raise self._fail("encrypted file is truncated")
        plain = self._open(bytes(self._buf), True)
        self._buf.clear()
        return plain


def _path_aad(header: bytes, rel: str) -> bytes:
    name = rel.encode()
    return header + struct.pack(">I", len(name)) + name


def _read_full(f: IO[bytes], n: int) -> bytes:
    """Read exactly ``n`` bytes unless the stream ends first."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def encrypted_size(plain: int) -> int:
    """The size of a file of ``plain`` bytes once encrypted."""
    chunks = max(1, -(-plain // CHUNK))
    return HEADER.size + plain + chunks * TAG
