"""Edits checkpoints as someone who can write the store would: files replaced and
the manifest made to agree. ``resign`` then plays a holder of a trusted key (or a
``stasis import --trust``): the signature is what stops anyone else, so tests of
the checks behind it need it out of the way."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def rehash(ckpt: Path, rel: str) -> None:
    """Record ``rel`` as it now is in the manifest."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / rel).read_bytes()
    manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def rewrite(ckpt: Path, rel: str, data: bytes, *, sign: bool = True) -> None:
    """Replace ``rel`` with ``data`` and make the manifest (and, with ``sign``, its
    signature) agree."""
    (ckpt / rel).write_bytes(data)
    rehash(ckpt, rel)
    if sign:
        resign(ckpt)


def edit_metadata(ckpt: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Edit ``stasis.json`` and the manifest's copy of it, then re-sign."""
    meta = json.loads((ckpt / "stasis.json").read_text())
    change(meta)
    (ckpt / "stasis.json").write_text(json.dumps(meta, indent=1))
    rehash(ckpt, "stasis.json")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    change(manifest["metadata"])
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    resign(ckpt)


def resign(ckpt: Path) -> None:
    """Sign the manifest as it now is with the test session's (trusted) key."""
    from runtime.store.signing import Signing

    key = os.environ["STASIS_TEST_SIGNING_KEY"]
    sig = Signing(key).sign((ckpt / "manifest.json").read_bytes())
    (ckpt / "manifest.sig").write_bytes(sig)
