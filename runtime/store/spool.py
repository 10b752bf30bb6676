"""Spools: the local directories (``<spool_dir>/<name>-<random>/``) an S3 checkpoint is
written into before its upload.

A spool is made and locked under a hidden name, then renamed into place, and stays
flocked while a writer or an upload worker (whose PID ``PID_FILE`` records) holds it.
``collect_spools`` removes only spools that nobody holds and nobody touched for the
grace period: the ones never committed, and the ones a failed upload kept for the
store that collects them.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from runtime.names import METADATA_FILE, SPOOL_PENDING
from runtime.store.files import (
    NotRegular,
    is_locked,
    local_error,
    new_token,
    newest_mtime,
    read_small,
    rmtree,
)
from runtime.store.model import NAME_PATTERN, check_name

PID_FILE = ".stasis-upload.pid"  # in a spool: the PID of the upload worker (runtime.store.upload)
SPOOL_OWN = frozenset({SPOOL_PENDING, PID_FILE})  # the spool's bookkeeping, never uploaded
MAX_STASIS_JSON = 1 << 20  # a spool's stasis.json and pending record, read into memory
_SPOOL_NAME = re.compile(rf"(?:{NAME_PATTERN})-[0-9a-f]{{12}}")
_NEW_SPOOL = re.compile(rf"\.(?:{NAME_PATTERN})-[0-9a-f]{{12}}\.new")


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
        raise local_error(e, doing, spool_dir) from e
    try:
        os.chmod(new, 0o700)
        lock = os.open(new, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        rmtree(new)
        raise local_error(e, doing, spool_dir) from e
    # Where flock is not supported the grace period alone protects the spool.
    with contextlib.suppress(OSError):
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        os.rename(new, spool)
    except OSError as e:
        os.close(lock)
        rmtree(new)
        raise local_error(e, doing, spool_dir) from e
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
        raise local_error(e, "collecting spools", spool_dir) from e
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
        doc = json.loads(read_small(os.path.join(spool, SPOOL_PENDING), MAX_STASIS_JSON))
    except (OSError, ValueError, NotRegular):
        return None
    url = doc.get("url") if isinstance(doc, dict) else None
    return url if isinstance(url, str) else None


def read_stasis_json(spool: str) -> dict[str, Any] | None:
    """The spool's ``stasis.json`` if it is a small JSON object (else None, as the local store)."""
    try:
        doc = json.loads(read_small(os.path.join(spool, METADATA_FILE), MAX_STASIS_JSON))
    except (OSError, ValueError, NotRegular):
        return None
    return doc if isinstance(doc, dict) else None
