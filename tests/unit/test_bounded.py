"""Untrusted checkpoint data is bounded and total: JSON nesting and size, archive and
diff expansion, deleted.files, metadata a restore acts on, the restore that fails
after runc restore, and `--` before ctr's positional values."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import signal
import subprocess
import tarfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from runtime import boundedjson, config
from runtime.capture import rootfs
from runtime.config import Config, Limits, StorageConfig
from runtime.errors import (
    DataLoss,
    InvalidArgument,
    ResourceExhausted,
    StasisError,
)
from runtime.linux.proc import Stdio
from runtime.linux.runc import CheckpointOpts, RestoreOpts, Runc
from runtime.store import metadata
from runtime.store.archive import import_tar
from runtime.store.local import LocalStore
from runtime.store.model import Manifest
from shim.task.process import InitProcess, Status
from shim.task.stdio import ProcessIO
from tests.unit.test_process import FakeIO, FakeRunc, run

DEEP = b"[" * 100_000 + b"]" * 100_000


# --------------------------------------------------------------------------- JSON


def test_deep_nesting_is_dataloss_not_recursion_error() -> None:
    with pytest.raises(DataLoss, match=r"x.json nests deeper than 64"):
        boundedjson.loads(DEEP, "x.json")
    obj = b'{"a":' * 65 + b"1" + b"}" * 65
    with pytest.raises(DataLoss, match=r"nests deeper"):
        boundedjson.loads(obj, "x.json")
    assert boundedjson.loads(b'{"a":' * 64 + b"1" + b"}" * 64, "x.json") is not None


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"s": "[" * 1000, "t": '\\"[{' * 100, "u": [[1]]})
    assert boundedjson.loads(text, "x")["s"] == "[" * 1000


def test_size_and_syntax_errors_name_the_document() -> None:
    with pytest.raises(DataLoss, match=r"big.json is larger than 10 bytes"):
        boundedjson.loads(b"[" + b"1," * 10 + b"1]", "big.json", max_bytes=10)
    with pytest.raises(InvalidArgument, match=r"bad.json is not valid JSON"):
        boundedjson.loads(b"{", "bad.json", error=InvalidArgument)
    with pytest.raises(DataLoss, match=r"not valid JSON"):
        boundedjson.loads(b"\xff\xfe", "bad.json")


def test_manifest_deep_or_with_too_many_files_is_dataloss() -> None:
    with pytest.raises(DataLoss, match=r"manifest.json nests deeper"):
        Manifest.parse(DEEP, "checkpoint x")
    files = {f"f{i}": {"sha256": "0" * 64, "size": 0} for i in range(100_001)}
    doc = {"version": 1, "name": "x", "created": "2024-01-01T00:00:00Z", "files": files,
           "metadata": {}}  # fmt: skip
    with pytest.raises(DataLoss, match=r"lists 100001 files"):
        Manifest.parse(json.dumps(doc).encode(), "checkpoint x")


def make(store: LocalStore, name: str, meta: dict[str, Any], stasis: bytes | None = None) -> Path:
    with store.begin(name) as w:
        Path(w.path("checkpoint/pages-1.img")).write_bytes(b"pages")
        w.write_bytes("stasis.json", stasis if stasis is not None else json.dumps(meta).encode())
        w.commit(meta)
    return Path(store.root) / name


def test_list_skips_a_broken_entry_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = signed_store(tmp_path / "s")
    make(store, "good", {"image": "a"})
    bad = make(store, "bad", {})
    (bad / "manifest.json").write_bytes(DEEP)
    make(store, "deep-stasis", {"image": "b"}, stasis=DEEP)
    with caplog.at_level(logging.WARNING):
        infos = store.list()
    assert [i.name for i in infos] == ["good", "deep-stasis"]
    assert infos[1].metadata["image"] == "b"  # the manifest's copy
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "skipping checkpoint bad" in warned[0], warned


def signed_store(root: Path) -> LocalStore:
    """A store whose checkpoints a restore accepts: signed with the session's key."""
    from runtime.store import signing

    return LocalStore(str(root), signing=signing.Signing(signing.DEFAULT_KEY_FILE))


def restore_config(root: Path, limits: Limits | None = None) -> Config:
    return Config(StorageConfig(url=f"file://{root}"), limits=limits or Limits())


def test_restore_with_deep_stasis_json_is_dataloss(tmp_path: Path) -> None:
    from shim.checkpoint import take as checkpointing

    store = signed_store(tmp_path / "s")
    make(store, "deep", {}, stasis=DEEP)
    with pytest.raises(DataLoss, match=r"stasis.json nests deeper"):
        checkpointing.prepare_restore(
            f"file://{tmp_path}/s/deep", None, restore_config(tmp_path / "s")
        )


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize(
    ("meta", "field"),
    [
        ({"execs": "x"}, "execs: not a list"),
        ({"execs": ["junk"]}, r"execs\[0\]: not an object"),
        ({"execs": [{"id": "x", "pid": "1"}]}, r"execs\[0\].pid"),
        ({"execs": [{"id": "-x", "pid": 1}]}, r"execs\[0\].id"),
        ({"execs": [{"id": "a", "pid": 1}, {"id": "a", "pid": 2}]}, r"execs\[1\].id.*twice"),
        ({"execs": [{"id": "x", "pid": 1, "args": [1]}]}, r"execs\[0\].args"),
        ({"gpu": "x"}, "gpu: not an object"),
        ({"gpu": {"pids": ["a"]}}, "gpu.pids"),
        ({"gpu": {"inventory": {"count": "2"}}}, "gpu.inventory.count"),
        ({"gpu": {"inventory": []}}, "gpu.inventory"),
        ({"tcp_established": "yes"}, "tcp_established"),
        ({"image": "--privileged"}, "image: '--privileged' starts with '-'"),
        ({"image": 3}, "image: not a string"),
        ({"labels": {"a": 1}}, "labels"),
    ],
)
def test_malformed_metadata_is_refused_naming_the_field(meta: dict[str, Any], field: str) -> None:
    with pytest.raises(DataLoss, match=rf"checkpoint c: stasis.json: {field}"):
        metadata.check(meta, "checkpoint c")


def test_wellformed_metadata_passes() -> None:
    metadata.check(
        {
            "format": 1,
            "image": "docker.io/x:1",
            "exit": True,
            "tcp_established": False,
            "labels": {"a": "b"},
            "execs": [{"id": "e1", "pid": 12, "args": ["sh"]}, {"id": "e2", "pid": 0}],
            "gpu": {
                "inventory": {
                    "count": 1,
                    "models": ["H100"],
                    "driver": "580.1",
                    "driver_version": 12080,
                },
                "pids": [1],
                "lock_timeout_ms": 5,
            },
            "runc": {"version": "1.2"},
        },
        "checkpoint c",
    )


def test_restore_of_malformed_execs_is_refused_before_anything_runs(tmp_path: Path) -> None:
    from shim.checkpoint import take as checkpointing

    store = signed_store(tmp_path / "s")
    make(store, "k", {"execs": [{"id": "x", "pid": "abc"}]})
    upper = tmp_path / "upper"
    upper.mkdir()
    with pytest.raises(DataLoss, match=r"restore from checkpoint .*execs\[0\].pid"):
        checkpointing.prepare_restore(
            f"file://{tmp_path}/s/k", str(upper), restore_config(tmp_path / "s")
        )
    assert list(upper.iterdir()) == []


def test_restore_policy_fresh_starts_fresh_on_malformed_metadata(tmp_path: Path) -> None:
    """What the shim's restore-policy fresh catches: every failure is a StasisError."""
    from shim.checkpoint import take as checkpointing

    store = signed_store(tmp_path / "s")
    make(store, "gpu", {"gpu": {"inventory": "x"}})
    make(store, "deep", {}, stasis=b'{"gpu":' + DEEP + b"}")
    for name in ("gpu", "deep"):
        with pytest.raises(StasisError):
            checkpointing.prepare_restore(
                f"file://{tmp_path}/s/{name}", None, restore_config(tmp_path / "s")
            )


# --------------------------------------------------------------------------- restore failing late


class RestoringRunc(FakeRunc):
    root = "/nonexistent/runc-root"  # where runc keeps state: nothing to clean here

    async def restore(
        self,
        id: str,
        bundle: str,
        opts: RestoreOpts,
        stdio: Stdio,
        started: Callable[[int], None] | None = None,
    ) -> None:
        await self._call("restore", id)
        assert opts.pid_file
        Path(opts.pid_file).write_text("4343\n")


def test_a_restore_failing_after_runc_restore_kills_what_it_restored(tmp_path: Path) -> None:
    async def body() -> None:
        runc = RestoringRunc()
        p = InitProcess(
            "c1", str(tmp_path), cast(Runc, runc), cast(ProcessIO, FakeIO()), ("", "", "")
        )
        opts = RestoreOpts(
            CheckpointOpts(image_path=str(tmp_path / "img")), pid_file=str(tmp_path / "init.pid")
        )
        p.prepare_restore(opts, timeout=60)

        def on_restored(_: InitProcess) -> None:
            raise ValueError("adopting went wrong")

        p.on_restored = on_restored
        with pytest.raises(ValueError):
            await p.start()
        assert runc.calls[-1] == ("kill", "c1", signal.SIGKILL, True)
        assert p.status is Status.CREATED
        await p.kill(signal.SIGKILL, all=True)  # allowed: something was restored
        p.exited(137)
        assert p.status is Status.STOPPED
        await p.delete()

    run(body())


def test_kill_of_a_checkpoint_task_never_restored_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        runc = RestoringRunc()
        p = InitProcess(
            "c1", str(tmp_path), cast(Runc, runc), cast(ProcessIO, FakeIO()), ("", "", "")
        )
        p.prepare_restore(
            RestoreOpts(CheckpointOpts(image_path="/x"), pid_file="/x/pid"), timeout=60
        )
        with pytest.raises(StasisError, match=r"cannot kill"):
            await p.kill(signal.SIGKILL)
        assert runc.calls == []

    run(body())


# --------------------------------------------------------------------------- expansion


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], *, gz: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = out.getvalue()
    return gzip.compress(raw) if gz else raw


def reg(name: str, size: int) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = size
    return info, bytes(size)


def test_import_refuses_what_expands_past_the_limit_before_writing(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(tar_bytes([reg("checkpoint/a.img", 1 << 20), reg("big", 8 << 20)], gz=True))
    assert archive.stat().st_size < 64 << 10
    store = signed_store(tmp_path / "s")
    with pytest.raises(
        ResourceExhausted, match=rf"archive {archive} .* over the limit limits.max_import_bytes"
    ):
        import_tar(store, str(archive), "x", Limits(max_import_bytes=4 << 20), trust=True)
    assert os.listdir(tmp_path / "s") == []  # the partial import went
    import_tar(store, str(archive), "x", Limits(max_import_bytes=16 << 20), trust=True)


def test_import_refuses_what_would_not_fit_the_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(tar_bytes([reg("checkpoint/a.img", 1 << 20)]))
    store = signed_store(tmp_path / "s")
    free = os.statvfs(tmp_path)
    reserve = free.f_bavail * free.f_frsize - (512 << 10)  # leaves 512 KiB for us
    with pytest.raises(ResourceExhausted, match=r"do not fit .* kept in reserve"):
        import_tar(store, str(archive), "x", Limits(reserve_bytes=reserve), trust=True)
    assert os.listdir(tmp_path / "s") == []


def sparse_tar(path: Path, size: int) -> None:
    """A GNU sparse member ``big`` of ``size`` bytes holding one 512-byte block of data
    (Python's tarfile reads sparse members but cannot write them: GNU tar does)."""
    work = path.parent / "sparse"
    work.mkdir()
    with open(work / "big", "wb") as f:
        f.truncate(size)
        f.seek(size - 512)
        f.write(b"x" * 512)
    subprocess.run(
        ["tar", "--sparse", "--format=gnu", "-cf", str(path), "-C", str(work), "big"], check=True
    )
    (work / "big").unlink()
    work.rmdir()


def test_apply_refuses_a_diff_that_expands_past_the_limit(tmp_path: Path) -> None:
    diff = tmp_path / "rootfs-diff.tar"
    diff.write_bytes(tar_bytes([reg("a", 1 << 20), reg("b", 1 << 20)]))
    upper = tmp_path / "upper"
    upper.mkdir()
    with pytest.raises(ResourceExhausted, match=r"rootfs diff .*limits.max_diff_bytes"):
        rootfs.apply(str(diff), str(tmp_path / "none"), str(upper), max_bytes=(1 << 20) + 1)
    assert list(upper.iterdir()) == []  # refused before writing anything
    rootfs.apply(str(diff), str(tmp_path / "none"), str(upper), max_bytes=2 << 20)


def test_apply_counts_a_sparse_member_at_its_full_size(tmp_path: Path) -> None:
    """The issue's case: a 10 KB diff that wrote a fully allocated 2 GiB file."""
    diff = tmp_path / "rootfs-diff.tar"
    sparse_tar(diff, 2 << 30)
    assert diff.stat().st_size < 16 << 10
    with tarfile.open(diff) as tar:
        assert tar.getmember("big").issparse()
    upper = tmp_path / "upper"
    upper.mkdir()
    with pytest.raises(ResourceExhausted, match=rf"at least {2 << 30}.*limits.max_diff_bytes"):
        rootfs.apply(str(diff), str(tmp_path / "none"), str(upper), max_bytes=1 << 30)
    assert list(upper.iterdir()) == []
    # nor past the free space, whatever the limit
    with pytest.raises(ResourceExhausted, match=rf"{2 << 30} bytes do not fit in {upper}"):
        free = os.statvfs(upper)
        rootfs.apply(
            str(diff), str(tmp_path / "none"), str(upper),
            reserve_bytes=free.f_bavail * free.f_frsize - (1 << 30),
        )  # fmt: skip
    assert list(upper.iterdir()) == []


def test_limits_in_the_config(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text("[limits]\nmax_import_bytes = 10\nmax_diff_bytes = 20\nreserve_bytes = 0\n")
    assert config.load({"STASIS_CONFIG": str(conf)}).limits == Limits(10, 20, 0)
    conf.write_text("[limits]\nmax_diff_bytes = -1\n")
    with pytest.raises(InvalidArgument, match=r"limits.max_diff_bytes must be a number of bytes"):
        config.load({"STASIS_CONFIG": str(conf)})
    conf.write_text("[limits]\nmax_diffs = 1\n")
    with pytest.raises(InvalidArgument, match=r"unknown key limits.max_diffs"):
        config.load({"STASIS_CONFIG": str(conf)})


# --------------------------------------------------------------------------- deleted.files


def read_deleted(tmp_path: Path, data: bytes) -> list[tuple[str, ...]]:
    path = tmp_path / "deleted.files"
    path.write_bytes(data)
    return [tuple(p.split("\0")) for p in rootfs._read_deleted(str(path))]


def test_deleted_files_formats(tmp_path: Path) -> None:
    assert read_deleted(tmp_path, b"") == []
    assert read_deleted(tmp_path, b" [ ] \n") == []
    podman = json.dumps(["/a-c", "/a/b", "/a", "/\u00e9\\"]).encode()
    assert read_deleted(tmp_path, podman) == [("a",), ("a", "b"), ("a-c",), ("\u00e9\\",)]
    per_line = b'[\n"/x",\n  "/y/z"\n]\n'
    assert read_deleted(tmp_path, per_line) == [("x",), ("y", "z")]


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b'["/a"', DataLoss, "not valid JSON"),
        (b'["/a" "/b"]', DataLoss, "expected ','"),
        (b'["/a"] x', DataLoss, "data after"),
        (b'["/a\\q"]', DataLoss, "not valid JSON"),
        (b'["/a', DataLoss, "unterminated"),
        (b'{"a": 1}', InvalidArgument, "not a JSON array of paths"),
        (b'["/a", 1]', InvalidArgument, "not a JSON array of paths"),
        (b'["/"]', InvalidArgument, "root cannot be deleted"),
        (b'["/a/../b"]', InvalidArgument, r"'\.\.'"),
        (b'["' + b"a" * (40 << 10) + b'"]', InvalidArgument, "longer than 32768"),
        (b'["/\xff"]', DataLoss, "not valid JSON"),
    ],
)
def test_bad_deleted_files(
    tmp_path: Path, data: bytes, error: type[StasisError], match: str
) -> None:
    with pytest.raises(error, match=match):
        read_deleted(tmp_path, data)


def test_a_long_entry_without_its_end_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "deleted.files"
    path.write_bytes(b'["' + b"a" * (4 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument, match=r"longer than"):
            rootfs._read_deleted(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_a_long_list_is_read_a_path_at_a_time(tmp_path: Path) -> None:
    paths = [f"/usr/share/doc/package-{i:06d}/some/deeper/file-name.txt" for i in range(40_000)]
    data = json.dumps(paths).encode()
    path = tmp_path / "deleted.files"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        got = rootfs._read_deleted(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(got) == len(paths)
    # the paths themselves, held compactly (the whole-file parse peaked at 27 MB here)
    assert peak < 12 << 20, peak


def test_too_many_deleted_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rootfs, "_MAX_DELETED", 3)
    with pytest.raises(ResourceExhausted, match=r"more than 3 deleted paths"):
        read_deleted(tmp_path, json.dumps(["/a", "/b", "/c", "/d"]).encode())


# --------------------------------------------------------------------------- ctr argv


def test_restore_puts_dashdash_before_ctrs_positional_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from runtime.cli import containers as cli

    store = signed_store(tmp_path / "s")
    make(store, "ok", {"image": "docker.io/x:1"})
    make(store, "evil", {"image": "--privileged"})
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(cli, "ctr", lambda ns, *args, check=True: calls.append(args) or "")

    def ns(ref: str, image: str | None = None, new_id: str = "new") -> argparse.Namespace:
        return argparse.Namespace(
            ref=f"file://{tmp_path}/s/{ref}", image=image, new_id=new_id,
            address="/x", namespace="default",
        )  # fmt: skip

    cli.restore(ns("ok"))
    args = calls.pop()
    assert args[args.index("--") + 1 :] == ("docker.io/x:1", "new")
    with pytest.raises(DataLoss, match=r"image: '--privileged' starts with '-'"):
        cli.restore(ns("evil"))
    with pytest.raises(InvalidArgument, match=r"image '--privileged' starts with '-'"):
        cli.restore(ns("ok", image="--privileged"))
    with pytest.raises(InvalidArgument, match=r"container id '-x'"):
        cli.restore(ns("ok", new_id="-x"))
    assert calls == []
