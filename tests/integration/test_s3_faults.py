"""S3 checkpoints when things go wrong: the upload worker SIGKILLed half-way through
the upload, and a wrong secret.

The CLI asks the shim over ttrpc; the shim dumps into a local spool and a worker
process of its own (`python -m runtime.store.upload`, its PID in the spool's
`.stasis-upload.pid`) compresses and uploads it. So "the checkpointing process"
killed in the middle of the upload is that worker, and the shim and its container
live on. The upload is slowed down by a throttling TCP proxy in front of the
session's moto_server, so that it is caught in the act: a multipart upload under the
checkpoint's prefix with parts in it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import pytest
from bed import workload
from bed.containerd import Containerd, unique_id
from bed.s3proxy import Fault, FaultProxy
from bed.workload import COUNTER, IMAGE, RUNTIME, bundle, count, holding_memory, stasis_argv, task
from conftest import S3Server, signing_table

from runtime.names import SPOOL_DIR, SPOOL_PENDING

pytestmark = pytest.mark.integration

WORKER_PID = ".stasis-upload.pid"  # runtime.store.spool.PID_FILE, in the spool
# Shared objects that boto3/botocore (the XML parsers) or zstandard load:
# a shim that never imported them has none of them mapped.
# (ssl is no marker: asyncio maps it in every shim.)
UPLOAD_LIBS = ("zstandard", "/pyexpat.", "/_elementtree.")
CACHE_DIR = "/var/lib/stasis/cache"  # runtime.store.files.DEFAULT_CACHE_DIR, restores download
MEM_MIB = 96  # random (incompressible) memory the container holds: the upload's bulk
PROXY_RATE = 8 << 20  # bytes/s the proxy lets through towards moto: ~12 s for the upload


# -- helpers -----------------------------------------------------------------------------

# S3 round trips are slower than local ones: more time for each CLI call.
stasis = partial(workload.stasis, timeout=180)


def wait_for(ok: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, ValueError):
            if got := ok():
                return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def counting(pid: int, timeout: float = 30) -> int:
    """Waits until the container of init `pid` counts on; returns the count seen."""
    first = wait_for(lambda: count(pid), timeout, f"init {pid} to count")
    return int(wait_for(lambda: count(pid) > first and count(pid), timeout, f"{pid} to count on"))


def wait_count(c: Containerd, id: str, above: int, timeout: float = 60) -> int:
    def ok() -> int:
        t = task(c, id)
        return count(t[0]) if t and t[1] == "RUNNING" and count(t[0]) > above else 0

    return int(wait_for(ok, timeout, f"{id} to count past {above}"))


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
    return out


def dd_resident_kib(init: int) -> int:
    """RssAnon of the container's dd (0 while the head writer is still filling it)."""
    todo, seen = [init], []
    while todo:
        kids = children(todo.pop())
        todo += kids
        seen += kids
    comms = {p: Path(f"/proc/{p}/comm").read_text().strip() for p in seen}
    if "head" in comms.values():
        return 0
    for pid, comm in comms.items():
        if comm == "dd":
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    return 0


def upload_libs(pid: int) -> list[str]:
    """The shared objects of boto3's and zstandard's imports that process `pid` maps."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    libs = {line.split()[-1] for line in maps if ".so" in line}
    return sorted(lib for lib in libs if any(m in lib for m in UPLOAD_LIBS))


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie answers kill(0) too: it is not running.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def remove(c: Containerd, id: str) -> None:
    c.ctr("task", "kill", "-s", "KILL", id, check=False)
    for _ in range(100):
        if task(c, id) is None or c.ctr("task", "rm", "-f", id, check=False).returncode == 0:
            break
        time.sleep(0.05)
    c.ctr("containers", "rm", id, check=False)


def client(s3: S3Server) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        region_name="us-east-1",
    )


def objects(s3: Any, bucket: str, prefix: str) -> list[str]:
    resp = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def uploads(s3: Any, bucket: str, prefix: str) -> list[tuple[str, str]]:
    resp = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return [(u["Key"], u["UploadId"]) for u in resp.get("Uploads", [])]


@contextlib.contextmanager
def session_config(text: str) -> Iterator[Path]:
    """The session's STASIS_CONFIG (which shims read at every checkpoint) replaced by
    `text` for the block, its content restored afterwards whatever happens."""
    path = Path(os.environ["STASIS_CONFIG"])
    saved = path.read_bytes()
    try:
        path.write_text(text + signing_table())  # the session's key signs and verifies
        yield path
    finally:
        path.write_bytes(saved)


def s3_config(endpoint: str, key_id: str, secret: str) -> str:
    return (
        "[storage.s3]\n"
        f'access_key_id = "{key_id}"\n'
        f'secret_access_key = "{secret}"\n'
        'region = "us-east-1"\n'
        f'endpoint = "{endpoint}"\n'
    )


class SlowProxy:
    """A TCP proxy in front of moto that lets at most `rate` bytes per second through
    towards it (all connections together); answers come back unthrottled. `close`
    cuts every connection."""

    def __init__(self, upstream: str, rate: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self._rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()  # when the bytes reserved so far have gone through
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._listener.accept()
                up = socket.create_connection(self._upstream)
            except OSError:
                return
            with self._lock:
                if self._closed:
                    down.close()
                    up.close()
                    return
                self._sockets += [down, up]
            threading.Thread(target=self._pump, args=(down, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, throttle: bool) -> None:
        try:
            while data := src.recv(256 << 10):
                if throttle:
                    with self._lock:
                        self._next = max(self._next, time.monotonic()) + len(data) / self._rate
                        until = self._next
                    time.sleep(max(0.0, until - time.monotonic()))
                    if self._closed:
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        self._listener.close()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


# -- the upload worker SIGKILLed during the upload -------------------------------------------


def test_upload_worker_killed_mid_upload_nothing_listed_gc_cleans_container_runs(
    containerd: Containerd, s3_server: S3Server
) -> None:
    c = containerd
    s3 = client(s3_server)
    id = unique_id("s3k")
    run = unique_id("kill")
    prefix = f"s3://{s3_server.bucket}/{run}"
    name = unique_id("ckpt-killed")  # spools are machine-wide: never shared by sessions
    init = 0
    proxy = SlowProxy(s3_server.endpoint, PROXY_RATE)
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", holding_memory(MEM_MIB))
    try:
        t = task(c, id)
        assert t is not None and t[1] == "RUNNING"
        init = t[0]
        wait_for(lambda: dd_resident_kib(init) >= MEM_MIB << 10, 60, f"dd to hold {MEM_MIB} MiB")
        before = counting(init)
        shim = int((bundle(c, id) / "shim.pid").read_text())
        assert upload_libs(shim) == []

        with session_config(
            s3_config(proxy.endpoint, s3_server.access_key_id, s3_server.secret_access_key)
        ):
            cli = subprocess.Popen(
                [*stasis_argv(c), "checkpoint", id, "--to", prefix, "--name", name],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                # The worker writes its PID into the spool before the dump starts.
                def worker_pid() -> int:
                    found = glob.glob(f"{SPOOL_DIR}/{name}-*/{WORKER_PID}")
                    assert cli.poll() is None, f"the checkpoint ended first: {cli.communicate()}"
                    return int(Path(found[0]).read_text()) if found else 0

                worker = int(wait_for(worker_pid, 120, "the upload worker's pid file"))
                assert worker != shim and parent(worker) == shim

                # Uploading: a multipart upload under the checkpoint with parts in it.
                def parts_arrived() -> bool:
                    for key, upload_id in uploads(s3, s3_server.bucket, f"{run}/{name}/"):
                        resp = s3.list_parts(Bucket=s3_server.bucket, Key=key, UploadId=upload_id)
                        if resp.get("Parts"):
                            return True
                    assert cli.poll() is None, f"the checkpoint ended first: {cli.communicate()}"
                    return False

                wait_for(parts_arrived, 120, "the upload to be under way", step=0.02)
                os.kill(worker, signal.SIGKILL)
                out, err = cli.communicate(timeout=60)
            finally:
                if cli.poll() is None:
                    cli.kill()
                    cli.wait()
        proxy.close()  # nothing the dead worker sent may still trickle into moto

        # One line: who died, where it was uploading to, where the files are.
        assert cli.returncode != 0, out
        assert len(err.strip().splitlines()) == 1 and err.startswith("stasis: "), err
        assert f"upload worker (pid {worker}) was killed by SIGKILL" in err, err
        assert f"s3://{s3_server.bucket}/{run}/{name}/" in err and proxy.endpoint in err, err
        assert "stasis push" in err and s3_server.secret_access_key not in err, err
        assert uploads(s3, s3_server.bucket, f"{run}/"), "the killed upload left a multipart upload"

        # The shim and its container live on (leave-running): it counts on.
        assert alive(shim) and not alive(worker)
        t = task(c, id)
        assert t == (init, "RUNNING"), t
        assert counting(init) > before
        # The shim never imported boto3 or zstandard: its worker did.
        assert upload_libs(shim) == []

        # The spool is kept, committed, for `stasis push`.
        spools = glob.glob(f"{SPOOL_DIR}/{name}-*")
        assert len(spools) == 1 and spools[0] in err, (spools, err)
        assert os.path.exists(os.path.join(spools[0], SPOOL_PENDING))

        # Without a manifest there is no checkpoint.
        assert stasis(c, "list", "--store", prefix, "--json").stdout.strip() == "[]"
        assert stasis(c, "list", "--store", prefix).stdout == ""

        # gc takes the stray objects, the unfinished upload's parts and the kept spool.
        gc = stasis(c, "gc", "--store", prefix, "--grace", "0")
        removed = gc.stdout.splitlines()
        in_bucket = [r for r in removed if r.startswith(f"{prefix}/")]
        assert in_bucket and all(r.startswith(f"{prefix}/{name}/data-") for r in in_bucket)
        assert any(r.endswith("(unfinished upload)") for r in in_bucket), removed
        assert sorted(set(removed) - set(in_bucket)) == [f"file://{spools[0]}"], removed
        assert objects(s3, s3_server.bucket, f"{run}/") == []
        assert uploads(s3, s3_server.bucket, f"{run}/") == []
        assert not os.path.exists(spools[0])
        assert stasis(c, "gc", "--store", prefix, "--grace", "0").stdout == ""
        assert stasis(c, "list", "--store", prefix).stdout == ""

        t = task(c, id)
        assert t == (init, "RUNNING"), t
        assert counting(init) > before
    finally:
        proxy.close()
        remove(c, id)
        if init and alive(init):
            os.kill(init, signal.SIGKILL)
        for spool in glob.glob(f"{SPOOL_DIR}/{name}-*"):
            shutil.rmtree(spool, ignore_errors=True)
        with contextlib.suppress(Exception):
            stasis(c, "gc", "--store", prefix, "--grace", "0", check=False)


# -- a wrong secret ----------------------------------------------------------------------------


def moto_auth(endpoint: str, no_auth_actions: float) -> None:
    """moto_server authenticates every request after `no_auth_actions` more (inf: never)."""
    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=str(no_auth_actions).encode(),
        headers={"Content-Type": "text/plain"},  # a form body would not reach moto
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def test_wrong_secret_one_line_never_leaked_container_keeps_running(
    containerd_1_7: Containerd, s3_server: S3Server
) -> None:
    c = containerd_1_7
    id = unique_id("s3s")
    run = unique_id("secret")
    name = unique_id("ckpt-refused")
    prefix = f"s3://{s3_server.bucket}/{run}"
    wrong = f"WrongSecret-{uuid.uuid4().hex}"
    # An IAM user of moto's with a real key id: the wrong secret gives SignatureDoesNotMatch.
    iam = boto3.client(
        "iam",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key_id,
        aws_secret_access_key=s3_server.secret_access_key,
        region_name="us-east-1",
    )
    user = f"stasis-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key_id = iam.create_access_key(UserName=user)["AccessKey"]["AccessKeyId"]
    log = c.log_path
    log_start = log.stat().st_size
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", COUNTER)
    try:
        t = task(c, id)
        assert t is not None
        counting(t[0])
        with session_config(s3_config(s3_server.endpoint, key_id, wrong)):
            moto_auth(s3_server.endpoint, 0)  # from now on moto checks every signature
            try:
                r = stasis(c, "checkpoint", id, "--to", prefix, "--name", name, check=False)
            finally:
                moto_auth(s3_server.endpoint, float("inf"))
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stasis: "), r.stderr
        line = lines[0]
        assert f"s3://{s3_server.bucket}/{run}/{name}/" in line, line
        assert s3_server.endpoint in line and "access refused" in line, line
        assert wrong not in r.stdout + r.stderr

        # The container was never touched: it counts on.
        t = task(c, id)
        assert t is not None and t[1] == "RUNNING"
        counting(t[0])

        # Nowhere else either: not in the shim's log (containerd's), the bucket, the spool.
        time.sleep(0.5)  # the shim's last log lines through containerd
        with log.open("rb") as f:
            f.seek(log_start)
            logged = f.read()
        assert b"SignatureDoesNotMatch" in logged or name.encode() in logged, "shim logged it"
        assert wrong.encode() not in logged
        s3 = client(s3_server)
        assert objects(s3, s3_server.bucket, f"{run}/") == []
        assert glob.glob(f"{SPOOL_DIR}/{name}-*") == []
        local = [*glob.glob(f"{SPOOL_DIR}/**", recursive=True)]
        local += glob.glob(f"{CACHE_DIR}/**", recursive=True)
        for path in local:
            if os.path.isfile(path) and os.path.getsize(path) < 64 << 20:
                with open(path, "rb") as f:
                    assert wrong.encode() not in f.read(), path
    finally:
        remove(c, id)
        with contextlib.suppress(Exception):
            iam.delete_access_key(UserName=user, AccessKeyId=key_id)
            iam.delete_user(UserName=user)


# -- the CLI alone: push refuses what was never committed, gc of a local store ---------------


def test_push_refuses_an_uncommitted_spool_and_gc_of_a_local_store(
    s3_server: S3Server, tmp_path: Path
) -> None:
    cli = [sys.executable, "-m", "runtime.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )

    # A spool whose writer died before commit (no .stasis-pending.json): maybe half a dump.
    spool = tmp_path / "spool" / "half-0123456789ab"
    (spool / "checkpoint").mkdir(parents=True)
    (spool / "checkpoint" / "pages-1.img").write_bytes(b"x" * 4096)
    r = run("push", str(spool), "--to", f"s3://{s3_server.bucket}/{unique_id('push')}")
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "never committed" in r.stderr, r.stderr
    assert spool.is_dir()
    r = run("push", str(tmp_path / "none"), "--to", f"s3://{s3_server.bucket}/x")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = run("push", str(spool), "--to", str(tmp_path / "store"))
    assert r.returncode != 0 and "s3://" in r.stderr and r.stderr.count("\n") == 1

    # A local store: .partial-* directories untouched for --grace seconds go.
    store = tmp_path / "store"
    old, fresh = store / ".partial-old-0a1b2c", store / ".partial-new-3d4e5f"
    for d in (old, fresh):
        (d / "checkpoint").mkdir(parents=True)
        (d / "checkpoint" / "pages-1.img").write_bytes(b"y")
    hour_ago = time.time() - 3600
    for p in (old / "checkpoint" / "pages-1.img", old / "checkpoint", old):
        os.utime(p, (hour_ago, hour_ago))
    r = run("gc", "--store", str(store), "--grace", "600")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"file://{old}"]
    assert not old.exists() and fresh.exists()
    r = run("gc", "--store", str(store))  # default grace: an hour
    assert r.returncode == 0 and r.stdout == "" and fresh.exists()
    assert json.loads(run("gc", "--store", str(store), "--grace", "0", "--json").stdout) == [
        f"file://{fresh}"
    ]
    r = run("gc", "--store", str(store), "--grace", "-5")
    assert r.returncode != 0 and not fresh.exists()


# -- S3 answering 500/503, or stalling ---------------------------------------------------------


@pytest.fixture
def fault_proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3_server.endpoint)
    yield proxy
    proxy.close()


def test_transient_errors_and_stalls_are_retried(
    containerd_1_7: Containerd, s3_server: S3Server, fault_proxy: FaultProxy
) -> None:
    c = containerd_1_7
    id = unique_id("s3t")
    run = unique_id("transient")
    prefix = f"s3://{s3_server.bucket}/{run}"
    name = unique_id("ckpt-transient")
    fault_proxy.faults += [
        Fault("PUT", "partNumber=", status=503, times=2),  # SlowDown on two part uploads
        Fault("POST", "uploads", status=500, times=1),  # one CreateMultipartUpload
        Fault("PUT", "", stall=2.0, times=1),  # one request held for 2 s
    ]
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", holding_memory(24))
    try:
        t = task(c, id)
        assert t is not None
        counting(t[0])
        with session_config(
            s3_config(fault_proxy.endpoint, s3_server.access_key_id, s3_server.secret_access_key)
        ):
            r = stasis(c, "checkpoint", id, "--to", prefix, "--name", name)
        assert r.stdout.strip().splitlines()[-1] == f"{prefix}/{name}"
        assert [f.hits for f in fault_proxy.faults] == [2, 1, 1], fault_proxy.faults
        # Whole, and it verifies.
        meta = json.loads(stasis(c, "inspect", f"{prefix}/{name}", "--json").stdout)
        assert meta["name"] == name
        t = task(c, id)
        assert t is not None and t[1] == "RUNNING"
        counting(t[0])
    finally:
        remove(c, id)
        stasis(c, "rm", f"{prefix}/{name}", check=False)


def test_persistent_server_errors_fail_cleanly_and_leave_nothing(
    containerd_1_7: Containerd, s3_server: S3Server, fault_proxy: FaultProxy
) -> None:
    c = containerd_1_7
    s3 = client(s3_server)
    id = unique_id("s3e")
    run = unique_id("broken")
    prefix = f"s3://{s3_server.bucket}/{run}"
    name = unique_id("ckpt-broken")
    c.ctr("run", "-d", "--runtime", RUNTIME, IMAGE, id, "sh", "-c", holding_memory(24))
    try:
        t = task(c, id)
        assert t is not None
        counting(t[0])
        fault_proxy.faults.append(Fault("PUT", "", status=500))  # every upload fails
        with session_config(
            s3_config(fault_proxy.endpoint, s3_server.access_key_id, s3_server.secret_access_key)
        ):
            r = stasis(c, "checkpoint", id, "--to", prefix, "--name", name, check=False)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stasis: "), r.stderr
        assert s3_server.bucket in lines[0] and fault_proxy.endpoint in lines[0], lines[0]
        assert s3_server.secret_access_key not in r.stdout + r.stderr
        # The container never noticed.
        t = task(c, id)
        assert t is not None and t[1] == "RUNNING"
        counting(t[0])
        # Nothing looks complete; gc leaves neither objects, nor parts, nor the spool.
        listed = stasis(c, "list", "--store", prefix, "--json").stdout
        assert name not in listed
        stasis(c, "gc", "--store", prefix, "--grace", "0")
        assert objects(s3, s3_server.bucket, f"{run}/") == []
        assert uploads(s3, s3_server.bucket, f"{run}/") == []
        assert glob.glob(f"{SPOOL_DIR}/{name}-*") == []
    finally:
        remove(c, id)
