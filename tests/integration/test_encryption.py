"""Checkpoints encrypted at rest, end to end on containerd 2.1.

A private containerd of this module's own runs its shims with a Stasis config
that names a key file (STASIS_CONFIG in containerd's environment; the session's
config and containerds are untouched): a counting container is checkpointed
(no plaintext of its memory or files in the store), restored (it counts on),
and a restore with another key configured is refused naming the checkpoint and
both key ids, before any process starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bed.containerd import Containerd, bed_missing, images_dir, unique_id
from bed.workload import IMAGE, RUNTIME, remove, stasis, task, wait_count

from runtime.store import crypt
from runtime.store.files import DEFAULT_CACHE_DIR
from runtime.store.local import LocalStore

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BUCKET = "stasis-enc"


@dataclass
class Bed:
    containerd: Containerd
    work: Path
    config: Path
    key_a: Path
    key_b: Path

    s3: str = ""  # [storage.s3] table, once moto_server runs

    def use_key(self, key: Path) -> None:
        """Point the config (read by shims at every checkpoint and restore) at ``key``."""
        self.config.write_text(
            "[storage]\n"
            f'url = "file://{self.work}/default"\n'
            f'restore_sources = ["file://{self.work}", "file:///tmp", "s3://{BUCKET}"]\n'
            + self.s3
            + "[encryption]\n"
            f'key_file = "{key}"\n'
        )
        self.config.chmod(0o600)


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    if why := bed_missing(["2.1"]):
        pytest.fail(why, pytrace=False)
    work = Path(tempfile.mkdtemp(prefix="stasis-enc-", dir="/var/tmp"))
    key_a, key_b = work / "a.key", work / "b.key"
    crypt.write_key_file(str(key_a))
    crypt.write_key_file(str(key_b))
    config = work / "config.toml"
    saved = os.environ.get("STASIS_CONFIG")
    dirs = [REPO / ".venv" / "bin"]
    c = Containerd.in_run_dir("2.1", [d for d in dirs if d.is_dir()])
    b = Bed(c, work, config, key_a, key_b)
    b.use_key(key_a)
    # The CLI's config, and through containerd's environment the shims'.
    os.environ["STASIS_CONFIG"] = str(config)
    left = None
    try:
        c.start()
        c.import_image(images_dir() / "busybox.tar")
        yield b
    finally:
        left = c.stop()
        if saved is None:
            os.environ.pop("STASIS_CONFIG", None)
        else:
            os.environ["STASIS_CONFIG"] = saved
        shutil.rmtree(work, ignore_errors=True)
    assert not left, f"containerd left behind (now cleaned up): {left}"


@pytest.fixture
def ids(bed: Bed) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for id in made:
        remove(bed.containerd, id)


def _cache_entries(name: str) -> list[str]:
    try:
        return [e for e in os.listdir(DEFAULT_CACHE_DIR) if e.startswith(f"{name}-")]
    except FileNotFoundError:
        return []


def test_encrypted_checkpoint_restores_and_another_key_is_refused(bed: Bed, ids: list[str]) -> None:
    c = bed.containerd
    marker = f"stasis-marker-{os.urandom(8).hex()}"
    # The marker lives in the shell's memory (a variable) and in a file of the rootfs diff.
    script = (
        f"M={marker}; echo $M > /secret; "
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"
    )
    id = unique_id("enc")
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", script)
    ids.append(id)
    before = wait_count(c, id, 20)
    store = bed.work / "store"
    name = f"{id}-ckpt"
    out = stasis(c, "checkpoint", id, "--exit", "--to", str(store), "--name", name)
    ref = out.stdout.split()[-1]
    remove(c, id)

    # Nothing in the store in clear: not the memory, not the rootfs diff.
    files = [p for p in (store / name).rglob("*") if p.is_file()]
    assert any(p.name.startswith("pages-") for p in files), files
    for p in files:
        assert marker.encode() not in p.read_bytes(), f"{p} holds the marker in clear"
    # ... while the decrypted images do hold it (the check above means something).
    key = crypt.load_key(str(bed.key_a))
    with LocalStore(str(store), key=key, cache_dir=str(bed.work / "cache")).open(name) as r:
        images = Path(r.file("checkpoint"))
        assert any(marker.encode() in p.read_bytes() for p in images.glob("pages-*.img"))
        assert r.manifest.encryption is not None and r.manifest.encryption.key_id == key.id

    new = unique_id("rst")
    c.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
          f"stasis.dev/restore-from={ref}", IMAGE, new)  # fmt: skip
    ids.append(new)
    assert wait_count(c, new, before) > before  # counts on from the checkpoint
    pid = task(c, new)[0]  # type: ignore[index]
    assert Path(f"/proc/{pid}/root/secret").read_text().strip() == marker
    remove(c, new)
    deadline = time.monotonic() + 10
    while _cache_entries(name) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _cache_entries(name) == [], "decrypted copies left in the cache"

    # Another key configured: refused at Create, naming the checkpoint and both key ids.
    bed.use_key(bed.key_b)
    other = crypt.load_key(str(bed.key_b))
    wrong = unique_id("wrong")
    done = c.ctr(
        "run", "-d", "--runtime", RUNTIME, "--annotation",
        f"stasis.dev/restore-from={ref}", IMAGE, wrong, check=False,
    )  # fmt: skip
    ids.append(wrong)
    assert done.returncode != 0, done.stdout
    message = done.stderr
    assert name in message and key.id in message and other.id in message, message
    assert task(c, wrong) is None or task(c, wrong)[1] != "RUNNING"  # type: ignore[index]
    # The CLI refuses the same way.
    shown = stasis(c, "inspect", ref, check=False)
    assert shown.returncode != 0 and key.id in shown.stderr and other.id in shown.stderr
    bed.use_key(bed.key_a)


@pytest.fixture
def moto(bed: Bed) -> Iterator[object]:
    """moto_server with bucket BUCKET; the bed's config points [storage.s3] at it."""
    import socket
    import subprocess
    import sys

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.prefix) / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="k", aws_secret_access_key="s",
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        bed.s3 = (
            '[storage.s3]\naccess_key_id = "k"\nsecret_access_key = "s"\n'
            f'region = "us-east-1"\nendpoint = "{endpoint}"\n'
        )
        bed.use_key(bed.key_a)
        yield client
    finally:
        bed.s3 = ""
        bed.use_key(bed.key_a)
        proc.terminate()  # our own child, by its Popen
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_encrypted_s3_checkpoint_restores(bed: Bed, moto: object, ids: list[str]) -> None:
    """The upload worker encrypts on the way up; the restoring shim decrypts after download."""
    from typing import Any

    client: Any = moto
    c = bed.containerd
    marker = f"stasis-s3-marker-{os.urandom(8).hex()}"
    script = (
        f"M={marker}; echo $M > /secret; "
        "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.05; done"
    )
    id = unique_id("encs3")
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", script)
    ids.append(id)
    before = wait_count(c, id, 20)
    out = stasis(c, "checkpoint", id, "--exit", "--to", f"s3://{BUCKET}/enc", "--name", id)
    ref = out.stdout.split()[-1]
    assert ref == f"s3://{BUCKET}/enc/{id}"
    remove(c, id)
    objects = client.list_objects_v2(Bucket=BUCKET, Prefix=f"enc/{id}/")["Contents"]
    assert any("pages-" in o["Key"] for o in objects), objects
    for o in objects:
        body = client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
        assert marker.encode() not in body, f"{o['Key']} holds the marker in clear"

    new = unique_id("rsts3")
    c.ctr("run", "-d", "--runtime", RUNTIME, "--annotation",
          f"stasis.dev/restore-from={ref}", IMAGE, new)  # fmt: skip
    ids.append(new)
    assert wait_count(c, new, before) > before
    pid = task(c, new)[0]  # type: ignore[index]
    assert Path(f"/proc/{pid}/root/secret").read_text().strip() == marker
