"""The local store: checkpoints as directories under a root, on any POSIX filesystem
(a NAS mount included).

A writer stages into a hidden ``<root>/.partial-<name>-<random>/`` directory, fsyncs
every file and directory, writes the manifest, and renames the directory to
``<root>/<name>`` in one step; ``gc`` removes what crashed writers left. A store
given a ``Signing`` writes ``manifest.sig`` before the manifest, and ``open`` refuses
a checkpoint whose signature does not verify. A checkpoint is opened once, through no
symlink below its store, and read through that descriptor.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from runtime.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StasisError,
    Unavailable,
)
from runtime.linux import fsresolve
from runtime.store.files import (
    DirReader,
    NotRegular,
    StagingWriter,
    fsync_dir,
    is_locked,
    new_token,
    newest_mtime,
    read_small,
    rmtree,
    stasis_json,
    storage_error,
)
from runtime.store.model import (
    MANIFEST,
    MANIFEST_SIG,
    MAX_SMALL_JSON,
    NAME_RE,
    SIG_MAX,
    CheckpointInfo,
    Manifest,
    check_name,
    ref,
)

if TYPE_CHECKING:
    from runtime.store.crypt import Key
    from runtime.store.signing import Signing


PARTIAL_PREFIX = ".partial-"

log = logging.getLogger("stasis.store")


def _skipped(name: str, url: str, e: StasisError) -> None:
    """``list`` leaves out a broken checkpoint and says so (on stderr, for the CLI)."""
    log.warning("stasis: warning: %s: skipping checkpoint %s: %s", url, name, e)


@dataclass(frozen=True)
class Anchor:
    """Where a store named by a restore reference must be reached from."""

    root: str  # an allowed store's directory, realpath'd (trusted configuration)
    allowed: str  # the allowed stores, for messages


class LocalStore:
    """Checkpoints as directories under ``root``, on any POSIX filesystem (a NAS mount too).

    With ``create`` (the default, for Stasis's own store), ``begin`` creates a
    missing root 0700; ``resolve`` passes ``create=False`` for a directory a
    user named. Nothing is created or changed before a write, and Stasis sets
    the mode only of a directory it has just made itself: never one that
    exists (think ``stasis list --store /tmp``), never through a symlink.
    Checkpoint directories are 0700 and their files 0600 either way.

    A checkpoint is opened once, through no symlink below the root (a name that
    is a symlink in the store is refused, PermissionDenied), and read through
    that descriptor (``DirReader``). The root itself may be reached through
    symlinks: it is trusted configuration, or a path a user typed. With
    ``anchor`` (``resolve_source``), the root is opened beneath an allowed
    store's directory through no symlink as well.

    With ``key`` (``runtime.store.crypt``), new checkpoints are encrypted and
    encrypted ones can be opened (decrypted copies go under ``cache_dir``);
    without, encrypted checkpoints are listed but not opened.
    """

    def __init__(
        self,
        root: str,
        *,
        create: bool = True,
        key: Key | None = None,
        cache_dir: str | None = None,
        signing: Signing | None = None,
        anchor: Anchor | None = None,
    ) -> None:
        self.root = os.path.abspath(root)
        self.url = "file://" + self.root
        self.key = key
        self.cache_dir = cache_dir
        self.signing = signing
        self._anchor = anchor
        self._create = create

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def _prepare(self) -> None:
        """Create the root 0700 if it is missing (before a write); leave an existing one
        as it is."""
        parent = os.path.dirname(self.root)
        try:
            os.makedirs(parent, exist_ok=True)
            try:
                os.mkdir(self.root, 0o700)
            except FileExistsError:
                pass
            else:
                # Ours: 0700 whatever the umask, through a descriptor of what
                # mkdir made (O_NOFOLLOW: never a symlink put in its place).
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fchmod(fd, 0o700)
                finally:
                    os.close(fd)
            if not os.path.isdir(self.root):
                raise Unavailable(f"storage {self.url}: not a directory")
        except OSError as e:
            raise storage_error(e, "creating the store directory (0700)", self.url) from e

    def _dir(self, name: str) -> str:
        return os.path.join(self.root, check_name(name))

    def _root_fd(self) -> int:
        """An ``O_PATH`` descriptor of the root; OSError as opening says."""
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        if self._anchor is None:
            return os.open(self.root, flags)
        top = os.open(self._anchor.root, flags)
        rel = os.path.relpath(self.root, self._anchor.root)
        if rel == ".":
            return top
        try:
            return fsresolve.open_beneath(top, rel, flags)
        finally:
            os.close(top)

    def open_dir(self, name: str) -> int:
        """A descriptor of checkpoint directory ``name``, reached through no symlink.

        NotFound if it is missing; PermissionDenied if a symlink (or ``..``) is
        on the way from the root (from the anchor, with one).
        """
        check_name(name)
        where = f"checkpoint {name} in {self.url}"
        try:
            root = self._root_fd()
            try:
                return fsresolve.open_beneath(root, name, os.O_RDONLY | os.O_DIRECTORY)
            finally:
                os.close(root)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{where} does not exist") from None
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.EXDEV):
                raise storage_error(e, f"opening {where}", self.url) from e
            if self._anchor is None:
                raise PermissionDenied(
                    f"{where} is a symlink: a checkpoint is read only from a real "
                    "directory of its store"
                ) from e
            raise PermissionDenied(
                f"{where}: a symlink is on the way to it from {self._anchor.root}; restores "
                "read only real directories of the stores they may read "
                f"(storage.url, storage.restore_sources: {self._anchor.allowed})"
            ) from e

    def _load_at(self, dir_fd: int, name: str, *, check: bool = False) -> Manifest:
        """The manifest in checkpoint directory ``dir_fd``: NotFound, or DataLoss if
        malformed; with ``check`` and a ``signing``, the bytes parsed are the ones whose
        ``manifest.sig`` was verified (PermissionDenied / DataLoss else)."""
        where = f"checkpoint {name} in {self.url}"
        try:
            data = read_small(MANIFEST, dir_fd=dir_fd)
        except FileNotFoundError:
            raise NotFound(f"{where} does not exist") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise DataLoss(f"{where}: {MANIFEST} is a symlink") from e
            raise storage_error(e, f"reading {where}", self.url) from e
        except (ValueError, NotRegular) as e:
            raise DataLoss(
                f"{where}: {MANIFEST} is not a regular file of at most {MAX_SMALL_JSON} bytes"
            ) from e
        manifest = Manifest.parse(data, where)
        if check and self.signing is not None:
            try:
                sig: bytes | None = read_small(MANIFEST_SIG, SIG_MAX, dir_fd=dir_fd)
            except FileNotFoundError:
                sig = None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise DataLoss(f"{where}: {MANIFEST_SIG} is a symlink") from e
                raise storage_error(e, f"reading {where}", self.url) from e
            except (ValueError, NotRegular) as e:
                raise DataLoss(f"{where}: {MANIFEST_SIG} is not a small regular file") from e
            self.signing.verify(data, sig, where)
        return manifest

    def _load(self, name: str) -> Manifest:
        """The manifest of complete checkpoint ``name``: NotFound, PermissionDenied (a
        symlink), or DataLoss if malformed."""
        fd = self.open_dir(name)
        try:
            return self._load_at(fd, name)
        finally:
            os.close(fd)

    def _complete(self, name: str) -> bool:
        try:
            self._load(name)
        except (NotFound, DataLoss, PermissionDenied):
            return False  # a symlink under the name is no checkpoint either
        return True

    def begin(self, name: str) -> _LocalWriter:
        """Start writing ``name`` in ``<root>/.partial-<name>-<random>/``."""
        check_name(name)
        if self._create:
            self._prepare()
        if self._complete(name):
            raise AlreadyExists(f"checkpoint {name} in {self.url} exists already")
        staging = os.path.join(self.root, f"{PARTIAL_PREFIX}{name}-{new_token()}")
        try:
            os.mkdir(staging, 0o700)
        except FileNotFoundError:
            raise NotFound(f"storage {self.url} does not exist") from None
        except OSError as e:
            raise storage_error(e, f"starting checkpoint {name}", self.url) from e
        try:
            os.chmod(staging, 0o700)
            lock = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            rmtree(staging)
            raise storage_error(e, f"starting checkpoint {name}", self.url) from e
        # gc skips directories whose lock is held; where flock is not supported
        # (some network filesystems) the grace period alone protects the writer.
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return _LocalWriter(self, name, staging, lock)

    def open(self, name: str) -> DirReader:
        """Open complete checkpoint ``name`` in place (an encrypted one: authenticated;
        with ``signing``, its signature verified).

        The reader reads through the directory descriptor checked here; its
        ``path`` is the kernel's name for that directory (no symlink in it).
        """
        fd = self.open_dir(name)
        try:
            manifest = self._load_at(fd, name, check=True)
            sealer = manifest.open_with(self.key, f"checkpoint {name} in {self.url}")
            try:
                path = fsresolve.fd_path(fd)
            except OSError as e:
                raise storage_error(e, f"opening checkpoint {name}", self.url) from e
            return DirReader(
                name, path, manifest, self.url, sealer=sealer, cache_dir=self.cache_dir, dir_fd=fd
            )
        except BaseException:
            os.close(fd)
            raise

    def vouch(self, name: str) -> None:
        """Sign complete checkpoint ``name`` with this store's key on the caller's word:
        one its key did not sign (written before checkpoints were signed, or by an
        untrusted node). Every file is first checked against the manifest (DataLoss
        otherwise), and the signature covers those very manifest bytes."""
        if self.signing is None:
            raise FailedPrecondition(f"{self.url}: this store has no signing key to vouch with")
        where = f"checkpoint {name} in {self.url}"
        fd = self.open_dir(name)
        try:
            data = read_small(MANIFEST, dir_fd=fd)
            manifest = Manifest.parse(data, where)
            reader = DirReader(
                name, fsresolve.fd_path(fd), manifest, self.url, cache_dir=self.cache_dir,
                dir_fd=os.dup(fd),
            )  # fmt: skip
            with reader:
                reader.verify()
            sig = self.signing.sign(data)
            tmp = f".{MANIFEST_SIG}.{new_token()}"
            out = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=fd
            )
            with open(out, "wb") as f:
                f.write(sig)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, MANIFEST_SIG, src_dir_fd=fd, dst_dir_fd=fd)
            with contextlib.suppress(OSError):
                os.fsync(fd)
        except OSError as e:
            raise storage_error(e, f"signing {where}", self.url) from e
        finally:
            os.close(fd)
        log.warning("checkpoint %s in %s signed by this node on the user's word", name, self.url)

    def list(self) -> builtins.list[CheckpointInfo]:
        """The complete checkpoints (valid manifest), oldest first; partials are never listed."""
        try:
            with os.scandir(self.root) as it:
                names = sorted(
                    e.name
                    for e in it
                    if NAME_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
                )
        except FileNotFoundError:
            return []
        except OSError as e:
            raise storage_error(e, "listing checkpoints", self.url) from e
        infos = []
        for name in names:
            try:
                fd = self.open_dir(name)
            except NotFound:
                continue  # removed meanwhile
            except StasisError as e:  # a symlink under the name, say
                _skipped(name, self.url, e)
                continue
            try:
                manifest = self._load_at(fd, name)
                metadata = stasis_json(self._dir(name), manifest, dir_fd=fd)
            except NotFound:
                continue  # removed meanwhile
            except StasisError as e:
                _skipped(name, self.url, e)
                continue
            finally:
                os.close(fd)
            infos.append(
                CheckpointInfo(name, ref(self.url, name), manifest.created, manifest.size, metadata)
            )
        return sorted(infos, key=lambda i: (i.created, i.name))

    def remove(self, name: str) -> None:
        """Delete ``name``: renamed out of sight first, so it vanishes in one step.

        A directory of that name without a valid manifest is removed too.
        """
        target = self._dir(name)
        if not os.path.lexists(target):
            raise NotFound(f"checkpoint {name} in {self.url} does not exist")
        aside = os.path.join(self.root, f"{PARTIAL_PREFIX}{name}-removed-{new_token()}")
        try:
            os.rename(target, aside)
            fsync_dir(self.root)
        except FileNotFoundError:
            raise NotFound(f"checkpoint {name} in {self.url} does not exist") from None
        except OSError as e:
            raise storage_error(e, f"removing checkpoint {name}", self.url) from e
        rmtree(aside)  # what survives is a partial leftover for gc

    def gc(self, grace_seconds: float) -> builtins.list[str]:
        """Remove ``.partial-*`` leftovers untouched for ``grace_seconds``; returns their names.

        A partial directory whose writer still holds its lock is kept whatever
        its age; the newest mtime anywhere inside counts, so a long CRIU dump
        that keeps writing is not collected.
        """
        if grace_seconds < 0:
            raise InvalidArgument(f"gc grace period must be >= 0, not {grace_seconds}")
        deadline = time.time() - grace_seconds
        try:
            with os.scandir(self.root) as it:
                leftovers = sorted(e.path for e in it if e.name.startswith(PARTIAL_PREFIX))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise storage_error(e, "collecting partial checkpoints", self.url) from e
        removed = []
        for path in leftovers:
            if is_locked(path) or newest_mtime(path) > deadline:
                continue
            rmtree(path)
            if not os.path.lexists(path):
                removed.append(os.path.basename(path))
        return removed


class _LocalWriter(StagingWriter):
    """Writes ``<root>/.partial-<name>-<random>/`` and renames it to ``<root>/<name>``."""

    def __init__(self, store: LocalStore, name: str, staging: str, lock: int) -> None:
        super().__init__(name, staging, store.url, store.key, store.signing)
        self._store = store
        self._lock: int | None = lock  # flock held while writing; gc skips locked partials

    def _publish(self, manifest: Manifest) -> None:
        root = self._store.root
        target = os.path.join(root, self._name)
        try:
            os.rename(self._staging, target)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            if self._store._complete(self._name):
                raise AlreadyExists(
                    f"checkpoint {self._name} in {self._store.url} exists already"
                ) from e
            # Something incomplete holds the name (it "does not exist"): move it
            # aside for gc and take the name.
            os.rename(
                target, os.path.join(root, f"{PARTIAL_PREFIX}{self._name}-stale-{new_token()}")
            )
            os.rename(self._staging, target)
        # Published. Should the fsync below fail, commit's abort removes the
        # checkpoint again: a commit that raised leaves nothing behind.
        self._staging = target
        fsync_dir(root)

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            os.close(lock)
