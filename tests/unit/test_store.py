"""Tests for runtime.store: writing, reading, verifying, collecting and archiving checkpoints.

The ENOSPC tests mount a real 2 MiB tmpfs (root only) and unmount it in ``finally``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.config import Config, StorageConfig
from runtime.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from runtime.store import files as st
from runtime.store.api import CheckpointWriter, Store
from runtime.store.archive import export_tar, import_tar
from runtime.store.local import LocalStore
from runtime.store.memory import MemoryStore
from runtime.store.model import MANIFEST, FileEntry, Manifest
from runtime.store.resolve import default_store, open_store, resolve

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

PAGES = os.urandom(300_000)


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def partials(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".partial-"))


def fill(writer: CheckpointWriter, tmp_path: Path) -> None:
    """Write a checkpoint the way the checkpoint code does: CRIU dir, files, stasis.json."""
    images = writer.path("checkpoint", directory=True)
    Path(images, "pages-1.img").write_bytes(PAGES)  # as CRIU would, through the real path
    Path(images, "core-1.img").write_bytes(b"core")
    src = tmp_path / "diff-src.tar"
    src.write_bytes(b"rootfs diff" * 1000)
    writer.add_file("rootfs-diff.tar", str(src))
    writer.write_bytes("deleted.files", b"/etc/motd\n")
    writer.write_bytes("spec.dump", b'{"ociVersion": "1.2.0"}')
    writer.write_bytes("config.dump", b'{"id": "c1"}')
    writer.write_bytes(
        "stasis.json", json.dumps({"container_id": "c1", "image": "busybox"}).encode()
    )


EXPECTED = {
    "checkpoint/pages-1.img",
    "checkpoint/core-1.img",
    "rootfs-diff.tar",
    "deleted.files",
    "spec.dump",
    "config.dump",
    "stasis.json",
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def local(root: Path) -> LocalStore:
    return LocalStore(str(root))


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, root: Path) -> Store:
    if request.param == "local":
        return LocalStore(str(root))
    return MemoryStore()


def make(store: Store, name: str, tmp_path: Path, metadata: dict[str, Any] | None = None) -> None:
    with store.begin(name) as w:
        fill(w, tmp_path)
        w.commit(metadata if metadata is not None else {"by": "test"})


# --------------------------------------------------------------------------- round trips


def test_round_trip(store: Store, tmp_path: Path) -> None:
    before = time.time()
    with store.begin("ckpt-1") as w:
        assert w.name == "ckpt-1"
        fill(w, tmp_path)
        info = w.commit({"by": "test", "container_id": "from-commit"})
    assert info.name == "ckpt-1"
    assert info.ref == f"{store.url}/ckpt-1"
    assert before - 1 <= info.created.timestamp() <= time.time() + 1
    assert info.size == sum(len(b) for b in _contents(tmp_path).values())
    # stasis.json updates the commit metadata
    assert info.metadata == {"by": "test", "container_id": "c1", "image": "busybox"}
    assert store.list() == [info]

    with store.open("ckpt-1") as r:
        assert r.name == "ckpt-1"
        assert r.info == info
        assert r.metadata == info.metadata
        assert set(r.manifest.files) == EXPECTED
        for rel, data in _contents(tmp_path).items():
            assert Path(r.file(rel)).read_bytes() == data
            assert r.manifest.files[rel] == FileEntry(hashlib.sha256(data).hexdigest(), len(data))
        assert Path(r.file("checkpoint"), "pages-1.img").read_bytes() == PAGES
        assert os.path.isfile(os.path.join(r.path, MANIFEST))
        r.verify()


def _contents(tmp_path: Path) -> dict[str, bytes]:
    return {
        "checkpoint/pages-1.img": PAGES,
        "checkpoint/core-1.img": b"core",
        "rootfs-diff.tar": b"rootfs diff" * 1000,
        "deleted.files": b"/etc/motd\n",
        "spec.dump": b'{"ociVersion": "1.2.0"}',
        "config.dump": b'{"id": "c1"}',
        "stasis.json": json.dumps({"container_id": "c1", "image": "busybox"}).encode(),
    }


def test_manifest_format(local: LocalStore, root: Path, tmp_path: Path) -> None:
    make(local, "m", tmp_path, {"k": [1, 2]})
    doc = json.loads((root / "m" / MANIFEST).read_bytes())
    assert set(doc) == {"version", "name", "created", "files", "metadata"}
    assert doc["version"] == 1
    assert doc["name"] == "m"
    assert doc["created"].endswith("Z")
    assert doc["metadata"] == {"k": [1, 2]}
    assert doc["files"]["deleted.files"] == {
        "sha256": hashlib.sha256(b"/etc/motd\n").hexdigest(),
        "size": 10,
    }
    assert (
        Manifest.parse((root / "m" / MANIFEST).read_bytes(), "x").to_json()
        == (root / "m" / MANIFEST).read_bytes()
    )


def test_empty_checkpoint(store: Store) -> None:
    with store.begin("empty") as w:
        info = w.commit()
    assert info.size == 0 and info.metadata == {}
    with store.open("empty") as r:
        r.verify()


def test_add_file_missing_source(store: Store, tmp_path: Path) -> None:
    with store.begin("x") as w:
        with pytest.raises(NotFound, match="nope"):
            w.add_file("a", str(tmp_path / "nope"))
        w.write_bytes("a", b"still usable")
        w.commit()
    assert [i.name for i in store.list()] == ["x"]


def test_overwrite_within_writer(store: Store) -> None:
    with store.begin("x") as w:
        w.write_bytes("a", b"first, longer")
        w.write_bytes("a", b"second")
        w.commit()
    with store.open("x") as r:
        assert Path(r.file("a")).read_bytes() == b"second"


def test_parallel_digest(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(st, "_PARALLEL_MIN", 1000)
    blobs = {f"checkpoint/pages-{i}.img": os.urandom(5000 + i) for i in range(6)}
    with store.begin("big") as w:
        for rel, data in blobs.items():
            w.write_bytes(rel, data)
        w.write_bytes("small", b"s")
        w.commit()
    with store.open("big") as r:
        r.verify()
        for rel, data in blobs.items():
            assert r.manifest.files[rel].sha256 == hashlib.sha256(data).hexdigest()
        Path(r.file("checkpoint/pages-3.img")).write_bytes(b"\0" * 5003)
        with pytest.raises(DataLoss, match=r"checkpoint/pages-3\.img: sha256 mismatch"):
            r.verify()


def test_multi_chunk_files(local: LocalStore) -> None:
    data = os.urandom(st.CHUNK * 2 + 17)
    with local.begin("chunks") as w:
        w.write_bytes("f", data)
        info = w.commit()
    assert info.size == len(data)
    with local.open("chunks") as r:
        assert r.manifest.files["f"].sha256 == hashlib.sha256(data).hexdigest()
        r.verify()


# --------------------------------------------------------------------------- names and paths


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-x", "_x", "a/b", "a b", "..", "x" * 129, "é", "a\nb"]
)
def test_bad_names(store: Store, name: str) -> None:
    with pytest.raises(InvalidArgument, match="not a valid checkpoint name"):
        store.begin(name)
    with pytest.raises(InvalidArgument):
        store.open(name)
    with pytest.raises(InvalidArgument):
        store.remove(name)


@pytest.mark.parametrize("name", ["a", "0", "A.b-c_d", "x" * 128, "c1-20250101T000000Z"])
def test_good_names(store: Store, name: str) -> None:
    with store.begin(name) as w:
        w.commit()
    assert [i.name for i in store.list()] == [name]


@pytest.mark.parametrize(
    "rel", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "a/", MANIFEST, "a\0b"]
)
def test_bad_rel_paths(store: Store, rel: str) -> None:
    with store.begin("x") as w:
        with pytest.raises(InvalidArgument):
            w.path(rel)
        with pytest.raises(InvalidArgument):
            w.write_bytes(rel, b"")


def test_reader_file_refuses_escapes(local: LocalStore, root: Path, tmp_path: Path) -> None:
    make(local, "x", tmp_path)
    with local.open("x") as r:
        for rel in ("../x/spec.dump", "/etc/passwd", "checkpoint/../spec.dump", ""):
            with pytest.raises(InvalidArgument):
                r.file(rel)
        with pytest.raises(NotFound, match="no file nope"):
            r.file("nope")
        with pytest.raises(NotFound):
            r.file("check")  # a prefix of a directory name is not the directory
        assert r.file("checkpoint") == str(root / "x" / "checkpoint")
    # A directory swapped for a symlink that leads out
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "core-1.img").write_bytes(b"core")
    os.rename(root / "x" / "checkpoint", tmp_path / "moved")
    os.symlink(outside, root / "x" / "checkpoint")
    with local.open("x") as r:
        with pytest.raises(InvalidArgument, match="leads out"):
            r.file("checkpoint/core-1.img")
        with pytest.raises(DataLoss, match="checkpoint: not a regular file"):
            r.verify()


# --------------------------------------------------------------------------- lifecycle


def test_already_exists(store: Store, tmp_path: Path) -> None:
    make(store, "x", tmp_path)
    with pytest.raises(AlreadyExists, match="checkpoint x"):
        store.begin("x")


def test_racing_writers_same_name(store: Store, root: Path) -> None:
    a = store.begin("x")
    b = store.begin("x")  # nothing complete yet: both may start
    a.write_bytes("f", b"a")
    b.write_bytes("f", b"b")
    a.commit()
    with pytest.raises(AlreadyExists):
        b.commit()
    with store.open("x") as r:
        assert Path(r.file("f")).read_bytes() == b"a"
    if isinstance(store, LocalStore):
        assert partials(root) == []


def test_exception_aborts(store: Store, root: Path) -> None:
    with pytest.raises(RuntimeError), store.begin("x") as w:
        w.write_bytes("f", b"data")
        raise RuntimeError("CRIU failed")
    assert store.list() == []
    with pytest.raises(NotFound):
        store.open("x")
    if isinstance(store, LocalStore):
        assert partials(root) == []


def test_leaving_without_commit_aborts(store: Store, root: Path) -> None:
    with store.begin("x") as w:
        staging = w.path("f")
        w.write_bytes("f", b"data")
    assert not os.path.exists(staging)
    assert store.list() == []
    if isinstance(store, LocalStore):
        assert partials(root) == []


def test_writer_closed_after_commit_or_abort(store: Store) -> None:
    w = store.begin("x")
    w.commit()
    for call in (lambda: w.path("f"), lambda: w.write_bytes("f", b""), lambda: w.commit()):
        with pytest.raises(FailedPrecondition, match="committed"):
            call()
    w.abort()  # a no-op after commit
    assert [i.name for i in store.list()] == ["x"]
    w2 = store.begin("y")
    w2.abort()
    w2.abort()
    with pytest.raises(FailedPrecondition, match="aborted"):
        w2.write_bytes("f", b"")


def test_bad_metadata_aborts(store: Store, root: Path) -> None:
    w = store.begin("x")
    w.write_bytes("f", b"data")
    with pytest.raises(InvalidArgument, match="metadata"):
        w.commit({"when": object()})
    assert store.list() == []
    if isinstance(store, LocalStore):
        assert partials(root) == []


def test_special_files_refused_at_commit(store: Store, root: Path) -> None:
    w = store.begin("x")
    os.mkfifo(w.path("fifo"))
    with pytest.raises(InvalidArgument, match="fifo is not a regular file"):
        w.commit()
    w = store.begin("y")
    os.symlink("/etc/passwd", w.path("link"))
    with pytest.raises(InvalidArgument, match="link is not a regular file"):
        w.commit()
    assert store.list() == []
    if isinstance(store, LocalStore):
        assert partials(root) == []


def test_manifest_is_written_last(
    local: LocalStore, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    digest = st.digest_file

    def recording_digest(path: str, *, seal: bool = False) -> FileEntry:
        partial = next(root.glob(".partial-x-*"))
        events.append(f"digest {'manifest' if (partial / MANIFEST).exists() else 'no-manifest'}")
        return digest(path, seal=seal)

    real_rename = os.rename

    def failing_rename(src: str, dst: str) -> None:
        if os.path.basename(str(src)).startswith(".partial-x-") and str(dst).endswith("/x"):
            # At publish time everything is in place, the manifest included...
            assert (Path(src) / MANIFEST).is_file()
            assert {str(p.relative_to(src)) for p in Path(src).rglob("*") if p.is_file()} == (
                EXPECTED | {MANIFEST}
            )
            events.append("rename")
            # ...and "the machine dies" just before the rename.
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(st, "digest_file", recording_digest)
    monkeypatch.setattr(os, "rename", failing_rename)
    w = local.begin("x")
    fill(w, tmp_path)
    with pytest.raises(Unavailable, match=f"storage {local.url}.*Input/output error"):
        w.commit({})
    assert events == ["digest no-manifest"] * len(EXPECTED) + ["rename"]
    assert local.list() == []
    assert partials(root) == []  # commit's failure aborted: the partial dir is gone
    with pytest.raises(NotFound):
        local.open("x")


def test_crash_leftovers_do_not_exist(local: LocalStore, root: Path, tmp_path: Path) -> None:
    """A crash before the rename leaves a partial dir (even with a manifest): invisible."""
    make(local, "done", tmp_path)
    w = local.begin("crashed")
    fill(w, tmp_path)
    # Simulate a crash after the manifest was written but before the rename.
    (Path(w.path("f")).parent / MANIFEST).write_bytes((root / "done" / MANIFEST).read_bytes())
    # A directory under a valid name, but without a manifest (a copy in progress).
    (root / "incomplete").mkdir()
    (root / "incomplete" / "spec.dump").write_bytes(b"{}")
    # And one whose manifest is garbage.
    (root / "garbage").mkdir()
    (root / "garbage" / MANIFEST).write_bytes(b"{not json")
    assert [i.name for i in local.list()] == ["done"]
    for name in ("crashed", "incomplete"):
        with pytest.raises(NotFound, match=f"checkpoint {name} in {local.url} does not exist"):
            local.open(name)
    with pytest.raises(DataLoss, match=r"checkpoint garbage in .*manifest\.json is not valid JSON"):
        local.open("garbage")
    w.abort()


def test_commit_over_incomplete_directory(local: LocalStore, root: Path) -> None:
    (root / "x").mkdir(parents=True)
    (root / "x" / "junk").write_bytes(b"junk")
    with local.begin("x") as w:
        w.write_bytes("f", b"new")
        w.commit()
    with local.open("x") as r:
        r.verify()
        assert set(r.manifest.files) == {"f"}
    # The old contents were moved aside where gc finds them.
    [aside] = partials(root)
    assert aside.startswith(".partial-x-stale-")
    assert local.gc(0) == [aside]


def test_list_ignores_partials_and_sorts_by_creation(
    store: Store, root: Path, tmp_path: Path
) -> None:
    make(store, "b", tmp_path)
    make(store, "a", tmp_path)
    open_writer = store.begin("c")
    open_writer.write_bytes("f", b"x")
    if isinstance(store, LocalStore):
        (root / "stray-file").write_bytes(b"not a checkpoint")
        (root / ".hidden").mkdir()
    assert [i.name for i in store.list()] == ["b", "a"]
    open_writer.abort()


def test_list_missing_root(tmp_path: Path) -> None:
    s = LocalStore(str(tmp_path / "absent"), create=False)
    assert s.list() == []
    assert s.gc(0) == []
    with pytest.raises(NotFound):
        s.open("x")
    with pytest.raises(NotFound, match="does not exist"):
        s.begin("x")
    assert not (tmp_path / "absent").exists()


def test_remove(store: Store, root: Path, tmp_path: Path) -> None:
    make(store, "x", tmp_path)
    make(store, "y", tmp_path)
    store.remove("x")
    assert [i.name for i in store.list()] == ["y"]
    with pytest.raises(NotFound):
        store.remove("x")
    with pytest.raises(NotFound):
        store.open("x")
    if isinstance(store, LocalStore):
        assert partials(root) == []
        assert sorted(os.listdir(root)) == ["y"]


def test_remove_incomplete_directory(local: LocalStore, root: Path) -> None:
    (root / "half").mkdir(parents=True)
    (root / "half" / "f").write_bytes(b"")
    local.remove("half")
    assert not (root / "half").exists()
    assert partials(root) == []


# --------------------------------------------------------------------------- gc


def age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (when, when), follow_symlinks=False)


def test_gc_removes_old_partials_only(local: LocalStore, root: Path, tmp_path: Path) -> None:
    make(local, "complete", tmp_path)
    age(root / "complete", 3600)
    old = root / ".partial-old-0123"
    (old / "checkpoint").mkdir(parents=True)
    (old / "checkpoint" / "pages-1.img").write_bytes(b"x")
    age(old, 3600)
    fresh = root / ".partial-fresh-4567"
    fresh.mkdir()
    (fresh / "f").write_bytes(b"x")
    # Old at the top, but something deep inside was written recently (a long dump).
    busy = root / ".partial-busy-89ab"
    (busy / "checkpoint").mkdir(parents=True)
    (busy / "checkpoint" / "pages-1.img").write_bytes(b"x")
    age(busy, 3600)
    os.utime(busy / "checkpoint" / "pages-1.img")
    stray = root / ".partial-file-cdef"
    stray.write_bytes(b"x")
    age(stray, 3600)
    (root / "not-partial").mkdir()
    age(root / "not-partial", 3600)

    assert local.gc(600) == [".partial-file-cdef", ".partial-old-0123"]
    assert sorted(os.listdir(root)) == [
        ".partial-busy-89ab",
        ".partial-fresh-4567",
        "complete",
        "not-partial",
    ]
    assert local.gc(0) == [".partial-busy-89ab", ".partial-fresh-4567"]
    with local.open("complete") as r:
        r.verify()


def test_gc_skips_a_live_writer(local: LocalStore, root: Path) -> None:
    w = local.begin("live")
    w.write_bytes("f", b"x")
    [partial] = partials(root)
    age(root / partial, 3600)
    assert local.gc(0) == []  # its writer holds the lock
    w.commit()
    assert [i.name for i in local.list()] == ["live"]
    w2 = local.begin("dead")
    w2.write_bytes("f", b"x")
    w2._release()  # as if its process died: the lock is gone
    [dead] = partials(root)
    assert local.gc(0) == [dead]
    assert partials(root) == []


def test_gc_grace_must_not_be_negative(store: Store) -> None:
    with pytest.raises(InvalidArgument):
        store.gc(-1)


# --------------------------------------------------------------------------- verify


@pytest.fixture
def checkpoint(local: LocalStore, root: Path, tmp_path: Path) -> Path:
    make(local, "v", tmp_path)
    return root / "v"


def test_verify_flipped_byte(local: LocalStore, checkpoint: Path) -> None:
    pages = checkpoint / "checkpoint" / "pages-1.img"
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0x01
    pages.write_bytes(bytes(data))
    with local.open("v") as r, pytest.raises(DataLoss) as caught:
        r.verify()
    message = str(caught.value)
    assert f"checkpoint v in {local.url}" in message
    assert "checkpoint/pages-1.img: sha256 mismatch" in message
    assert "spec.dump" not in message


def test_verify_truncated(local: LocalStore, checkpoint: Path) -> None:
    (checkpoint / "spec.dump").write_bytes(b"{")
    with local.open("v") as r, pytest.raises(DataLoss, match=r"spec\.dump: size 1, manifest says"):
        r.verify()


def test_verify_missing_file(local: LocalStore, checkpoint: Path) -> None:
    (checkpoint / "config.dump").unlink()
    with local.open("v") as r, pytest.raises(DataLoss, match=r"config\.dump: missing"):
        r.verify()


def test_verify_extra_file(local: LocalStore, checkpoint: Path) -> None:
    (checkpoint / "checkpoint" / "evil.img").write_bytes(b"")
    with local.open("v") as r, pytest.raises(DataLoss, match=r"checkpoint/evil\.img: not in"):
        r.verify()


def test_verify_reports_every_problem(local: LocalStore, checkpoint: Path) -> None:
    (checkpoint / "config.dump").unlink()
    (checkpoint / "extra").write_bytes(b"")
    (checkpoint / "deleted.files").write_bytes(b"/etc/motX\n")
    with local.open("v") as r, pytest.raises(DataLoss) as caught:
        r.verify()
    for part in ("config.dump: missing", "extra: not in", "deleted.files: sha256 mismatch"):
        assert part in str(caught.value)


@pytest.mark.parametrize(
    "manifest",
    [
        b"{",
        b"[]",
        b'{"version": 2, "name": "v", "created": "2025-01-01T00:00:00Z", "files": {}, '
        b'"metadata": {}}',
        b'{"version": 1, "name": "v", "created": "yesterday", "files": {}, "metadata": {}}',
        b'{"version": 1, "name": "v", "created": "2025-01-01T00:00:00Z", "files": [], '
        b'"metadata": {}}',
        b'{"version": 1, "name": "v", "created": "2025-01-01T00:00:00Z", "metadata": {}, '
        b'"files": {"../x": {"sha256": "' + b"0" * 64 + b'", "size": 0}}}',
        b'{"version": 1, "name": "v", "created": "2025-01-01T00:00:00Z", "metadata": {}, '
        b'"files": {"x": {"sha256": "nope", "size": 0}}}',
        b'{"version": 1, "name": "v", "created": "2025-01-01T00:00:00Z", "metadata": {}, '
        b'"files": {"x": {"sha256": "' + b"0" * 64 + b'", "size": -1}}}',
        b'{"version": 1, "name": 3, "created": "2025-01-01T00:00:00Z", "files": {}, '
        b'"metadata": {}}',
        b"\xff\xfe",
    ],
)
def test_malformed_manifest(local: LocalStore, checkpoint: Path, manifest: bytes) -> None:
    with local.open("v") as r:
        (checkpoint / MANIFEST).write_bytes(manifest)
        with pytest.raises(DataLoss, match=r"checkpoint v in .*manifest\.json"):
            r.verify()
    with pytest.raises(DataLoss, match=r"checkpoint v in .*manifest\.json"):
        local.open("v")
    assert local.list() == []


def test_manifest_changed_after_open(local: LocalStore, checkpoint: Path) -> None:
    with local.open("v") as r:
        doc = json.loads((checkpoint / MANIFEST).read_bytes())
        doc["metadata"]["by"] = "someone else"
        (checkpoint / MANIFEST).write_text(json.dumps(doc))
        with pytest.raises(DataLoss, match="changed since"):
            r.verify()


def test_verify_memory_store_copy(tmp_path: Path) -> None:
    mem = MemoryStore()
    make(mem, "m", tmp_path)
    with mem.open("m") as r:
        copy = r.path
        Path(r.file("spec.dump")).write_bytes(b'{"ociVersion": "1.2.1"}')
        with pytest.raises(DataLoss, match=r"spec\.dump: sha256 mismatch"):
            r.verify()
    assert not os.path.exists(copy)  # close removed the local copy
    with mem.open("m") as r:  # the stored bytes are untouched
        r.verify()


# --------------------------------------------------------------------------- permissions


def test_root_created_private_by_the_first_write(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        s = LocalStore(str(tmp_path / "a" / "root"))
        assert s.list() == [] and s.gc(0) == []
        with pytest.raises(NotFound):
            s.open("x")
        assert not (tmp_path / "a").exists()  # reading creates nothing
        make(s, "x", tmp_path)
    finally:
        os.umask(old)
    assert mode(tmp_path / "a" / "root") == 0o700


def test_existing_root_keeps_its_mode(tmp_path: Path) -> None:
    """Only a directory Stasis has just made is chmodded: not one named for a read
    (``stasis list --store /tmp``), not one written into, not one behind a symlink."""
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chmod(loose, 0o1777)
    s = open_store(str(loose))
    assert s.list() == []
    with pytest.raises(NotFound):
        s.open("x")
    assert mode(loose) == 0o1777
    make(s, "x", tmp_path)
    with s.open("x") as r:
        export_tar(r, str(tmp_path / "x.tar"))
    assert mode(loose) == 0o1777
    link = tmp_path / "link"
    link.symlink_to(loose)
    via_link = LocalStore(str(link))
    make(via_link, "y", tmp_path)
    assert [i.name for i in via_link.list()] == ["x", "y"]
    assert mode(loose) == 0o1777


def test_cli_list_leaves_the_named_store_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from runtime.cli import main as cli

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    link = tmp_path / "link"
    link.symlink_to(shared)
    (tmp_path / "config.toml").write_text(f'[storage]\nurl = "file://{tmp_path}/default"\n')
    monkeypatch.setenv("STASIS_CONFIG", str(tmp_path / "config.toml"))
    for store in (shared, link):
        assert cli.main(["list", "--store", str(store)]) == 0
    assert cli.main(["list"]) == 0
    assert cli.main(["inspect", "nothing"]) == 1
    assert mode(shared) == 0o1777
    assert not (tmp_path / "default").exists()  # nor is the default store made by reading


def test_files_0600_dirs_0700(local: LocalStore, root: Path, tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with local.begin("p") as w:
            fill(w, tmp_path)
            os.chmod(w.path("checkpoint/pages-1.img"), 0o644)  # CRIU/runc may write 0644
            os.chmod(w.path("checkpoint", directory=True), 0o755)
            [partial] = partials(root)
            assert mode(root / partial) == 0o700
            w.commit()
    finally:
        os.umask(old)
    assert mode(root) == 0o700
    assert mode(root / "p") == 0o700
    assert mode(root / "p" / "checkpoint") == 0o700
    for rel in [*EXPECTED, MANIFEST]:
        assert mode(root / "p" / rel) == 0o600, rel


def test_user_named_directory_is_not_chmodded(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    config = Config(StorageConfig(url=f"file://{tmp_path}/default"))
    s, name = resolve(str(shared / "ckpt"), config)
    assert name == "ckpt"
    with s.begin(name) as w:
        w.write_bytes("f", b"x")
        w.commit()
    assert mode(shared) == 0o755
    assert mode(shared / "ckpt") == 0o700
    assert mode(shared / "ckpt" / "f") == 0o600


# --------------------------------------------------------------------------- ENOSPC (real tmpfs)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@needs_root
def test_enospc_write_bytes(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small") as small:
        s = LocalStore(str(small))
        w = s.begin("big")
        w.write_bytes("spec.dump", b"{}")
        with pytest.raises(ResourceExhausted) as caught:
            w.write_bytes("checkpoint/pages-1.img", b"\0" * (4 << 20))
        assert f"storage file://{small} is full" in str(caught.value)
        assert "pages-1.img" in str(caught.value)
        assert os.listdir(small) == []  # the partial dir is gone, no manifest anywhere
        assert s.list() == []
        with pytest.raises(FailedPrecondition):
            w.commit()
        # The store works again once there is room.
        with s.begin("small") as w2:
            w2.write_bytes("f", b"x")
            w2.commit()
        assert [i.name for i in s.list()] == ["small"]


@needs_root
def test_enospc_add_file_in_context(tmp_path: Path) -> None:
    src = tmp_path / "big.img"
    src.write_bytes(os.urandom(4 << 20))
    with tmpfs(tmp_path / "small") as small:
        s = LocalStore(str(small))
        with (
            pytest.raises(ResourceExhausted, match=f"storage file://{small} is full"),
            s.begin("big") as w,
        ):
            w.add_file("checkpoint/pages-1.img", str(src))
            w.commit()
        assert os.listdir(small) == []
        assert s.list() == []


@needs_root
def test_enospc_from_criu_then_commit(tmp_path: Path) -> None:
    """CRIU fills the disk through path(); the manifest cannot be written: nothing remains."""
    with tmpfs(tmp_path / "small") as small:
        s = LocalStore(str(small))
        w = s.begin("big")
        pages = w.path("checkpoint/pages-1.img")
        with open(pages, "wb") as f, contextlib.suppress(OSError):
            for _ in range(4 * 16):
                f.write(b"\xaa" * (64 << 10))
                f.flush()
        with pytest.raises(ResourceExhausted, match=f"storage file://{small} is full"):
            w.commit()
        assert os.listdir(small) == []
        assert s.list() == []


# --------------------------------------------------------------------------- resolve


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(StorageConfig(url=f"file://{tmp_path}/default"))


def test_resolve_name_uses_default_store(config: Config, tmp_path: Path) -> None:
    s, name = resolve("ckpt-1", config)
    assert name == "ckpt-1"
    assert isinstance(s, LocalStore)
    assert s.root == f"{tmp_path}/default"
    assert s.url == f"file://{tmp_path}/default"
    assert not (tmp_path / "default").exists()  # resolving creates nothing ...
    with s.begin(name) as w:
        w.commit()
    assert mode(tmp_path / "default") == 0o700  # ... Stasis's own store is made private by a write


def test_resolve_absolute_path(config: Config, tmp_path: Path) -> None:
    for ref in (f"{tmp_path}/nas/ckpt", f"{tmp_path}/nas/ckpt/", f"{tmp_path}/nas/../nas/ckpt"):
        s, name = resolve(ref, config)
        assert isinstance(s, LocalStore)
        assert (s.root, name) == (f"{tmp_path}/nas", "ckpt")
    assert not (tmp_path / "nas").exists()  # resolving creates nothing


def test_resolve_file_url(config: Config, tmp_path: Path) -> None:
    for ref in (f"file://{tmp_path}/nas/ckpt", f"file://localhost{tmp_path}/nas/ckpt"):
        s, name = resolve(ref, config)
        assert isinstance(s, LocalStore)
        assert (s.root, name) == (f"{tmp_path}/nas", "ckpt")
    s, name = resolve(f"file://{tmp_path}/my%20nas/ckpt", config)
    assert isinstance(s, LocalStore)
    assert (s.root, name) == (f"{tmp_path}/my nas", "ckpt")


def test_resolve_round_trips_info_ref(config: Config, tmp_path: Path) -> None:
    s, name = resolve("x", config)
    with s.begin(name) as w:
        w.write_bytes("f", b"x")
        info = w.commit()
    s2, name2 = resolve(info.ref, config)
    with s2.open(name2) as r:
        r.verify()
        assert r.info == info


def test_resolve_s3(config: Config) -> None:
    from runtime.store.s3 import S3Store

    store, name = resolve("s3://bucket/prefix/ckpt", config)
    assert isinstance(store, S3Store) and store.url == "s3://bucket/prefix" and name == "ckpt"
    s3_default = Config(StorageConfig(url="s3://bucket/prefix"))
    store, name = resolve("ckpt", s3_default)
    assert isinstance(store, S3Store) and name == "ckpt"


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "a/b",
        "./x",
        "../x",
        "x/",
        "http://host/x",
        "file://relative/x",
        "/",
        "/tmp/.hidden",
        "/tmp/bad name",
        "-x",
    ],
)
def test_resolve_rejects(config: Config, ref: str) -> None:
    with pytest.raises(InvalidArgument):
        resolve(ref, config)


def test_open_store(tmp_path: Path) -> None:
    for url in (f"file://{tmp_path}/s", f"{tmp_path}/s"):
        s = open_store(url)
        assert isinstance(s, LocalStore)
        assert s.root == f"{tmp_path}/s"
    from runtime.store.s3 import S3Store

    assert isinstance(open_store("s3://b", Config()), S3Store)
    with pytest.raises(InvalidArgument):
        open_store("relative")
    assert isinstance(default_store(Config(StorageConfig(url=f"file://{tmp_path}/d"))), LocalStore)


# --------------------------------------------------------------------------- archives


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_export_import_round_trip(store: Store, tmp_path: Path, suffix: str) -> None:
    make(store, "src", tmp_path, {"origin": "node-a"})
    tar_path = tmp_path / f"ckpt{suffix}"
    with store.open("src") as r:
        export_tar(r, str(tar_path))
        original = r.manifest
    assert mode(tar_path) == 0o600
    assert not [p for p in os.listdir(tmp_path) if ".partial-" in p]
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        assert names[0] == MANIFEST
        # top level, Podman layout; plus what containerd's CRI restore needs
        assert set(names) == EXPECTED | {MANIFEST, "checkpoint", "status.dump", "status"}
        assert tar.getmember("checkpoint").isdir()
        assert all(m.mode == 0o600 for m in tar.getmembers() if m.isfile())

    other = LocalStore(str(tmp_path / "other"))
    info = import_tar(other, str(tar_path), "dst")
    assert info.name == "dst"
    assert info.metadata == {"origin": "node-a", "container_id": "c1", "image": "busybox"}
    with other.open("dst") as r:
        r.verify()
        assert r.manifest.files == original.files
        for rel, data in _contents(tmp_path).items():
            assert Path(r.file(rel)).read_bytes() == data


CRI_CONFIG_DUMP = {
    "id": "c1",
    "name": "c1",
    "rootfsImageName": "127.0.0.1:5000/stasis/busybox:test",
    "rootfsImageRef": "127.0.0.1:5000/stasis/busybox@sha256:" + "a" * 64,
    "runtime": "io.containerd.stasis.v2",
    "createdTime": "2025-01-02T03:04:05.123456789Z",
    "checkpointedTime": "2025-01-02T03:05:00Z",
    "restored": False,
}
CRI_SPEC_DUMP = {
    "ociVersion": "1.2.0",
    "annotations": {
        "io.kubernetes.cri.sandbox-id": "old-pod",
        "io.kubernetes.cri.container-name": "counter",
        "stasis.dev/restore-from": "file:///old",
        "stasis.dev/team": "a",
    },
}


def _make_cri(store: Store, tmp_path: Path, extra: dict[str, bytes] | None = None) -> None:
    with store.begin("cri") as w:
        fill(w, tmp_path)
        w.write_bytes("config.dump", json.dumps(CRI_CONFIG_DUMP).encode())
        w.write_bytes("spec.dump", json.dumps(CRI_SPEC_DUMP).encode())
        for rel, data in (extra or {}).items():
            w.write_bytes(rel, data)
        w.commit({})


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def test_export_adds_what_containerd_cri_restore_reads(store: Store, tmp_path: Path) -> None:
    """status.dump (a CRI ContainerStatus: containerd 2.1 refuses the archive without
    it) and containerd's status, derived from config.dump and spec.dump."""
    _make_cri(store, tmp_path)
    with store.open("cri") as r:
        export_tar(r, str(tmp_path / "cri.tar"))
    files = _members(tmp_path / "cri.tar")
    status = json.loads(files["status.dump"])
    created = 1735787045123456000  # 2025-01-02T03:04:05.123456Z (ns, to the microsecond)
    assert status == {
        "id": "c1",
        "metadata": {"name": "counter"},
        "state": 1,
        "created_at": created,
        "started_at": created,
        "image": {"image": CRI_CONFIG_DUMP["rootfsImageName"]},
        "image_ref": CRI_CONFIG_DUMP["rootfsImageRef"],
        "labels": {},
        # the old pod's place and a Stasis restore request do not follow the container
        "annotations": {"stasis.dev/team": "a"},
    }
    assert json.loads(files["status"])["CreatedAt"] == created
    assert "status.dump" not in json.loads(files[MANIFEST])["files"]

    # Importing the archive leaves the additions out: the checkpoint is as it was.
    other = LocalStore(str(tmp_path / "other"))
    import_tar(other, str(tmp_path / "cri.tar"), "back")
    with other.open("back") as back, store.open("cri") as orig:
        assert back.manifest.files == orig.manifest.files


def test_export_keeps_a_checkpoint_s_own_status_dump(store: Store, tmp_path: Path) -> None:
    own = b'{"id": "from-containerd"}'
    _make_cri(store, tmp_path, {"status.dump": own})
    with store.open("cri") as r:
        export_tar(r, str(tmp_path / "cri.tar"))
    with tarfile.open(tmp_path / "cri.tar") as tar:
        assert tar.getnames().count("status.dump") == 1
    files = _members(tmp_path / "cri.tar")
    assert files["status.dump"] == own
    assert "status" in files  # still missing from the checkpoint, so added
    other = LocalStore(str(tmp_path / "other"))
    import_tar(other, str(tmp_path / "cri.tar"), "back")
    with other.open("back") as back:
        assert Path(back.file("status.dump")).read_bytes() == own
        assert "status" not in back.manifest.files


def test_export_without_config_dump_adds_nothing(store: Store, tmp_path: Path) -> None:
    with store.begin("bare") as w:
        Path(w.path("checkpoint", directory=True), "core-1.img").write_bytes(b"core")
        w.commit({})
    with store.open("bare") as r:
        export_tar(r, str(tmp_path / "bare.tar"))
    assert set(_members(tmp_path / "bare.tar")) == {MANIFEST, "checkpoint/core-1.img"}


def test_export_refuses_corrupt_checkpoint(local: LocalStore, root: Path, tmp_path: Path) -> None:
    make(local, "src", tmp_path)
    pages = root / "src" / "checkpoint" / "pages-1.img"
    pages.write_bytes(b"\0" + pages.read_bytes()[1:])
    out = tmp_path / "out"
    out.mkdir()
    with local.open("src") as r, pytest.raises(DataLoss, match=r"pages-1\.img: sha256 mismatch"):
        export_tar(r, str(out / "ckpt.tar"))
    assert os.listdir(out) == []  # no half-written archive


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info, None


def test_import_podman_archive_without_manifest(local: LocalStore, tmp_path: Path) -> None:
    tar_path = _tar(
        tmp_path / "podman.tar",
        [
            _special(".", tarfile.DIRTYPE),
            _special("./checkpoint", tarfile.DIRTYPE),
            _file("./checkpoint/pages-1.img", PAGES),
            _file("./checkpoint/inventory.img", b"inv"),
            _file("./config.dump", b"{}"),
            _file("./spec.dump", b"{}"),
            _file("./rootfs-diff.tar", b"diff"),
            _file("./network.status", b"[]"),
            _link("./checkpoint/pages-copy.img", "./checkpoint/pages-1.img", tarfile.LNKTYPE),
        ],
    )
    info = import_tar(local, str(tar_path), "from-podman")
    assert info.metadata == {}
    with local.open("from-podman") as r:
        r.verify()
        assert set(r.manifest.files) == {
            "checkpoint/pages-1.img",
            "checkpoint/inventory.img",
            "checkpoint/pages-copy.img",
            "config.dump",
            "spec.dump",
            "rootfs-diff.tar",
            "network.status",
        }
        assert Path(r.file("checkpoint/pages-copy.img")).read_bytes() == PAGES


HOSTILE: dict[str, list[tuple[tarfile.TarInfo, bytes | None]]] = {
    "absolute": [_file("/etc/cron.d/evil", b"x")],
    "dotdot": [_file("checkpoint/../../evil", b"x")],
    "dotdot-top": [_file("../evil", b"x")],
    "symlink-escaping": [_link("checkpoint", "/etc", tarfile.SYMTYPE)],
    "symlink-dotdot": [_link("spec.dump", "../../etc/shadow", tarfile.SYMTYPE)],
    "symlink-inside": [_file("a", b"x"), _link("b", "a", tarfile.SYMTYPE)],
    "hardlink-outside": [_link("passwd", "/etc/passwd", tarfile.LNKTYPE)],
    "hardlink-unknown": [_link("x", "not-in-archive", tarfile.LNKTYPE)],
    "hardlink-dotdot": [_link("x", "../outside", tarfile.LNKTYPE)],
    "fifo": [_special("fifo", tarfile.FIFOTYPE)],
    "chardev": [_special("null", tarfile.CHRTYPE)],
    "duplicate": [_file("spec.dump", b"a"), _file("spec.dump", b"b")],
    "duplicate-dir-file": [_special("d", tarfile.DIRTYPE), _file("d", b"x")],
    "reserved-manifest-twice": [_file(MANIFEST, b"{}"), _file(MANIFEST, b"{}")],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_import_refuses_hostile_members(
    local: LocalStore, root: Path, tmp_path: Path, case: str
) -> None:
    tar_path = _tar(tmp_path / f"{case}.tar", HOSTILE[case])
    with pytest.raises(InvalidArgument, match=str(tar_path)):
        import_tar(local, str(tar_path), "evil")
    assert local.list() == []
    assert partials(root) == []
    assert not (tmp_path / "evil").exists()
    assert not (root.parent / "evil").exists()


def _exported(store: Store, tmp_path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    make(store, "src", tmp_path)
    with store.open("src") as r:
        manifest = json.loads(r.manifest.to_json())
    return manifest, _contents(tmp_path)


@pytest.mark.parametrize("case", ["tampered", "missing", "extra", "malformed"])
def test_import_verifies_manifest(local: LocalStore, root: Path, tmp_path: Path, case: str) -> None:
    manifest, files = _exported(MemoryStore(), tmp_path)
    if case == "tampered":
        files["spec.dump"] = b'{"ociVersion": "9.9.9"}'
    elif case == "missing":
        del files["config.dump"]
    elif case == "extra":
        files["checkpoint/evil.img"] = b"evil"
    data = b"{oops" if case == "malformed" else json.dumps(manifest).encode()
    tar_path = _tar(
        tmp_path / "t.tar", [_file(MANIFEST, data), *(_file(k, v) for k, v in files.items())]
    )
    expected = {
        "tampered": r"spec\.dump: sha256 or size mismatch",
        "missing": r"config\.dump: missing",
        "extra": r"checkpoint/evil\.img: not in the manifest",
        "malformed": r"manifest\.json is not valid JSON",
    }[case]
    with pytest.raises(DataLoss, match=expected) as caught:
        import_tar(local, str(tar_path), "dst")
    assert str(tar_path) in str(caught.value)
    assert local.list() == []
    assert partials(root) == []


def test_import_errors(local: LocalStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        import_tar(local, str(tmp_path / "absent.tar"), "x")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(InvalidArgument, match="not a tar archive"):
        import_tar(local, str(junk), "x")
    good = _tar(tmp_path / "good.tar", [_file("f", b"x")])
    with pytest.raises(InvalidArgument, match="not a valid checkpoint name"):
        import_tar(local, str(good), "../x")
    import_tar(local, str(good), "x")
    with pytest.raises(AlreadyExists):
        import_tar(local, str(good), "x")


def test_import_truncated_archive(local: LocalStore, root: Path, tmp_path: Path) -> None:
    make(local, "src", tmp_path)
    tar_path = tmp_path / "t.tar"
    with local.open("src") as r:
        export_tar(r, str(tar_path))
    data = tar_path.read_bytes()
    tar_path.write_bytes(data[: len(data) // 2])
    with pytest.raises((InvalidArgument, DataLoss)):
        import_tar(local, str(tar_path), "dst")
    assert [i.name for i in local.list()] == ["src"]
    assert partials(root) == []


# --------------------------------------------------------------------------- leaks


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_no_fd_leaks(local: LocalStore, tmp_path: Path) -> None:
    make(local, "warm", tmp_path)  # let lazy imports open what they open once
    before = _fds()
    make(local, "x", tmp_path)
    with local.open("x") as r:
        r.verify()
        export_tar(r, str(tmp_path / "x.tar"))
    import_tar(local, str(tmp_path / "x.tar"), "y")
    with pytest.raises(RuntimeError), local.begin("z"):
        raise RuntimeError
    local.gc(0)
    local.remove("x")
    assert _fds() == before


def test_restore_references_outside_the_configured_stores_are_refused(tmp_path: Path) -> None:
    from runtime.config import Config, StorageConfig
    from runtime.errors import PermissionDenied
    from runtime.store.resolve import check_source

    store = tmp_path / "store"
    nas = tmp_path / "nas"
    (tmp_path / "evil").mkdir()
    (store / "link").parent.mkdir()
    (store / "link").symlink_to(tmp_path / "evil")
    cfg = Config(
        StorageConfig(url=f"file://{store}", restore_sources=(f"file://{nas}", "s3://b/p"))
    )
    for ok in ("name-1", f"{store}/c1", f"file://{store}/c1", f"{nas}/c2", "s3://b/p/c3"):
        check_source(ok, cfg)
    for bad in (
        "file:///etc/shadow-ckpt",
        f"{store}/../evil/c1",
        f"{store}/link/c1",  # a symlink out of the store
        f"{store}",  # the store itself is no checkpoint of it
        "s3://b/other/c3",
        "s3://b/p2/c3",
    ):
        with pytest.raises(PermissionDenied, match="restore_sources"):
            check_source(bad, cfg)


# --------------------------------------------------------------------------- one resolution


def signed(root: Path) -> LocalStore:
    """A store whose checkpoints a restore accepts: signed with the session's key."""
    from runtime.store import signing

    return LocalStore(str(root), signing=signing.Signing(signing.DEFAULT_KEY_FILE))


@pytest.fixture
def attack(tmp_path: Path) -> tuple[Config, Path, Path]:
    """A store with checkpoint ``good``, and a "container rootfs" outside it holding a
    restorable checkpoint ``evil`` and ``lnk`` -> ``<store>/good``."""
    store, rootfs = tmp_path / "store", tmp_path / "rootfs"
    make(signed(store), "good", tmp_path)
    make(signed(rootfs), "evil", tmp_path, {"by": "the container"})
    (rootfs / "lnk").symlink_to(store / "good")
    return Config(StorageConfig(url=f"file://{store}")), store, rootfs


def _restore(ref: str, config: Config) -> None:
    from shim.checkpoint import take as checkpointing

    plan = checkpointing.prepare_restore(ref, None, config)
    if plan is not None:
        plan.reader.close()


def test_restore_ref_up_from_a_symlink_into_the_store_is_refused(
    attack: tuple[Config, Path, Path],
) -> None:
    """``<rootfs>/lnk/../evil``: realpath says ``<store>/evil``, normpath ``<rootfs>/evil``."""
    from runtime.errors import PermissionDenied

    config, store, rootfs = attack
    for ref in (f"{rootfs}/lnk/../evil", f"file://{rootfs}/lnk/../evil"):
        with pytest.raises(PermissionDenied) as caught:
            _restore(ref, config)
        message = str(caught.value)
        assert f"restore from checkpoint {ref!r}" in message and f"file://{store}" in message
    # '..' is refused even where it would stay inside the store
    with pytest.raises(PermissionDenied, match=r"'\.\.' component.*restore_sources"):
        _restore(f"{store}/good/../good", config)
    _restore(f"{store}/good", config)  # the straight path is fine
    _restore("good", config)


def test_restore_ref_through_a_symlink_below_the_store_is_refused(
    attack: tuple[Config, Path, Path],
) -> None:
    from runtime.errors import PermissionDenied
    from runtime.store.resolve import check_source, resolve_source

    config, store, rootfs = attack
    (store / "sub").symlink_to(rootfs)  # a directory of the store leading out
    ref = f"{store}/sub/evil"
    with pytest.raises(PermissionDenied, match=f"from {store}.*restore_sources"):
        check_source(ref, config)
    s, name = resolve_source(ref, config)  # lexically inside: the open is what refuses
    with pytest.raises(PermissionDenied, match="a symlink is on the way"):
        s.open(name)
    with pytest.raises(PermissionDenied, match=f"restore from checkpoint {ref!r}"):
        _restore(ref, config)


def test_name_that_is_a_symlink_in_the_store_is_refused(
    attack: tuple[Config, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from runtime.cli import main as cli
    from runtime.errors import PermissionDenied

    config, store, rootfs = attack
    (store / "alias").symlink_to(rootfs / "evil")
    with pytest.raises(PermissionDenied, match=r"restore from checkpoint 'alias'.*is a symlink"):
        _restore("alias", config)
    with pytest.raises(PermissionDenied, match=f"checkpoint alias in file://{store} is a symlink"):
        LocalStore(str(store)).open("alias")
    assert [i.name for i in LocalStore(str(store)).list()] == ["good"]
    # stasis inspect / export / restore, by name and by path, open the same way
    (store.parent / "config.toml").write_text(f'[storage]\nurl = "file://{store}"\n')
    monkeypatch.setenv("STASIS_CONFIG", str(store.parent / "config.toml"))
    capsys.readouterr()
    for ref in ("alias", str(store / "alias")):
        assert cli.main(["inspect", ref]) == 1
        assert "is a symlink" in capsys.readouterr().err
    # a pod checkpoint's member names are names in the same store
    pod = {"format": 1, "containers": {"a": "alias"}, "volumes": []}
    with signed(store).begin("pod") as w:
        w.write_bytes("pod.json", json.dumps(pod).encode())
        w.commit()
    from shim.checkpoint import take as checkpointing

    with pytest.raises(PermissionDenied, match=r"alias .* is a symlink"):
        checkpointing.prepare_restore("pod", None, config, container_name="a")


def test_restore_ref_through_the_configured_root_symlink(tmp_path: Path) -> None:
    """The store's own directory is configuration: a symlink there is the admin's."""
    real = tmp_path / "real"
    make(signed(real), "c1", tmp_path)
    (tmp_path / "link").symlink_to(real)
    config = Config(StorageConfig(url=f"file://{tmp_path}/link"))
    for ref in ("c1", f"{tmp_path}/link/c1", f"{real}/c1", f"file://{real}/c1"):
        _restore(ref, config)


def test_reader_reads_the_directory_it_checked(
    local: LocalStore, root: Path, tmp_path: Path
) -> None:
    """A checkpoint swapped after it was opened is not what the reader reads."""
    make(local, "x", tmp_path, {"which": "original"})
    make(local, "other", tmp_path, {"which": "swapped in"})
    with local.open("x") as r:
        assert r.path == str(root / "x")
        os.rename(root / "x", root / "x-moved")
        os.rename(root / "other", root / "x")
        r.verify()  # the original's manifest and files, through the descriptor
        assert r.metadata["which"] == "original"
        assert r.info.metadata["which"] == "original"


def test_reader_refuses_symlinks_inside_the_checkpoint(
    local: LocalStore, root: Path, tmp_path: Path
) -> None:
    make(local, "x", tmp_path)
    outside = tmp_path / "outside.json"
    outside.write_text('{"image": "evil"}')
    os.unlink(root / "x" / "stasis.json")
    (root / "x" / "stasis.json").symlink_to(outside)
    with local.open("x") as r:
        assert r.metadata.get("image") != "evil"  # not followed
        with pytest.raises(InvalidArgument, match=r"stasis\.json leads out"):
            r.file("stasis.json")
        with pytest.raises(DataLoss, match=r"stasis\.json: not a regular file"):
            r.verify()
    assert local.list()[0].metadata.get("image") != "evil"
    manifest = root / "x" / MANIFEST
    (tmp_path / "m.json").write_bytes(manifest.read_bytes())
    manifest.unlink()
    manifest.symlink_to(tmp_path / "m.json")
    with pytest.raises(DataLoss, match=r"manifest\.json is a symlink"):
        local.open("x")
    assert local.list() == []


def test_closed_reader_refuses_and_keeps_no_descriptor(local: LocalStore, tmp_path: Path) -> None:
    make(local, "x", tmp_path)
    before = len(os.listdir("/proc/self/fd"))
    r = local.open("x")
    assert len(os.listdir("/proc/self/fd")) == before + 1
    r.close()
    r.close()
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(FailedPrecondition, match="reader is closed"):
        r.verify()


# --------------------------------------------------------------------------- encryption at rest


def _keyed(tmp_path: Path, name: str = "k1") -> Any:
    from runtime.store import crypt

    return crypt.Key(hashlib.sha256(name.encode()).digest(), str(tmp_path / f"{name}.key"))


def _stored_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def test_encrypted_local_checkpoint_round_trip(tmp_path: Path, root: Path) -> None:
    from runtime.capture.digest import KnownDigest

    key = _keyed(tmp_path)
    cache = tmp_path / "cache"
    store = LocalStore(str(root), key=key, cache_dir=str(cache))
    with store.begin("c1") as w:
        fill(w, tmp_path)
        pages = Path(w.path("checkpoint/pages-1.img"))
        st_ = pages.stat()
        plain = hashlib.sha256(PAGES).hexdigest()
        known = {
            "checkpoint/pages-1.img": KnownDigest(plain, len(PAGES), st_.st_mtime_ns, st_.st_ino)
        }
        info = w.commit({"by": "test"}, known)
    assert info.metadata == {"by": "test", "container_id": "c1", "image": "busybox"}
    stored = _stored_bytes(root / "c1")
    assert PAGES[:4096] not in stored and b"rootfs diff" not in stored and b"busybox" not in stored
    doc = json.loads((root / "c1" / MANIFEST).read_text())
    enc = doc["encryption"]
    assert enc["alg"] == "AES-256-GCM" and enc["key_id"] == key.id and len(enc["mac"]) == 64
    # The manifest describes the stored (encrypted) bytes: the known plaintext digest is ignored.
    entry = doc["files"]["checkpoint/pages-1.img"]
    assert entry["sha256"] != plain
    assert (
        entry["sha256"]
        == hashlib.sha256((root / "c1/checkpoint/pages-1.img").read_bytes()).hexdigest()
    )
    assert all(mode(p) == 0o600 for p in (root / "c1").rglob("*") if p.is_file())
    assert not list((root / "c1").rglob("*.stasis-encrypting"))
    with store.open("c1") as r:
        r.verify()
        assert r.metadata["image"] == "busybox"
        images = r.file("checkpoint")
        assert images.startswith(str(cache)) and mode(Path(images).parent) == 0o700
        assert Path(images, "pages-1.img").read_bytes() == PAGES
        assert Path(r.file("rootfs-diff.tar")).read_bytes() == b"rootfs diff" * 1000
        assert Path(r.file("deleted.files")).read_bytes() == b"/etc/motd\n"
    assert not os.path.exists(images) and list(cache.iterdir()) == []
    # list needs no key: the manifest's metadata (authenticated, not secret) is shown,
    # not stasis.json (encrypted).
    infos = LocalStore(str(root)).list()
    assert [i.name for i in infos] == ["c1"] and infos[0].metadata == {"by": "test"}


def test_encrypted_checkpoint_needs_its_key(tmp_path: Path, root: Path) -> None:
    from runtime.errors import PermissionDenied

    key = _keyed(tmp_path)
    make(LocalStore(str(root), key=key), "c1", tmp_path)
    with pytest.raises(
        FailedPrecondition,
        match=f"checkpoint c1 .* is encrypted \\(key id {key.id}\\): configure encryption.key_file",
    ):
        LocalStore(str(root)).open("c1")
    other = _keyed(tmp_path, "k2")
    with pytest.raises(PermissionDenied, match=f"key id {key.id}.*has key id {other.id}"):
        LocalStore(str(root), key=other).open("c1")
    # A key does not stop unencrypted checkpoints from being read.
    make(LocalStore(str(root)), "plain", tmp_path)
    with LocalStore(str(root), key=key).open("plain") as r:
        assert Path(r.file("checkpoint/pages-1.img")).read_bytes() == PAGES


def test_encrypted_manifest_is_authenticated(tmp_path: Path, root: Path) -> None:
    key = _keyed(tmp_path)
    store = LocalStore(str(root), key=key, cache_dir=str(tmp_path / "cache"))
    make(store, "c1", tmp_path)
    path = root / "c1" / MANIFEST
    good = path.read_text()
    for old, new in (('"by": "test"', '"by": "evil"'), ('"c1"', '"c2"')):
        path.write_text(good.replace(old, new, 1))
        with pytest.raises(DataLoss, match=r"manifest\.json authentication failed"):
            store.open("c1")
    path.write_text(good)
    with store.open("c1") as r:
        r.verify()


def test_tampered_encrypted_file_is_data_loss(tmp_path: Path, root: Path) -> None:
    key = _keyed(tmp_path)
    store = LocalStore(str(root), key=key, cache_dir=str(tmp_path / "cache"))
    make(store, "c1", tmp_path)
    target = root / "c1" / "checkpoint" / "pages-1.img"
    data = bytearray(target.read_bytes())
    data[100] ^= 1
    target.write_bytes(bytes(data))
    with store.open("c1") as r:
        with pytest.raises(DataLoss, match=r"checkpoint/pages-1\.img: sha256 mismatch"):
            r.verify()
        with pytest.raises(DataLoss, match=r"checkpoint/pages-1\.img"):
            r.file("checkpoint")
    # Swapping two files of the checkpoint (sizes and digests swapped in a forged manifest
    # would fail its MAC); swapping the bytes alone fails the digest and the decryption.
    spec, cfg = root / "c1" / "spec.dump", root / "c1" / "config.dump"
    a, b = spec.read_bytes(), cfg.read_bytes()
    spec.write_bytes(b)
    cfg.write_bytes(a)
    with store.open("c1") as r, pytest.raises(DataLoss, match=r"spec\.dump"):
        r.file("spec.dump")


def test_encrypted_memory_store(tmp_path: Path) -> None:
    key = _keyed(tmp_path)
    store = MemoryStore(key=key)
    make(store, "c1", tmp_path)
    assert store.list()[0].metadata == {"by": "test"}
    with store.open("c1") as r:
        r.verify()
        assert Path(r.file("checkpoint/pages-1.img")).read_bytes() == PAGES
        assert r.metadata["image"] == "busybox"
    store.key = None
    with pytest.raises(FailedPrecondition, match="is encrypted"):
        store.open("c1")


def test_encrypted_export_and_import_stay_encrypted(tmp_path: Path, root: Path) -> None:
    key = _keyed(tmp_path)
    store = LocalStore(str(root), key=key, cache_dir=str(tmp_path / "cache"))
    make(store, "c1", tmp_path)
    tar_path = str(tmp_path / "c1.tar")
    with store.open("c1") as r:
        export_tar(r, tar_path)
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        member = tar.extractfile("checkpoint/pages-1.img")
        assert member is not None and PAGES[:4096] not in member.read()
    assert "status.dump" not in names  # nothing derived in clear
    other = LocalStore(str(tmp_path / "other"))  # no key needed to store it
    import_tar(other, tar_path, "copy")
    assert (
        json.loads((tmp_path / "other/copy" / MANIFEST).read_text())["encryption"]["key_id"]
        == key.id
    )
    with pytest.raises(FailedPrecondition, match="is encrypted"):
        other.open("copy")
    with LocalStore(str(tmp_path / "other"), key=key, cache_dir=str(tmp_path / "cache")).open(
        "copy"
    ) as r:
        r.verify()
        assert Path(r.file("checkpoint/pages-1.img")).read_bytes() == PAGES


def test_stores_take_the_key_from_the_config(tmp_path: Path, root: Path) -> None:
    from runtime.config import EncryptionConfig
    from runtime.errors import PermissionDenied

    key_file = tmp_path / "checkpoint.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    key_file.chmod(0o600)
    cfg = Config(StorageConfig(url=f"file://{root}"), EncryptionConfig(str(key_file)))
    store = open_store(f"file://{root}", cfg)
    assert isinstance(store, LocalStore) and store.key is not None
    make(store, "c1", tmp_path)
    by_path, name = resolve(str(root / "c1"), cfg)
    with by_path.open(name) as r:
        r.verify()
    s3_store = open_store("s3://bucket/p", cfg)
    assert getattr(s3_store, "key", None) == store.key
    assert getattr(resolve("s3://bucket/p/c1", cfg)[0], "key", None) == store.key
    key_file.chmod(0o644)
    with pytest.raises(PermissionDenied, match=f"encryption key file {key_file} has mode 0644"):
        default_store(cfg)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_encrypted_s3_checkpoint(tmp_path: Path, moto_endpoint: str) -> None:
    """Encrypted on the way up (zstd inside), verified then decrypted on the way down."""
    import boto3

    from runtime.config import S3Config
    from runtime.errors import PermissionDenied
    from runtime.store import crypt
    from runtime.store.s3 import S3Store

    client = boto3.client(
        "s3", endpoint_url=moto_endpoint, region_name="us-east-1",
        aws_access_key_id="k", aws_secret_access_key="s",
    )  # fmt: skip
    bucket = f"enc-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    cfg = S3Config("k", "s", "us-east-1", moto_endpoint)
    key_a, key_b = str(tmp_path / "a.key"), str(tmp_path / "b.key")
    a, b = crypt.write_key_file(key_a), crypt.write_key_file(key_b)

    def store(key_file: str | None) -> S3Store:
        return S3Store(
            f"s3://{bucket}/p", cfg, spool_dir=str(tmp_path / "spool"),
            cache_dir=str(tmp_path / "cache"), key_file=key_file, retry_delay=0.01,
        )  # fmt: skip

    marker = b"stasis-s3-marker-" + os.urandom(8).hex().encode()
    big = marker + os.urandom(6 << 20) + bytes(8 << 20)  # parts of a multipart upload
    try:
        enc = store(key_a)
        with enc.begin("c1") as w:
            Path(w.path("checkpoint/pages-1.img")).write_bytes(big)
            w.write_bytes("checkpoint/empty.img", b"")
            w.write_bytes("stasis.json", json.dumps({"secret": marker.decode()}).encode())
            info = w.commit({"by": "test"})
        assert info.metadata == {"by": "test"}
        objects = client.list_objects_v2(Bucket=bucket)["Contents"]
        bodies = [client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in objects]
        assert all(marker not in body for body in bodies)
        doc = json.loads(client.get_object(Bucket=bucket, Key="p/c1/manifest.json")["Body"].read())
        assert doc["encryption"]["key_id"] == a.id and "stasis_json" not in doc
        pages = doc["files"]["checkpoint/pages-1.img"]
        assert pages["compression"] == "none" and pages["size"] < len(big) // 2  # zstd inside
        with enc.open("c1") as r:
            r.verify()
            images = Path(r.file("checkpoint"))
            assert (images / "pages-1.img").read_bytes() == big
            assert (images / "empty.img").read_bytes() == b""
            assert json.loads(Path(r.file("stasis.json")).read_text())["secret"] == marker.decode()
        assert not images.exists() and list((tmp_path / "cache").iterdir()) == []
        with pytest.raises(FailedPrecondition, match=f"is encrypted \\(key id {a.id}\\)"):
            store(None).open("c1")
        with pytest.raises(PermissionDenied, match=f"key id {a.id}.*key id {b.id}"):
            store(key_b).open("c1")
        doc["metadata"]["by"] = "evil"
        client.put_object(Bucket=bucket, Key="p/c1/manifest.json", Body=json.dumps(doc).encode())
        with pytest.raises(DataLoss, match="authentication failed"):
            enc.open("c1")
        # A spool committed for encryption is never pushed in clear or under another key.
        w2 = enc.begin("c2")
        w2.write_bytes("spec.dump", marker)
        w2.prepare({})
        w2.finish(False)  # as after a failed upload: the spool is kept
        for other in (store(None), store(key_b)):
            with pytest.raises(FailedPrecondition, match=f"encrypted with key id {a.id}"):
                other.push(w2.spool)
        enc.push(w2.spool)
        with enc.open("c2") as r:
            assert Path(r.file("spec.dump")).read_bytes() == marker
        # Exported as stored, and imported into a local store, it opens with the key.
        tar_path = str(tmp_path / "c2.tar")
        with enc.open("c2") as r:
            export_tar(r, tar_path)
        local = LocalStore(str(tmp_path / "local"), key=a, cache_dir=str(tmp_path / "lc"))
        import_tar(local, tar_path, "c2")
        with local.open("c2") as r:
            r.verify()
            assert Path(r.file("spec.dump")).read_bytes() == marker
    finally:
        for o in client.list_objects_v2(Bucket=bucket).get("Contents", []):
            client.delete_object(Bucket=bucket, Key=o["Key"])
        for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        client.delete_bucket(Bucket=bucket)
