#!/usr/bin/env python3
"""Stasis shim vs containerd's runc shim, measured in one run on one private containerd.

    .venv/bin/python bench/shim.py [--runs N] [--versions 1.7,2.1] [--json OUT] [--profile]

For each containerd version of the test bed (tests/bed/setup.sh) it starts a private
containerd (tests/bed/containerd.py), imports the busybox image and measures:

* latency: wall time of `ctr run --rm IMAGE ID true` with our runtime and with
  io.containerd.runc.v2, interleaved ABAB after discarded warm-up runs; median, p90 and
  the ratio of medians (ours / runc);
* memory: VmRSS, PSS and USS of one idle shim daemon (`ctr run -d IMAGE ID sleep 1000`,
  read after a settle delay, and for ours after the shim zygote that forked it has gone:
  it leaves by itself 60 s after the last start, the bench ends it at once; its own
  memory just before is kept in the sample), the ratio ours / runc;
* with --profile: where the time of one `ctr run --rm` goes, from containerd's debug log
  and `ctr events` timestamps (ours and, for reference, runc's).

Everything (tasks, containers, the containerd instance) is cleaned up, also on failure or
Ctrl-C. Raw numbers go to bench/results-shim.json (gitignored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
# This file's name would shadow the `shim` package: bench/ off sys.path, the repo on it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
for _p in (REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bed.containerd import Containerd, bed_missing, images_dir, unique_id  # noqa: E402

from bench.common import (  # noqa: E402
    BenchError,
    containerd_version,
    end_zygote,
    loadavg,
    machine_info,
    memory_of,
    precompile,
    private_signing_key,
    shim_path,
    signals_as_interrupt,
    signals_ignored,
    summary,
    write_json,
)
from bench.common import read_bytes as _read  # noqa: E402

OURS = "io.containerd.stasis.v2"
RUNC = "io.containerd.runc.v2"
RUNTIMES = (OURS, RUNC)  # the ABAB order: ours first in every pair
LABEL = {OURS: "stasis", RUNC: "runc shim"}
TAG = {OURS: "stasis", RUNC: "runc"}  # in container ids
SHIM_BINARY = {OURS: "containerd-shim-stasis-v2", RUNC: "containerd-shim-runc-v2"}
IMAGE = "docker.io/stasis/busybox:test"
NAMESPACE = "stasis-bench"  # not the tests' namespace: no shared runc root or cgroup

LATENCY_TARGET, LATENCY_GOAL = 1.5, 1.25
MEMORY_TARGET, MEMORY_GOAL = 1.5, 1.0

DEFAULT_JSON = REPO / "bench" / "results-shim.json"


# -- small helpers -------------------------------------------------------------------


def verdict(ratio: float, target: float, goal: float) -> dict[str, Any]:
    return {
        "ratio": ratio,
        "target": target,
        "goal": goal,
        "pass_target": ratio <= target,
        "pass_goal": ratio <= goal,
    }


def verdict_text(v: dict[str, Any]) -> str:
    t = "PASS" if v["pass_target"] else "MISS"
    g = "PASS" if v["pass_goal"] else "MISS"
    return f"{v['ratio']:.2f}   target <= {v['target']:.2f} {t}   goal <= {v['goal']:.2f} {g}"


# -- latency -------------------------------------------------------------------------


def run_rm(c: Containerd, runtime: str, cid: str) -> tuple[float, int, int]:
    """`ctr run --rm IMAGE cid true`; (seconds, wall ns at start, wall ns at end)."""
    w0 = time.time_ns()
    t0 = time.perf_counter()
    r = c.ctr("run", "--rm", "--runtime", runtime, IMAGE, cid, "true", check=False, timeout=120)
    elapsed = time.perf_counter() - t0
    w1 = time.time_ns()
    if r.returncode != 0:
        raise BenchError(
            f"ctr run --rm with {runtime} failed ({r.returncode}): {r.stderr.strip()}\n"
            f"containerd log:\n{c.log_tail(20)}"
        )
    return elapsed, w0, w1


def bench_latency(
    c: Containerd, runs: int, warmup: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    samples: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
    warm: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
    order: list[str] = []
    for i in range(warmup + runs):
        for rt in RUNTIMES:
            elapsed, _, _ = run_rm(c, rt, unique_id(f"lat-{TAG[rt]}"))
            (warm if i < warmup else samples)[rt].append(elapsed)
            if i >= warmup:
                order.append(rt)
        if i >= warmup:
            progress(f"latency {i - warmup + 1}/{runs}")
    result: dict[str, Any] = {
        "command": f"ctr run --rm --runtime RUNTIME {IMAGE} ID true",
        "runs": runs,
        "warmup": warmup,
        "order": "ABAB (stasis first in every pair)",
        "unit": "s",
        "runtimes": {
            rt: {"samples": samples[rt], "warmup_samples": warm[rt], **summary(samples[rt])}
            for rt in RUNTIMES
        },
    }
    if runs:
        ratio = statistics.median(samples[OURS]) / statistics.median(samples[RUNC])
        result["ratio_median"] = verdict(ratio, LATENCY_TARGET, LATENCY_GOAL)
        result["ratio_p90"] = result["runtimes"][OURS]["p90"] / result["runtimes"][RUNC]["p90"]
    return result


# -- memory --------------------------------------------------------------------------


def _ppid(pid: int) -> int:
    stat = _read(f"/proc/{pid}/stat").decode()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _names_address(pid: int, address: str) -> bool:
    """The shim's argv has `-address ADDR` (or -address=ADDR), or its environment names ADDR."""
    argv = _read(f"/proc/{pid}/cmdline").split(b"\0")
    addr = address.encode()
    for i, arg in enumerate(argv):
        if arg.lstrip(b"-") == b"address" and i + 1 < len(argv) and argv[i + 1] == addr:
            return True
        if arg.lstrip(b"-") == b"address=" + addr:
            return True
    with suppress(OSError):
        return addr in _read(f"/proc/{pid}/environ")
    return False


def find_shims(binary: str, address: str) -> list[int]:
    """Every process whose cmdline names `binary` and that serves containerd at `address`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if binary.encode() in _read(f"/proc/{pid}/cmdline") and _names_address(pid, address):
                found.append(pid)
        except OSError:
            continue
    return found


def task_pid(c: Containerd, cid: str) -> int:
    for line in c.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[0] == cid:
            return int(fields[1])
    raise BenchError(f"task {cid} not listed by `ctr tasks ls`")


def shim_of(c: Containerd, runtime: str, cid: str) -> int:
    """The shim daemon serving container cid: the parent of the task's init process,
    checked to be a `runtime` shim serving this containerd."""
    binary = SHIM_BINARY[runtime]
    candidates = find_shims(binary, str(c.address))
    init = task_pid(c, cid)
    parent = _ppid(init)
    if parent in candidates:
        return parent
    raise BenchError(
        f"{cid}: the init process {init} has parent {parent}, not one of the {binary} "
        f"processes serving {c.address}: {candidates}"
    )


def key_file(pid: int) -> str:
    """The file holding most of a shim's code: libpython for ours, the binary for runc's."""
    exe = os.readlink(f"/proc/{pid}/exe")
    for line in _read(f"/proc/{pid}/maps").decode(errors="replace").splitlines():
        path = line.split(maxsplit=5)[5] if len(line.split(maxsplit=5)) == 6 else ""
        if "/libpython" in path:
            return path.strip()
    return exe


def mappers(path: str, exclude: int) -> list[int]:
    """Other processes mapping `path`: they share its page-cache pages, lowering PSS."""
    found = []
    needle = path.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == exclude:
            continue
        with suppress(OSError):
            if needle in _read(f"/proc/{entry}/maps"):
                found.append(int(entry))
    return found


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def remove(c: Containerd, cid: str) -> None:
    c.ctr("tasks", "delete", "--force", cid, check=False)
    c.ctr("containers", "delete", cid, check=False)


def measure_idle_shim(c: Containerd, runtime: str, settle: float) -> dict[str, Any]:
    cid = unique_id(f"mem-{TAG[runtime]}")
    c.ctr("run", "-d", "--runtime", runtime, IMAGE, cid, "sleep", "1000", timeout=120)
    pid = None
    try:
        time.sleep(settle)
        pid = shim_of(c, runtime, cid)
        zygote = end_zygote(pid)
        sample: dict[str, Any] = {"container": cid, "shim_pid": pid, **memory_of(pid)}
        sample["zygote"] = zygote
        shared = key_file(pid)
        sample["key_file"] = shared
        sample["key_file_mappers"] = mappers(shared, pid)  # incl. this bench for libpython
        sample["sharers"] = len(sample["key_file_mappers"])
        sample["shim_cmdline"] = (
            _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
        )
        return sample
    finally:
        remove(c, cid)
        # A second shim of the same binary alive at the next reading would share its
        # pages and lower its PSS: wait for this one to be gone.
        if pid is not None and not _wait_gone(pid, 10.0):
            raise BenchError(f"{runtime} shim {pid} still alive 10 s after its task was deleted")


MEM_KEYS = ("VmRSS", "Pss", "USS")


def bench_memory(
    c: Containerd, runs: int, settle: float, progress: Callable[[str], None]
) -> dict[str, Any]:
    samples: dict[str, list[dict[str, Any]]] = {rt: [] for rt in RUNTIMES}
    for i in range(runs):
        for rt in RUNTIMES:
            samples[rt].append(measure_idle_shim(c, rt, settle))
        progress(f"memory {i + 1}/{runs}")
    result: dict[str, Any] = {
        "command": f"ctr run -d --runtime RUNTIME {IMAGE} ID sleep 1000",
        "settle_s": settle,
        "runs": runs,
        "unit": "KiB",
        "runtimes": {},
    }
    for rt in RUNTIMES:
        keys = sorted({k for s in samples[rt] for k, v in s.items() if isinstance(v, int)})
        keys = [k for k in keys if k != "shim_pid"]
        result["runtimes"][rt] = {
            "samples": samples[rt],
            "median": {k: statistics.median(s[k] for s in samples[rt]) for k in keys},
        }
    ours, runc = result["runtimes"][OURS]["median"], result["runtimes"][RUNC]["median"]
    result["ratio"] = {
        "rss": verdict(ours["VmRSS"] / runc["VmRSS"], MEMORY_TARGET, MEMORY_GOAL),
        "pss": verdict(ours["Pss"] / runc["Pss"], MEMORY_TARGET, MEMORY_GOAL),
        "uss": ours["USS"] / runc["USS"],
    }
    return result


# -- profile -------------------------------------------------------------------------

_LOG_LINE = re.compile(r'time="([^"]+)" level=(\w+) msg=(?:"((?:[^"\\]|\\.)*)"|(\S+))')
_EVENT_LINE = re.compile(r"^(\S+) (\S+) ([+-])(\d\d)(\d\d) \S+ (\S+) (/\S+) ?(.*)$")


def _frac_ns(frac: str) -> int:
    return int((frac + "000000000")[:9]) if frac else 0


def parse_log_time(ts: str) -> int | None:
    """containerd's RFC 3339 UTC time, or our shim's Python asctime (local time), in ns."""
    try:
        if "T" in ts:  # 2026-11-27T17:55:10.849948905Z
            base, _, rest = ts.rstrip("Z").partition(".")
            when = dt.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
            return int(when.timestamp()) * 10**9 + _frac_ns(rest)
        base, _, ms = ts.partition(",")  # 2026-11-27 17:55:00,942 (local time)
        when = dt.datetime.strptime(base, "%Y-%m-%d %H:%M:%S")
        return int(when.timestamp()) * 10**9 + _frac_ns(ms)
    except ValueError:
        return None


def parse_event(line: str) -> dict[str, Any] | None:
    """One `ctr events` line: 2026-11-27 17:55:10.861399363 +0000 UTC ns /topic {json}."""
    m = _EVENT_LINE.match(line.strip())
    if not m:
        return None
    date, clock, sign, hh, mm, ns, topic, payload = m.groups()
    base, _, frac = clock.partition(".")
    try:
        tz = dt.timezone((1 if sign == "+" else -1) * dt.timedelta(hours=int(hh), minutes=int(mm)))
        when = dt.datetime.strptime(f"{date} {base}", "%Y-%m-%d %H:%M:%S").replace(tzinfo=tz)
        body = json.loads(payload) if payload else {}
    except ValueError:
        return None
    t = int(when.timestamp()) * 10**9 + _frac_ns(frac)
    return {"t": t, "namespace": ns, "topic": topic, "event": body}


class EventWatcher:
    """`ctr events` in the background, every line parsed and kept."""

    def __init__(self, c: Containerd) -> None:
        cmd = [str(c.bin_dir / "ctr"), "--address", str(c.address), "events"]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=c.env(),
        )
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = parse_event(line)
            if ev is not None:
                with self._lock:
                    self.events.append(ev)

    def about(self, cid: str) -> list[dict[str, Any]]:
        with self._lock:
            evs = list(self.events)
        return [
            e
            for e in evs
            if cid in (e["event"].get("id"), e["event"].get("container_id"), e["event"].get("key"))
        ]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(2)


# The milestones of one `ctr run --rm`, in the order they normally happen. Each phase
# of the breakdown is the time from the previous milestone that was seen to this one.
MILESTONES: list[tuple[str, str]] = [
    ("ctr_start", "ctr launched (bench clock)"),
    ("container_created", "ctr start-up, image, snapshot prepare, container record"),
    ("shim_started", "NewTask up to `shim start` returning its address"),
    ("shim_serving", "shim daemon start-up until it logs that it serves"),
    ("task_created", "Create RPC (runc create) until /tasks/create"),
    ("task_started", "create reply, ctr wait + Start RPC (runc start) until /tasks/start"),
    ("task_exited", "`true` runs; exit reaped and published as /tasks/exit"),
    ("task_deleted", "ctr sees the exit, Delete RPC (runc delete, unmount) -> /tasks/delete"),
    ("shim_disconnected", "Shutdown RPC until the shim's connection closes"),
    ("snapshot_removed", "`shim delete` cleanup binary, bundle removal, snapshot remove"),
    ("container_deleted", "container record deleted"),
    ("ctr_exit", "ctr exits (bench clock)"),
]


def milestones(
    events: list[dict[str, Any]], log_lines: list[str], cid: str, w0: int, w1: int
) -> dict[str, int]:
    """Wall-clock ns of each milestone seen for container cid (ctr_start/ctr_exit: w0/w1)."""
    seen: dict[str, int] = {"ctr_start": w0}

    def first(name: str, t: int | None) -> None:
        if t is not None and name not in seen:
            seen[name] = t

    topics = {
        "/containers/create": "container_created",
        "/tasks/create": "task_created",
        "/tasks/start": "task_started",
        "/tasks/exit": "task_exited",
        "/tasks/delete": "task_deleted",
        "/snapshot/remove": "snapshot_removed",
        "/containers/delete": "container_deleted",
    }
    for ev in events:
        if ev["topic"] in topics:
            first(topics[ev["topic"]], ev["t"])
    for line in log_lines:
        m = _LOG_LINE.search(line)
        if not m:
            continue
        t = parse_log_time(m.group(1))
        msg = (m.group(3) or m.group(4) or "").replace('\\"', '"')
        if msg == "shim bootstrap parameters" or msg == f"connecting to shim {cid}":
            first("shim_started", t)  # 1.7 / 2.1: logged once `shim start` has returned
        elif msg == "serving api on socket" or msg.startswith("serving /run/containerd/s/"):
            first("shim_serving", t)  # runc shim's / our shim's own log line
        elif msg == "shim disconnected" and f"id={cid}" in line:
            first("shim_disconnected", t)
    seen["ctr_exit"] = w1
    return {name: seen[name] for name, _ in MILESTONES if name in seen}


def phases(seen: dict[str, int]) -> dict[str, float]:
    """ms spent reaching each milestone from the previous one seen."""
    out: dict[str, float] = {}
    prev: int | None = None
    for name, _ in MILESTONES:
        if name not in seen:
            continue
        if prev is not None:
            out[name] = (seen[name] - prev) / 1e6
        prev = seen[name]
    out["total"] = (seen["ctr_exit"] - seen["ctr_start"]) / 1e6
    return out


def bench_profile(c: Containerd, runs: int, progress: Callable[[str], None]) -> dict[str, Any]:
    watcher = EventWatcher(c)
    per_run: dict[str, list[dict[str, Any]]] = {rt: [] for rt in RUNTIMES}
    try:
        time.sleep(0.5)  # let the subscription register
        for i in range(runs):
            for rt in RUNTIMES:
                cid = unique_id(f"prof-{TAG[rt]}")
                offset = c.log_path.stat().st_size
                elapsed, w0, w1 = run_rm(c, rt, cid)
                time.sleep(0.3)  # shim log lines are copied into the log asynchronously
                with c.log_path.open("rb") as f:
                    f.seek(offset)
                    lines = f.read().decode(errors="replace").splitlines()
                seen = milestones(watcher.about(cid), lines, cid, w0, w1)
                per_run[rt].append(
                    {
                        "container": cid,
                        "elapsed_s": elapsed,
                        "milestones_ns": seen,
                        "phases_ms": phases(seen),
                    }
                )
            progress(f"profile {i + 1}/{runs}")
    finally:
        watcher.close()
    result: dict[str, Any] = {
        "runs": runs,
        "sources": "ctr events (shim-published task events carry the shim's clock), "
        "containerd debug log incl. shim log lines",
        "milestones": dict(MILESTONES),
        "runtimes": {},
    }
    for rt in RUNTIMES:
        names = [n for n, _ in MILESTONES[1:]] + ["total"]
        med = {}
        for n in names:
            vals = [r["phases_ms"][n] for r in per_run[rt] if n in r["phases_ms"]]
            if vals:
                med[n] = statistics.median(vals)
        result["runtimes"][rt] = {"runs": per_run[rt], "median_phases_ms": med}
    return result


# -- one containerd version ----------------------------------------------------------


def bench_version(version: str, args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Fills `out` as it goes, so a failure or ^C keeps what was measured."""
    if why := bed_missing([version]):
        raise BenchError(why)
    out["loadavg_start"] = loadavg()

    def progress(what: str) -> None:
        if sys.stderr.isatty():
            print(f"\r  [{version}] {what}   ", end="", file=sys.stderr, flush=True)

    c = Containerd.in_run_dir(version, shim_path(), namespace=NAMESPACE)
    try:
        c.start()
        c.import_image(images_dir() / "busybox.tar")
        out["containerd_version"] = containerd_version(c)
        out["workdir"] = str(c.workdir)
        out["latency"] = bench_latency(c, args.runs, args.warmup, progress)
        if args.mem_runs:
            out["memory"] = bench_memory(c, args.mem_runs, args.settle, progress)
        if args.profile:
            out["profile"] = bench_profile(c, args.profile_runs, progress)
    finally:
        if sys.stderr.isatty():
            print("\r" + " " * 40 + "\r", end="", file=sys.stderr, flush=True)
        with signals_ignored():
            left = c.stop()
        out["leftovers"] = repr(left) if left else None
        out["loadavg_end"] = loadavg()


# -- report --------------------------------------------------------------------------


def ms(s: float) -> str:
    return f"{s * 1000:8.1f}"


def mib(kib: float) -> str:
    return f"{kib / 1024:7.1f}"


def print_version(r: dict[str, Any]) -> None:
    print(
        f"\ncontainerd {r['version']} ({r.get('containerd_version', '?')})   "
        f"load avg {r.get('loadavg_start')} -> {r.get('loadavg_end')}"
    )
    if "error" in r:
        print(f"  ERROR (partial results below): {r['error'].splitlines()[0]}")
    lat = r.get("latency")
    if lat:
        print(
            f"  latency: `ctr run --rm ... true`, {lat['runs']} runs each, ABAB, "
            f"{lat['warmup']} warm-up runs each discarded  (ms)"
        )
        print(f"    {'':12}{'median':>9}{'p90':>9}{'mean':>9}{'min':>9}{'max':>9}")
        for rt in RUNTIMES:
            s = lat["runtimes"][rt]
            if "median" in s:
                print(
                    f"    {LABEL[rt]:12}"
                    + "".join(ms(s[k]) + " " for k in ("median", "p90", "mean", "min", "max"))
                )
        if "ratio_median" in lat:
            print(f"    ratio stasis/runc (medians)  {verdict_text(lat['ratio_median'])}")
            print(f"    ratio stasis/runc (p90)      {lat['ratio_p90']:.2f}")
    mem = r.get("memory")
    if mem:
        print(
            f"  memory: one idle shim (`sleep 1000`, read after {mem['settle_s']} s), "
            f"median of {mem['runs']}  (MiB)"
        )
        print(f"    {'':12}{'RSS':>8}{'PSS':>8}{'USS':>8}{'anon':>8}{'threads':>8}{'sharers':>9}")
        for rt in RUNTIMES:
            m = mem["runtimes"][rt]["median"]
            print(
                f"    {LABEL[rt]:12}{mib(m['VmRSS'])} {mib(m['Pss'])} {mib(m['USS'])} "
                f"{mib(m.get('RssAnon', 0))} {m.get('Threads', 0):7.0f} {m.get('sharers', 0):8.0f}"
            )
        print(f"    ratio RSS stasis/runc        {verdict_text(mem['ratio']['rss'])}")
        print(f"    ratio PSS stasis/runc        {verdict_text(mem['ratio']['pss'])}")
        print(f"    ratio USS stasis/runc        {mem['ratio']['uss']:.2f}")
        print(
            "    (PSS splits shared pages among the processes mapping them; `sharers` counts "
            "the other\n     processes mapping the shim's main file: libpython for stasis, "
            "incl. this bench;\n     the shim binary for runc. RSS and USS bound PSS.)"
        )
    prof = r.get("profile")
    if prof:
        print(
            f"  profile: one `ctr run --rm ... true`, median of {prof['runs']} runs per phase "
            "(ms from the previous milestone)"
        )
        print(f"    {'phase (reached at)':20}{'stasis':>9}{'runc':>9}{'diff':>9}   covers")
        o = prof["runtimes"][OURS]["median_phases_ms"]
        n = prof["runtimes"][RUNC]["median_phases_ms"]
        for name, what in [*MILESTONES[1:], ("total", "ctr launch to ctr exit")]:
            a, b = o.get(name), n.get(name)
            fa = f"{a:9.1f}" if a is not None else f"{'-':>9}"
            fb = f"{b:9.1f}" if b is not None else f"{'-':>9}"
            fd = f"{a - b:+9.1f}" if a is not None and b is not None else f"{'':9}"
            print(f"    {name:20}{fa}{fb}{fd}   {what}")
    if r.get("leftovers"):
        print(f"  WARNING: leftovers cleaned up by force: {r['leftovers']}")


def print_summary(results: dict[str, Any]) -> None:
    print("\nsummary (stasis / runc shim)")
    for v, r in results.items():
        if "error" in r:
            print(f"  {v}: ERROR {r['error'].splitlines()[0]}")
            continue
        lat, mem = r.get("latency", {}), r.get("memory", {})
        if "ratio_median" in lat:
            print(f"  {v} latency median  {verdict_text(lat['ratio_median'])}")
        if mem:
            print(f"  {v} memory RSS      {verdict_text(mem['ratio']['rss'])}")
            print(f"  {v} memory PSS      {verdict_text(mem['ratio']['pss'])}")


# -- main ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="timed runs per runtime (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="discarded runs per runtime (default 2)")
    p.add_argument("--versions", default="1.7,2.1", help="containerd versions (default 1.7,2.1)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    p.add_argument(
        "--mem-runs",
        type=int,
        default=3,
        help="idle-shim memory readings per runtime, median kept (default 3; 0: skip)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds between `ctr run -d` and the memory reading (default 1)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also break one `ctr run --rm` into phases (containerd log + events)",
    )
    p.add_argument(
        "--profile-runs",
        type=int,
        default=5,
        help="profiled runs per runtime, median per phase (default 5)",
    )
    args = p.parse_args(argv)
    args.versions = [v.strip() for v in args.versions.split(",") if v.strip()]
    if args.runs < 1 or args.warmup < 0 or args.mem_runs < 0 or args.profile_runs < 1:
        p.error("--runs and --profile-runs must be >= 1, --warmup and --mem-runs >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    precompile()
    private_signing_key()
    if os.geteuid() != 0:
        print("bench/shim.py needs root (it runs a private containerd)", file=sys.stderr)
        return 2
    doc: dict[str, Any] = {
        "benchmark": "shim",
        "timestamp": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "config": {
            "runs": args.runs,
            "warmup": args.warmup,
            "versions": args.versions,
            "mem_runs": args.mem_runs,
            "settle_s": args.settle,
            "profile": args.profile,
            "profile_runs": args.profile_runs if args.profile else 0,
            "image": IMAGE,
            "namespace": NAMESPACE,
            "runtimes": {"ours": OURS, "reference": RUNC},
            "targets": {
                "latency_ratio": {"target": LATENCY_TARGET, "goal": LATENCY_GOAL},
                "memory_ratio": {"target": MEMORY_TARGET, "goal": MEMORY_GOAL},
            },
        },
        "machine": machine_info(),
        "results": {},
    }
    m = doc["machine"]
    print(
        f"stasis shim bench  {doc['timestamp']}  nproc {m['nproc']}  kernel {m['kernel']}  "
        f"{m['cpu']}  commit {m['repo_commit'][:12]}{' (dirty)' if m['repo_dirty'] else ''}"
    )
    if not m["shim_binary"]:
        print(f"{SHIM_BINARY[OURS]} not found in {shim_path()}", file=sys.stderr)
        return 2
    failed = False
    try:
        with signals_as_interrupt():
            for version in args.versions:
                r: dict[str, Any] = {"version": version}
                doc["results"][version] = r
                try:
                    bench_version(version, args, r)
                except (BenchError, RuntimeError, subprocess.SubprocessError, OSError) as e:
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
