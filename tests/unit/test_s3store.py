"""Tests for runtime.store.s3 against a real S3-compatible server (moto's, in a thread).

One server for the session; every test gets its own bucket, deleted afterwards
(moto keeps objects in RAM). Failures are injected by replacing a method of
the store's boto3 client; wrong credentials are tested with moto's IAM
authentication switched on for the test.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

from runtime.config import Config, S3Config, StorageConfig
from runtime.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from runtime.store.api import CheckpointReader, CheckpointWriter, Store
from runtime.store.archive import export_tar, import_tar
from runtime.store.local import LocalStore
from runtime.store.model import MANIFEST
from runtime.store.resolve import default_store, open_store, resolve
from runtime.store.s3 import S3Reader, S3Store, S3Writer

MiB = 1 << 20
KEY_ID = "AKIDSTASISTEST"
SECRET = "stasis-test-secret-Qx7v93kP"
REPO = Path(__file__).resolve().parents[2]


def data(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def raw_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        config=BotoConfig(s3={"addressing_style": "path"}),
    )


@pytest.fixture
def s3(endpoint: str) -> Any:
    """A plain boto3 client on the server, to look behind the store's back."""
    return raw_client(endpoint)


@pytest.fixture
def bucket(s3: Any) -> Iterator[str]:
    name = f"stasis-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    for u in s3.list_multipart_uploads(Bucket=name).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=name, Key=u["Key"], UploadId=u["UploadId"])
    for o in s3.list_objects_v2(Bucket=name).get("Contents", []):
        s3.delete_object(Bucket=name, Key=o["Key"])
    s3.delete_bucket(Bucket=name)


def s3_config(endpoint: str, **kw: Any) -> S3Config:
    fields: dict[str, Any] = {
        "access_key_id": KEY_ID,
        "secret_access_key": SECRET,
        "region": "us-east-1",
        "endpoint": endpoint,
    }
    fields.update(kw)
    return S3Config(**fields)


MakeStore = Callable[..., S3Store]


@pytest.fixture
def make_store(endpoint: str, bucket: str, tmp_path: Path) -> MakeStore:
    def make(url: str | None = None, cfg: S3Config | None = None, **kw: Any) -> S3Store:
        kw.setdefault("spool_dir", str(tmp_path / "spool"))
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        kw.setdefault("retry_delay", 0.01)
        return S3Store(
            url or f"s3://{bucket}/ckpts", cfg if cfg is not None else s3_config(endpoint), **kw
        )

    return make


@pytest.fixture
def store(make_store: MakeStore) -> S3Store:
    return make_store()


def keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    return sorted(
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    )


def uploads(s3: Any, bucket: str) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def manifest_doc(s3: Any, bucket: str, name: str) -> dict[str, Any]:
    body = s3.get_object(Bucket=bucket, Key=f"ckpts/{name}/{MANIFEST}")["Body"].read()
    doc: dict[str, Any] = json.loads(body)
    return doc


BIG = data(10 * MiB, seed=7) + bytes(10 * MiB)  # 20 MiB: half random, half zeros


def fill(w: CheckpointWriter, big: bool = True) -> dict[str, bytes]:
    """Write a checkpoint-like tree (through path(), as CRIU would, and the other calls)."""
    files = {
        "empty": b"",
        "spec.dump": b'{"ociVersion": "1.0.2"}',
        "stasis.json": json.dumps({"container": "c1", "tcp_established": True}).encode(),
        "checkpoint/core-1.img": data(100_000, seed=2),
        "checkpoint/sub/files.img": b"x" * MiB,
    }
    if big:
        files["checkpoint/pages-1.img"] = BIG
    images = w.path("checkpoint", directory=True)
    for rel, content in files.items():
        if rel.startswith("checkpoint/"):
            target = os.path.join(images, rel[len("checkpoint/") :])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(content)
        else:
            w.write_bytes(rel, content)
    return files


def fail_part(
    monkeypatch: pytest.MonkeyPatch, store: S3Store, number: int, times: int | None
) -> list[int]:
    """Make upload_part fail for part ``number`` (``times`` times, or always); returns the
    part numbers tried."""
    client = store.client()
    real = client.upload_part
    tried: list[int] = []

    def upload_part(**kw: Any) -> Any:
        tried.append(kw["PartNumber"])
        if kw["PartNumber"] == number and (times is None or tried.count(number) <= times):
            raise ClientError(
                {
                    "Error": {"Code": "InternalError", "Message": "injected"},
                    "ResponseMetadata": {"HTTPStatusCode": 500},
                },
                "UploadPart",
            )
        return real(**kw)

    monkeypatch.setattr(client, "upload_part", upload_part)
    return tried


# --------------------------------------------------------------------------- round trip


def test_round_trip(store: S3Store, s3: Any, bucket: str, tmp_path: Path) -> None:
    s: Store = store  # the S3 store satisfies the Store protocol
    w = s.begin("ckpt1")
    assert isinstance(w, S3Writer)
    assert w.spool.startswith(str(tmp_path / "spool") + "/ckpt1-")
    assert w.path("checkpoint/pages-1.img").startswith(w.spool + "/")
    files = fill(w)
    info = w.commit({"reason": "test"})
    assert not os.path.exists(w.spool)
    assert info.name == "ckpt1"
    assert info.ref == f"s3://{bucket}/ckpts/ckpt1"
    assert info.size == sum(map(len, files.values()))
    assert info.metadata == {"reason": "test", "container": "c1", "tcp_established": True}
    assert s.list() == [info]

    doc = manifest_doc(s3, bucket, "ckpt1")
    assert set(doc["files"]) == set(files)
    objects = {o["Key"]: o for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert len(objects) == len(files) + 1
    for rel, entry in doc["files"].items():
        assert entry["compression"] == "zstd"
        assert entry["key"].startswith("data-") and entry["key"].endswith(f"{rel}.zst")
        assert objects[f"ckpts/ckpt1/{entry['key']}"]["Size"] == entry["stored_size"]
        assert entry["size"] == len(files[rel])
    pages = doc["files"]["checkpoint/pages-1.img"]
    assert 10 * MiB < pages["stored_size"] < 11 * MiB  # the zeros compress away
    big = s3.head_object(Bucket=bucket, Key=f"ckpts/ckpt1/{pages['key']}")
    assert big["ETag"].strip('"').endswith("-2")  # two parts: 8 MiB + the rest

    with s.open("ckpt1") as r:
        assert isinstance(r, S3Reader)
        assert r.info == info
        assert r.metadata == info.metadata
        assert r.manifest.files["checkpoint/pages-1.img"].size == 20 * MiB
        images = r.file("checkpoint")  # a directory: everything under it
        assert images == os.path.join(r.path, "checkpoint")
        for rel, content in files.items():
            path = os.path.join(r.path, rel)
            if rel.startswith("checkpoint/"):
                assert Path(path).read_bytes() == content
        assert Path(r.file("spec.dump")).read_bytes() == files["spec.dump"]
        assert Path(r.file("empty")).read_bytes() == b""
        r.verify()
        with pytest.raises(NotFound, match="no file nope"):
            r.file("nope")
        with pytest.raises(InvalidArgument):
            r.file("../ckpt1")
        cache = r.path
        assert os.path.isdir(cache)
    assert not os.path.exists(cache)


def test_export_and_import_through_s3(store: S3Store, tmp_path: Path) -> None:
    """The store-independent helpers work on S3 readers and writers."""
    with store.begin("src") as w:
        files = fill(w, big=False)
        w.commit()
    with store.open("src") as r:
        export_tar(r, str(tmp_path / "ckpt.tar"))
    info = import_tar(store, str(tmp_path / "ckpt.tar"), "copy")
    assert info.size == sum(map(len, files.values()))
    local = LocalStore(str(tmp_path / "local"))
    import_tar(local, str(tmp_path / "ckpt.tar"), "copy")
    with store.open("copy") as r, local.open("copy") as lr:
        r.verify()
        assert r.manifest.files == lr.manifest.files
    assert [i.name for i in store.list()] == ["src", "copy"]


def test_manifest_is_written_last(store: S3Store, bucket: str) -> None:
    writes: list[tuple[str, str]] = []

    def record(params: dict[str, Any], model: Any, **kw: Any) -> None:
        if model.name in ("PutObject", "UploadPart", "CompleteMultipartUpload"):
            writes.append((model.name, params["Key"]))

    store.client().meta.events.register("provide-client-params.s3", record)
    with store.begin("ckpt") as w:
        fill(w)
        w.commit()
    assert writes[-1] == ("PutObject", f"ckpts/ckpt/{MANIFEST}")
    assert [k for _, k in writes].count(f"ckpts/ckpt/{MANIFEST}") == 1
    ops = [op for op, _ in writes]
    assert ops.count("UploadPart") == 2 and ops.count("CompleteMultipartUpload") == 1


# --------------------------------------------------------------------------- failures


def test_failed_upload_keeps_the_spool_and_push_retries(
    store: S3Store, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried = fail_part(monkeypatch, store, 2, times=None)
    with store.begin("ckpt") as w:
        files = fill(w)
        with pytest.raises(Unavailable) as err:
            w.commit({"reason": "retry me"})
    message = str(err.value)
    assert "upload part 2 of" in message
    assert f"kept in {w.spool}" in message and "push" in message
    assert "\n" not in message
    assert tried.count(2) == 4  # the part got the store's own retries
    # Nothing is listed, no manifest, no unfinished upload, no stray object; the spool stays.
    assert store.list() == []
    assert keys(s3, bucket) == []
    assert uploads(s3, bucket) == []
    assert Path(w.spool, "checkpoint/pages-1.img").read_bytes() == BIG
    with pytest.raises(FailedPrecondition):
        w.commit()

    monkeypatch.undo()
    info = store.push(w.spool)
    assert not os.path.exists(w.spool)
    assert info.name == "ckpt"
    assert info.metadata["reason"] == "retry me"
    with store.open("ckpt") as r:
        r.verify()
        assert Path(r.file("checkpoint/pages-1.img")).read_bytes() == BIG
        assert set(r.manifest.files) == set(files)


def test_a_refused_manifest_leaves_nothing_behind(
    store: S3Store, s3: Any, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = store.client()
    real = client.put_object

    def put_object(**kw: Any) -> Any:
        if kw["Key"].endswith(MANIFEST):
            error = {"Code": "AccessDenied", "Message": "no"}
            raise ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Put")
        return real(**kw)

    monkeypatch.setattr(client, "put_object", put_object)
    with store.begin("ckpt") as w:
        fill(w, big=False)
        with pytest.raises(PermissionDenied, match=f"S3 put s3://{bucket}/ckpts/ckpt/manifest"):
            w.commit()
    assert keys(s3, bucket) == [] and uploads(s3, bucket) == []
    assert os.path.isdir(w.spool)


def test_a_transient_part_failure_is_retried(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried = fail_part(monkeypatch, store, 2, times=1)
    with store.begin("ckpt") as w:
        fill(w)
        w.commit()
    assert tried.count(2) == 2
    with store.open("ckpt") as r:
        r.verify()


def test_a_part_broken_off_mid_body_is_sent_again_whole(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = store.client()
    real = client.upload_part
    broken: list[int] = []

    def upload_part(**kw: Any) -> Any:
        if kw["PartNumber"] == 1 and not broken:
            broken.append(len(kw["Body"].read(1000)))
            raise ConnectionError("injected: the connection broke off mid-body")
        return real(**kw)

    monkeypatch.setattr(client, "upload_part", upload_part)
    start = time.monotonic()
    with store.begin("ckpt") as w:
        fill(w)
        w.commit()
    assert broken == [1000]
    # Rewound, not sent short: a short body stalls until the read timeout.
    assert time.monotonic() - start < 30
    with store.open("ckpt") as r:
        r.verify()
        assert Path(r.file("checkpoint/pages-1.img")).read_bytes() == BIG


def test_push_after_the_name_was_taken(store: S3Store) -> None:
    first, second = store.begin("ckpt"), store.begin("ckpt")
    fill(first, big=False)
    fill(second, big=False)
    first.commit()
    with pytest.raises(AlreadyExists, match=f"kept in {second.spool}"):
        second.commit()
    assert os.path.isdir(second.spool)
    info = store.push(second.spool, name="other")
    assert [i.name for i in store.list()] == ["ckpt", "other"]
    assert info.ref.endswith("/other")
    for name in ("ckpt", "other"):  # separate data directories: neither overwrote the other
        with store.open(name) as r:
            r.verify()


def test_gc_removes_leftovers(store: S3Store, s3: Any, bucket: str) -> None:
    with store.begin("good") as w:
        fill(w, big=False)
        w.commit()
    good = keys(s3, bucket, "ckpts/good/")
    s3.put_object(Bucket=bucket, Key="ckpts/ghost/data-1/a.zst", Body=b"a")
    mpu = s3.create_multipart_upload(Bucket=bucket, Key="ckpts/ghost/data-1/big.zst")
    s3.upload_part(
        Bucket=bucket,
        Key="ckpts/ghost/data-1/big.zst",
        UploadId=mpu["UploadId"],
        PartNumber=1,
        Body=b"p" * 1000,
    )
    s3.put_object(Bucket=bucket, Key="ckpts/good/data-old/stray.zst", Body=b"s")
    s3.put_object(Bucket=bucket, Key="elsewhere/x", Body=b"x")

    assert store.gc(3600) == []
    assert len(uploads(s3, bucket)) == 1
    removed = store.gc(0)
    assert sorted(removed) == [
        "ghost/data-1/a.zst",
        "ghost/data-1/big.zst (unfinished upload)",
        "good/data-old/stray.zst",
    ]
    assert uploads(s3, bucket) == []
    assert keys(s3, bucket) == sorted([*good, "elsewhere/x"])
    with store.open("good") as r:
        r.verify()
    assert store.gc(0) == []
    with pytest.raises(InvalidArgument):
        store.gc(-1)


@pytest.mark.parametrize(
    ("compression", "damage", "reason"),
    [
        ("none", "flip", "sha256 mismatch"),
        ("zstd", "flip", "checkpoint/core-1.img: "),  # undecodable or a sha256 mismatch
        ("zstd", "truncate", "stored object is"),
        ("zstd", "delete", "is missing"),
    ],
)
def test_damaged_objects_are_data_loss(
    store: S3Store, s3: Any, bucket: str, compression: str, damage: str, reason: str
) -> None:
    with store.begin("ckpt") as w:
        w.compression = compression
        fill(w, big=False)
        w.commit()
    entry = manifest_doc(s3, bucket, "ckpt")["files"]["checkpoint/core-1.img"]
    key = f"ckpts/ckpt/{entry['key']}"
    stored = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    if damage == "flip":
        stored[len(stored) // 2] ^= 0x01
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(stored))
    elif damage == "truncate":
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(stored[:-10]))
    else:
        s3.delete_object(Bucket=bucket, Key=key)
    with store.open("ckpt") as r:
        assert Path(r.file("spec.dump")).read_bytes() == b'{"ociVersion": "1.0.2"}'
        with pytest.raises(DataLoss) as err:
            r.verify()
        message = str(err.value)
        assert message.startswith(f"checkpoint ckpt in s3://{bucket}/ckpts: ")
        assert "checkpoint/core-1.img: " in message and reason in message
        assert "files.img" not in message and "spec.dump" not in message
        with pytest.raises(DataLoss, match=r"core-1\.img"):
            r.file("checkpoint")
        assert not os.path.exists(os.path.join(r.path, "checkpoint/core-1.img"))


def test_a_large_damaged_object_is_data_loss(store: S3Store, s3: Any, bucket: str) -> None:
    """Ranged GETs: damage in the second range is found."""
    with store.begin("ckpt") as w:
        w.compression = "none"
        w.write_bytes("pages.img", data(9 * MiB))
        w.commit()
    key = "ckpts/ckpt/" + manifest_doc(s3, bucket, "ckpt")["files"]["pages.img"]["key"]
    stored = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    stored[-5] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(stored))
    with store.open("ckpt") as r, pytest.raises(DataLoss, match=r"pages\.img: sha256 mismatch"):
        r.verify()


def test_missing_and_malformed_manifests(store: S3Store, s3: Any, bucket: str) -> None:
    with pytest.raises(NotFound, match=f"checkpoint nope in s3://{bucket}/ckpts does not exist"):
        store.open("nope")
    s3.put_object(Bucket=bucket, Key=f"ckpts/bad/{MANIFEST}", Body=b"{not json")
    with pytest.raises(DataLoss, match="not valid JSON"):
        store.open("bad")
    with store.begin("good") as w:
        w.write_bytes("a", b"a")
        w.commit()
    doc = manifest_doc(s3, bucket, "good")
    doc["files"]["a"]["key"] = "../other/a"
    s3.put_object(Bucket=bucket, Key=f"ckpts/evil/{MANIFEST}", Body=json.dumps(doc).encode())
    with pytest.raises(DataLoss, match="a: bad stored key"):
        store.open("evil")
    assert [i.name for i in store.list()] == ["good"]
    with pytest.raises(InvalidArgument):
        store.open("../x")


def test_already_exists_remove_and_abort(store: S3Store, s3: Any, bucket: str) -> None:
    with store.begin("ckpt") as w:
        w.write_bytes("a", b"a")
        w.commit()
    with pytest.raises(AlreadyExists, match=f"checkpoint ckpt in s3://{bucket}/ckpts"):
        store.begin("ckpt")
    store.remove("ckpt")
    assert store.list() == []
    assert keys(s3, bucket) == []
    with pytest.raises(NotFound):
        store.remove("ckpt")

    with pytest.raises(RuntimeError), store.begin("ckpt") as w:
        w.write_bytes("a", b"a")
        raise RuntimeError("checkpoint failed")
    assert not os.path.exists(w.spool)
    with pytest.raises(FailedPrecondition, match="writer is aborted"):
        w.commit()
    with pytest.raises(InvalidArgument):
        store.begin("ckpt").write_bytes(MANIFEST, b"{}")
    w = store.begin("ckpt")
    w.compression = "brotli"
    with pytest.raises(InvalidArgument, match="unknown compression"):
        w.commit()
    assert not os.path.exists(w.spool)
    assert keys(s3, bucket) == []


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_compressions(make_store: MakeStore, s3: Any, bucket: str, compression: str) -> None:
    store = make_store(compression=compression)
    with store.begin("ckpt") as w:
        files = fill(w, big=False)
        w.commit()
    doc = manifest_doc(s3, bucket, "ckpt")
    ext = {"zstd": ".zst", "none": ""}[compression]
    for rel, entry in doc["files"].items():
        assert entry["compression"] == compression
        assert entry["key"].endswith(rel + ext)
    with store.open("ckpt") as r:
        r.verify()
        for rel, content in files.items():
            assert Path(r.file(rel)).read_bytes() == content


def test_checksums_when_required(make_store: MakeStore, endpoint: str) -> None:
    store = make_store(cfg=s3_config(endpoint, checksum="when_required"), compression="none")
    with store.begin("ckpt") as w:
        w.write_bytes("pages.img", data(9 * MiB))  # multipart without CRC32
        w.commit()
    with store.open("ckpt") as r:
        r.verify()


# --------------------------------------------------------------------------- errors


@pytest.fixture
def iam_key(endpoint: str) -> dict[str, str]:
    """An IAM user's access key allowed s3:*, created while moto's auth is still off."""
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )
    user = f"stasis-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    statement = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
    policy = {"Version": "2012-10-17", "Statement": [statement]}
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key: dict[str, str] = iam.create_access_key(UserName=user)["AccessKey"]
    return key


def test_wrong_credentials(
    make_store: MakeStore,
    endpoint: str,
    bucket: str,
    iam_key: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    import moto.settings

    caplog.set_level(logging.DEBUG)
    wrong = "wrong-secret-Zk29fXq81"
    before = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # authenticate every request from now on
    try:
        right = {
            "access_key_id": iam_key["AccessKeyId"],
            "secret_access_key": iam_key["SecretAccessKey"],
        }
        good = make_store(cfg=s3_config(endpoint, **right))
        assert good.list() == []
        for key_id in (iam_key["AccessKeyId"], "AKIDNOSUCHKEY"):
            cfg = s3_config(endpoint, access_key_id=key_id, secret_access_key=wrong)
            store = make_store(cfg=cfg)
            for op in (store.list, lambda s=store: s.begin("ckpt")):
                with pytest.raises(PermissionDenied) as err:
                    op()
                message = str(err.value)
                assert "\n" not in message
                assert f"s3://{bucket}/ckpts" in message and endpoint in message
                assert "access refused" in message
                text = "".join(traceback.format_exception(err.value))
                assert wrong not in text and wrong not in repr(store) and wrong not in repr(cfg)
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = before
    assert caplog.text  # botocore logged its requests
    assert wrong not in caplog.text and iam_key["SecretAccessKey"] not in caplog.text


def test_missing_bucket(make_store: MakeStore) -> None:
    store = make_store("s3://no-such-bucket-stasis/ckpts")
    ops: list[Callable[[], object]] = [
        store.list,
        lambda: store.begin("ckpt"),
        lambda: store.open("ckpt"),
        lambda: store.gc(0),
        lambda: store.remove("ckpt"),
    ]
    for op in ops:
        with pytest.raises(NotFound, match="bucket no-such-bucket-stasis does not exist"):
            op()


def test_unreachable_endpoint(make_store: MakeStore, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    dead = f"http://127.0.0.1:{port}"
    store = make_store(cfg=s3_config(dead), connect_timeout=0.5, max_attempts=2)
    start = time.monotonic()
    for op in (store.list, lambda: store.begin("ckpt")):
        with pytest.raises(Unavailable, match=f"at {dead}: cannot reach the endpoint"):
            op()
    assert time.monotonic() - start < 10


def test_credentials_from_the_aws_chain(
    make_store: MakeStore, endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("AWS_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bare = S3Config(endpoint=endpoint, region="us-east-1")
    with pytest.raises(PermissionDenied, match="no usable S3 credentials"):
        make_store(cfg=bare).list()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-the-environment")
    store = make_store(cfg=bare)
    with store.begin("ckpt") as w:
        w.write_bytes("a", b"a")
        w.commit()
    assert [i.name for i in store.list()] == ["ckpt"]
    with pytest.raises(InvalidArgument, match="access_key_id is set but secret_access_key"):
        S3Store("s3://b/p", S3Config(access_key_id="AKID"))


# --------------------------------------------------------------------------- resolving


def test_resolve_and_open_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s3cfg = S3Config(
        endpoint="http://user:pw@127.0.0.1:9/", access_key_id="a", secret_access_key="b"
    )
    config = Config(StorageConfig(url=f"file://{tmp_path}/local", s3=s3cfg))
    store, name = resolve("s3://bucket/prefix/name", config)
    assert isinstance(store, S3Store) and name == "name"
    assert (store.url, store.bucket, store.prefix) == ("s3://bucket/prefix", "bucket", "prefix")
    assert store.endpoint == "http://127.0.0.1:9"  # no user:password in messages
    store, name = resolve("s3://bucket/a/b/name", config)
    assert (store.url, name) == ("s3://bucket/a/b", "name")
    store, name = resolve("s3://bucket/name", config)
    assert (store.url, name) == ("s3://bucket", "name")
    for bad in (
        "s3://bucket",
        "s3://bucket/",
        "s3:///name",
        "s3://bucket/p/bad name",
        "s3://b/a//n",
    ):
        with pytest.raises(InvalidArgument):
            resolve(bad, config)

    s3_default = Config(StorageConfig(url="s3://bucket/prefix/", s3=s3cfg))
    store, name = resolve("ckpt", s3_default)
    assert isinstance(store, S3Store) and (store.url, name) == ("s3://bucket/prefix", "ckpt")
    assert isinstance(default_store(s3_default), S3Store)
    assert isinstance(open_store("s3://bucket/p", config), S3Store)

    # Without a config, open_store reads it (here: from the environment).
    monkeypatch.setenv("STASIS_CONFIG", str(tmp_path / "config.toml"))
    (tmp_path / "config.toml").write_text('[storage.s3]\nregion = "eu-west-1"\n')
    monkeypatch.setenv("STASIS_S3_ENDPOINT", "http://127.0.0.1:8")
    store = open_store("s3://bucket/p")
    assert isinstance(store, S3Store) and store.endpoint == "http://127.0.0.1:8"


def test_local_use_does_not_import_boto3(tmp_path: Path) -> None:
    code = f"""
import sys
from runtime.config import Config
from runtime.store.resolve import open_store, resolve
resolve({str(tmp_path / "x")!r}, Config())
open_store("file://{tmp_path}/store")
loaded = [m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore", "zstandard")]
assert not loaded and "runtime.store.s3" not in sys.modules, loaded
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_protocols(store: S3Store) -> None:
    w: CheckpointWriter = store.begin("ckpt")
    w.write_bytes("a", b"a")
    w.commit()
    r: CheckpointReader = store.open("ckpt")
    r.close()
    r.close()
