"""An in-memory store, a test double beside the store interface: checkpoints kept as
bytes, written and read through local directories like any other store's, so the
manifest, encryption and signatures behave as in ``runtime.store.local``.
"""

from __future__ import annotations

import builtins
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime import boundedjson
from runtime.errors import AlreadyExists, DataLoss, InvalidArgument, NotFound
from runtime.names import METADATA_FILE
from runtime.store.files import DirReader, StagingWriter, open_new, rmtree
from runtime.store.model import MANIFEST, CheckpointInfo, Manifest, check_name, ref

if TYPE_CHECKING:
    from runtime.store.crypt import Key
    from runtime.store.signing import Signing


@dataclass(frozen=True)
class _Stored:
    manifest: Manifest
    files: dict[str, bytes]
    signature: bytes | None = None


class MemoryStore:
    """Checkpoints kept as bytes in memory, for tests.

    Writers stage files in a private temporary directory (CRIU needs real
    paths); ``commit`` reads them into memory and deletes the directory.
    Readers get a private local copy, deleted by ``close``. ``key`` as for LocalStore.
    """

    def __init__(self, key: Key | None = None, signing: Signing | None = None) -> None:
        self.url = f"memory://{id(self):x}"
        self.key = key
        self.signing = signing
        self._lock = threading.Lock()
        self._checkpoints: dict[str, _Stored] = {}  # guarded by _lock

    def begin(self, name: str) -> _MemoryWriter:
        """Start writing ``name`` in a private temporary directory."""
        import tempfile

        check_name(name)
        with self._lock:
            if name in self._checkpoints:
                raise AlreadyExists(f"checkpoint {name} in {self.url} exists already")
        return _MemoryWriter(self, name, tempfile.mkdtemp(prefix=f"stasis-{name}-"))

    def _get(self, name: str) -> _Stored:
        check_name(name)
        with self._lock:
            stored = self._checkpoints.get(name)
        if stored is None:
            raise NotFound(f"checkpoint {name} in {self.url} does not exist")
        return stored

    def open(self, name: str) -> DirReader:
        """Open ``name`` through a private local copy of its files (``close`` deletes it)."""
        import tempfile

        stored = self._get(name)
        if self.signing is not None:
            self.signing.verify(
                stored.manifest.to_json(), stored.signature, f"checkpoint {name} in {self.url}"
            )
        sealer = stored.manifest.open_with(self.key, f"checkpoint {name} in {self.url}")
        copy = tempfile.mkdtemp(prefix=f"stasis-{name}-")
        try:
            for rel, data in [*stored.files.items(), (MANIFEST, stored.manifest.to_json())]:
                target = os.path.join(copy, rel)
                os.makedirs(os.path.dirname(target), 0o700, exist_ok=True)
                with open_new(target) as f:
                    f.write(data)
        except BaseException:
            rmtree(copy)
            raise
        return DirReader(name, copy, stored.manifest, self.url, lambda: rmtree(copy), sealer=sealer)

    def list(self) -> builtins.list[CheckpointInfo]:
        """The checkpoints, oldest first."""
        with self._lock:
            items = builtins.list(self._checkpoints.items())
        infos = []
        for name, stored in items:
            metadata = dict(stored.manifest.metadata)
            raw = stored.files.get(METADATA_FILE) if stored.manifest.encryption is None else None
            try:
                doc = boundedjson.loads(raw, METADATA_FILE) if raw is not None else None
            except DataLoss:
                doc = None
            if isinstance(doc, dict):
                metadata.update(doc)
            infos.append(
                CheckpointInfo(
                    name,
                    ref(self.url, name),
                    stored.manifest.created,
                    stored.manifest.size,
                    metadata,
                )
            )
        return sorted(infos, key=lambda i: (i.created, i.name))

    def remove(self, name: str) -> None:
        """Forget ``name``."""
        check_name(name)
        with self._lock:
            if self._checkpoints.pop(name, None) is None:
                raise NotFound(f"checkpoint {name} in {self.url} does not exist")

    def gc(self, grace_seconds: float) -> builtins.list[str]:
        """Nothing to collect: uncommitted writers never reach the store."""
        if grace_seconds < 0:
            raise InvalidArgument(f"gc grace period must be >= 0, not {grace_seconds}")
        return []

    def _add(self, name: str, stored: _Stored) -> None:
        with self._lock:
            if name in self._checkpoints:
                raise AlreadyExists(f"checkpoint {name} in {self.url} exists already")
            self._checkpoints[name] = stored


class _MemoryWriter(StagingWriter):
    _durable = False  # the staging directory is thrown away anyway

    def __init__(self, store: MemoryStore, name: str, staging: str) -> None:
        super().__init__(name, staging, store.url, store.key, store.signing)
        self._store = store

    def _publish(self, manifest: Manifest) -> None:
        files = {}
        for rel in manifest.files:
            with open(os.path.join(self._staging, rel), "rb") as f:
                files[rel] = f.read()
        self._store._add(self._name, _Stored(manifest, files, self._signature))
        rmtree(self._staging)
