"""The store interface: what every store (``runtime.store.local``, ``runtime.store.memory``,
``runtime.store.s3``) offers, as Protocols.

A checkpoint being written is invisible until ``commit`` returns; a committed one is
read through local paths, checked against its manifest by ``verify``.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Protocol

from runtime.capture.digest import KnownDigest
from runtime.store.model import CheckpointInfo, Manifest


class CheckpointWriter(Protocol):
    """A checkpoint being written; nothing is visible until ``commit`` returns.

    Use it as a context manager: leaving the block without ``commit`` (an
    exception included) aborts. Not safe for concurrent use from several threads.
    """

    @property
    def name(self) -> str:
        """The checkpoint's name."""
        ...

    def path(self, rel: str, *, directory: bool = False) -> str:
        """Local path for ``rel`` (parents created); with ``directory``, the directory itself."""
        ...

    def add_file(self, rel: str, src_path: str) -> None:
        """Copy the local file ``src_path`` into the checkpoint as ``rel``."""
        ...

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` into the checkpoint as ``rel``."""
        ...

    def commit(
        self,
        metadata: dict[str, Any] | None = None,
        known: Mapping[str, KnownDigest] | None = None,
    ) -> CheckpointInfo:
        """Digest every file, write the manifest last, and publish the checkpoint atomically.

        ``known``: digests taken while the files were written (by rel path);
        a store may use those whose file is unchanged instead of re-reading it.
        """
        ...

    def abort(self) -> None:
        """Throw the partial checkpoint away (idempotent; a no-op after commit)."""
        ...

    def __enter__(self) -> CheckpointWriter: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class CheckpointReader(Protocol):
    """A complete checkpoint, readable through local paths; ``close`` when done."""

    @property
    def name(self) -> str:
        """The checkpoint's name."""
        ...

    @property
    def path(self) -> str:
        """The local directory holding the checkpoint's files."""
        ...

    @property
    def manifest(self) -> Manifest:
        """The manifest read when the checkpoint was opened."""
        ...

    @property
    def metadata(self) -> dict[str, Any]:
        """Commit metadata updated with ``stasis.json``, as in CheckpointInfo."""
        ...

    @property
    def info(self) -> CheckpointInfo:
        """Name, creation time, size and metadata."""
        ...

    def verify(self, only: Callable[[str], bool] | None = None) -> None:
        """Check every file against the manifest; any difference raises DataLoss.

        With ``only``, just the files it selects are hashed (names, sizes and the
        manifest are always checked); a store may hash more than asked.
        """
        ...

    def file(self, rel: str) -> str:
        """Local path of the checkpoint file ``rel`` (InvalidArgument if it escapes)."""
        ...

    def close(self) -> None:
        """Release local copies (if the store made any)."""
        ...

    def __enter__(self) -> CheckpointReader: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Store(Protocol):
    """Where checkpoints live (local directory, memory, S3: ``runtime.store.s3``)."""

    @property
    def url(self) -> str:
        """The store's URL, without credentials (for messages)."""
        ...

    def begin(self, name: str) -> CheckpointWriter:
        """Start writing checkpoint ``name`` (AlreadyExists if a complete one has it)."""
        ...

    def open(self, name: str) -> CheckpointReader:
        """Open complete checkpoint ``name`` (NotFound if there is none)."""
        ...

    def list(self) -> builtins.list[CheckpointInfo]:
        """The complete checkpoints, oldest first."""
        ...

    def remove(self, name: str) -> None:
        """Delete checkpoint ``name`` (NotFound if there is none)."""
        ...

    def gc(self, grace_seconds: float) -> builtins.list[str]:
        """Delete partial leftovers older than ``grace_seconds``; returns what was removed."""
        ...
