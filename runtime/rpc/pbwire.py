"""The protobuf wire format, for the few small messages the stasis CLI exchanges.

``stasis checkpoint`` sends one CheckpointRequest to a shim and reads one
CheckpointResponse, and asks containerd for one Container: importing protobuf and
the generated modules for that costs the CLI ~30 ms of CPU and ~10 MiB, on the
critical path of every checkpoint and taken from CRIU while the dump runs. These
messages are flat (strings, booleans, unsigned integers, doubles and nested
messages), so the CLI encodes and decodes them with this module instead; the shim,
which serves many messages, keeps the generated code. The unit tests check both
against the generated classes.

proto3 semantics: ``encode`` leaves out fields at their default value (an empty
string, False, 0, 0.0), and a decoded message answers a missing field with its
default. Unknown fields are skipped, as protobuf does. Malformed input raises
ValueError naming what was wrong.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing's import costs the CLI ~5 ms; mypy treats this name as True
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import TypeAlias

    Value: TypeAlias = str | bytes | bool | int | float | None

VARINT, I64, LEN, I32 = 0, 1, 2, 5


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def encode(fields: Iterable[tuple[int, Value]]) -> bytes:
    """A message of ``(field number, value)`` pairs: str and bytes are length-delimited,
    bool and int (unsigned) varints, float a double; a nested message is given as its
    encoded bytes. Defaults and None are left out; a repeated field repeats its pair."""
    out = bytearray()
    for number, value in fields:
        if value is None or value == "" or value == b"" or value is False:
            continue
        if isinstance(value, bool):
            out += _varint(number << 3 | VARINT) + b"\x01"
        elif isinstance(value, int):
            if value < 0:
                raise ValueError(f"field {number}: {value} is negative (unsigned only)")
            if value:
                out += _varint(number << 3 | VARINT) + _varint(value)
        elif isinstance(value, float):
            if value:
                out += _varint(number << 3 | I64) + struct.pack("<d", value)
        elif isinstance(value, (str, bytes)):
            raw = value.encode() if isinstance(value, str) else value
            out += _varint(number << 3 | LEN) + _varint(len(raw)) + raw
        else:
            raise TypeError(f"field {number}: cannot encode {type(value).__name__}")
    return bytes(out)


class Message:
    """A decoded message: each field's values in wire order, read by the type the
    caller's schema gives it (the last value wins for a scalar, as in protobuf)."""

    def __init__(self, data: bytes) -> None:
        self.fields: dict[int, list[int | bytes]] = {}
        view = memoryview(data)
        i, end = 0, len(data)
        while i < end:
            key, i = self._read_varint(view, i)
            number, kind = key >> 3, key & 7
            if number == 0:
                raise ValueError(f"field number 0 at byte {i}")
            value: int | bytes
            if kind == VARINT:
                value, i = self._read_varint(view, i)
            elif kind == LEN:
                size, i = self._read_varint(view, i)
                if i + size > end:
                    raise ValueError(f"field {number}: {size} bytes announced, {end - i} left")
                value, i = bytes(view[i : i + size]), i + size
            elif kind in (I64, I32):
                size = 8 if kind == I64 else 4
                if i + size > end:
                    raise ValueError(f"field {number}: truncated fixed-width value")
                value, i = bytes(view[i : i + size]), i + size
            else:
                raise ValueError(f"field {number}: unsupported wire type {kind}")
            self.fields.setdefault(number, []).append(value)

    @staticmethod
    def _read_varint(view: memoryview, i: int) -> tuple[int, int]:
        n = shift = 0
        while True:
            if i >= len(view):
                raise ValueError("truncated varint")
            if shift > 63:
                raise ValueError(f"varint longer than 10 bytes at byte {i}")
            b = view[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n, i

    def _last(self, number: int, want: type) -> int | bytes | None:
        values = self.fields.get(number)
        if not values:
            return None
        value = values[-1]
        if not isinstance(value, want):
            raise ValueError(f"field {number}: wrong wire type for a {want.__name__} field")
        return value

    def string(self, number: int) -> str:
        raw = self._last(number, bytes)
        if raw is None:
            return ""
        assert isinstance(raw, bytes)
        try:
            return raw.decode()
        except UnicodeDecodeError as e:
            raise ValueError(f"field {number}: not UTF-8: {e}") from e

    def bytes(self, number: int) -> bytes:
        raw = self._last(number, bytes)
        assert raw is None or isinstance(raw, bytes)
        return raw or b""

    def uint(self, number: int) -> int:
        value = self._last(number, int)
        assert value is None or isinstance(value, int)
        return value or 0

    def boolean(self, number: int) -> bool:
        return self.uint(number) != 0

    def double(self, number: int) -> float:
        raw = self._last(number, bytes)
        if raw is None:
            return 0.0
        assert isinstance(raw, bytes)
        if len(raw) != 8:
            raise ValueError(f"field {number}: a double takes 8 bytes, not {len(raw)}")
        value: float = struct.unpack("<d", raw)[0]
        return value

    def message(self, number: int) -> Message:
        """A nested message (empty when absent); protobuf merges repeated occurrences,
        which concatenating their bytes does."""
        parts = self.fields.get(number) or []
        if any(not isinstance(p, bytes) for p in parts):
            raise ValueError(f"field {number}: wrong wire type for a message field")
        return Message(b"".join(p for p in parts if isinstance(p, bytes)))
