#!/usr/bin/env python3
"""Every Stasis benchmark in one run, each figure measured side by side with its reference
on this machine; writes bench/results.json and docs/performance.md (plots in docs/img/).

    sudo .venv/bin/python bench/run.py [--quick] [--only shim,checkpoint,s3,profile]
    .venv/bin/python bench/run.py --render-only   # the page again from bench/results.json

Sections (each with its own private containerd 1.7 from the test bed, cleaned up after):

* shim: `ctr run --rm` start-to-exit latency, ours / runc shim (bench/shim.py); resident
  memory of one idle shim, of one shim serving a 3-container pod (the containers share
  a shim through the `io.containerd.runc.v2.group` annotation, which both shims honour)
  and of 50 single-container pods (sum over the 50 shims); where one `ctr run --rm`
  spends its time (containerd log + events, bench/shim.py --profile);
* checkpoint: checkpoint and restore of a container holding 64 MiB .. 2 GiB of touched
  memory, ours / raw runc+CRIU to the same directory (bench/checkpoint.py), with the
  frozen part; rootfs diff capture, ours / containerd's diff service; 20 containers
  checkpointed at once, total time and peak memory of the shims and helpers, ours
  (`stasis checkpoint`) / 20 concurrent raw `runc checkpoint`;
* s3: checkpoint to S3 (moto_server) and restore from it, ours / raw runc local
  (bench/s3.py);
* profile: what explains the gaps, measured: the shim daemon's imports (`python -X
  importtime`), the interpreter's own memory, the CLI's start-up, disk write throughput
  with fdatasync (dd), sha256 and zstd throughput.

Needs root and the test bed (`bash tests/bed/setup.sh`). Exit status: 0 done (whether
goals are met or not), 1 a section failed, 2 cannot run, 130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
# bench/shim.py would shadow the `shim` package: bench/ off sys.path, the repo on it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
for _p in (REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bed.containerd import Containerd, bed_missing, images_dir, unique_id  # noqa: E402

from bench import checkpoint as ck  # noqa: E402
from bench import common, report  # noqa: E402
from bench import s3 as s3b  # noqa: E402
from bench import shim as sb  # noqa: E402

DEFAULT_JSON = BENCH / "results.json"
GROUP_ANNOTATION = "io.containerd.runc.v2.group"
SECTIONS = ("profile", "shim", "checkpoint", "s3")

# Run counts: the full run stays within about 20 minutes on 2 cores.
FULL: dict[str, Any] = {
    "latency_runs": 20,
    "latency_warmup": 2,
    "mem_runs": 3,
    "pod_runs": 3,
    "pods": 50,
    "profile_runs": 5,
    "sizes": [(64, 5), (256, 5), (1024, 5), (2048, 2)],
    "files": 10000,
    "diff_runs": 5,
    "concurrent": 20,
    "concurrent_mib": 64,
    "s3_mib": 512,
    "s3_runs": 3,
}
QUICK: dict[str, Any] = {
    "latency_runs": 3,
    "latency_warmup": 1,
    "mem_runs": 1,
    "pod_runs": 1,
    "pods": 5,
    "profile_runs": 1,
    "sizes": [(64, 1), (256, 1)],
    "files": 2000,
    "diff_runs": 1,
    "concurrent": 4,
    "concurrent_mib": 16,
    "s3_mib": 64,
    "s3_runs": 1,
}


def progress(what: str) -> None:
    """One line of progress on stderr (a terminal or a log)."""
    print(f"  .. {what}", file=sys.stderr, flush=True)


# -- shim: latency, idle shim, 3-container pod, 50 pods ----------------------------------


def remove_and_wait(c: Containerd, cids: list[str], pids: list[int]) -> None:
    """Delete containers, then wait for their shims to be gone (a live shim of the same
    binary would share pages with the next reading and lower its PSS)."""
    for cid in cids:
        sb.remove(c, cid)
    for pid in pids:
        if not sb._wait_gone(pid, 15.0):
            raise common.BenchError(f"shim {pid} still alive 15 s after its tasks were deleted")


def measure_pod_shim(c: Containerd, runtime: str, size: int, settle: float) -> dict[str, Any]:
    """`size` containers in one group: one shim serves them all; its memory."""
    group = unique_id(f"pod-{sb.TAG[runtime]}")
    cids = [f"{group}-c{k}" for k in range(size)]
    pid = None
    try:
        for cid in cids:
            c.ctr("run", "-d", "--runtime", runtime, "--annotation",
                  f"{GROUP_ANNOTATION}={group}", sb.IMAGE, cid, "sleep", "1000",
                  timeout=120)  # fmt: skip
        time.sleep(settle)
        shims = {sb.shim_of(c, runtime, cid) for cid in cids}
        if len(shims) != 1:
            raise common.BenchError(
                f"{runtime}: the {size} containers of {group} have shims {shims}"
            )
        pid = shims.pop()
        zygote = common.end_zygote(pid)
        mem = common.memory_of(pid)
        return {"group": group, "containers": size, "shim_pid": pid, **mem, "zygote": zygote}
    finally:
        remove_and_wait(c, cids, [pid] if pid else [])


def measure_many_pods(c: Containerd, runtime: str, n: int, settle: float) -> dict[str, Any]:
    """n single-container pods (`ctr run -d` each): the sum of their shims' memory."""
    tag = unique_id(f"many-{sb.TAG[runtime]}")
    cids: list[str] = []
    pids: list[int] = []
    try:
        t0 = time.perf_counter()
        for k in range(n):
            cid = f"{tag}-{k}"
            cids.append(cid)
            c.ctr("run", "-d", "--runtime", runtime, sb.IMAGE, cid, "sleep", "1000", timeout=120)
        start_s = time.perf_counter() - t0
        time.sleep(settle)
        pids = sorted({sb.shim_of(c, runtime, cid) for cid in cids})
        if len(pids) != n:
            raise common.BenchError(f"{runtime}: {n} pods but {len(pids)} shims")
        zygotes = [z for p in pids if (z := common.end_zygote(p)) is not None]
        mems = [common.memory_of(p) for p in pids]
        total = {k: sum(m.get(k, 0) for m in mems) for k in common.MEMORY_SUMS}
        return {
            "pods": n,
            "start_all_s": start_s,
            "total_kib": total,
            "per_shim": mems,
            "zygotes": zygotes,
        }
    finally:
        remove_and_wait(c, cids, pids)


def section_shim(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    if why := bed_missing(["1.7"]):
        raise common.BenchError(why)
    c = Containerd.in_run_dir("1.7", common.shim_path(), namespace=sb.NAMESPACE)
    try:
        c.start()
        c.import_image(images_dir() / "busybox.tar")
        out["containerd_version"] = common.containerd_version(c)
        out["loadavg_start"] = common.loadavg()
        progress("latency: ctr run --rm, ours and runc shim, ABAB")
        out["latency"] = sb.bench_latency(
            c, cfg["latency_runs"], cfg["latency_warmup"], lambda s: None
        )
        progress("memory: one idle shim each")
        out["memory"] = sb.bench_memory(c, cfg["mem_runs"], 1.0, lambda s: None)
        progress("memory: one shim serving a 3-container pod each")
        pod: dict[str, list[dict[str, Any]]] = {rt: [] for rt in sb.RUNTIMES}
        for _ in range(cfg["pod_runs"]):
            for rt in sb.RUNTIMES:
                pod[rt].append(measure_pod_shim(c, rt, 3, 1.0))
        out["pod3"] = {
            "containers": 3,
            "how": f"3 x ctr run -d --annotation {GROUP_ANNOTATION}=POD; the one shim's memory",
            "runtimes": {
                rt: {
                    "samples": pod[rt],
                    "median": {
                        k: sorted(s[k] for s in pod[rt])[len(pod[rt]) // 2]
                        for k in ("VmRSS", "Pss", "USS")
                    },
                }
                for rt in sb.RUNTIMES
            },
        }
        progress(f"memory: {cfg['pods']} single-container pods each")
        out["pods"] = {
            "how": f"{cfg['pods']} x ctr run -d ... sleep 1000, sum over their shims",
            "runtimes": {rt: measure_many_pods(c, rt, cfg["pods"], 2.0) for rt in sb.RUNTIMES},
        }
        progress("profile: phases of one ctr run --rm")
        out["profile"] = sb.bench_profile(c, cfg["profile_runs"], lambda s: None)
    finally:
        with common.signals_ignored():
            left = c.stop()
        out["leftovers"] = repr(left) if left else None
        out["loadavg_end"] = common.loadavg()


# -- checkpoint: memory sweep, rootfs diff, 20 at once ---------------------------------


class MemorySampler:
    """Polls the PSS and RSS of a set of processes (chosen anew at every poll by
    `select`) and keeps the peak of their sums, and which processes made it."""

    def __init__(self, select: Any, interval: float = 0.2) -> None:
        self.select = select
        self.interval = interval
        self.peak_pss = self.peak_rss = 0
        self.peak_breakdown: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def poll(self) -> None:
        procs: dict[int, str] = self.select()
        pss = rss = 0
        by_comm: dict[str, int] = {}
        for pid, comm in procs.items():
            p, r = common.pss_rss_kib(pid)
            pss += p
            rss += r
            by_comm[comm] = by_comm.get(comm, 0) + p
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        if pss > self.peak_pss:
            self.peak_pss, self.peak_breakdown = pss, by_comm

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def result(self) -> dict[str, Any]:
        return {
            "peak_pss_kib": self.peak_pss,
            "peak_rss_kib": self.peak_rss,
            "peak_pss_by_comm_kib": self.peak_breakdown,
            "polls": self.samples,
        }


def _wait_all(procs: list[subprocess.Popen[str]], what: str) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise common.BenchError(f"{what} failed ({p.returncode}): {err.strip()[-1500:]}")
        outs.append(out)
    return outs


def concurrent_ours(
    c: Containerd, work: Path, n: int, mib: int, scope: common.Scope
) -> dict[str, Any]:
    cids = [unique_id(f"cc-stasis-{k}") for k in range(n)]
    inits: list[int] = []
    for cid in cids:
        scope.push(f"container {cid}", lambda cid=cid: ck.remove(c, cid))
        init, _ = ck.run_ours(c, cid, mib)
        inits.append(init)
    shims = sorted({sb.shim_of(c, sb.OURS, cid) for cid in cids})
    spec = ck.bundle_spec(c, cids[0])  # for the raw runc side: same process and mounts
    store = work / "store-concurrent"
    scope.push(f"dir {store}", lambda: ck.rm_tree(store))
    clis: list[subprocess.Popen[str]] = []

    def select() -> dict[int, str]:
        tree = common.process_tree()
        container = set(inits)
        for init in inits:
            container |= set(common.descendants(init, tree))
        chosen: dict[int, str] = {}
        for root in [*shims, *(p.pid for p in clis)]:
            with_comm = {root: "shim" if root in shims else "stasis-cli"}
            with_comm.update(common.descendants(root, tree))
            chosen.update({p: cm for p, cm in with_comm.items() if p not in container})
        return chosen

    baseline = MemorySampler(select)
    baseline.poll()
    with MemorySampler(select) as sampler:
        t0 = time.perf_counter()
        for cid in cids:
            clis.append(
                subprocess.Popen(
                    [
                        *common.stasis_cmd(),
                        "--address",
                        str(c.address),
                        "-n",
                        ck.NAMESPACE,
                        "checkpoint",
                        cid,
                        "--exit",
                        "--to",
                        str(store),
                        "--name",
                        cid,
                        "--json",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outs = _wait_all(clis, "stasis checkpoint (concurrent)")
        total = time.perf_counter() - t0
    import json

    reported = [json.loads(o) for o in outs]
    return {
        "containers": n,
        "mem_mib": mib,
        "total_s": total,
        "shims_before_kib": baseline.result()["peak_pss_kib"],
        **sampler.result(),
        "reported_seconds": [r["seconds"] for r in reported],
        "reported_frozen_seconds": [r["frozen_seconds"] for r in reported],
        "spec": spec,
    }


def concurrent_runc(
    raw: Any, spec: dict[str, Any], n: int, mib: int, scope: common.Scope
) -> dict[str, Any]:
    rids, bundles = [], []
    for k in range(n):
        rid = unique_id(f"cc-raw-{k}")
        b = raw.bundle(rid, spec, scope)
        _, init = raw.detached(b, rid, "run", ["-d", "--bundle", str(b)], scope)
        ck.wait_resident(init, mib)
        (b / "criu-work").mkdir()
        rids.append(rid)
        bundles.append(b)
    procs: list[subprocess.Popen[str]] = []

    def select() -> dict[int, str]:
        tree = common.process_tree()
        chosen: dict[int, str] = {}
        for p in procs:
            chosen[p.pid] = "runc"
            chosen.update(common.descendants(p.pid, tree))
        return chosen

    with MemorySampler(select) as sampler:
        t0 = time.perf_counter()
        for rid, b in zip(rids, bundles, strict=True):
            images = raw.work / f"images-{rid}"
            scope.push(f"images {images}", lambda images=images: ck.rm_tree(images))
            images.mkdir()
            cmd = raw.argv(b, "checkpoint", "--image-path", str(images),
                           "--work-path", str(b / "criu-work"), rid)  # fmt: skip
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=raw.env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        _wait_all(procs, "runc checkpoint (concurrent)")
        total = time.perf_counter() - t0
    return {"containers": n, "mem_mib": mib, "total_s": total, **sampler.result()}


def section_checkpoint(cfg: dict[str, Any], out: dict[str, Any], workdir_base: Path) -> None:
    if why := bed_missing(["1.7"]):
        raise common.BenchError(why)
    errors: list[str] = []
    out["cleanup_errors"] = errors
    workdir_base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="stasis-bench-run-", dir=workdir_base))
    saved = os.environ.get("STASIS_RESTORE_SOURCES")
    os.environ["STASIS_RESTORE_SOURCES"] = f"file://{work}"
    c = Containerd.in_run_dir("1.7", common.shim_path(), namespace=ck.NAMESPACE)
    try:
        c.start()
        c.import_image(images_dir() / "busybox.tar")
        out["containerd_version"] = common.containerd_version(c)
        out["loadavg_start"] = common.loadavg()
        out["checkpoint_dir_fs"] = common.cmd_out(["stat", "-fc", "%T", str(work)])
        sweep = out.setdefault("sweep", [])
        for mib, runs in cfg["sizes"]:
            progress(f"checkpoint/restore {mib} MiB, {runs} run(s) each")
            args = argparse.Namespace(mem_mib=mib, runs=runs)
            sweep.append(ck.bench_checkpoint(c, work, args, errors, lambda s: None))
        progress(f"rootfs diff: image of {cfg['files']} files")
        dargs = argparse.Namespace(
            files=cfg["files"], changed=10, diff_runs=cfg["diff_runs"], diff_warmup=1
        )
        out["diff"] = ck.bench_diff(c, work, dargs, errors, lambda s: None)
        n, mib = cfg["concurrent"], cfg["concurrent_mib"]
        progress(f"{n} concurrent checkpoints of {mib} MiB: ours")
        with common.Scope(errors) as scope:
            out["concurrent"] = {"stasis": concurrent_ours(c, work, n, mib, scope)}
        spec = out["concurrent"]["stasis"].pop("spec")
        progress(f"{n} concurrent checkpoints of {mib} MiB: raw runc")
        raw = ck.RawRunc(work, work / "busybox-layer", c.env())
        with common.Scope(errors) as scope:
            out["concurrent"]["runc"] = concurrent_runc(raw, spec, n, mib, scope)
        ck.rm_cgroups(ck.RAW_CGROUP)
    finally:
        with common.signals_ignored():
            left = c.stop()
            ck.rm_cgroups(ck.RAW_CGROUP)
            try:
                ck.rm_tree(work)
            except common.BenchError as e:
                errors.append(str(e))
            if saved is None:
                os.environ.pop("STASIS_RESTORE_SOURCES", None)
            else:
                os.environ["STASIS_RESTORE_SOURCES"] = saved
        out["leftovers"] = repr(left) if left else None
        out["loadavg_end"] = common.loadavg()


# -- s3 ----------------------------------------------------------------------------------


def section_s3(cfg: dict[str, Any], out: dict[str, Any], workdir_base: Path) -> None:
    progress(f"S3: {cfg['s3_mib']} MiB, {cfg['s3_runs']} run(s) each, moto_server")
    args = argparse.Namespace(
        version="1.7",
        mem_mib=cfg["s3_mib"],
        runs=cfg["s3_runs"],
        floor_runs=1,
        workdir_base=workdir_base,
    )
    out["moto"] = s3b._moto_version()
    s3b.bench(args, out)


# -- profile: what explains the gaps ---------------------------------------------------

# As the forked daemon imports them (shim/bootstrap/serving.py).
DAEMON_IMPORTS = "import sys, gc, shim.main; import socket, shim.daemon.serve"


def importtime(statement: str) -> dict[str, Any]:
    """`python -X importtime -c statement`: total, and the top-level imports by cost."""
    py = str(REPO / ".venv" / "bin" / "python")
    py = py if Path(py).is_file() else sys.executable
    t0 = time.perf_counter()
    r = subprocess.run([py, "-X", "importtime", "-c", statement], capture_output=True,
                       text=True, cwd="/", timeout=60, check=False)  # fmt: skip
    wall = time.perf_counter() - t0
    rows = []
    for line in r.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m:
            rows.append((int(m.group(1)), int(m.group(2)), len(m.group(3)), m.group(4)))
    top = sorted((x for x in rows if x[2] == 0), key=lambda x: -x[1])
    return {
        "statement": statement,
        "wall_s": wall,
        "imports": len(rows),
        "self_total_ms": sum(x[0] for x in rows) / 1000,
        "top_level_ms": {name: cum / 1000 for _, cum, _, name in top[:12]},
    }


def python_memory(statement: str) -> dict[str, int]:
    """Memory of an interpreter that ran `statement` and sleeps."""
    py = str(REPO / ".venv" / "bin" / "python")
    py = py if Path(py).is_file() else sys.executable
    p = subprocess.Popen([py, "-c", f"{statement}\nimport time\ntime.sleep(60)"], cwd="/",
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(2.0)
        return common.memory_of(p.pid)
    finally:
        p.kill()
        p.wait()


def disk_throughput(directory: Path, mib: int) -> dict[str, Any]:
    """dd of `mib` MiB into `directory`, through the page cache and with fdatasync."""
    out: dict[str, Any] = {"mib": mib, "dir": str(directory)}
    f = directory / f"dd-{os.getpid()}"
    try:
        for key, extra in (("fdatasync", ["conv=fdatasync"]), ("cached", [])) * 2:
            t0 = time.perf_counter()
            subprocess.run(["dd", "if=/dev/zero", f"of={f}", "bs=1M", f"count={mib}", *extra],
                           capture_output=True, check=True, timeout=600)  # fmt: skip
            s = time.perf_counter() - t0
            f.unlink()
            if s < out.get(f"{key}_s", float("inf")):  # the better of two tries
                out[f"{key}_s"] = s
                out[f"{key}_mib_s"] = mib / s
    finally:
        f.unlink(missing_ok=True)
    return out


def hash_zstd_throughput(mib: int) -> dict[str, float]:
    """MiB/s of sha256 and of zstd (level 3) over half random, half zero data."""
    data = os.urandom(mib << 19) + bytes(mib << 19)
    t0 = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    sha = mib / (time.perf_counter() - t0)
    out = {"sha256_mib_s": sha}
    try:
        import zstandard

        t0 = time.perf_counter()
        comp = zstandard.ZstdCompressor(level=3).compress(data)
        out["zstd_compress_mib_s"] = mib / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        zstandard.ZstdDecompressor().decompress(comp)
        out["zstd_decompress_mib_s"] = mib / (time.perf_counter() - t0)
    except ImportError:
        pass
    return out


def cli_startup(runs: int) -> dict[str, Any]:
    """Wall time of `stasis --help`: interpreter start-up and the CLI's imports."""
    xs = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([*common.stasis_cmd(), "--help"], capture_output=True, check=False,
                       timeout=60)  # fmt: skip
        xs.append(time.perf_counter() - t0)
    return common.summary(xs)


def section_profile(cfg: dict[str, Any], out: dict[str, Any], workdir_base: Path) -> None:
    out["loadavg_start"] = common.loadavg()
    progress("profile: imports, interpreter memory, CLI start-up, disk, sha256/zstd")
    out["importtime_daemon"] = importtime(DAEMON_IMPORTS)
    out["importtime_cli"] = importtime("import runtime.cli.main")
    out["python_bare_kib"] = python_memory("pass")
    out["python_daemon_imports_kib"] = python_memory(f"{DAEMON_IMPORTS}\ngc.collect()")
    out["cli_startup_s"] = cli_startup(3)
    workdir_base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stasis-bench-dd-", dir=workdir_base) as d:
        out["disk"] = disk_throughput(Path(d), 256 if cfg is QUICK else 1024)
    out["cpu"] = hash_zstd_throughput(256)
    out["loadavg_end"] = common.loadavg()


# -- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few runs, small sizes: a smoke run")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"sections ({','.join(SECTIONS)})")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    p.add_argument("--page", type=Path, default=report.PAGE, help=f"default {report.PAGE}")
    p.add_argument(
        "--workdir-base", type=Path, default=Path("/var/tmp"), help="checkpoints, bundles, dd"
    )
    p.add_argument("--render-only", action="store_true", help="the page from --json, no runs")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if bad := set(args.only) - set(SECTIONS):
        p.error(f"unknown sections {sorted(bad)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.precompile()
    common.private_signing_key()
    if args.render_only:
        import json

        doc = json.loads(args.json.read_text())
        report.render(doc, args.page)
        common.write_json(args.json, doc)  # with the verdicts recomputed
        print(report.table_text(doc))
        print(f"page: {args.page}")
        return 0
    if os.geteuid() != 0:
        print("bench/run.py needs root (private containerd, runc, CRIU)", file=sys.stderr)
        return 2
    if not common.shim_binary():
        print(f"{common.SHIM_BINARY} not found in {common.shim_path()}", file=sys.stderr)
        return 2
    cfg = QUICK if args.quick else FULL
    doc: dict[str, Any] = {
        "benchmark": "all",
        "timestamp": common.now_iso(),
        "argv": sys.argv,
        "quick": args.quick,
        "config": {k: v for k, v in cfg.items()},
        "machine": common.machine_info(),
        "loadavg_start": common.loadavg(),
        "sections": {},
    }
    print(common.banner("all", doc))
    failed = False
    t_all = time.perf_counter()
    runners = {
        "profile": lambda o: section_profile(cfg, o, args.workdir_base),
        "shim": lambda o: section_shim(cfg, o),
        "checkpoint": lambda o: section_checkpoint(cfg, o, args.workdir_base),
        "s3": lambda o: section_s3(cfg, o, args.workdir_base),
    }
    try:
        with common.signals_as_interrupt():
            for name in SECTIONS:
                if name not in args.only:
                    continue
                out: dict[str, Any] = {}
                doc["sections"][name] = out
                t0 = time.perf_counter()
                print(f"[{name}] load avg {common.loadavg()}", flush=True)
                try:
                    runners[name](out)
                except Exception as e:  # keep the other sections' numbers
                    failed = True
                    out["error"] = f"{type(e).__name__}: {e}"
                    print(f"[{name}] ERROR {out['error'][:2000]}", file=sys.stderr)
                out["seconds"] = time.perf_counter() - t0
                print(f"[{name}] done in {out['seconds']:.0f} s", flush=True)
                common.write_json(args.json, doc)
    except KeyboardInterrupt:
        doc["interrupted"] = True
        print("\ninterrupted; everything started was cleaned up", file=sys.stderr)
        common.write_json(args.json, doc)
        return 130
    doc["seconds"] = time.perf_counter() - t_all
    doc["loadavg_end"] = common.loadavg()
    doc["verdicts"] = report.verdicts(doc)
    common.write_json(args.json, doc)
    report.render(doc, args.page)
    print(report.table_text(doc))
    print(f"\nraw numbers: {args.json}\npage: {args.page}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
