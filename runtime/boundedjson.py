"""One JSON parser for untrusted documents: bounded in size and nesting depth.

Checkpoint metadata (``manifest.json``, ``stasis.json``, ``pod.json``,
``spec.dump``, ``config.dump``) and archive members come from whoever could
write a store or an archive. ``json.loads`` alone takes any size, and nesting
a few thousand brackets deep makes it (or whatever walks the result later)
raise ``RecursionError``, which no caller expects. :func:`loads` refuses both
up front and turns every failure into one :class:`~runtime.errors.StasisError`
(``DataLoss`` unless the caller names another class) whose message names the
document.
"""

from __future__ import annotations

import json
import os
import re
import stat
from typing import Any

from runtime.errors import DataLoss, StasisError

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted (an OCI spec or pod spec needs ~12)."""

MAX_BYTES = 16 << 20
"""Largest document accepted unless the caller says otherwise."""

# A JSON string (escapes included) or one bracket: strings are skipped whole, so
# brackets inside them do not count. An unterminated string does not match; the
# parse after the scan reports it.
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def _too_deep(data: bytes, limit: int) -> bool:
    if data.count(b"[") + data.count(b"{") <= limit:
        return False  # cannot nest deeper than it has brackets (the common case)
    depth = 0
    for m in _TOKENS.finditer(data):
        c = data[m.start()]
        if c == 0x22:  # a string
            continue
        if c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def loads(
    data: bytes | str,
    what: str,
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    error: type[StasisError] = DataLoss,
) -> Any:
    """Parse ``data``; ``what`` names the document in errors (``checkpoint x: stasis.json``).

    Raises ``error`` (DataLoss by default) when the document is larger than
    ``max_bytes``, nests deeper than ``max_depth``, or is not valid UTF-8 JSON.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise error(f"{what} is larger than {max_bytes} bytes")
    if _too_deep(raw, max_depth):
        raise error(f"{what} nests deeper than {max_depth} levels")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise error(f"{what} is not valid JSON: {e}") from e


def load_file(
    path: str,
    what: str,
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    error: type[StasisError] = DataLoss,
) -> Any:
    """:func:`loads` of a regular file, read no further than ``max_bytes`` + 1.

    Symlinks are not followed and FIFOs or devices are refused (``error``);
    OSError (a missing file included) propagates for the caller to classify.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{what} is not a regular file")
        data = f.read(max_bytes + 1)
    return loads(data, what, max_bytes=max_bytes, max_depth=max_depth, error=error)


def load_stream(
    f: Any,
    what: str,
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    error: type[StasisError] = DataLoss,
) -> Any:
    """:func:`loads` of an open binary stream (a tar member), read no further than
    ``max_bytes`` + 1."""
    data = f.read(max_bytes + 1)
    return loads(data, what, max_bytes=max_bytes, max_depth=max_depth, error=error)
