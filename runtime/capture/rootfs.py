"""A container's filesystem changes, read from its overlay upperdir and written back
into one, in the files Podman, CRI-O and the Kubernetes checkpoint archive use.

:func:`capture` walks only the upperdir (its cost is the size of the change) and
writes ``rootfs-diff.tar`` (PAX, relative names, numeric owners, nanosecond mtimes,
xattrs as ``SCHILY.xattr.*``) and ``deleted.files`` (a JSON array of absolute paths:
whiteouts, and opaque directories, which are in the tar too). It refuses overlays
that keep data outside the upperdir (``metacopy``, ``redirect_dir``) rather than
write an incomplete diff; SELinux labels and overlay's own xattrs are never carried.

:func:`apply` writes such a pair into a new container's upperdir before its overlay
is mounted, treating it as hostile: every path is resolved one component at a time
from a directory descriptor with ``O_NOFOLLOW``, and anything that would reach
outside the upperdir is refused with InvalidArgument naming the entry.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import re
import stat
import sys
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO

from runtime.budget import Budget
from runtime.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    StasisError,
    Unavailable,
)

TAR_NAME = "rootfs-diff.tar"
"""The conventional name of the tar of added and modified files in a checkpoint."""

DELETED_NAME = "deleted.files"
"""The conventional name of the JSON list of deleted paths in a checkpoint."""

_NS = 1_000_000_000
_CHUNK = 1 << 20
_XATTR_PAX = "SCHILY.xattr."
# Overlay's own metadata: trusted.overlay.* normally, user.overlay.* with userxattr.
_OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")
_WHITEOUT_XATTRS = ("trusted.overlay.whiteout", "user.overlay.whiteout")
_OUTSIDE_UPPER_XATTRS = {
    "trusted.overlay.metacopy": "metacopy=on",
    "user.overlay.metacopy": "metacopy=on",
    "trusted.overlay.redirect": "redirect_dir=on",
    "user.overlay.redirect": "redirect_dir=on",
}
_NOT_CARRIED_XATTRS = frozenset({"security.selinux"})
_OPAQUE = "trusted.overlay.opaque"
_CAPABILITY = "security.capability"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_CACHE = 64
# deleted.files is untrusted: one path (JSON-escaped) may be at most this long
# (PATH_MAX is 4096), and the list at most this many paths.
_MAX_DELETED_ENTRY = 32 << 10
_MAX_DELETED = 1 << 19


@dataclass(frozen=True)
class DiffStats:
    """What a capture wrote or an apply created.

    ``files`` counts every non-directory, non-symlink entry (regular files,
    hardlinks, fifos, device nodes); ``bytes`` is the regular file data.
    """

    files: int
    dirs: int
    symlinks: int
    deleted: int
    bytes: int


@dataclass
class _Counts:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    deleted: int = 0
    bytes: int = 0

    def frozen(self) -> DiffStats:
        return DiffStats(self.files, self.dirs, self.symlinks, self.deleted, self.bytes)


def upperdir_of(mount_options: Sequence[str]) -> str | None:
    """The ``upperdir=`` of overlay mount options, or None (a read-only or non-overlay mount).

    As with the kernel's option parser, a later ``upperdir=`` overrides an earlier one.
    """
    upper: str | None = None
    for opt in mount_options:
        if opt.startswith("upperdir="):
            upper = opt.removeprefix("upperdir=")
    return upper or None


# --------------------------------------------------------------------------- capture


def capture(upperdir: str, tar_path: str, deleted_path: str, *, durable: bool = True) -> DiffStats:
    """Write the changes held in an overlay ``upperdir`` to ``tar_path`` and ``deleted_path``.

    Walks only the upperdir (never the image layers). Both files are written
    atomically (temporary file, fsync, rename, fsync of the directory; no fsync
    unless ``durable``: a checkpoint's writer, which fsyncs every file at its
    commit, asks for none inside the container's frozen time). Run it while the container
    cannot write (stopped, paused or frozen): a file that changes underneath
    raises :class:`FailedPrecondition`, as does an upperdir made with
    ``metacopy=on`` or ``redirect_dir=on``, whose data partly lives below it.
    """
    try:
        root_fd = os.open(upperdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise FailedPrecondition(f"capture: upperdir {upperdir} is not a directory") from e
    except OSError as e:
        raise _os_error(f"capture: open upperdir {upperdir}", e) from e
    try:
        walker = _Capture(root_fd, upperdir)
        try:
            with (
                _atomic(tar_path, durable) as out,
                tarfile.TarFile(
                    fileobj=out,
                    mode="w",
                    format=tarfile.PAX_FORMAT,
                    encoding="utf-8",
                    errors="surrogateescape",
                    copybufsize=_CHUNK,
                ) as tar,
            ):
                walker.run(tar)
            with _atomic(deleted_path, durable) as out:
                out.write(json.dumps(sorted(walker.deleted)).encode())
        except OSError as e:
            raise _os_error(f"capture {upperdir} to {tar_path}", e) from e
        walker.counts.deleted = len(walker.deleted)
        return walker.counts.frozen()
    finally:
        os.close(root_fd)


@dataclass
class _Dir:
    fd: int
    rel: str  # "" for the root, else "a/b/"
    names: list[str]
    xwhiteouts: bool  # opaque "x": children may be whiteouts marked by an xattr
    index: int = 0


@dataclass
class _Capture:
    root_fd: int
    upperdir: str
    deleted: list[str] = field(default_factory=list)
    counts: _Counts = field(default_factory=_Counts)
    links: dict[tuple[int, int], str] = field(default_factory=dict)

    def run(self, tar: tarfile.TarFile) -> None:
        stack = [_Dir(self.root_fd, "", sorted(os.listdir(self.root_fd)), False)]
        try:
            while stack:
                top = stack[-1]
                if top.index == len(top.names):
                    stack.pop()
                    if top.fd != self.root_fd:
                        os.close(top.fd)
                    continue
                name = top.names[top.index]
                top.index += 1
                try:
                    child = self.entry(tar, top, name)
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        raise FailedPrecondition(
                            f"capture {self.upperdir}: {top.rel + name} changed while "
                            f"capturing ({e.strerror}); stop or freeze the container first"
                        ) from e
                    raise
                if child is not None:
                    stack.append(child)
        finally:
            for d in stack:
                if d.fd != self.root_fd:
                    os.close(d.fd)

    def entry(self, tar: tarfile.TarFile, parent: _Dir, name: str) -> _Dir | None:
        """Adds one upperdir entry to the tar (or to ``deleted``); a directory is returned."""
        rel = parent.rel + name
        st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        mode = st.st_mode
        if stat.S_ISCHR(mode) and st.st_rdev == 0:
            self.deleted.append("/" + rel)  # a whiteout
            return None
        if stat.S_ISSOCK(mode):
            return None  # a socket is bound by a process; restore recreates it
        if stat.S_ISDIR(mode):
            return self.directory(tar, parent, name, rel)
        if stat.S_ISREG(mode):
            self.regular(tar, parent, name, rel)
            return None

        xattrs = self.xattrs(f"/proc/self/fd/{parent.fd}/{name}", rel, follow=False)
        info = self.info(rel, st, xattrs)
        if self.hardlink(info, st):
            pass
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(name, dir_fd=parent.fd)
            self.counts.symlinks += 1
        else:
            if stat.S_ISFIFO(mode):
                info.type = tarfile.FIFOTYPE
            elif stat.S_ISCHR(mode):
                info.type = tarfile.CHRTYPE
            elif stat.S_ISBLK(mode):
                info.type = tarfile.BLKTYPE
            else:
                raise FailedPrecondition(f"capture {self.upperdir}: {rel}: unknown file type")
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            self.counts.files += 1
        tar.addfile(info)
        return None

    def directory(self, tar: tarfile.TarFile, parent: _Dir, name: str, rel: str) -> _Dir:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
            xattrs = self.xattrs(fd, rel, follow=True)
            opaque = _overlay_attr(xattrs, _OPAQUE_XATTRS)
            if opaque == b"y":
                self.deleted.append("/" + rel)  # its lower content is gone
            info = self.info(rel, st, xattrs)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            self.counts.dirs += 1
            return _Dir(fd, rel + "/", sorted(os.listdir(fd)), opaque == b"x")
        except BaseException:
            os.close(fd)
            raise

    def regular(self, tar: tarfile.TarFile, parent: _Dir, name: str, rel: str) -> None:
        # O_NONBLOCK: should the name have become a fifo since the stat, do not hang on it.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=parent.fd)
        with open(fd, "rb", buffering=_CHUNK) as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FailedPrecondition(
                    f"capture {self.upperdir}: {rel} changed type while capturing; "
                    "stop or freeze the container first"
                )
            xattrs = self.xattrs(fd, rel, follow=True)
            if parent.xwhiteouts and _overlay_attr(xattrs, _WHITEOUT_XATTRS) is not None:
                self.deleted.append("/" + rel)
                return
            info = self.info(rel, st, xattrs)
            if self.hardlink(info, st):
                tar.addfile(info)
                return
            info.size = st.st_size
            try:
                tar.addfile(info, f)
            except OSError as e:
                if e.errno is None:  # tarfile: "unexpected end of data"
                    raise FailedPrecondition(
                        f"capture {self.upperdir}: {rel} shrank while capturing; "
                        "stop or freeze the container first"
                    ) from e
                raise
            self.counts.files += 1
            self.counts.bytes += st.st_size

    def hardlink(self, info: tarfile.TarInfo, st: os.stat_result) -> bool:
        """Turns ``info`` into a hardlink to an earlier name of the same inode, if any."""
        if st.st_nlink < 2:
            return False
        key = (st.st_dev, st.st_ino)
        first = self.links.setdefault(key, info.name)
        if first == info.name:
            return False
        info.type = tarfile.LNKTYPE
        info.linkname = first
        self.counts.files += 1
        return True

    def xattrs(self, target: int | str, rel: str, *, follow: bool) -> dict[str, bytes]:
        """The entry's extended attributes, overlay's own and SELinux labels included.

        ``target`` is a descriptor or a /proc/self/fd path (read without following).
        """
        try:
            names = os.listxattr(target, follow_symlinks=follow)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return {}
            raise
        out: dict[str, bytes] = {}
        for n in names:
            try:
                out[n] = os.getxattr(target, n, follow_symlinks=follow)
            except OSError as e:
                if e.errno == errno.ENODATA:  # removed meanwhile
                    continue
                raise
            if n in _OUTSIDE_UPPER_XATTRS:
                raise FailedPrecondition(
                    f"capture {self.upperdir}: {rel} has {n}: the overlay was mounted with "
                    f"{_OUTSIDE_UPPER_XATTRS[n]}, so part of its data is outside the upperdir"
                )
        return out

    def info(self, rel: str, st: os.stat_result, xattrs: dict[str, bytes]) -> tarfile.TarInfo:
        info = tarfile.TarInfo(rel)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""  # numeric owners: host names mean nothing in the container
        pax: dict[str, str] = {}
        sec, ns = divmod(st.st_mtime_ns, _NS)
        info.mtime = sec
        if ns or sec < 0:
            pax["mtime"] = _format_ns(st.st_mtime_ns)
        for n, v in xattrs.items():
            if n.startswith(_OVERLAY_XATTRS) or n in _NOT_CARRIED_XATTRS:
                continue
            try:
                n.encode("utf-8")
            except UnicodeEncodeError as e:
                raise FailedPrecondition(
                    f"capture {self.upperdir}: {rel}: xattr name {n!r} is not UTF-8"
                ) from e
            # Binary values survive: tarfile writes them raw under hdrcharset=BINARY.
            pax[_XATTR_PAX + n] = v.decode("utf-8", "surrogateescape")
        info.pax_headers = pax
        return info


def _overlay_attr(xattrs: dict[str, bytes], names: Sequence[str]) -> bytes | None:
    for n in names:
        if n in xattrs:
            return xattrs[n]
    return None


def _format_ns(total_ns: int) -> str:
    sign = "-" if total_ns < 0 else ""
    sec, ns = divmod(abs(total_ns), _NS)
    return f"{sign}{sec}.{ns:09d}"


def _parse_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime in nanoseconds, exactly when a pax record carries it."""
    text = member.pax_headers.get("mtime")
    if text:
        sign = -1 if text.startswith("-") else 1
        whole, _, frac = text.lstrip("+-").partition(".")
        if whole.isdigit() and (not frac or frac.isdigit()):
            return sign * (int(whole) * _NS + int((frac + "000000000")[:9]))
    return int(member.mtime * _NS)


@contextlib.contextmanager
def _atomic(path: str, durable: bool = True) -> Iterator[IO[bytes]]:
    """A file that appears at ``path`` complete (fsynced if ``durable``, renamed) or
    not at all."""
    import tempfile

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with open(fd, "wb", buffering=_CHUNK) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _os_error(what: str, e: OSError) -> StasisError:
    msg = f"{what}: {e.strerror or e}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(msg)
    if e.errno in (errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EINVAL):
        return InvalidArgument(msg)
    return Unavailable(msg)


# --------------------------------------------------------------------------- apply


def apply(
    tar_path: str,
    deleted_path: str,
    upperdir: str,
    *,
    allow_devices: bool = True,
    allow_setuid: bool = True,
    max_bytes: int | None = None,
    reserve_bytes: int = 0,
) -> DiffStats:
    """Write a captured diff into the fresh ``upperdir`` of a new container, before mounting it.

    The tar is extracted first (modes, numeric owners, nanosecond mtimes,
    xattrs); then each deleted path becomes a whiteout, or, where the tar put a
    directory there, that directory is made opaque; directory modes and mtimes
    are set last. A missing file counts as empty (Podman writes ``deleted.files``
    only when something was deleted). A directory the tar does not list but a
    path needs is made 0755 root-owned; :func:`capture` lists every directory
    of the upperdir, so this happens only with diffs from elsewhere.

    The input is untrusted. Raises :class:`InvalidArgument`, naming the entry,
    for absolute paths, ``..``, NUL bytes, a path through a symlink or a file,
    a hardlink to something absent or outside, overlay's own xattrs, unknown
    entry types, device nodes unless ``allow_devices``, and setuid/setgid files
    or file capabilities unless ``allow_setuid``. Nothing is ever written
    outside ``upperdir``; after a refusal the upperdir may hold part of the
    diff and should be discarded. A tar or list that cannot be parsed raises
    :class:`DataLoss`.

    Before anything is written, the tar's regular files (a sparse one at its
    full size: it is written out whole) must add up to at most ``max_bytes``
    and fit the upperdir's free space less ``reserve_bytes``; else
    :class:`ResourceExhausted`. ``deleted.files`` is read a path at a time,
    each at most 32 KiB, at most 524,288 of them.
    """
    deleted = _read_deleted(deleted_path)
    try:
        root_fd = os.open(upperdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise FailedPrecondition(f"apply: upperdir {upperdir} is not a directory") from e
    except OSError as e:
        raise _os_error(f"apply: open upperdir {upperdir}", e) from e
    ex = _Apply(root_fd, allow_devices=allow_devices, allow_setuid=allow_setuid)
    try:
        try:
            raw = open(tar_path, "rb")  # noqa: SIM115 - closed below, after the tar
        except FileNotFoundError:
            raw = None
        except OSError as e:
            raise _os_error(f"apply: open {tar_path}", e) from e
        if raw is not None:
            budget = Budget(
                upperdir,
                f"rootfs diff {tar_path}",
                limit=sys.maxsize if max_bytes is None else max_bytes,
                reserve=reserve_bytes,
                setting="limits.max_diff_bytes",
            )
            with raw:
                _extract(raw, tar_path, ex, budget)
        for joined in deleted:
            ex.delete(tuple(joined.split("\0")))
        ex.finish()
        ex.counts.deleted = len(deleted)
        return ex.counts.frozen()
    finally:
        ex.close()
        os.close(root_fd)


def _extract(raw: IO[bytes], tar_path: str, ex: _Apply, budget: Budget) -> None:
    try:
        with tarfile.open(
            fileobj=raw, mode="r:", encoding="utf-8", errors="surrogateescape"
        ) as tar:
            # Headers only (the data is skipped by seeking): what it expands to.
            members = tar.getmembers()
            budget.take(sum(m.size for m in members if m.isreg()))
            for member in members:
                ex.member(tar, member)
            # tarfile stops quietly at a truncated or bad header after the first: only
            # the end-of-archive block (zeros) tells a complete tar from a cut one.
            raw.seek(tar.offset)
            end = raw.read(tarfile.BLOCKSIZE)
    except (tarfile.TarError, EOFError) as e:
        raise DataLoss(f"apply: {tar_path} is corrupt or truncated: {e}") from e
    except OSError as e:
        raise _os_error(f"apply: read {tar_path}", e) from e
    if len(end) != tarfile.BLOCKSIZE or end.count(0) != tarfile.BLOCKSIZE:
        raise DataLoss(f"apply: {tar_path} is truncated or corrupt at byte {tar.offset}")


def _parts(name: str, what: str) -> tuple[str, ...]:
    """A relative path's components, '.' dropped; refuses NUL, absolute paths and '..'."""
    if "\x00" in name:
        raise InvalidArgument(f"{what}: the name contains a NUL byte")
    if name.startswith("/"):
        raise InvalidArgument(f"{what}: absolute path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidArgument(f"{what}: '..' in the path")
    return parts


def _read_deleted(path: str) -> list[str]:
    """The deleted paths, their components joined by NUL (compact: one string each),
    sorted so that a directory comes before what is under it (NUL sorts first, as
    tuples of components would): a path under a whiteout is then skipped."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        return []
    except OSError as e:
        raise _os_error(f"apply: read {path}", e) from e
    out: set[str] = set()
    try:
        with f:
            for p in _json_strings(f, path):
                what = f"deleted path {p!r}"
                parts = _parts(p.removeprefix("/"), what)
                if not parts:
                    raise InvalidArgument(f"{what}: the root cannot be deleted")
                out.add("\0".join(parts))
                if len(out) > _MAX_DELETED:
                    raise ResourceExhausted(
                        f"apply: {path} lists more than {_MAX_DELETED} deleted paths"
                    )
    except OSError as e:
        raise _os_error(f"apply: read {path}", e) from e
    return sorted(out)


_WS = re.compile(r"[ \t\n\r]*")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_CONTROL = re.compile("[\x00-\x1f]")  # not allowed unescaped in a JSON string
# One array entry and what follows it: the fast path, a match per path.
_ENTRY = re.compile(r'[ \t\n\r]*("[^"\\]*(?:\\.[^"\\]*)*")[ \t\n\r]*([,\]])', re.DOTALL)


def _json_strings(f: IO[bytes], path: str) -> Iterator[str]:
    """The strings of a JSON array of strings, read a chunk at a time: memory is
    bounded by one entry (at most ``_MAX_DELETED_ENTRY`` characters), not the file.
    An empty file is an empty array."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof = "", 0, False
    not_json = f"apply: {path} is not valid JSON"

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = f.read(_CHUNK)
        eof = not chunk
        try:
            text = decoder.decode(chunk, final=eof)
        except UnicodeDecodeError as e:
            raise DataLoss(f"{not_json}: {e}") from e
        buf, pos = buf[pos:] + text, 0
        return True

    def peek() -> str:
        nonlocal pos
        while True:
            m = _WS.match(buf, pos)
            assert m is not None  # it matches the empty string
            pos = m.end()
            if pos < len(buf):
                return buf[pos]
            if not fill():
                return ""

    def string() -> str:
        """The string token at ``pos`` (after a peek found its quote), read whole."""
        nonlocal pos
        while (m := _STRING.match(buf, pos)) is None:
            if len(buf) - pos > _MAX_DELETED_ENTRY:
                raise InvalidArgument(too_long)
            if not fill():
                raise DataLoss(f"{not_json}: unterminated string at the end")
        pos = m.end()
        return m.group()

    too_long = f"apply: {path}: an entry longer than {_MAX_DELETED_ENTRY} characters"
    c = peek()
    if not c:
        return
    if c != "[":
        raise InvalidArgument(f"apply: {path} is not a JSON array of paths")
    pos += 1
    if peek() == "]":
        pos += 1
    else:
        while True:
            m = _ENTRY.match(buf, pos)
            if m is not None:  # a whole entry and its separator in the buffer
                token, sep = m.group(1, 2)
                pos = m.end()
            else:  # at the buffer's end, or malformed
                c = peek()
                if not c:
                    raise DataLoss(f"{not_json}: it ends inside the array")
                if c != '"':
                    raise InvalidArgument(f"apply: {path} is not a JSON array of paths")
                token = string()
                sep = peek()
                pos += 1
                if sep not in (",", "]"):
                    raise DataLoss(f"{not_json}: expected ',' or ']', found {sep[:1]!r}")
            if "\\" not in token and not _CONTROL.search(token):
                value = token[1:-1]  # nothing to decode (the common case, and fast)
            else:
                try:
                    value = json.loads(token)  # one string token: no nesting
                except ValueError as e:
                    raise DataLoss(f"{not_json}: {e}") from e
            if len(value) > _MAX_DELETED_ENTRY:
                raise InvalidArgument(too_long)
            yield value
            if sep == "]":
                break
    if peek():
        raise DataLoss(f"{not_json}: data after the array")


class _Apply:
    """Extraction state: the upperdir, cached directory descriptors, deferred directory metadata.

    Every path is resolved from ``root`` one component at a time with
    O_NOFOLLOW. A directory, once there, is never replaced (an entry that would
    replace one is refused), so a cached descriptor always names the directory
    at its path.
    """

    def __init__(self, root: int, *, allow_devices: bool, allow_setuid: bool) -> None:
        self.root = root
        self.allow_devices = allow_devices
        self.allow_setuid = allow_setuid
        self.counts = _Counts()
        self.dirs: OrderedDict[tuple[str, ...], int] = OrderedDict()  # LRU of open dir fds
        self.dir_meta: dict[tuple[str, ...], tuple[int, int]] = {}  # parts -> (mode, mtime ns)
        self.whiteouts: set[tuple[str, ...]] = set()

    def close(self) -> None:
        while self.dirs:
            os.close(self.dirs.popitem()[1])

    def dir(self, parts: tuple[str, ...], what: str, *, create: bool) -> int:
        """A descriptor for directory ``parts``, made (0755) where missing if ``create``."""
        i = len(parts)
        while i and parts[:i] not in self.dirs:
            i -= 1
        fd = self.dirs[parts[:i]] if i else self.root
        if i:
            self.dirs.move_to_end(parts[:i])
        while i < len(parts):
            name = parts[i]
            i += 1
            try:
                fd = self.open_dir(fd, name, what, parts[:i], create=create)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise InvalidArgument(
                        f"{what}: {'/'.join(parts[:i])} is not a directory "
                        "(a symlink or a file): refusing to resolve the path through it"
                    ) from e
                raise
            self.dirs[parts[:i]] = fd
            if len(self.dirs) > _DIR_CACHE:
                os.close(self.dirs.popitem(last=False)[1])
        return fd

    @staticmethod
    def open_dir(parent: int, name: str, what: str, parts: tuple[str, ...], *, create: bool) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise InvalidArgument(f"{what}: {'/'.join(parts)} does not exist") from None
        os.mkdir(name, 0o755, dir_fd=parent)
        return os.open(name, _DIR_FLAGS, dir_fd=parent)

    def member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        what = f"tar entry {m.name!r}"
        parts = _parts(m.name, what)
        if not parts:
            if m.isdir():
                return  # "./": the upperdir's root is the snapshotter's
            raise InvalidArgument(f"{what}: a non-directory at the root")
        xattrs = self.xattrs(m, what)
        if m.ischr() or m.isblk():
            if not self.allow_devices:
                raise InvalidArgument(f"{what}: device nodes are not allowed")
        elif not (m.isreg() or m.isdir() or m.issym() or m.islnk() or m.isfifo()):
            raise InvalidArgument(f"{what}: unsupported tar entry type {m.type!r}")
        if not self.allow_setuid and not m.isdir() and m.mode & (stat.S_ISUID | stat.S_ISGID):
            raise InvalidArgument(f"{what}: setuid/setgid files are not allowed")
        try:
            parent = self.dir(parts[:-1], what, create=True)
            self.create(tar, m, parts, parent, xattrs, what)
        except OSError as e:
            raise _os_error(f"apply: {what}", e) from e

    def xattrs(self, m: tarfile.TarInfo, what: str) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for key, value in m.pax_headers.items():
            if not key.startswith(_XATTR_PAX):
                continue
            n = key.removeprefix(_XATTR_PAX)
            if "\x00" in n or not n:
                raise InvalidArgument(f"{what}: bad xattr name {n!r}")
            if n.startswith(_OVERLAY_XATTRS):
                raise InvalidArgument(f"{what}: overlay's own xattr {n} is not allowed")
            if n == _CAPABILITY and not self.allow_setuid:
                raise InvalidArgument(f"{what}: file capabilities are not allowed")
            if n in _NOT_CARRIED_XATTRS:
                continue
            out[n] = value.encode("utf-8", "surrogateescape")
        return out

    def clear(self, parent: int, name: str, what: str, *, keep_dir: bool) -> bool:
        """Removes a non-directory at ``name``; True if a directory is there (kept if allowed)."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_ISDIR(st.st_mode):
            if not keep_dir:
                raise InvalidArgument(f"{what}: would replace a directory")
            return True
        os.unlink(name, dir_fd=parent)
        return False

    def create(
        self,
        tar: tarfile.TarFile,
        m: tarfile.TarInfo,
        parts: tuple[str, ...],
        parent: int,
        xattrs: dict[str, bytes],
        what: str,
    ) -> None:
        name = parts[-1]
        mtime = _parse_ns(m)
        mode = m.mode & 0o7777
        if m.isdir():
            if not self.clear(parent, name, what, keep_dir=True):
                os.mkdir(name, 0o700, dir_fd=parent)
            fd = self.dir(parts, what, create=False)
            os.fchown(fd, m.uid, m.gid)
            for n, v in xattrs.items():
                os.setxattr(fd, n, v)
            self.dir_meta.pop(parts, None)  # a later entry's metadata wins
            self.dir_meta[parts] = (mode, mtime)
            self.counts.dirs += 1
            return

        self.clear(parent, name, what, keep_dir=False)
        if m.isreg():
            src = tar.extractfile(m)
            if src is None:  # pragma: no cover - isreg() members always have data
                raise InvalidArgument(f"{what}: no data")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(name, flags, 0o600, dir_fd=parent)
            with open(fd, "wb", buffering=0) as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                os.fchown(fd, m.uid, m.gid)  # before xattrs and mode: chown drops caps and setuid
                for n, v in xattrs.items():
                    os.setxattr(fd, n, v)
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime, mtime))
            self.counts.files += 1
            self.counts.bytes += m.size
            return

        if m.islnk():
            self.link(m, parts, parent, what)
            self.counts.files += 1
            return

        if m.issym():
            if "\x00" in m.linkname or not m.linkname:
                raise InvalidArgument(f"{what}: bad symlink target {m.linkname!r}")
            os.symlink(m.linkname, name, dir_fd=parent)
            self.counts.symlinks += 1
        else:
            kind = stat.S_IFIFO if m.isfifo() else stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            dev = 0 if m.isfifo() else os.makedev(m.devmajor, m.devminor)
            os.mknod(name, kind | 0o600, dev, dir_fd=parent)
            self.counts.files += 1
        os.chown(name, m.uid, m.gid, dir_fd=parent, follow_symlinks=False)
        # No descriptor for a symlink or a node (opening a fifo blocks, a device may act):
        # /proc/self/fd/<dir>/<name> names it without resolving anything but the last name.
        for n, v in xattrs.items():
            os.setxattr(f"/proc/self/fd/{parent}/{name}", n, v, follow_symlinks=False)
        if not m.issym():
            # Follows the name, but this is the node just made: nothing else writes here.
            os.chmod(name, mode, dir_fd=parent)
        os.utime(name, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)

    def link(self, m: tarfile.TarInfo, parts: tuple[str, ...], parent: int, what: str) -> None:
        target = _parts(m.linkname, f"{what}: hardlink target {m.linkname!r}")
        if not target or target == parts:
            raise InvalidArgument(f"{what}: bad hardlink target {m.linkname!r}")
        tparent = self.dir(target[:-1], f"{what}: hardlink target {m.linkname!r}", create=False)
        try:
            st = os.stat(target[-1], dir_fd=tparent, follow_symlinks=False)
        except FileNotFoundError:
            raise InvalidArgument(
                f"{what}: hardlink target {m.linkname!r} does not exist"
            ) from None
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{what}: hardlink target {m.linkname!r} is a directory")
        os.link(target[-1], parts[-1], src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False)

    def delete(self, parts: tuple[str, ...]) -> None:
        """Whites out one deleted path, or makes the directory the tar put there opaque."""
        if any(parts[:i] in self.whiteouts for i in range(1, len(parts))):
            return  # under a deleted directory already
        what = f"deleted path {'/' + '/'.join(parts)!r}"
        try:
            parent = self.dir(parts[:-1], what, create=True)
            name = parts[-1]
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=parent)
                self.whiteouts.add(parts)
                return
            if stat.S_ISDIR(st.st_mode):
                os.setxattr(self.dir(parts, what, create=False), _OPAQUE, b"y")
            # Else the tar put a file there, which hides the lower one already.
        except OSError as e:
            raise _os_error(f"apply: {what}", e) from e

    def finish(self) -> None:
        """Directory modes and mtimes, last: creating entries changed the mtimes."""
        for parts, (mode, mtime) in reversed(self.dir_meta.items()):
            what = f"tar entry {'/'.join(parts)!r}"
            try:
                fd = self.dir(parts, what, create=False)
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime, mtime))
            except OSError as e:
                raise _os_error(f"apply: {what}", e) from e
