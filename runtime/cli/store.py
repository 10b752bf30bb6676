"""The stasis commands on stored checkpoints: list, inspect, rm, trust, export,
import, gc, push, and keygen for the keys that sign and encrypt them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from runtime import config
from runtime.cli.common import progress
from runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from runtime.names import SPOOL_PENDING
from runtime.store.archive import export_tar, import_tar
from runtime.store.crypt import write_key_file
from runtime.store.local import LocalStore
from runtime.store.resolve import default_store, open_store, resolve, signing_for
from runtime.store.signing import PUBLIC_SUFFIX, key_id, write_private


def open_checkpoint(ref: str) -> Any:
    """The checkpoint's reader: a context manager that closes it (an S3 reader's
    local copies go)."""
    store, name = resolve(ref, config.load())
    return store.open(name)


def remove_checkpoint(ref: str) -> None:
    """Remove a checkpoint, which must be one of its store's complete checkpoints (a
    path to any other directory is refused); an unsigned or untrusted one too."""
    store, name = resolve(ref, config.load())
    if name not in {info.name for info in store.list()}:
        raise NotFound(f"{ref!r} is not a complete checkpoint of {store.url}")
    store.remove(name)


def list_command(ns: argparse.Namespace) -> int:
    cfg = config.load()
    store = open_store(ns.store, cfg) if ns.store else default_store(cfg)
    infos = store.list()
    if ns.json:
        print(json.dumps([_public(vars(i)) for i in infos], indent=1, default=str))
    else:
        for i in infos:
            print(f"{i.name}\t{i.size}\t{i.created}")
    return 0


def _public(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if not k.startswith("_")}


def inspect(ns: argparse.Namespace) -> int:
    with open_checkpoint(ns.ref) as reader:
        if not ns.json:
            print(json.dumps(reader.metadata, indent=1))
            return 0
        manifest = json.loads(reader.manifest.to_json())
        data = {"name": reader.name, "ref": reader.info.ref, "manifest": manifest}
        if not reader.info.ref.startswith("s3://"):
            data["path"] = reader.path  # an S3 reader's path is a temporary copy
        print(json.dumps(data, indent=1))
    return 0


def remove_command(ns: argparse.Namespace) -> int:
    remove_checkpoint(ns.ref)
    return 0


def trust(ns: argparse.Namespace) -> int:
    """Sign a checkpoint of a local store that this node's key did not sign."""
    store, name = resolve(ns.ref, config.load())
    if not isinstance(store, LocalStore):
        raise InvalidArgument(
            f"{ns.ref!r}: only checkpoints of local stores are signed in place; for another "
            "store, `stasis export` it where it is trusted and `stasis import --trust` it here"
        )
    store.vouch(name)
    print(f"{ns.ref}: signed by this node")
    return 0


def export(ns: argparse.Namespace) -> int:
    cfg = config.load()
    with open_checkpoint(ns.ref) as reader:
        export_tar(reader, ns.file, signing_for(cfg))
    return 0


def import_command(ns: argparse.Namespace) -> int:
    # --trust's warning goes to the log and, as one line, to stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("stasis: %(message)s"))
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("stasis.store")
    logger.addHandler(handler)
    try:
        cfg = config.load()
        store = default_store(cfg)
        name = ns.name or os.path.basename(ns.file).removesuffix(".tar")
        print(import_tar(store, ns.file, name, cfg.limits, trust=ns.trust).name)
    finally:
        logger.removeHandler(handler)
    return 0


def gc_command(ns: argparse.Namespace) -> int:
    removed = gc(ns.store, ns.grace)
    if ns.json:
        print(json.dumps(removed, indent=1))
    else:
        for ref in removed:
            print(ref)
    return 0


def gc(url: str, grace: float) -> list[str]:
    """Remove a store's leftovers older than ``grace``; returns them as references."""
    cfg = config.load()
    store = open_store(url, cfg) if url else default_store(cfg)
    progress(f"collecting leftovers in {store.url} older than {grace:g} s ...")
    base = store.url.rstrip("/")
    removed = [f"{base}/{item}" for item in store.gc(grace)]
    if store.url.startswith("s3://"):
        from runtime.store.s3 import S3Store  # boto3: only for S3 stores

        assert isinstance(store, S3Store)
        removed += [f"file://{path}" for path in store.gc_spools(grace)]
    return removed


def push_command(ns: argparse.Namespace) -> int:
    out = push(ns.spool, ns.to, ns.name)
    print(json.dumps(out) if ns.json else out["ref"])
    return 0


def push(spool: str, to: str, name: str | None) -> dict[str, Any]:
    """Upload a spool that a failed S3 upload kept (the spool goes once it is uploaded)."""
    from runtime.store.s3 import S3Store  # boto3: only for S3 stores

    cfg = config.load()
    spool = os.path.abspath(spool)
    url = to or _spool_url(spool) or cfg.storage.url
    if not url.startswith("s3://"):
        where = "--to" if to else "the configured store (storage.url)"
        raise FailedPrecondition(
            f"push uploads a kept spool to an S3 store: {where} is {url}, give --to s3://..."
        )
    if not os.path.isdir(spool):
        raise FailedPrecondition(f"spool {spool} does not exist (or is not a directory)")
    if not os.path.lexists(os.path.join(spool, SPOOL_PENDING)):
        # Its writer died before commit (during the CRIU dump, say): the files may be
        # incomplete, and a manifest over them would make them look restorable.
        raise FailedPrecondition(
            f"spool {spool} was never committed (no {SPOOL_PENDING}): its checkpoint may be "
            "incomplete; not uploading it"
        )
    store = open_store(url, cfg)
    assert isinstance(store, S3Store)
    progress(f"uploading {spool} to {store.url} ...")
    info = store.push(spool, name or None)
    return {"ref": info.ref, "name": info.name, "size": info.size}


def _spool_url(spool: str) -> str:
    """The store a committed spool was meant for ("" if it does not say)."""
    try:
        with open(os.path.join(spool, SPOOL_PENDING), "rb") as f:
            doc = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return ""
    url = doc.get("url") if isinstance(doc, dict) else None
    return url if isinstance(url, str) and url.startswith("s3://") else ""


def keygen(ns: argparse.Namespace) -> int:
    if ns.signing:
        kid = key_id(write_private(ns.file).public_key())
        pub = ns.file + PUBLIC_SUFFIX
        progress(f"wrote {ns.file} and {pub}: set signing.key_file to it (key id {kid})")
        print(kid)
    else:
        key = write_key_file(ns.file)
        progress(f"wrote {ns.file}: set encryption.key_file to it (key id {key.id})")
        print(key.id)
    return 0
