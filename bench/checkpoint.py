#!/usr/bin/env python3
"""Stasis checkpoint/restore against raw runc, and rootfs diff capture against containerd's
differ, measured in one run on one private containerd.

    .venv/bin/python bench/checkpoint.py [--mem-mib 1024] [--runs 3] [--versions 1.7]
                                         [--files 10000] [--diff-runs 5] [--json OUT]

For each containerd version of the test bed (tests/bed/setup.sh) it starts a private
containerd (tests/bed/containerd.py), imports the busybox image and measures:

* checkpoint/restore of a container holding --mem-mib MiB of touched memory (half random,
  half zeros, in the buffer of a busybox `dd` blocked on a pipe), ours against raw runc
  on the same spec, the images in the same directory file system:
  - ours: `stasis checkpoint ID --exit --to STORE --json` (wall time; the shim's own
    `seconds` and `frozen_seconds` too), then `ctr run -d --annotation
    stasis.dev/restore-from=REF IMAGE NEWID` (wall time: it returns once the task runs);
  - raw: an OCI bundle with our container's config.json (copied from its containerd
    bundle: same namespaces, mounts, masks), the busybox layer as an overlay rootfs,
    stdio pipes held by this process; `runc run -d`, then `runc checkpoint --image-path
    DIR` and `runc restore -d --image-path DIR` (wall time each);
  - ratios ours / raw of the medians, target <= 1.15;
  - the cost of holding every restore to the new container's spec: how long CRIU held
    the restored tree at pre-resume while the shim checked it (the shim's debug line
    in containerd's log), as the median of restore / (restore - hold), target <= 1.03;
  - and, not in the target, raw runc doing what a Stasis checkpoint adds to CRIU's
    work, measured the same way: the images' sha256 as CRIU writes them with early
    writeback (runtime.capture.digest.TailDigester, as the shim) and their fsync, inside the
    timed checkpoint; the restore timed until a sha256 of the images computed
    alongside (as the shim's restore gate) is done too. Ours / that ratio separates
    the cost of the guarantees on this machine from Stasis's own overhead;
* rootfs diff capture: an image of --files (10,000) small files, a container on our
  runtime that modified 10 of them; `runtime.capture.rootfs.capture` on its overlay upperdir
  (ours) against `ctr snapshots diff` of the same snapshot (containerd's diff service,
  what `ctr container checkpoint --rw` uses), uncompressed tar and gzip; ratio
  containerd / ours, target >= 10.

Everything (containers, runc containers, bundles, mounts, checkpoints, cgroups, the
containerd instance) is cleaned up, also on failure or Ctrl-C. Raw numbers go to
bench/results-checkpoint.json (gitignored).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime as dt
import functools
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
# bench/shim.py would shadow the `shim` package: never import from bench/ itself.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
for _p in (REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bed.containerd import (  # noqa: E402
    Containerd,
    bed_missing,
    images_dir,
    mounts_under,
    unique_id,
)
from bed.images import DEFAULT_BUSYBOX, Entry, base_entries, image_tar  # noqa: E402

from bench.common import (  # noqa: E402
    BenchError,
    Scope,
    containerd_version,
    descendants,
    loadavg,
    machine_info,
    precompile,
    private_signing_key,
    shim_path,
    signals_as_interrupt,
    signals_ignored,
    stasis_cmd,
    status_kib,
    summary,
    timed,
    write_json,
)
from bench.common import cmd_out as _cmd_out  # noqa: E402
from runtime.capture import rootfs  # noqa: E402
from runtime.capture.digest import TailDigester  # noqa: E402

OURS = "io.containerd.stasis.v2"
IMAGE = "docker.io/stasis/busybox:test"
MANY_REF = "docker.io/stasis/manyfiles:bench"
NAMESPACE = "stasis-bench-ckpt"  # not bench/shim.py's nor the tests': no shared runc root
RAW_CGROUP = f"{NAMESPACE}-raw"  # parent cgroup of the raw runc containers
RESTORE_FROM = "stasis.dev/restore-from"
MT_TAR = "application/vnd.oci.image.layer.v1.tar"

CEILING_TARGET = 1.03  # a restore with the spec-ceiling check / without it: at most
CKPT_TARGET = 1.15  # ours / raw runc, checkpoint and restore: at most
DIFF_TARGET = 10.0  # containerd / ours, rootfs diff capture: at least

DEFAULT_JSON = BENCH / "results-checkpoint.json"
SLEEP_FOREVER = "1000000"
_MNT_DETACH = 2


# -- verdicts (bench/common.py has the rest) ----------------------------------------


def verdict(ratio: float, target: float, higher_is_better: bool = False) -> dict[str, Any]:
    ok = ratio >= target if higher_is_better else ratio <= target
    bound = "at_least" if higher_is_better else "at_most"
    return {"ratio": ratio, "target": target, bound: True, "pass": ok}


def verdict_text(v: dict[str, Any]) -> str:
    op = ">=" if v.get("at_least") else "<="
    return f"{v['ratio']:6.2f}   target {op} {v['target']:.2f}  {'PASS' if v['pass'] else 'MISS'}"


# -- processes and memory -----------------------------------------------------------


def cgroup_memory_bytes(pid: int) -> int | None:
    """The memory charged to the process's memory cgroup (v1 usage_in_bytes, v2 current)."""
    with suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                f = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.current"
            elif "memory" in controllers.split(","):
                f = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.usage_in_bytes"
            else:
                continue
            return int(f.read_text().strip())
    return None


def mem_script(mib: int) -> str:
    """busybox sh: `dd` reads MIB MiB (first half random, second half zeros) into one
    buffer of that size, then blocks for ever on its second read: the memory stays
    resident (anonymous, touched) in dd while the container sleeps."""
    total = mib << 20
    rnd = total // 2
    return (
        f"(head -c {rnd} /dev/urandom; head -c {total - rnd} /dev/zero; sleep {SLEEP_FOREVER})"
        f" | dd bs={total} count=2 iflag=fullblock of=/dev/null"
    )


def wait_resident(init: int, mib: int, timeout: float = 180.0) -> dict[str, Any]:
    """Waits until the container's dd holds `mib` MiB anonymous memory (the head writers
    gone); returns its readings. Raises if it does not happen in time."""
    want = mib << 10
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        procs = descendants(init)
        dds = [p for p, comm in procs.items() if comm == "dd"]
        if dds and "head" not in procs.values():
            with suppress(OSError, ValueError):
                st = status_kib(dds[0])
                last = {"dd_pid": dds[0], **st}
                if st.get("RssAnon", 0) >= want:
                    last["container_processes"] = len(procs) + 1
                    last["cgroup_memory_bytes"] = cgroup_memory_bytes(dds[0])
                    return last
        time.sleep(0.1)
    raise BenchError(f"the container (init {init}) never held {mib} MiB in dd: {last}")


def dir_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under path (what our store does at commit)."""
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_tree(path: Path) -> None:
    """sha256 of every file under path (what a restore verifies)."""
    import hashlib

    for dirpath, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                hashlib.file_digest(fh, "sha256")


def umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(str(path).encode(), _MNT_DETACH)


def rm_tree(path: Path) -> None:
    """rmtree, never through a mount: unmount whatever is below first."""
    if not path.exists():
        return
    for point in mounts_under(path):
        umount(point)
    if mounts_under(path):
        raise BenchError(f"{path} still has mounts below it; not removing it")
    shutil.rmtree(path, ignore_errors=True)


_DUMP_STATS = {
    1: "freezing_us",
    2: "frozen_us",
    3: "memdump_us",
    4: "memwrite_us",
    5: "pages_scanned",
    7: "pages_written",
}


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def criu_dump_stats(path: Path) -> dict[str, int]:
    """CRIU's own timing of a dump, from the `stats-dump` image it leaves in its work
    directory (`--work-path`; 8 bytes of magic, a u32 size, a StatsEntry whose field 1 is the
    DumpStatsEntry): how long it took to freeze, how long the tasks stayed frozen, and
    how long it spent collecting and writing memory pages (microseconds). {} if absent."""
    try:
        raw = path.read_bytes()
        size = int.from_bytes(raw[8:12], "little")
        msg = raw[12 : 12 + size]
        i, out = 0, {}
        while i < len(msg):
            key, i = _varint(msg, i)
            if key & 7 == 2:
                length, i = _varint(msg, i)
                if key >> 3 == 1:  # dump
                    body, j = msg[i : i + length], 0
                    while j < len(body):
                        k, j = _varint(body, j)
                        if k & 7 != 0:
                            return out
                        v, j = _varint(body, j)
                        if (k >> 3) in _DUMP_STATS:
                            out[_DUMP_STATS[k >> 3]] = v
                i += length
            elif key & 7 == 0:
                _, i = _varint(msg, i)
            else:
                break
        return out
    except (OSError, IndexError, ValueError):
        return {}


class StatsCatcher:
    """Reads CRIU's stats-dump in the shim's CRIU work directory in the moment between
    CRIU writing it and the shim removing the directory (polls every 5 ms); {} if missed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stats: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and not self.stats:
            if self.path.exists():
                self.stats = criu_dump_stats(self.path)
            self._stop.wait(0.005)

    def __enter__(self) -> StatsCatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def result(self) -> dict[str, int]:
        return self.stats


# -- our runtime through containerd ----------------------------------------------------


def task_info(c: Containerd, cid: str) -> tuple[int, str] | None:
    for line in c.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[0] == cid:
            return int(fields[1]), fields[2]
    return None


def remove(c: Containerd, cid: str) -> None:
    c.ctr("tasks", "kill", "-s", "KILL", cid, check=False)
    for _ in range(100):
        if task_info(c, cid) is None:
            break
        if c.ctr("tasks", "delete", "--force", cid, check=False).returncode == 0:
            break
        time.sleep(0.05)
    c.ctr("containers", "delete", cid, check=False)


def bundle_dir(c: Containerd, cid: str) -> Path:
    """Our container's bundle (where the shim's CRIU works)."""
    return c.state / "io.containerd.runtime.v2.task" / NAMESPACE / cid


def bundle_spec(c: Containerd, cid: str) -> dict[str, Any]:
    """The config.json containerd wrote into our container's bundle."""
    found = sorted(c.state.glob(f"io.containerd.runtime.v2.task/{NAMESPACE}/{cid}/config.json"))
    if not found:
        found = sorted(c.state.glob(f"*/{NAMESPACE}/{cid}/config.json"))
    if not found:
        raise BenchError(f"no bundle config.json for {cid} under {c.state}")
    spec: dict[str, Any] = json.loads(found[0].read_text())
    return spec


def run_ours(c: Containerd, cid: str, mib: int) -> tuple[int, dict[str, Any]]:
    c.ctr("run", "-d", "--runtime", OURS, IMAGE, cid, "sh", "-c", mem_script(mib), timeout=120)
    t = task_info(c, cid)
    if t is None or t[1] != "RUNNING":
        raise BenchError(f"{cid} is not running after `ctr run -d`: {t}")
    return t[0], wait_resident(t[0], mib)


def ceiling_hold(c: Containerd, rid: str, timeout: float = 5.0) -> float | None:
    """How long CRIU held ``rid``'s restored tree at pre-resume while the shim checked
    it against the spec (the shim's debug line in containerd's log; None: not seen)."""
    needle = f"restore of {rid}: CRIU held "
    deadline = time.monotonic() + timeout
    while True:
        with suppress(OSError), open(c.log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if needle in line:
                    return float(line.split(needle, 1)[1].split("s", 1)[0])
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def ours_once(
    c: Containerd, work: Path, mib: int, i: int, scope: Scope, want_spec: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One checkpoint --exit + restore of a container on our runtime."""
    sample: dict[str, Any] = {}
    cid = unique_id("ck-stasis")
    scope.push(f"container {cid}", lambda: remove(c, cid))
    _, sample["before"] = run_ours(c, cid, mib)
    spec = bundle_spec(c, cid) if want_spec else None
    store = work / "store"
    name = f"bench-{i}-{uuid.uuid4().hex[:6]}"
    scope.push(f"checkpoint {name}", lambda: rm_tree(store / name))
    cmd = [
        *stasis_cmd(),
        "--address",
        str(c.address),
        "-n",
        NAMESPACE,
        "checkpoint",
        cid,
        "--exit",
        "--to",
        str(store),
        "--name",
        name,
        "--json",
    ]
    stats_catcher = StatsCatcher(bundle_dir(c, cid) / "criu-work" / "stats-dump")
    with stats_catcher:
        elapsed, r = timed(cmd, what="stasis checkpoint")
    reported = json.loads(r.stdout)
    sample["checkpoint_s"] = elapsed
    sample["reported"] = reported
    t = task_info(c, cid)
    if t is not None and t[1] != "STOPPED":
        raise BenchError(f"{cid} is {t[1]} after `stasis checkpoint --exit`")
    remove(c, cid)
    sample["images_bytes"] = dir_size(store / name / "checkpoint")
    sample["criu_stats"] = stats_catcher.result()
    sample["checkpoint_bytes"] = dir_size(store / name)

    rid = unique_id("rs-stasis")
    scope.push(f"container {rid}", lambda: remove(c, rid))
    cmd = [
        str(c.bin_dir / "ctr"),
        "--address",
        str(c.address),
        "--namespace",
        NAMESPACE,
        "run",
        "-d",
        "--runtime",
        OURS,
        "--annotation",
        f"{RESTORE_FROM}={reported['ref']}",
        IMAGE,
        rid,
    ]
    sample["restore_s"], _ = timed(cmd, env=c.env(), what="ctr run -d (restore)")
    sample["ceiling_hold_s"] = ceiling_hold(c, rid)
    t = task_info(c, rid)
    if t is None or t[1] != "RUNNING":
        raise BenchError(f"restored {rid} is not running: {t}")
    sample["after"] = wait_resident(t[0], mib, timeout=30)
    return sample, spec


# -- raw runc -------------------------------------------------------------------------


def extract_busybox_layer(dest: Path) -> None:
    """The busybox image's single layer, from the OCI layout in busybox.tar, into dest."""
    with tarfile.open(images_dir() / "busybox.tar") as outer:

        def blob(digest: str) -> bytes:
            f = outer.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            assert f is not None
            return f.read()

        index = json.loads(outer.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        layers = manifest["layers"]
        dest.mkdir(parents=True)
        for layer in layers:
            if not layer["mediaType"].endswith(".tar"):
                raise BenchError(f"busybox.tar: layer {layer['mediaType']} is not a plain tar")
            with tarfile.open(fileobj=io.BytesIO(blob(layer["digest"]))) as tar:
                tar.extractall(dest, filter="fully_trusted")


class RawRunc:
    """runc driven by hand: a private --root, bundles and overlay rootfs under `work`."""

    def __init__(self, work: Path, lower: Path, env: dict[str, str]) -> None:
        self.work = work
        self.lower = lower
        self.root = work / "runc-root"
        self.env = env
        self.binary = shutil.which("runc", path=env["PATH"]) or "runc"
        self.root.mkdir(parents=True, exist_ok=True)

    def argv(self, bundle: Path, *args: str) -> list[str]:
        log = bundle / "runc-log.json"
        return [
            self.binary,
            "--root",
            str(self.root),
            "--log",
            str(log),
            "--log-format",
            "json",
            *args,
        ]

    def log_tail(self, bundle: Path) -> str:
        with suppress(OSError):
            return "\n".join((bundle / "runc-log.json").read_text().splitlines()[-5:])
        return ""

    def bundle(self, rid: str, spec: dict[str, Any], scope: Scope) -> Path:
        """bundle/config.json (spec with our cgroup and rootfs) and bundle/rootfs, an
        overlay of the busybox layer with a fresh upperdir (like a containerd snapshot)."""
        b = self.work / f"bundle-{rid}"
        scope.push(f"bundle {b}", lambda: rm_tree(b))
        for d in ("rootfs", "upper", "ovl-work"):
            (b / d).mkdir(parents=True)
        spec = json.loads(json.dumps(spec))
        spec["root"] = {"path": "rootfs", "readonly": False}
        spec["linux"]["cgroupsPath"] = f"/{RAW_CGROUP}/{rid}"
        spec.pop("annotations", None)
        spec["process"]["terminal"] = False
        (b / "config.json").write_text(json.dumps(spec))
        opts = f"lowerdir={self.lower},upperdir={b / 'upper'},workdir={b / 'ovl-work'}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(b / "rootfs")],
            check=True,
            capture_output=True,
        )
        scope.push(f"mount {b / 'rootfs'}", lambda: umount(b / "rootfs"))
        return b

    def detached(
        self, bundle: Path, rid: str, command: str, args: list[str], scope: Scope
    ) -> tuple[float, int]:
        """`runc run -d` / `runc restore -d` with stdio pipes this process holds (as a shim
        does); (wall seconds, container init pid)."""
        pid_file = bundle / f"{rid}.pid"
        r0, w0 = os.pipe()
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        for fd in (w0, r1, r2):  # ours until the cleanup: the container's stdio peers
            scope.push(f"fd {fd}", functools.partial(os.close, fd))
        scope.push(f"runc container {rid}", lambda: self.destroy(bundle, rid))
        try:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [*self.argv(bundle, command, *args), "--pid-file", str(pid_file), rid],
                stdin=r0,
                stdout=w1,
                stderr=w2,
                env=self.env,
                close_fds=True,
            )
            rc = proc.wait(timeout=600)
            elapsed = time.perf_counter() - t0
        finally:
            for fd in (r0, w1, w2):
                os.close(fd)
        if rc != 0:
            raise BenchError(f"runc {command} {rid} failed ({rc}): {self.log_tail(bundle)}")
        return elapsed, int(pid_file.read_text().strip())

    def destroy(self, bundle: Path, rid: str) -> None:
        """Kill and delete a runc container of ours, if runc still knows it."""
        if not (self.root / rid).exists():
            return
        subprocess.run(
            self.argv(bundle, "kill", rid, "KILL"),
            capture_output=True,
            env=self.env,
            timeout=30,
            check=False,
        )
        for _ in range(100):
            r = subprocess.run(
                self.argv(bundle, "delete", "--force", rid),
                capture_output=True,
                env=self.env,
                timeout=30,
                check=False,
            )
            if r.returncode == 0 or not (self.root / rid).exists():
                return
            time.sleep(0.05)
        raise BenchError(f"runc delete --force {rid} keeps failing: {r.stderr!r}")

    def once(
        self, spec: dict[str, Any], mib: int, scope: Scope, guarded: bool = False
    ) -> dict[str, Any]:
        """One run -d, checkpoint (stops it), restore -d of a raw runc container.

        ``guarded``: runc doing the work a Stasis checkpoint adds to CRIU's, in this
        process: the images' sha256 as CRIU writes them, with early writeback
        (runtime.capture.digest.TailDigester, what the shim runs), then their fsync, all
        inside the timed checkpoint; and the restore timed until a sha256 of the
        images, computed alongside as the shim's restore gate does, is done too.
        Not in the target's ratio: it shows what Stasis's guarantees cost on this
        machine, apart from its own overhead.
        """
        sample: dict[str, Any] = {}
        rid = unique_id("ck-raw")
        b = self.bundle(rid, spec, scope)
        _, init = self.detached(b, rid, "run", ["-d", "--bundle", str(b)], scope)
        sample["before"] = wait_resident(init, mib)
        images = self.work / f"images-{rid}"
        scope.push(f"images {images}", lambda: rm_tree(images))
        images.mkdir()
        cmd = self.argv(
            b, "checkpoint", "--image-path", str(images), "--work-path", str(b / "criu-work"), rid
        )
        (b / "criu-work").mkdir()
        if guarded:
            t0 = time.perf_counter()
            digester = TailDigester(str(images)).start()
            try:
                timed(cmd, env=self.env, what="runc checkpoint")
            finally:
                digester.finish()
            fsync_tree(images)
            sample["checkpoint_s"] = time.perf_counter() - t0
            sample["fsync_s"] = 0.0
        else:
            sample["checkpoint_s"], _ = timed(cmd, env=self.env, what="runc checkpoint")
            # Not in the ratio: what our store does on top (fsync), and it leaves the
            # images clean in the page cache before the restore, as ours are.
            t0 = time.perf_counter()
            fsync_tree(images)
            sample["fsync_s"] = time.perf_counter() - t0
        sample["images_bytes"] = dir_size(images)
        sample["criu_stats"] = criu_dump_stats(b / "criu-work" / "stats-dump")
        if (self.root / rid).exists():
            raise BenchError(f"runc container {rid} still exists after runc checkpoint")
        new = unique_id("rs-raw")
        (b / "criu-restore").mkdir()
        args = [
            "-d",
            "--image-path",
            str(images),
            "--work-path",
            str(b / "criu-restore"),
            "--bundle",
            str(b),
            "--no-subreaper",
        ]
        if guarded:
            t0 = time.perf_counter()
            hashing = threading.Thread(target=sha256_tree, args=(images,), daemon=True)
            hashing.start()
            _, init = self.detached(b, new, "restore", args, scope)
            hashing.join()
            sample["restore_s"] = time.perf_counter() - t0
        else:
            sample["restore_s"], init = self.detached(b, new, "restore", args, scope)
        sample["after"] = wait_resident(init, mib, timeout=30)
        return sample


def rm_cgroups(name: str) -> None:
    """rmdir <controller>/<name>/* and <controller>/<name> (v1) or <name> (v2) if empty."""
    base = Path("/sys/fs/cgroup")
    for parent in [base / name, *base.glob(f"*/{name}")]:
        if not parent.is_dir():
            continue
        for child in parent.iterdir():
            if child.is_dir():
                with suppress(OSError):
                    child.rmdir()
        with suppress(OSError):
            parent.rmdir()


# -- checkpoint/restore bench -------------------------------------------------------------


def bench_checkpoint(
    c: Containerd,
    work: Path,
    args: argparse.Namespace,
    errors: list[str],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    mib = args.mem_mib
    lower = work / "busybox-layer"
    if not lower.exists():
        extract_busybox_layer(lower)
    raw = RawRunc(work, lower, c.env())
    result: dict[str, Any] = {
        "mem_mib": mib,
        "workload": mem_script(mib),
        "runs": args.runs,
        "order": "ABC ABC (stasis, runc, runc with Stasis's guarantees)",
        "checkpoint_dir_fs": _cmd_out(["stat", "-fc", "%T", str(work)]),
        "checkpoint_dir": str(work),
        "commands": {
            "stasis_checkpoint": "stasis --address A -n NS checkpoint ID --exit --to STORE "
            "--name N --json",
            "stasis_restore": f"ctr run -d --runtime {OURS} --annotation "
            f"{RESTORE_FROM}=REF {IMAGE} NEWID",
            "runc_checkpoint": "runc --root R checkpoint --image-path DIR --work-path W ID",
            "runc_restore": "runc --root R restore -d --image-path DIR --work-path W "
            "--bundle B --no-subreaper --pid-file P NEWID",
        },
        "runc": _cmd_out([raw.binary, "--version"]).splitlines()[:1],
        "criu": _cmd_out(["criu", "--version"]).splitlines()[:1],
        "samples": {"stasis": [], "runc": [], "runc_guarded": []},
    }
    spec: dict[str, Any] | None = None
    try:
        for i in range(args.runs):
            with Scope(errors) as scope:
                s, got = ours_once(c, work, mib, i, scope, want_spec=spec is None)
                spec = spec or got
            result["samples"]["stasis"].append(s)
            assert spec is not None
            result.setdefault("raw_spec_from", "config.json of the first stasis container")
            with Scope(errors) as scope:
                result["samples"]["runc"].append(raw.once(spec, mib, scope))
            with Scope(errors) as scope:
                result["samples"]["runc_guarded"].append(raw.once(spec, mib, scope, True))
            progress(f"checkpoint/restore {i + 1}/{args.runs}")
    finally:
        with signals_ignored():
            rm_cgroups(RAW_CGROUP)
            left = [p.name for p in raw.root.iterdir()] if raw.root.exists() else []
            if left:
                errors.append(f"runc containers left in {raw.root}: {left}")
    o, r = result["samples"]["stasis"], result["samples"]["runc"]
    n = min(len(o), len(r))
    if n:
        st = {
            "stasis_checkpoint_s": summary([x["checkpoint_s"] for x in o]),
            "stasis_checkpoint_shim_s": summary([x["reported"]["seconds"] for x in o]),
            "stasis_frozen_s": summary([x["reported"]["frozen_seconds"] for x in o]),
            "stasis_restore_s": summary([x["restore_s"] for x in o]),
            "runc_checkpoint_s": summary([x["checkpoint_s"] for x in r]),
            "runc_fsync_s": summary([x["fsync_s"] for x in r]),
            "runc_restore_s": summary([x["restore_s"] for x in r]),
        }
        holds = [x for x in o if x.get("ceiling_hold_s") is not None]
        if holds:
            st["stasis_ceiling_hold_s"] = summary([x["ceiling_hold_s"] for x in holds])
            # The same restores less the time the spec-ceiling check held them.
            st["stasis_restore_without_ceiling_s"] = summary(
                [x["restore_s"] - x["ceiling_hold_s"] for x in holds]
            )
        g = result["samples"]["runc_guarded"]
        if g:
            st["runc_guarded_checkpoint_s"] = summary([x["checkpoint_s"] for x in g])
            st["runc_guarded_restore_s"] = summary([x["restore_s"] for x in g])
        result["stats"] = st
        result["ratio"] = {
            "checkpoint": verdict(
                st["stasis_checkpoint_s"]["median"] / st["runc_checkpoint_s"]["median"],
                CKPT_TARGET,
            ),
            "restore": verdict(
                st["stasis_restore_s"]["median"] / st["runc_restore_s"]["median"], CKPT_TARGET
            ),
            "checkpoint_vs_runc_plus_fsync": st["stasis_checkpoint_s"]["median"]
            / statistics.median([x["checkpoint_s"] + x["fsync_s"] for x in r]),
            "frozen_vs_runc_checkpoint": st["stasis_frozen_s"]["median"]
            / st["runc_checkpoint_s"]["median"],
        }
        if holds:
            result["ratio"]["restore_with_ceiling"] = verdict(
                statistics.median(x["restore_s"] / (x["restore_s"] - x["ceiling_hold_s"])
                                  for x in holds),
                CEILING_TARGET,
            )  # fmt: skip
        if g:
            result["ratio"]["checkpoint_vs_runc_guarded"] = (
                st["stasis_checkpoint_s"]["median"] / st["runc_guarded_checkpoint_s"]["median"]
            )
            result["ratio"]["restore_vs_runc_guarded"] = (
                st["stasis_restore_s"]["median"] / st["runc_guarded_restore_s"]["median"]
            )
    return result


# -- rootfs diff bench ----------------------------------------------------------------------


def manyfiles_layout(files: int) -> list[str]:
    """data/dNNN/fNNN paths, 100 files a directory."""
    per = 100
    return [f"data/d{i // per:03d}/f{i % per:03d}" for i in range(files)]


def build_manyfiles(path: Path, files: int) -> int:
    """An OCI image tar (tests/bed/images.py) of busybox plus `files` small files;
    returns the number of entries in its layer."""
    entries = list(base_entries(DEFAULT_BUSYBOX))
    paths = manyfiles_layout(files)
    dirs = sorted({"data", *(p.rsplit("/", 1)[0] for p in paths)})
    entries += [Entry(d, "dir") for d in dirs]
    entries += [
        Entry(p, "file", mode=0o644, data=(f"{p}: small file {i}\n" * 3).encode())
        for i, p in enumerate(paths)
    ]
    path.write_bytes(image_tar(MANY_REF, entries, cmd=["sh"]))
    return len(entries)


def changed_paths(files: int, n: int) -> list[str]:
    paths = manyfiles_layout(files)
    step = max(1, len(paths) // n)
    return [paths[(k * step + k * 7) % len(paths)] for k in range(n)]


def upperdir(c: Containerd, cid: str) -> Path:
    """The overlay upperdir of the container's active snapshot (`ctr snapshots mounts`)."""
    out = c.ctr("snapshots", "mounts", "/nonexistent", cid).stdout
    for token in out.split():
        if "upperdir=" in token:
            upper = rootfs.upperdir_of(token.split(","))
            if upper:
                return Path(upper)
    raise BenchError(f"no upperdir in `ctr snapshots mounts` of {cid}: {out!r}")


def tar_regular_files(path: Path) -> list[str]:
    with tarfile.open(path, "r:*") as tar:
        return sorted(m.name.lstrip("./") for m in tar if m.isreg())


def bench_diff(
    c: Containerd,
    work: Path,
    args: argparse.Namespace,
    errors: list[str],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    image = work / "manyfiles.tar"
    if not image.exists():
        t0 = time.perf_counter()
        entries = build_manyfiles(image, args.files)
        build_s = time.perf_counter() - t0
    else:
        entries, build_s = -1, 0.0
    t0 = time.perf_counter()
    c.import_image(image)
    import_s = time.perf_counter() - t0
    changed = changed_paths(args.files, args.changed)
    script = "; ".join(f"echo changed >> /{p}" for p in changed) + f"; exec sleep {SLEEP_FOREVER}"
    result: dict[str, Any] = {
        "image": MANY_REF,
        "image_files": args.files,
        "image_layer_entries": entries,
        "image_build_s": build_s,
        "image_import_s": import_s,
        "changed": changed,
        "runs": args.diff_runs,
        "warmup": args.diff_warmup,
        "commands": {
            "stasis": "runtime.capture.rootfs.capture(upperdir, TAR, DELETED) in this process",
            "containerd_tar": f"ctr snapshots diff --media-type {MT_TAR} --ref R ID > FILE",
            "containerd_gzip": "ctr snapshots diff --ref R ID > FILE (gzip, the default, "
            "as ctr container checkpoint --rw)",
            "ctr_client": "ctr snapshots info ID (client start-up + one RPC)",
        },
        "samples": {"stasis": [], "containerd_tar": [], "containerd_gzip": [], "ctr_client": []},
        "warmup_samples": {
            "stasis": [],
            "containerd_tar": [],
            "containerd_gzip": [],
            "ctr_client": [],
        },
    }
    ctr = [str(c.bin_dir / "ctr"), "--address", str(c.address), "--namespace", NAMESPACE]
    with Scope(errors) as scope:
        cid = unique_id("diff-stasis")
        scope.push(f"container {cid}", lambda: remove(c, cid))
        c.ctr("run", "-d", "--runtime", OURS, MANY_REF, cid, "sh", "-c", script, timeout=120)
        upper = upperdir(c, cid)
        deadline = time.monotonic() + 30
        while not all((upper / p).is_file() for p in changed):
            if time.monotonic() > deadline:
                raise BenchError(f"{cid}: the {len(changed)} changes never reached {upper}")
            time.sleep(0.05)
        time.sleep(0.2)  # the last append
        result["upperdir"] = str(upper)
        out_dir = work / "diff-out"
        scope.push(f"dir {out_dir}", lambda: rm_tree(out_dir))
        out_dir.mkdir()
        for i in range(args.diff_warmup + args.diff_runs):
            bucket = result["warmup_samples" if i < args.diff_warmup else "samples"]
            # ours
            tar_path, deleted_path = out_dir / f"ours-{i}.tar", out_dir / f"ours-{i}.deleted"
            t0 = time.perf_counter()
            stats = rootfs.capture(str(upper), str(tar_path), str(deleted_path))
            bucket["stasis"].append(time.perf_counter() - t0)
            got = tar_regular_files(tar_path)
            if got != sorted(changed):
                raise BenchError(f"our capture holds {got}, not the {len(changed)} changed files")
            result["stasis_stats"] = dataclasses.asdict(stats)
            result["stasis_tar_bytes"] = tar_path.stat().st_size
            # containerd's diff service, uncompressed then gzip
            for key, extra in (
                ("containerd_tar", ["--media-type", MT_TAR]),
                ("containerd_gzip", []),
            ):
                out = out_dir / f"{key}-{i}"
                cmd = [*ctr, "snapshots", "diff", *extra, "--ref", f"bench-{uuid.uuid4().hex}", cid]
                with out.open("wb") as f:
                    t0 = time.perf_counter()
                    r = subprocess.run(
                        cmd,
                        stdout=f,
                        stderr=subprocess.PIPE,
                        env=c.env(),
                        stdin=subprocess.DEVNULL,
                        timeout=600,
                        check=False,
                    )
                    elapsed = time.perf_counter() - t0
                if r.returncode != 0:
                    raise BenchError(f"ctr snapshots diff failed: {r.stderr.decode()[-2000:]}")
                bucket[key].append(elapsed)
                got = tar_regular_files(out)
                if got != sorted(changed):
                    raise BenchError(f"containerd's diff ({key}) holds {got}")
                result[f"{key}_bytes"] = out.stat().st_size
            elapsed, _ = timed([*ctr, "snapshots", "info", cid], env=c.env(), what="ctr info")
            bucket["ctr_client"].append(elapsed)
            for leftover in out_dir.iterdir():
                leftover.unlink()
            if i >= args.diff_warmup:
                progress(f"rootfs diff {i - args.diff_warmup + 1}/{args.diff_runs}")
    st = {k: summary(v) for k, v in result["samples"].items()}
    result["stats"] = st
    if st["stasis"]:
        ours = st["stasis"]["median"]
        result["ratio"] = {
            "containerd_tar": verdict(st["containerd_tar"]["median"] / ours, DIFF_TARGET, True),
            "containerd_gzip": verdict(st["containerd_gzip"]["median"] / ours, DIFF_TARGET, True),
            "containerd_tar_minus_client": (
                st["containerd_tar"]["median"] - st["ctr_client"]["median"]
            )
            / ours,
        }
    return result


# -- one containerd version -------------------------------------------------------------


def bench_version(version: str, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Fills `out` as it goes, so a failure or ^C keeps what was measured."""
    if why := bed_missing([version]):
        raise BenchError(why)
    out["loadavg_start"] = loadavg()
    errors: list[str] = []
    out["cleanup_errors"] = errors

    def progress(what: str) -> None:
        if sys.stderr.isatty():
            print(f"\r  [{version}] {what}   ", end="", file=sys.stderr, flush=True)

    args.workdir_base.mkdir(parents=True, exist_ok=True)
    work = Path(
        tempfile.mkdtemp(prefix=f"stasis-ckpt-{version.replace('.', '')}-", dir=args.workdir_base)
    )
    # Restores may read the bench's stores (through containerd, the shims see this).
    os.environ["STASIS_RESTORE_SOURCES"] = f"file://{work}"
    c = Containerd.in_run_dir(version, shim_path(), namespace=NAMESPACE)
    try:
        c.start()
        c.import_image(images_dir() / "busybox.tar")
        out["containerd_version"] = containerd_version(c)
        out["workdir"] = str(c.workdir)
        if args.runs:
            out["checkpoint"] = bench_checkpoint(c, work, args, errors, progress)
        if args.diff_runs:
            out["diff"] = bench_diff(c, work, args, errors, progress)
    finally:
        if sys.stderr.isatty():
            print("\r" + " " * 50 + "\r", end="", file=sys.stderr, flush=True)
        with signals_ignored():
            left = c.stop()
            rm_cgroups(RAW_CGROUP)
            try:
                rm_tree(work)
            except BenchError as e:
                errors.append(str(e))
        out["leftovers"] = repr(left) if left else None
        out["loadavg_end"] = loadavg()


# -- report --------------------------------------------------------------------------------


def _row(label: str, s: dict[str, float], scale: float = 1.0, fmt: str = "{:9.3f}") -> str:
    if not s:
        return f"    {label:40}{'-':>9}"
    cells = "".join(fmt.format(s[k] * scale) for k in ("median", "min", "max"))
    return f"    {label:40}{cells}"


def print_version(r: dict[str, Any]) -> None:
    print(
        f"\ncontainerd {r['version']} ({r.get('containerd_version', '?')})   "
        f"load avg {r.get('loadavg_start')} -> {r.get('loadavg_end')}"
    )
    if "error" in r:
        print(f"  ERROR (partial results below): {r['error'].splitlines()[0]}")
    ck = r.get("checkpoint")
    if ck and ck.get("stats"):
        st = ck["stats"]
        o, w = ck["samples"]["stasis"], ck["samples"]["runc"]
        print(
            f"  checkpoint/restore: {ck['mem_mib']} MiB touched in dd (half random, half "
            f"zeros), {len(o)} runs each, {ck['order'].split(' (')[0]};\n  images to "
            f"{ck['checkpoint_dir']} "
            f"({ck['checkpoint_dir_fs']})  (s)"
        )
        print(f"    {'':40}{'median':>9}{'min':>9}{'max':>9}")
        print(_row("stasis checkpoint --exit (CLI)", st["stasis_checkpoint_s"]))
        print(_row("  shim-reported seconds", st["stasis_checkpoint_shim_s"]))
        print(_row("  frozen_seconds", st["stasis_frozen_s"]))
        print(_row("runc checkpoint", st["runc_checkpoint_s"]))
        print(_row("  fsync of its images (not in ratio)", st["runc_fsync_s"]))
        if "runc_guarded_checkpoint_s" in st:
            print(_row("  + sha256 as written, writeback, fsync", st["runc_guarded_checkpoint_s"]))
        print(_row("stasis restore (ctr run -d)", st["stasis_restore_s"]))
        if "stasis_ceiling_hold_s" in st:
            print(_row("  held at pre-resume (spec ceiling)", st["stasis_ceiling_hold_s"]))
        print(_row("runc restore -d", st["runc_restore_s"]))
        if "runc_guarded_restore_s" in st:
            print(_row("  + sha256 of the images alongside", st["runc_guarded_restore_s"]))
        mib = 1 << 20
        print(
            f"    CRIU images: stasis {statistics.median(x['images_bytes'] for x in o) / mib:.0f}"
            f" MiB (whole checkpoint "
            f"{statistics.median(x['checkpoint_bytes'] for x in o) / mib:.0f} MiB), runc "
            f"{statistics.median(x['images_bytes'] for x in w) / mib:.0f} MiB"
        )
        before = [x["before"]["RssAnon"] for x in o + w]
        after = [x["after"]["RssAnon"] for x in o + w]
        print(
            f"    dd RssAnon before checkpoint {min(before) / 1024:.0f}-{max(before) / 1024:.0f}"
            f" MiB, after restore {min(after) / 1024:.0f}-{max(after) / 1024:.0f} MiB"
        )
        ratio = ck["ratio"]
        print(f"    ratio checkpoint stasis/runc  {verdict_text(ratio['checkpoint'])}")
        print(f"    ratio restore    stasis/runc  {verdict_text(ratio['restore'])}")
        if "restore_with_ceiling" in ratio:
            print(
                "    ratio restore with/without the spec-ceiling hold  "
                f"{verdict_text(ratio['restore_with_ceiling'])}"
            )
        print(
            f"    (stasis checkpoint / (runc checkpoint + fsync) "
            f"{ratio['checkpoint_vs_runc_plus_fsync']:.2f}; frozen / runc checkpoint "
            f"{ratio['frozen_vs_runc_checkpoint']:.2f})"
        )
        if "checkpoint_vs_runc_guarded" in ratio:
            print(
                "    (against runc doing what Stasis adds to CRIU's work, the rows marked +: "
                f"checkpoint {ratio['checkpoint_vs_runc_guarded']:.2f}, restore "
                f"{ratio['restore_vs_runc_guarded']:.2f})"
            )
    df = r.get("diff")
    if df and df.get("stats", {}).get("stasis"):
        st = df["stats"]
        print(
            f"  rootfs diff capture: image of {df['image_files']} files (+busybox), "
            f"{len(df['changed'])} modified; {df['runs']} runs, {df['warmup']} warm-up "
            "discarded  (ms)"
        )
        print(f"    {'':40}{'median':>9}{'min':>9}{'max':>9}")
        fmt = "{:9.1f}"
        print(_row("stasis rootfs.capture (upperdir)", st["stasis"], 1000, fmt))
        print(_row("ctr snapshots diff (tar)", st["containerd_tar"], 1000, fmt))
        print(_row("ctr snapshots diff (gzip, --rw)", st["containerd_gzip"], 1000, fmt))
        print(_row("  ctr client alone (snapshots info)", st["ctr_client"], 1000, fmt))
        ratio = df["ratio"]
        print(f"    ratio containerd(tar)/stasis  {verdict_text(ratio['containerd_tar'])}")
        print(f"    ratio containerd(gzip)/stasis {verdict_text(ratio['containerd_gzip'])}")
        print(
            "    (containerd tar minus the ctr client alone, / stasis: "
            f"{ratio['containerd_tar_minus_client']:.1f})"
        )
    if r.get("leftovers"):
        print(f"  WARNING: leftovers cleaned up by force: {r['leftovers']}")
    for e in r.get("cleanup_errors") or []:
        print(f"  WARNING: {e}")


def print_summary(results: dict[str, Any]) -> None:
    print("\nsummary")
    for v, r in results.items():
        if "error" in r:
            print(f"  {v}: ERROR {r['error'].splitlines()[0]}")
        ck, df = r.get("checkpoint") or {}, r.get("diff") or {}
        if "ratio" in ck:
            print(f"  {v} checkpoint stasis/runc       {verdict_text(ck['ratio']['checkpoint'])}")
            print(f"  {v} restore    stasis/runc       {verdict_text(ck['ratio']['restore'])}")
        if "ratio" in df:
            t = df["ratio"]["containerd_tar"]
            print(f"  {v} rootfs diff containerd/stasis {verdict_text(t)}")


# -- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--mem-mib", type=int, default=1024, help="touched memory (default 1024)")
    p.add_argument(
        "--runs", type=int, default=3, help="checkpoint/restore runs per side (default 3; 0: skip)"
    )
    p.add_argument("--files", type=int, default=10000, help="files in the image (default 10000)")
    p.add_argument("--changed", type=int, default=10, help="files the container modifies (10)")
    p.add_argument(
        "--diff-runs", type=int, default=5, help="rootfs diff runs per side (default 5; 0: skip)"
    )
    p.add_argument("--diff-warmup", type=int, default=1, help="discarded diff runs (default 1)")
    p.add_argument("--versions", default="1.7", help="containerd versions (default 1.7)")
    p.add_argument(
        "--workdir-base",
        type=Path,
        default=Path("/var/tmp"),
        help="where the checkpoint images, bundles and rootfs go (default /var/tmp)",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    args = p.parse_args(argv)
    args.versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    if args.mem_mib < 2 or args.runs < 0 or args.diff_runs < 0 or args.diff_warmup < 0:
        p.error("--mem-mib >= 2, --runs/--diff-runs/--diff-warmup >= 0")
    if args.files < args.changed or args.changed < 1:
        p.error("need 1 <= --changed <= --files")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    precompile()
    private_signing_key()
    if os.geteuid() != 0:
        print("bench/checkpoint.py needs root (private containerd, runc, CRIU)", file=sys.stderr)
        return 2
    doc: dict[str, Any] = {
        "benchmark": "checkpoint",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "config": {
            "mem_mib": args.mem_mib,
            "runs": args.runs,
            "files": args.files,
            "changed": args.changed,
            "diff_runs": args.diff_runs,
            "diff_warmup": args.diff_warmup,
            "versions": args.versions,
            "workdir_base": str(args.workdir_base),
            "image": IMAGE,
            "namespace": NAMESPACE,
            "targets": {
                "checkpoint_ratio_stasis_over_runc_at_most": CKPT_TARGET,
                "restore_ratio_stasis_over_runc_at_most": CKPT_TARGET,
                "diff_ratio_containerd_over_stasis_at_least": DIFF_TARGET,
            },
        },
        "machine": machine_info(),
        "results": {},
    }
    m = doc["machine"]
    print(
        f"stasis checkpoint bench  {doc['timestamp']}  nproc {m['nproc']}  kernel {m['kernel']}"
        f"  cgroup {m['cgroup']}  {m['cpu']}  commit {m['repo_commit'][:12]}"
        f"{' (dirty)' if m['repo_dirty'] else ''}"
    )
    if not any((d / "containerd-shim-stasis-v2").is_file() for d in shim_path()):
        print(f"containerd-shim-stasis-v2 not found in {shim_path()}", file=sys.stderr)
        return 2
    failed = False
    try:
        with signals_as_interrupt():
            for version in args.versions:
                r: dict[str, Any] = {"version": version}
                doc["results"][version] = r
                try:
                    bench_version(version, args, r)
                except (
                    BenchError,
                    RuntimeError,
                    subprocess.SubprocessError,
                    OSError,
                    ValueError,
                ) as e:
                    failed = True
                    r["error"] = f"{type(e).__name__}: {e}"
                    print(f"\ncontainerd {version}: ERROR {e}", file=sys.stderr)
                print_version(r)
    except KeyboardInterrupt:
        doc["interrupted"] = True
        print("\ninterrupted; everything started was cleaned up", file=sys.stderr)
        write_json(args.json, doc)
        return 130
    print_summary(doc["results"])
    write_json(args.json, doc)
    print(f"\nraw numbers: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
