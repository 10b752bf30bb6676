"""From what a user typed (a name, an absolute path, a ``file://`` or ``s3://`` URL) to
a store and a checkpoint name; ``resolve_source`` does it for a restore, only within the
stores restores may read. Every store built here signs and verifies.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import TYPE_CHECKING

from runtime.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
)

if TYPE_CHECKING:
    from runtime.config import Config
    from runtime.store.crypt import Key
    from runtime.store.signing import Signing

from runtime.store.api import Store
from runtime.store.local import Anchor, LocalStore
from runtime.store.model import NAME_PATTERN, NAME_RE

# --------------------------------------------------------------------------- resolving


def open_store(url: str, config: Config | None = None) -> Store:
    """The store at ``url``: ``file:///abs/dir`` or ``/abs/dir`` (made 0700 by the first
    write if missing; nothing is created or changed before), or ``s3://bucket/prefix``
    (credentials and endpoint from ``config.storage.s3``; without ``config``, from
    ``runtime.config.load()``)."""
    if url.startswith("s3://"):
        from runtime.store.s3 import S3Store  # boto3 is imported only for S3 stores

        if config is None:
            from runtime.config import load

            config = load()
        return S3Store(
            url,
            config.storage.s3,
            key_file=config.encryption.key_file,
            signing=signing_for(config),
        )
    path = _file_url_path(url) if url.startswith("file://") else url
    if path is not None and path.startswith("/"):
        return LocalStore(path, key=_key(config), signing=signing_for(config))
    raise InvalidArgument(
        f"{url!r} is not a store: give file:///absolute/path, /absolute/path or s3://bucket/prefix"
    )


def _key(config: Config | None) -> Key | None:
    """The configured encryption key (read and checked now), or None."""
    if config is None or config.encryption.key_file is None:
        return None
    from runtime.store.crypt import load_key

    return load_key(config.encryption.key_file)


def signing_for(config: Config | None) -> Signing:
    """The signing key and trusted keys ``config`` names (files are read when first used).

    Without a config, the one ``runtime.config.load()`` reads: a store built
    from the configuration always signs and verifies.
    """
    from runtime.store import signing

    if config is None:
        from runtime.config import load

        config = load()
    key_file = config.signing.key_file or signing.DEFAULT_KEY_FILE
    return signing.Signing(key_file, config.signing.trusted_keys)


def default_store(config: Config) -> Store:
    """The configured store (``config.storage.url``)."""
    return open_store(config.storage.url, config)


def _file_url_path(url: str) -> str | None:
    """The absolute path of a ``file://`` URL (``file://localhost/...`` too), else None."""
    path = _unquote(url[len("file://") :])
    if path.startswith("localhost/"):
        path = path[len("localhost") :]
    return path if path.startswith("/") else None


def resolve(ref: str, config: Config) -> tuple[Store, str]:
    """Turn a checkpoint reference into (store, name).

    ``ref`` is a checkpoint name in the configured store, an absolute path to
    a checkpoint directory (store = its parent, name = its basename), or
    ``file:///abs/path/name``, or ``s3://bucket/prefix/name`` (store =
    ``s3://bucket/prefix`` with ``config.storage.s3``); anything else is
    InvalidArgument.
    """
    if ref.startswith("s3://"):
        from runtime.store.s3 import S3Store  # boto3 only for S3 stores
        from runtime.store.s3layout import split_ref

        url, name = split_ref(ref)
        store = S3Store(
            url,
            config.storage.s3,
            key_file=config.encryption.key_file,
            signing=signing_for(config),
        )
        return store, name
    if ref.startswith("file://"):
        path = _file_url_path(ref)
        if path is None:
            raise InvalidArgument(f"{ref!r}: a file URL needs an absolute path (file:///dir/name)")
        return _by_path(path, ref, config)
    if ref.startswith("/"):
        return _by_path(ref, ref, config)
    if NAME_RE.fullmatch(ref):
        return open_store(config.storage.url, config), ref
    raise InvalidArgument(
        f"{ref!r} is not a checkpoint reference: give a name ({NAME_PATTERN}), "
        "an absolute path to a checkpoint directory, or file:///path/to/checkpoint"
    )


def resolve_source(ref: str, config: Config) -> tuple[Store, str]:
    """``resolve`` for a restore: the reference is checked and resolved in one step.

    A restore-from annotation comes from whoever may create pods, and the
    restore runs as root: ``ref`` must lie in the configured store or in
    ``storage.restore_sources`` (PermissionDenied naming it and the allowed
    stores otherwise). A path reference must begin with an allowed store's
    directory (as configured, or its realpath) and go on without ``..``; the
    store returned opens the rest beneath that directory through no symlink
    (``LocalStore``'s anchor), so what is read is what was checked. A name is
    opened in the configured store the same way.
    """
    sources = (config.storage.url, *config.storage.restore_sources)
    allowed = ", ".join(sources)
    outside = PermissionDenied(
        f"{ref!r} is outside the stores restores may read ({allowed}); "
        "add its store to storage.restore_sources in the Stasis config to allow it"
    )
    if NAME_RE.fullmatch(ref):
        return resolve(ref, config)  # a name in the configured store
    if ref.startswith("s3://"):
        target = ref.rstrip("/")
        if any(target.startswith(src.rstrip("/") + "/") for src in sources):
            return resolve(ref, config)
        raise outside
    path = _file_url_path(ref) if ref.startswith("file://") else ref
    if path is None or not path.startswith("/"):
        return resolve(ref, config)  # not a reference at all: resolve says why
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:  # refused, not normalized: the kernel would take it after a symlink
        raise PermissionDenied(
            f"{ref!r} has a '..' component: restores read only paths that go straight "
            f"down from the stores they may read (storage.url, storage.restore_sources: {allowed})"
        )
    candidates = []
    for src in sources:
        root = _file_url_path(src) if src.startswith("file://") else src
        if root is None or not root.startswith("/"):
            continue  # s3
        real = os.path.realpath(root)  # trusted configuration: its symlinks are the admin's
        for prefix in {os.path.normpath(root), real}:
            top = [p for p in prefix.split("/") if p]
            if len(parts) > len(top) and parts[: len(top)] == top:
                candidates.append((len(top), real, parts[len(top) :]))
    if not candidates:
        raise outside
    _, real, rest = max(candidates, key=lambda c: c[0])  # the most specific store
    name = rest[-1]
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"{ref!r}: {name!r} is not a valid checkpoint name")
    store = LocalStore(
        os.path.join(real, *rest[:-1]),
        create=False,
        key=_key(config),
        signing=signing_for(config),
        anchor=Anchor(real, allowed),
    )
    return store, name


def check_source(ref: str, config: Config) -> None:
    """Refuse (PermissionDenied) a restore reference outside the configured store and
    ``storage.restore_sources``, or reached through ``..`` or a symlink below them.

    Only a check: a restore uses ``resolve_source``, whose store opens the
    checkpoint through the very descriptors it checks.
    """
    store, name = resolve_source(ref, config)
    if isinstance(store, LocalStore):
        with contextlib.suppress(NotFound):
            os.close(store.open_dir(name))


def _by_path(path: str, ref: str, config: Config) -> tuple[Store, str]:
    parent, name = os.path.split(os.path.normpath(path))
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(f"{ref!r}: {name!r} is not a valid checkpoint name")
    return LocalStore(parent, create=False, key=_key(config), signing=signing_for(config)), name


def _unquote(s: str) -> str:
    """Percent-decode a URL path (urllib stays out of the shim's imports)."""
    if "%" not in s:
        return s
    raw = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), s.encode())
    return os.fsdecode(raw)
