"""Tests for runtime.store.crypt: key files, key ids, and the chunked AES-256-GCM file streams."""

from __future__ import annotations

import base64
import io
import os
import re
import stat
from pathlib import Path

import pytest

from runtime.errors import AlreadyExists, DataLoss, InvalidArgument, NotFound, PermissionDenied
from runtime.store import crypt

C = crypt.CHUNK
KEY = crypt.Key(bytes(range(32)), "test")
SEALER = KEY.derive(b"\x01" * crypt.SALT_SIZE)


def seal(data: bytes, rel: str = "checkpoint/pages-1.img", sealer: crypt.Sealer = SEALER) -> bytes:
    out = io.BytesIO()
    digest, size = sealer.encrypt(io.BytesIO(data), out, rel)
    blob = out.getvalue()
    assert size == len(blob) == crypt.encrypted_size(len(data))
    import hashlib

    assert digest == hashlib.sha256(blob).hexdigest()
    return blob


def unseal(
    blob: bytes, rel: str = "checkpoint/pages-1.img", sealer: crypt.Sealer = SEALER
) -> bytes:
    out = io.BytesIO()
    size = sealer.decrypt(io.BytesIO(blob), out, rel, "checkpoint c1")
    assert size == len(out.getvalue())
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, 4096, C - 1, C, C + 1, 2 * C, 2 * C + 17])
def test_round_trip_around_chunk_boundaries(size: int) -> None:
    data = os.urandom(size)
    blob = seal(data)
    # (A short plaintext may turn up in random bytes by chance: check longer ones.)
    assert size < 16 or data[:64] not in blob
    assert unseal(blob) == data


def test_empty_file_has_one_final_chunk() -> None:
    blob = seal(b"")
    assert len(blob) == crypt.HEADER.size + crypt.TAG
    assert unseal(blob) == b""
    with pytest.raises(DataLoss, match=r"checkpoint/pages-1.img"):
        unseal(blob[: crypt.HEADER.size])  # the final chunk cut away


def test_same_plaintext_encrypts_differently() -> None:
    assert seal(b"x" * 100) != seal(b"x" * 100)  # a random nonce prefix per file


def test_tampering_any_byte_is_data_loss_naming_the_file() -> None:
    data = os.urandom(C + 100)
    blob = seal(data)
    for pos in (
        0,
        4,
        5,
        6,
        crypt.HEADER.size,
        C // 2,
        C + crypt.TAG + crypt.HEADER.size + 3,
        len(blob) - 1,
    ):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(DataLoss, match=r"checkpoint c1: checkpoint/pages-1.img"):
            unseal(bytes(bad))


@pytest.mark.parametrize("size", [C, C + 1, 3 * C])
def test_truncation_is_data_loss(size: int) -> None:
    blob = seal(os.urandom(size))
    first_chunk_end = crypt.HEADER.size + C + crypt.TAG
    for cut in {first_chunk_end, len(blob) - 1, crypt.HEADER.size + 5, 3}:
        if cut < len(blob):
            with pytest.raises(DataLoss, match=r"pages-1.img"):
                unseal(blob[:cut])
    with pytest.raises(DataLoss, match=r"pages-1.img"):
        unseal(blob + b"\0")  # anything appended


def test_reordered_chunks_are_data_loss() -> None:
    blob = seal(os.urandom(3 * C))
    h, n = crypt.HEADER.size, C + crypt.TAG
    chunks = [blob[h + i * n : h + (i + 1) * n] for i in range(3)]
    with pytest.raises(DataLoss, match="chunk 0"):
        unseal(blob[:h] + chunks[1] + chunks[0] + chunks[2])


def test_files_cannot_be_swapped_or_moved() -> None:
    a = seal(b"a" * 100, "spec.dump")
    with pytest.raises(DataLoss, match=r"config.dump"):
        unseal(a, "config.dump")  # the path is authenticated
    other = KEY.derive(b"\x02" * crypt.SALT_SIZE)  # another checkpoint, same key
    with pytest.raises(DataLoss, match=r"spec.dump"):
        unseal(a, "spec.dump", other)


def test_wrong_key_is_data_loss() -> None:
    blob = seal(b"secret")
    wrong = crypt.Key(os.urandom(32)).derive(b"\x01" * crypt.SALT_SIZE)
    with pytest.raises(DataLoss, match="decryption failed"):
        unseal(blob, sealer=wrong)


def test_not_an_encrypted_file() -> None:
    with pytest.raises(DataLoss, match="bad magic"):
        unseal(b"plain text that is long enough")
    with pytest.raises(DataLoss, match="no header"):
        unseal(b"STSE")


def test_key_ids_and_macs() -> None:
    assert KEY.id == crypt.Key(bytes(range(32))).id
    assert len(KEY.id) == 16 and KEY.id != crypt.Key(os.urandom(32)).id
    assert "raw" not in repr(KEY) and KEY.id in repr(KEY)
    mac = SEALER.mac(b"manifest")
    assert SEALER.check_mac(b"manifest", mac)
    assert not SEALER.check_mac(b"manifesT", mac)
    assert not KEY.derive(b"\x02" * crypt.SALT_SIZE).check_mac(b"manifest", mac)
    with pytest.raises(InvalidArgument):
        crypt.Key(b"short")


def _key_file(tmp_path: Path, data: bytes, mode: int = 0o600) -> str:
    path = tmp_path / "checkpoint.key"
    path.write_bytes(data)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize(
    "encode",
    [
        lambda raw: raw,
        lambda raw: raw.hex().encode(),
        lambda raw: raw.hex().encode() + b"\n",
        lambda raw: base64.b64encode(raw) + b"\n",
    ],
    ids=["raw", "hex", "hex-newline", "base64"],
)
def test_key_file_formats(tmp_path: Path, encode: object) -> None:
    raw = os.urandom(32)
    assert callable(encode)
    key = crypt.load_key(_key_file(tmp_path, encode(raw)))
    assert key.raw == raw and key.source.endswith("checkpoint.key")


def test_raw_key_ending_in_a_newline_byte_is_kept(tmp_path: Path) -> None:
    raw = os.urandom(31) + b"\n"
    assert crypt.load_key(_key_file(tmp_path, raw)).raw == raw


@pytest.mark.parametrize("data", [b"", b"too short", b"zz" * 32, b"a" * 33])
def test_bad_key_file_contents(tmp_path: Path, data: bytes) -> None:
    path = _key_file(tmp_path, data)
    with pytest.raises(
        InvalidArgument, match=re.escape(f"encryption key file {path}: not an encryption key")
    ):
        crypt.load_key(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _key_file(tmp_path, os.urandom(32).hex().encode(), mode)
    with pytest.raises(PermissionDenied, match=re.escape(f"{path} has mode 0{mode:o}")):
        crypt.load_key(path)
    os.chmod(path, 0o400)
    crypt.load_key(path)


def test_key_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = _key_file(tmp_path, os.urandom(32).hex().encode())
    if os.geteuid() != 0:
        pytest.skip("changing a file's owner needs root")
    os.chown(path, 12345, -1)
    with pytest.raises(PermissionDenied, match=re.escape(f"{path} is owned by uid 12345")):
        crypt.load_key(path)


def test_missing_key_file_and_symlinked_secret(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        crypt.load_key(str(tmp_path / "nope"))
    # A Kubernetes Secret volume: key -> ..data/key, mode from defaultMode.
    data = tmp_path / "..data"
    data.mkdir()
    raw = os.urandom(32)
    (data / "key").write_bytes(base64.b64encode(raw))
    (data / "key").chmod(0o400)
    (tmp_path / "key").symlink_to("..data/key")
    assert crypt.load_key(str(tmp_path / "key")).raw == raw


def test_write_key_file(tmp_path: Path) -> None:
    path = str(tmp_path / "new.key")
    key = crypt.write_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert crypt.load_key(path) == key
    with pytest.raises(AlreadyExists):
        crypt.write_key_file(path)
    assert crypt.load_key(path) == key
