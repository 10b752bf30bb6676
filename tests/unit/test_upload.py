"""Tests for runtime.store.upload (an S3 checkpoint's commit in a worker process) and for the
spool bookkeeping it relies on (runtime.store.spool: locks, the worker's pid file, gc).

The worker is real (`python -m runtime.store.upload`, started through ForkSpawner); the
S3 server is moto's, in a thread of the test process.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig
from moto.server import ThreadedMotoServer

from runtime.config import S3Config
from runtime.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from runtime.linux.proc import Completed, ForkSpawner, Stdio
from runtime.names import SPOOL_PENDING
from runtime.store import upload
from runtime.store.local import LocalStore
from runtime.store.memory import MemoryStore
from runtime.store.s3 import S3Store
from runtime.store.spool import PID_FILE, collect_spools, new_spool, spool_worker

REPO = Path(__file__).resolve().parents[2]
SECRET = "stasis-upload-secret-9Fq2"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(endpoint: str) -> Iterator[str]:
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIDUPLOAD",
        aws_secret_access_key=SECRET,
        config=BotoConfig(s3={"addressing_style": "path"}),
    )
    name = f"stasis-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    for u in s3.list_multipart_uploads(Bucket=name).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=name, Key=u["Key"], UploadId=u["UploadId"])
    for o in s3.list_objects_v2(Bucket=name).get("Contents", []):
        s3.delete_object(Bucket=name, Key=o["Key"])
    s3.delete_bucket(Bucket=name)


def config(endpoint: str) -> S3Config:
    return S3Config("AKIDUPLOAD", SECRET, "us-east-1", endpoint)


@pytest.fixture
def store(endpoint: str, bucket: str, tmp_path: Path) -> S3Store:
    return S3Store(
        f"s3://{bucket}/ckpts",
        config(endpoint),
        spool_dir=str(tmp_path / "spool"),
        cache_dir=str(tmp_path / "cache"),
        retry_delay=0.01,
    )


def fill(w: Any) -> None:  # an upload.Writer or a CheckpointWriter
    images = w.path("checkpoint", directory=True)
    Path(images, "pages-1.img").write_bytes(os.urandom(3 << 20))
    w.write_bytes("spec.dump", b"{}")
    w.write_bytes("stasis.json", json.dumps({"container_id": "c1"}).encode())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"worker {pid} still runs"
        time.sleep(0.02)


class NoSpawner:
    """A spawner that must not be used: local stores commit in-process."""

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdio: Stdio = Stdio(),
        capture: bool = False,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Completed:
        raise AssertionError(f"spawned {argv}")


# --------------------------------------------------------------------------- the worker


def test_the_upload_runs_in_a_worker(
    store: S3Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stasis.upload")

    async def go() -> tuple[int, str, Any]:
        async with upload.begin(store, "ckpt", ForkSpawner()) as w:
            assert isinstance(w, upload._Delegated)
            # The worker is ready before the caller writes (and would freeze) anything.
            pid = spool_worker(w.spool)
            assert pid == w.worker_pid and pid != os.getpid() and alive(pid)
            assert w.spool.startswith(str(tmp_path / "spool") + "/ckpt-")
            fill(w)
            with pytest.raises(Exception, match="written by commit"):
                w.write_bytes(PID_FILE, b"1")
            info = await w.commit({"reason": "test"})
            return pid, w.spool, info

    pid, spool, info = asyncio.run(go())
    assert info.ref == f"{store.url}/ckpt" and info.name == "ckpt"
    # The worker's log records reach the caller's log (the shim's, in the shim).
    assert f"upload worker {pid}: uploaded checkpoint ckpt in {store.url}" in caplog.text
    assert SECRET not in caplog.text
    assert info.metadata == {"reason": "test", "container_id": "c1"}
    assert not os.path.exists(spool)
    wait_gone(pid)
    [listed] = store.list()
    assert listed.name == "ckpt" and listed.size == info.size
    with store.open("ckpt") as r:
        r.verify()
        assert PID_FILE not in r.manifest.files and SPOOL_PENDING not in r.manifest.files


def test_a_refusal_comes_before_anything_is_written(store: S3Store, tmp_path: Path) -> None:
    async def attempt(s: S3Store) -> None:
        async with upload.begin(s, "ckpt", ForkSpawner()):
            raise AssertionError("the block must not run")

    with store.begin("ckpt") as w:
        w.write_bytes("a", b"a")
        w.commit()
    with pytest.raises(AlreadyExists, match=r"checkpoint ckpt in s3://.* exists already"):
        asyncio.run(attempt(store))
    missing = S3Store("s3://no-such-bucket-stasis/x", store.s3, **store.options())
    with pytest.raises(NotFound) as err:
        asyncio.run(attempt(missing))
    message = str(err.value)
    assert "bucket no-such-bucket-stasis does not exist" in message and "\n" not in message
    assert store.s3.endpoint is not None and store.s3.endpoint in message
    assert SECRET not in message
    assert os.listdir(tmp_path / "spool") == []


def test_a_killed_worker_fails_the_commit_and_keeps_the_spool(store: S3Store) -> None:
    async def go() -> tuple[str, int]:
        async with upload.begin(store, "ckpt", ForkSpawner()) as w:
            fill(w)
            pid = w.worker_pid
            os.kill(pid, signal.SIGKILL)
            spool = w.spool
            with pytest.raises(Unavailable) as err:
                await w.commit()
            message = str(err.value)
            assert f"upload worker (pid {pid}) was killed by SIGKILL" in message
            assert f"to s3://{store.bucket}/ckpts/ckpt/ at {store.endpoint}" in message
            assert f"kept in {spool}: `stasis push {spool} --to {store.url}`" in message
            assert "\n" not in message and SECRET not in message
            return spool, pid

    spool, pid = asyncio.run(go())
    assert not alive(pid)
    assert os.path.exists(os.path.join(spool, SPOOL_PENDING)) and spool_worker(spool) == pid
    assert store.list() == []
    info = store.push(spool)  # the spool's lock died with the worker
    assert info.name == "ckpt" and not os.path.exists(spool)
    with store.open("ckpt") as r:
        r.verify()


def test_an_abandoned_checkpoint_takes_its_spool_and_worker_along(store: S3Store) -> None:
    seen: dict[str, Any] = {}

    async def go() -> None:
        async with upload.begin(store, "ckpt", ForkSpawner()) as w:
            seen.update(spool=w.spool, pid=w.worker_pid)
            fill(w)
            raise RuntimeError("the dump failed")

    with pytest.raises(RuntimeError, match="the dump failed"):
        asyncio.run(go())
    assert not os.path.exists(seen["spool"])
    wait_gone(seen["pid"])
    assert store.list() == []


def test_local_stores_commit_in_process(tmp_path: Path) -> None:
    async def go(store: Any) -> str:
        async with upload.begin(store, "ckpt", NoSpawner()) as w:
            assert isinstance(w, upload._InProcess)
            fill(w)
            return (await w.commit()).ref

    local = LocalStore(str(tmp_path / "store"))
    assert asyncio.run(go(local)) == f"file://{tmp_path}/store/ckpt"
    memory = MemoryStore()
    asyncio.run(go(memory))
    assert [i.name for i in local.list()] == [i.name for i in memory.list()] == ["ckpt"]


def test_the_callers_process_never_imports_boto3(store: S3Store) -> None:
    """What the shim runs for an S3 checkpoint (its module, begin, commit) leaves boto3,
    botocore and zstandard out of its memory: only the worker loads them."""
    code = f"""
import asyncio, json, sys
import shim.checkpoint.take
from runtime.store import upload
from runtime.config import S3Config
from runtime.linux.proc import ForkSpawner
from runtime.store.s3 import S3Store

store = S3Store({store.url!r}, S3Config(**json.loads(sys.argv[1])), **json.loads(sys.argv[2]))

async def go():
    async with upload.begin(store, "ckpt", ForkSpawner()) as w:
        w.write_bytes("checkpoint/pages-1.img", bytes(6 << 20))
        return await w.commit()

assert asyncio.run(go()).name == "ckpt"
loaded = [m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore", "zstandard")]
assert not loaded, loaded
"""
    s3 = {
        "access_key_id": store.s3.access_key_id,
        "secret_access_key": store.s3.secret_access_key,
        "region": store.s3.region,
        "endpoint": store.s3.endpoint,
    }
    subprocess.run(
        [sys.executable, "-c", code, json.dumps(s3), json.dumps(store.options())],
        cwd=REPO,
        check=True,
        timeout=120,
    )
    assert [i.name for i in store.list()] == ["ckpt"]


# --------------------------------------------------------------------------- spools


def old(path: Path, age: float = 7200) -> None:
    when = time.time() - age
    for p in [*sorted(path.rglob("*"), reverse=True), path]:
        os.utime(p, (when, when), follow_symlinks=False)


def spool(root: Path, name: str, url: str | None, committed: bool = True) -> Path:
    path, lock = new_spool(str(root), name)
    os.close(lock)
    Path(path, "checkpoint").mkdir()
    Path(path, "checkpoint", "pages-1.img").write_bytes(b"p")
    if committed:
        doc: dict[str, Any] = {"name": name, "metadata": {}, "compression": "zstd"}
        if url is not None:
            doc["url"] = url
        Path(path, SPOOL_PENDING).write_text(json.dumps(doc))
    return Path(path)


def test_gc_removes_old_unlocked_spools_of_the_store(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    mine, theirs = "s3://b/mine", "s3://b/theirs"
    kept = spool(root, "kept", mine)
    other = spool(root, "other", theirs)
    legacy = spool(root, "legacy", None)  # kept before spools recorded their store
    half = spool(root, "half", mine, committed=False)  # its writer died mid-dump
    fresh = spool(root, "fresh", mine)
    held = spool(root, "held", mine)
    hidden = root / ".made-0123456789ab.new"  # a creation that never finished
    hidden.mkdir()
    (root / "not-a-spool").mkdir()
    for p in (kept, other, legacy, half, held, hidden, root / "not-a-spool"):
        old(p)
    lock = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert collect_spools(str(root), mine, 3 * 3600) == []
        removed = collect_spools(str(root), mine, 3600)
    finally:
        os.close(lock)
    assert sorted(removed) == sorted(str(p) for p in (kept, legacy, half, hidden))
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted([other.name, fresh.name, held.name, "not-a-spool"])
    assert collect_spools(str(root), mine, 0) == [str(fresh), str(held)]
    assert collect_spools(str(root), theirs, 0) == [str(other)]
    assert collect_spools(str(tmp_path / "none"), mine, 0) == []
    with pytest.raises(Exception, match=">= 0"):
        collect_spools(str(root), mine, -1)


def test_push_refuses_a_spool_in_use(store: S3Store, tmp_path: Path) -> None:
    w = store.begin("ckpt")  # holds the spool's lock until it is done
    fill(w)
    w.prepare()
    Path(w.spool, PID_FILE).write_text("4242\n")
    with pytest.raises(FailedPrecondition, match=r"in use by another process \(.*pid 4242\)"):
        store.push(w.spool)
    assert store.gc_spools(0) == []
    w.finish(False)  # the upload failed: the spool stays, unlocked
    assert store.push(w.spool).name == "ckpt"
    with pytest.raises(NotFound, match="does not exist"):
        store.push(w.spool)
