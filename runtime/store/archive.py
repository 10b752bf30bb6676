"""Checkpoints in and out as tar archives laid out like the Kubernetes/Podman
checkpoint archive (``export_tar`` / ``import_tar``); an import verifies every member
against the manifest before the checkpoint exists.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from runtime import boundedjson
from runtime.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    StasisError,
    Unavailable,
)

if TYPE_CHECKING:
    from runtime.config import Limits
    from runtime.store.signing import Signing

from runtime.store.api import CheckpointReader, Store
from runtime.store.files import (
    DISK_FULL,
    HashingReader,
    NotRegular,
    StagingWriter,
    copy,
    fsync_dir,
    new_token,
    open_new,
    problems_message,
    read_small,
    rmtree,
    storage_error,
)
from runtime.store.model import (
    MANIFEST,
    MANIFEST_SIG,
    MAX_SMALL_JSON,
    SIG_MAX,
    CheckpointInfo,
    FileEntry,
    Manifest,
    check_name,
)

log = logging.getLogger("stasis.store")

# What containerd's own checkpoint archives carry besides spec.dump and config.dump:
# the CRI ContainerStatus as JSON (status.dump: containerd 2.1's CRI restore, i.e.
# CreateContainer with the archive as the image, fails without it) and containerd's
# task status (status, kept there for checkpointctl). export_tar writes them, derived
# from config.dump and spec.dump, when the checkpoint has none; they are not in the
# manifest, and import_tar leaves them out again.
_STATUS_DUMP = "status.dump"
_CONTAINERD_STATUS = "status"
_EXPORT_EXTRAS = frozenset({_STATUS_DUMP, _CONTAINERD_STATUS})
_CRI_CONTAINER_RUNNING = 1  # runtime.v1.ContainerState
_CRI_CONTAINER_NAME = "io.kubernetes.cri.container-name"
# Spec annotations that describe the old container's place, not the container:
# containerd sets them again for the new one, and a Stasis restore annotation
# must not make the restored container restore a second time.
_NOT_CARRIED_ANNOTATIONS = ("io.kubernetes.cri.", "stasis.dev/restore-")


# --------------------------------------------------------------------------- archives


def _iso_ns(value: object) -> int:
    """An RFC 3339 time (as config.dump holds them) in ns since the epoch; 0 if none."""
    if not isinstance(value, str) or not value:
        return 0
    text = value.replace("Z", "+00:00")
    # Go writes up to nine fraction digits; datetime takes six.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1_000_000) * 1000


def _json_object(reader: CheckpointReader, rel: str) -> dict[str, Any] | None:
    try:
        data = boundedjson.loads(read_small(reader.file(rel)), rel)
    except (OSError, ValueError, StasisError, NotRegular):
        return None
    return data if isinstance(data, dict) else None


def _export_extras(reader: CheckpointReader) -> dict[str, bytes]:
    """status.dump and status for a checkpoint that lacks them (see _EXPORT_EXTRAS).

    Empty when the checkpoint has no config.dump (nothing to derive them from).
    """
    files = reader.manifest.files
    if reader.manifest.encryption is not None:
        return {}  # CRI cannot restore an encrypted archive; leak nothing in clear
    missing = [rel for rel in sorted(_EXPORT_EXTRAS) if rel not in files]
    config = _json_object(reader, "config.dump") if missing else None
    if config is None:
        return {}
    spec = _json_object(reader, "spec.dump") or {}
    annotations = spec.get("annotations")
    carried = {
        str(k): str(v)
        for k, v in (annotations.items() if isinstance(annotations, dict) else ())
        if not str(k).startswith(_NOT_CARRIED_ANNOTATIONS)
    }
    ident = str(config.get("id") or "")
    # CRI's name for the container, where it ran under CRI (ours name it by its id)
    cri_name = annotations.get(_CRI_CONTAINER_NAME) if isinstance(annotations, dict) else None
    created = _iso_ns(config.get("createdTime"))
    checkpointed = _iso_ns(config.get("checkpointedTime")) or created
    image = str(config.get("rootfsImageName") or config.get("rootfsImage") or "")
    extras = {
        _STATUS_DUMP: {
            "id": ident,
            "metadata": {"name": str(cri_name or config.get("name") or ident)},
            "state": _CRI_CONTAINER_RUNNING,
            "created_at": created,
            "started_at": created,
            "image": {"image": image},
            "image_ref": str(config.get("rootfsImageRef") or image),
            "labels": {},
            "annotations": carried,
        },
        _CONTAINERD_STATUS: {
            "CreatedAt": created,
            "StartedAt": created or checkpointed,
            "FinishedAt": 0,
            "ExitCode": 0,
            "Pid": 0,
            "Reason": "",
            "Message": "",
        },
    }
    return {rel: json.dumps(extras[rel], indent=1).encode() for rel in missing}


def export_tar(reader: CheckpointReader, tar_path: str, signing: Signing | None = None) -> None:
    """Write the checkpoint as a tar archive (gzip for ``.gz``/``.tgz``), mode 0600.

    Files sit at the top level (``checkpoint/...``, ``rootfs-diff.tar``,
    ``spec.dump`` ...) as in the Kubernetes/Podman checkpoint archive, with
    ``manifest.json`` first. Each file is checked against the manifest while
    it is copied (DataLoss on a mismatch); the archive appears under
    ``tar_path`` only when complete.

    An uncompressed archive is what containerd 2.1's CRI restores from (the
    archive's path as a new container's image) and what checkpointctl shows:
    for them the archive also gets ``status.dump`` and ``status`` when the
    checkpoint has none (outside the manifest; see ``_EXPORT_EXTRAS``).

    An encrypted checkpoint is exported as stored, encrypted (no extras): only
    Stasis with its key can restore it; CRI restore needs an unencrypted one.

    With ``signing``, ``manifest.sig`` follows the manifest: this node's
    signature over the archive's manifest (it exports only what it opened, and
    opening verified the checkpoint's own signature).
    """
    import tarfile

    manifest = reader.manifest
    where = f"checkpoint {reader.name}"
    directory = os.path.dirname(os.path.abspath(tar_path))
    tmp = os.path.join(directory, f".{os.path.basename(tar_path)}.partial-{new_token()}")
    mtime = manifest.created.timestamp()
    gzip = tar_path.endswith((".gz", ".tgz"))
    extras = _export_extras(reader)

    def member(name: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.size, info.mtime = kind, size, mtime
        info.mode = 0o700 if kind == tarfile.DIRTYPE else 0o600
        return info

    try:
        with (
            open_new(tmp) as out,
            (
                tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT)
                if gzip
                else tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT)
            ) as tar,
        ):
            data = manifest.to_json()
            tar.addfile(member(MANIFEST, tarfile.REGTYPE, len(data)), _BytesReader(data))
            if signing is not None:
                sig = signing.sign(data)
                tar.addfile(member(MANIFEST_SIG, tarfile.REGTYPE, len(sig)), _BytesReader(sig))
            dirs = sorted(
                {
                    "/".join(rel.split("/")[:i])
                    for rel in manifest.files
                    for i in range(1, rel.count("/") + 1)
                }
            )
            for d in dirs:
                tar.addfile(member(d, tarfile.DIRTYPE))
            for rel, entry in sorted(manifest.files.items()):
                path = _stored_path(reader, rel)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise DataLoss(f"{where}: {rel}: missing") from None
                with open(fd, "rb") as f:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
                        raise DataLoss(
                            f"{where}: {rel}: size {st.st_size}, manifest says {entry.size}"
                        )
                    hashing = HashingReader(f)
                    tar.addfile(member(rel, tarfile.REGTYPE, entry.size), hashing)
                if hashing.sha256.hexdigest() != entry.sha256:
                    raise DataLoss(f"{where}: {rel}: sha256 mismatch")
            for rel, data in extras.items():
                tar.addfile(member(rel, tarfile.REGTYPE, len(data)), _BytesReader(data))
            tar.close()
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, tar_path)
        fsync_dir(directory)
    except BaseException as e:
        rmtree(tmp)
        if isinstance(e, OSError):
            raise storage_error(e, f"exporting {where}", "file://" + tar_path) from e
        raise


def _stored_path(reader: CheckpointReader, rel: str) -> str:
    """``rel`` as the store holds it: encrypted, for an encrypted checkpoint."""
    if reader.manifest.encryption is None:
        return reader.file(rel)
    stored: Callable[[str], str] | None = getattr(reader, "stored_file", None)
    if stored is None:
        raise FailedPrecondition(f"checkpoint {reader.name}: cannot export it encrypted")
    return stored(rel)


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)

    def read(self, n: int = -1) -> bytes:
        n = len(self._data) if n < 0 else n
        chunk, self._data = self._data[:n], self._data[n:]
        return bytes(chunk)


def _member_rel(name: str, tar_path: str) -> str | None:
    """The checkpoint path of a tar member; None for the archive's root entry."""
    if name.startswith("/") or "\0" in name:
        raise InvalidArgument(f"{tar_path}: member {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"{tar_path}: member {name!r} leads out of the checkpoint")
    return "/".join(parts) or None


def import_tar(
    store: Store,
    tar_path: str,
    name: str,
    limits: Limits | None = None,
    *,
    trust: bool = False,
) -> CheckpointInfo:
    """Store a checkpoint archive (as ``export_tar`` or Podman/CRI-O write them) as ``name``.

    Absolute paths, ``..``, symlinks, devices and FIFOs, and hard links that do
    not point at an earlier file of the archive are refused (InvalidArgument).
    With a ``manifest.json`` every file must match it (DataLoss otherwise);
    without one, a manifest is built. Each file's size is checked before it is
    written (ResourceExhausted): all of them together must stay within
    ``limits.max_import_bytes`` and each must fit the free space less
    ``limits.reserve_bytes``.

    Into a store with a ``signing``, an archive must carry a ``manifest.sig``
    that verifies under a trusted key (PermissionDenied, before anything is
    extracted, when it is unsigned, has no manifest or names an unknown key;
    DataLoss for a wrong signature), unless ``trust``: then it is imported,
    logged as such, and signed by this node like every checkpoint it commits.
    """
    import tarfile

    from runtime.budget import Budget
    from runtime.config import Limits

    limits = limits or Limits()
    check_name(name)
    try:
        tar = tarfile.open(tar_path, "r:*")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        raise NotFound(f"{tar_path} does not exist") from None
    except tarfile.TarError as e:
        raise InvalidArgument(f"{tar_path} is not a tar archive: {e}") from e
    except OSError as e:
        raise Unavailable(f"cannot read {tar_path}: {e.strerror or e}") from e
    signing: Signing | None = getattr(store, "signing", None)
    with tar, store.begin(name) as writer:
        budget: Budget | None = None
        seen: dict[str, FileEntry] = {}
        dirs: set[str] = set()
        manifest_data: bytes | None = None
        sig_data: bytes | None = None
        imported: Manifest | None = None
        checked = signing is None

        def check_origin() -> None:
            nonlocal checked
            if checked:
                return
            checked = True
            assert signing is not None
            where = f"archive {tar_path}"
            try:
                if manifest_data is None:
                    raise PermissionDenied(f"{where} is unsigned (it has no {MANIFEST})")
                signing.verify(manifest_data, sig_data, where)
            except PermissionDenied as e:
                if not trust:
                    raise PermissionDenied(
                        f"{e}; `stasis import --trust` imports it, signed by this node"
                    ) from e
                log.warning(
                    "importing %s as %s on the user's word (--trust): %s", tar_path, name, e
                )

        try:
            for m in tar:
                rel = _member_rel(m.name, tar_path)
                if rel is None:
                    continue
                if (
                    rel in seen
                    or rel in dirs
                    or (rel == MANIFEST and manifest_data is not None)
                    or (rel == MANIFEST_SIG and sig_data is not None)
                ):
                    raise InvalidArgument(f"{tar_path}: member {m.name!r} appears twice")
                if rel not in (MANIFEST, MANIFEST_SIG):
                    check_origin()  # export_tar puts both first: refused before extracting
                if m.isdir():
                    writer.path(rel, directory=True)
                    dirs.add(rel)
                elif m.issym():
                    target = m.linkname
                    escapes = target.startswith("/") or ".." in target.split("/")
                    why = "leads out of the checkpoint" if escapes else "(links are not stored)"
                    raise InvalidArgument(
                        f"{tar_path}: member {m.name!r} is a symlink to {target!r} {why}"
                    )
                elif m.islnk():
                    target_rel = _member_rel(m.linkname, tar_path)
                    if target_rel not in seen:
                        raise InvalidArgument(
                            f"{tar_path}: member {m.name!r} is a hard link to {m.linkname!r}, "
                            "which is not an earlier file of the archive"
                        )
                    assert target_rel is not None
                    if budget is not None:  # the link is stored as a copy
                        budget.take(seen[target_rel].size, rel)
                    writer.add_file(rel, writer.path(target_rel))
                    seen[rel] = seen[target_rel]
                elif m.isreg():
                    src = tar.extractfile(m)
                    assert src is not None
                    with src:
                        if rel == MANIFEST:
                            manifest_data = src.read(MAX_SMALL_JSON + 1)
                            if len(manifest_data) > MAX_SMALL_JSON:
                                raise InvalidArgument(f"{tar_path}: {MANIFEST} is too large")
                            continue
                        if rel == MANIFEST_SIG:
                            sig_data = src.read(SIG_MAX + 1)
                            if len(sig_data) > SIG_MAX:
                                raise InvalidArgument(f"{tar_path}: {MANIFEST_SIG} is too large")
                            continue
                        if rel in _EXPORT_EXTRAS and manifest_data is not None:
                            imported = imported or Manifest.parse(manifest_data, tar_path)
                            if rel not in imported.files:
                                continue  # export_tar's addition for containerd/checkpointctl
                        target = writer.path(rel)
                        if budget is None:
                            budget = Budget(
                                os.path.dirname(target),
                                f"archive {tar_path}",
                                limit=limits.max_import_bytes,
                                reserve=limits.reserve_bytes,
                                setting="limits.max_import_bytes",
                            )
                        budget.take(m.size, rel)
                        try:
                            with open_new(target) as dst:
                                seen[rel] = copy(src, dst)
                        except OSError as e:
                            if e.errno in DISK_FULL:
                                writer.abort()
                            raise storage_error(e, f"importing {rel}", store.url) from e
                else:
                    raise InvalidArgument(
                        f"{tar_path}: member {m.name!r} is not a file or directory"
                    )
        except tarfile.TarError as e:
            raise InvalidArgument(f"{tar_path} is a damaged tar archive: {e}") from e
        check_origin()
        metadata: dict[str, Any] = {}
        if manifest_data is not None:
            imported = imported or Manifest.parse(manifest_data, tar_path)
            _check_imported(imported, seen, tar_path)
            metadata = imported.metadata
            if imported.encryption is not None:
                # Stored as it came, manifest and MAC included: re-sealing is
                # impossible without the key, and needless with it.
                if not isinstance(writer, StagingWriter):
                    raise FailedPrecondition(
                        f"{tar_path} holds an encrypted checkpoint: {store.url} cannot store it"
                    )
                writer.preserve = imported
        return writer.commit(metadata)


def _check_imported(manifest: Manifest, seen: dict[str, FileEntry], tar_path: str) -> None:
    problems = [f"{rel}: missing" for rel in sorted(manifest.files.keys() - seen.keys())]
    problems += [f"{rel}: not in the manifest" for rel in sorted(seen.keys() - manifest.files)]
    problems += [
        f"{rel}: sha256 or size mismatch"
        for rel in sorted(manifest.files.keys() & seen.keys())
        if manifest.files[rel] != seen[rel]
    ]
    if problems:
        raise DataLoss(problems_message(f"archive {tar_path}", problems))
