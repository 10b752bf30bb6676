"""Helpers shared by the bench scripts: machine info, summaries, timed runs, cleanup.

The scripts import it as `bench.common` with the repository root on sys.path and bench/
itself off it (bench/shim.py would shadow the `shim` package):

    REPO = Path(__file__).resolve().parent.parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from bench import common
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SHIM_BINARY = "containerd-shim-stasis-v2"


class BenchError(RuntimeError):
    """A measurement could not be made (the message says why)."""


# -- where things are -----------------------------------------------------------------


def precompile() -> None:
    """Bytecode for the code under test, so no run pays for compiling it (the stasis
    CLI writes none itself where PYTHONDONTWRITEBYTECODE is set)."""
    from shim.bootstrap.launcher import precompile as compile_packages

    compile_packages()


def private_signing_key() -> None:
    """The bench's shims, CLIs and upload workers sign with a key of the bench's own
    (environment, inherited through containerd), never the machine's
    /etc/stasis/signing.key, which the store makes on first use; removed at exit."""
    if os.environ.get("STASIS_SIGNING_KEY_FILE"):
        return
    directory = tempfile.mkdtemp(prefix="stasis-bench-key-")
    os.environ["STASIS_SIGNING_KEY_FILE"] = os.path.join(directory, "signing.key")
    atexit.register(shutil.rmtree, directory, True)


def shim_path() -> list[Path]:
    """Directories holding containerd-shim-stasis-v2: the repo's venv and this interpreter's."""
    dirs = [REPO / ".venv" / "bin", Path(sys.prefix) / "bin"]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d not in dirs[:i]]


def shim_binary() -> str | None:
    """The full path of our shim binary, or None when it is not installed."""
    return shutil.which(SHIM_BINARY, path=os.pathsep.join(map(str, shim_path())))


def stasis_cmd() -> list[str]:
    """The stasis CLI: the venv's entry point, else this interpreter's `-m runtime.cli`."""
    for d in shim_path():
        if (d / "stasis").is_file():
            return [str(d / "stasis")]
    return [sys.executable, "-m", "runtime.cli"]


# -- numbers --------------------------------------------------------------------------


def summary(xs: Sequence[float]) -> dict[str, float]:
    """n, median, p90 (linear interpolation, inclusive), mean, stdev, min, max."""
    if not xs:
        return {}
    p90 = statistics.quantiles(xs, n=10, method="inclusive")[-1] if len(xs) > 1 else xs[0]
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "p90": p90,
        "mean": statistics.fmean(xs),
        "stdev": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
    }


def goal_verdict(ratio: float, goal: float, higher_is_better: bool = False) -> dict[str, Any]:
    """ratio against the issue's goal (ours / reference <= goal, or >= for speed-ups)."""
    ok = ratio >= goal if higher_is_better else ratio <= goal
    return {"ratio": ratio, "goal": goal, "op": ">=" if higher_is_better else "<=", "meets": ok}


# -- the machine ----------------------------------------------------------------------


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def cmd_out(cmd: Sequence[str], cwd: Path | None = None, timeout: float = 10) -> str:
    """stdout of a command, stripped; "" when it fails or is missing."""
    try:
        r = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.strip() if r.returncode == 0 else ""


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = ""
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    status = cmd_out(["git", "status", "--porcelain"], cwd=REPO)
    return {
        "nproc": os.cpu_count(),
        "nproc_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpu": cpu,
        "mem_total_kib": mem_kib,
        "python": sys.version.split()[0],
        "cgroup": "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1",
        "runc": cmd_out(["runc", "--version"]).splitlines()[:1],
        "criu": [
            " ".join(cmd_out(["criu", "--version"]).splitlines()[:1]).replace("Version:", "CRIU")
        ],
        "repo_commit": cmd_out(["git", "rev-parse", "HEAD"], cwd=REPO),
        "repo_dirty": bool(status),
        "shim_binary": shim_binary(),
        "stasis_cli": stasis_cmd(),
    }


def banner(name: str, doc: dict[str, Any]) -> str:
    """One line: bench name, time, machine, commit."""
    m = doc["machine"]
    return (
        f"stasis {name} bench  {doc['timestamp']}  nproc {m['nproc']}  kernel {m['kernel']}  "
        f"cgroup {m['cgroup']}  {m['cpu']}  commit {m['repo_commit'][:12]}"
        f"{' (dirty)' if m['repo_dirty'] else ''}"
    )


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def containerd_version(c: Any) -> str:
    """The server version of a tests/bed/containerd.py Containerd."""
    out = c.ctr("version", check=False).stdout
    m = re.search(r"Version:\s*(\S+)", out.split("Server:", 1)[-1])
    return m.group(1) if m else "?"


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Written to a temporary file then renamed: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


# -- signals and cleanup --------------------------------------------------------------


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM (and SIGHUP) raise KeyboardInterrupt like ^C, so finally blocks run."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """While cleaning up: a second ^C must not leave the cleanup half done."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Scope:
    """Cleanup callbacks run last-in first-out when the block ends, however it ends,
    with ^C/SIGTERM ignored meanwhile; their failures are collected in `errors`."""

    def __init__(self, errors: list[str]) -> None:
        self._callbacks: list[tuple[str, Callable[[], object]]] = []
        self.errors = errors

    def push(self, what: str, fn: Callable[[], object]) -> None:
        self._callbacks.append((what, fn))

    def close(self) -> None:
        with signals_ignored():
            while self._callbacks:
                what, fn = self._callbacks.pop()
                try:
                    fn()
                except Exception as e:  # keep cleaning up, report it
                    self.errors.append(f"cleanup {what}: {type(e).__name__}: {e}")

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def timed(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600, what: str = ""
) -> tuple[float, subprocess.CompletedProcess[str]]:
    """(wall seconds, result) of a command; raises BenchError when it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise BenchError(f"{what or cmd[0]} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return elapsed, r


# -- processes and memory -------------------------------------------------------------


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def stat_fields(pid: int) -> tuple[str, int]:
    """(comm, ppid) of a process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    return comm, int(stat.rsplit(")", 1)[1].split()[1])


def process_tree() -> dict[int, list[tuple[int, str]]]:
    """ppid -> [(pid, comm)] of every process now."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with suppress(OSError, ValueError, IndexError):
            comm, ppid = stat_fields(int(entry))
            children.setdefault(ppid, []).append((int(entry), comm))
    return children


def descendants(root: int, tree: dict[int, list[tuple[int, str]]] | None = None) -> dict[int, str]:
    """pid -> comm of every process below `root` (not root itself)."""
    children = process_tree() if tree is None else tree
    out: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid, comm in children.get(todo.pop(), []):
            out[pid] = comm
            todo.append(pid)
    return out


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem, VmHWM of /proc/PID/status (KiB)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM/threads from status, and the smaps_rollup totals (all in KiB)."""
    out = status_kib(pid)
    rollup: dict[str, int] = {}
    for line in read_bytes(f"/proc/{pid}/smaps_rollup").decode().splitlines()[1:]:
        key, _, value = line.partition(":")
        with suppress(ValueError, IndexError):
            rollup[key.strip()] = int(value.split()[0])
    for key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Private_Clean", "Private_Dirty"):
        if key in rollup:
            out[key] = rollup[key]
    out["USS"] = rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)
    return out


def pss_rss_kib(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of one process from smaps_rollup, (0, 0) once it is gone."""
    pss = rss = 0
    with suppress(OSError, ValueError, IndexError):
        for line in read_bytes(f"/proc/{pid}/smaps_rollup").decode().splitlines()[1:]:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    return pss, rss


def zygote_of(pid: int) -> int | None:
    """The shim zygote (shim/bootstrap/zygote.py) that forked shim `pid`, if one did."""
    with suppress(OSError, ValueError, IndexError):
        ppid = int(read_bytes(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()[1])
        if read_bytes(f"/proc/{ppid}/cmdline").split(b"\0")[1:2] == [b"zygote"]:
            return ppid
    return None


MEMORY_SUMS = ("VmRSS", "Pss", "USS", "RssAnon")


def end_zygote(pid: int) -> dict[str, Any] | None:
    """End the shim zygote that forked shim `pid`, if one did, and return its memory
    just before. A zygote leaves by itself 60 s after its last start (shim/bootstrap/zygote.py):
    ending it now measures that steady state, in which the shims it forked keep
    sharing its pages among themselves, without waiting a minute per reading."""
    z = zygote_of(pid)
    if z is None:
        return None
    mem: dict[str, Any] = {"pid": z, **memory_of(z)}
    with suppress(ProcessLookupError):
        os.kill(z, signal.SIGTERM)  # this one process, found as the shim's parent
    deadline = time.monotonic() + 10
    while zygote_of(pid) == z and time.monotonic() < deadline:
        time.sleep(0.05)
    if zygote_of(pid) == z:
        raise BenchError(f"shim zygote {z} still alive 10 s after SIGTERM")
    return mem
