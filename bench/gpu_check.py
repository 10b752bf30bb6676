#!/usr/bin/env python3
"""The real-GPU check of GPU state in checkpoints (needs an NVIDIA GPU, driver >= 550).

    sudo python3 bench/gpu_check.py [--gib 4] [--criu PATH] [--dir DIR] [--json OUT]

What it does, in under 5 minutes on an H100/H200 with Python 3.12 + PyTorch and no
network:

1. starts a worker process (its own session, stdio in files) that puts a >= --gib GiB
   int32 tensor of seeded random values on the GPU and computes its checksum there
   (two int64 sums: plain and position-weighted), and recomputes it on request;
2. the driver alone, in place: Stasis's own backend (runtime/capture/gpu.py over
   libcuda.so.1) locks and checkpoints the worker's GPU state into host memory, then
   restores and unlocks it; the worker's checksum must not change;
3. Stasis's order for a checkpoint that leaves the workload running: lock +
   checkpoint, `criu dump --leave-running`, restore + unlock; checksum again;
4. the worker is killed, `criu restore -d` brings it back (same PID) from the images
   of step 3, then the driver restores and unlocks its GPU state; the restored
   worker recomputes the checksum on the GPU: it must match.

Steps 3 and 4 are one cycle; --cycles N repeats them on the restored process. With
--plugin DIR (CRIU's cuda_plugin) and NVIDIA's cuda-checkpoint in PATH, each cycle
is followed by one where the plugin, from CRIU's hooks, does the GPU part: the
reference Stasis is compared with.

It prints each step's seconds, the CRIU image size and the checkpoint and restore
rates in GiB/s (tensor GiB over driver + CRIU time: lock + checkpoint + dump, and
CRIU restore + driver restore + unlock), and exits 0 only when every checksum
matches. No containerd or runc is involved: this checks the driver calls and
CRIU with GPU memory; the shim's hooks around them are exercised by
tests/integration/test_gpu_fake.py (with a fake libcuda) on any machine.

Needs root, PyTorch with CUDA, and CRIU >= 4 (--criu, $STASIS_CRIU, or `criu` in
PATH; a CRIU build carried from another machine needs its shared libraries in
LD_LIBRARY_PATH). CRIU images go to --dir (default: /dev/shm when it has room, else
/var/tmp) and are removed afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime.capture import gpu  # noqa: E402
from runtime.errors import FailedPrecondition  # noqa: E402

GPU_WORKER = r"""
import torch

n = int(GIB * (1 << 30)) // 4
g = torch.Generator(device="cuda")
g.manual_seed(20240611)
x = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, device="cuda", generator=g)
NBYTES = x.numel() * 4
CHUNK = 1 << 26


def checksum():
    plain = weighted = 0
    for start in range(0, n, CHUNK):
        c = x[start : start + CHUNK].to(torch.int64)
        w = torch.arange(start, start + c.numel(), device="cuda", dtype=torch.int64) % 65521 + 1
        plain += int(c.sum().item())
        weighted += int((c * w).sum().item())
        del c, w
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return f"{plain}:{weighted}"
"""

# --cpu-stand-in: no GPU, no PyTorch: checks this script's CRIU choreography with the
# fake libcuda (STASIS_LIBCUDA=.../libcuda_fake.so, the worker lists itself in
# $STASIS_FAKE_CUDA_PIDS). Its numbers say nothing about GPUs.
CPU_WORKER = r"""
import hashlib

block = os.urandom(1 << 20)
x = bytearray(block) * int(GIB * 1024)
NBYTES = len(x)
if os.environ.get("STASIS_FAKE_CUDA_PIDS"):
    with open(os.environ["STASIS_FAKE_CUDA_PIDS"], "a") as f:
        f.write(f"{os.getpid()}\n")


def checksum():
    return hashlib.sha256(x).hexdigest()
"""

WORKER = r"""
import os, sys, time

GIB, work = float(sys.argv[1]), sys.argv[2]
%s

def say(name, text):
    tmp = os.path.join(work, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, os.path.join(work, name))


say("ready", f"{os.getpid()} {NBYTES} {checksum()}")
k = 1
while not os.path.exists(os.path.join(work, "go")):
    if os.path.exists(os.path.join(work, f"ask.{k}")):
        say(f"ans.{k}", checksum())
        k += 1
    time.sleep(0.01)
"""

PR_SET_CHILD_SUBREAPER = 36


class CheckError(Exception):
    """The check cannot go on; the message says why."""


def wait_file(path: Path, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise CheckError(f"the worker exited with {proc.returncode} before {path.name}")
        if time.monotonic() > deadline:
            raise CheckError(f"no {path.name} within {timeout:.0f} s")
        time.sleep(0.01)
    return path.read_text().strip()


def criu(binary: str, args: list[str], work: Path, log: str) -> float:
    t0 = time.monotonic()
    done = subprocess.run(
        [binary, *args, "-o", log, "-v4"], cwd=work, capture_output=True, text=True, timeout=240
    )
    took = time.monotonic() - t0
    if done.returncode != 0:
        tail = (
            (work / log).read_text(errors="replace").splitlines()[-15:]
            if (work / log).exists()
            else []
        )
        raise CheckError(
            f"criu {args[0]} failed ({done.returncode}): {done.stderr.strip()}\n" + "\n".join(tail)
        )
    return took


def pick_dir(gib: float, explicit: str | None) -> Path:
    if explicit:
        base = Path(explicit)
    else:
        shm = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
        base = Path("/dev/shm") if shm > (gib * 2.5 + 2) * (1 << 30) else Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="stasis-gpu-check-", dir=base))


def ask(work: Path, k: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> str:
    """Have the worker recompute its checksum (request number ``k``) and return it."""
    answer = work / f"ans.{k}"
    answer.unlink(missing_ok=True)
    (work / f"ask.{k}").touch()
    try:
        return wait_file(answer, timeout, proc)
    finally:
        (work / f"ask.{k}").unlink(missing_ok=True)


def timed(fn: Callable[[], object]) -> float:
    """How long ``fn()`` took, in seconds (3 decimals)."""
    t0 = time.monotonic()
    fn()
    return round(time.monotonic() - t0, 3)


def rate(gib: float, seconds: float) -> float:
    return round(gib / seconds, 3) if seconds > 0 else 0.0


def stand_in_state(args: argparse.Namespace, pid: int) -> tuple[Path, bytes] | None:
    """--cpu-stand-in only: the fake libcuda's state file of ``pid`` and its bytes.

    The real driver keeps a process's checkpoint state in the process's memory, so a
    CRIU restore brings back "checkpointed"; the fake keeps it in a file, which the
    script puts back as the dump left it (in a container the rootfs diff does that)."""
    directory = os.environ.get("STASIS_FAKE_CUDA_STATE")
    if not args.cpu_stand_in or not directory:
        return None
    path = Path(directory) / str(pid)
    return (path, path.read_bytes()) if path.exists() else None


class Cycle:
    """One checkpoint -> kill -> restore of the worker, by Stasis's order (the
    driver API around plain CRIU) or by CRIU's cuda_plugin (``plugin``: its folder;
    the plugin drives NVIDIA's cuda-checkpoint tool from CRIU's hooks)."""

    def __init__(
        self,
        args: argparse.Namespace,
        backend: gpu.CudaCheckpoint,
        binary: str,
        work: Path,
        gib: float,
    ) -> None:
        self.args, self.backend, self.binary, self.work = args, backend, binary, work
        self.gib = gib  # the tensor's size, for the rates
        self.n = 0

    def __call__(
        self, pid: int, k: int, kill: Callable[[], None], plugin: str = ""
    ) -> dict[str, Any]:
        """Checkpoint ``pid`` (waiting for request ``k``), leaving it running; check
        it; ``kill`` it; restore it; check it again. Returns the cycle's record."""
        self.n += 1
        images = self.work / f"images{self.n}"
        images.mkdir()
        plug = ["-L", plugin] if plugin else []
        sec: dict[str, float] = {}
        rec: dict[str, Any] = {"by": "criu cuda_plugin" if plugin else "stasis", "seconds": sec}
        fake_state = None
        dump = ["dump", "-t", str(pid), "-D", str(images), "--leave-running", "--link-remap"]
        if not plugin:
            sec["gpu_lock_checkpoint"] = timed(
                lambda: self.backend.suspend([pid], gpu.lock_timeout_ms())
            )
            sec["criu_dump"] = round(criu(self.binary, dump, self.work, f"dump{self.n}.log"), 3)
            fake_state = stand_in_state(self.args, pid)  # the state as the dump saw it
            sec["gpu_resume_after_dump"] = timed(lambda: self.backend.resume([pid]))
            ckpt = sec["gpu_lock_checkpoint"] + sec["criu_dump"]
        else:
            # The plugin's lock + checkpoint, the dump and its resume, in one.
            sec["criu_dump"] = round(
                criu(self.binary, dump + plug, self.work, f"dump{self.n}.log"), 3
            )
            ckpt = sec["criu_dump"]
        rec["checksum_left_running"] = ask(self.work, k, None, 120)
        rec["criu_image_gib"] = round(
            sum(f.stat().st_size for f in images.iterdir() if f.is_file()) / (1 << 30), 3
        )
        kill()  # its PID is free for the restore
        (self.work / f"ans.{k}").unlink(missing_ok=True)
        if fake_state is not None:
            fake_state[0].write_bytes(fake_state[1])
        pidfile = self.work / f"restored{self.n}.pid"
        restore = ["restore", "-D", str(images), "-d", "--pidfile", str(pidfile)]
        sec["criu_restore"] = round(
            criu(self.binary, restore + plug, self.work, f"restore{self.n}.log"), 3
        )
        rec["pid"] = int(pidfile.read_text().strip())
        rest = sec["criu_restore"]
        if not plugin:
            sec["gpu_restore_unlock"] = timed(lambda: self.backend.resume([rec["pid"]]))
            rest += sec["gpu_restore_unlock"]
        rec["checksum_after"] = ask(self.work, k, None, 120)  # it waits for request k again
        rec["checkpoint_gib_s"] = rate(self.gib, ckpt)
        rec["restore_gib_s"] = rate(self.gib, rest)
        for log in images.glob("*.log"):  # CRIU writes its logs beside the images
            shutil.copyfile(log, self.work / log.name)
        if not self.args.keep:
            shutil.rmtree(images, ignore_errors=True)
        print(
            f"{rec['by']}: checkpoint {ckpt:.2f} s = {rec['checkpoint_gib_s']:.2f} GiB/s, "
            f"restore {rest:.2f} s = {rec['restore_gib_s']:.2f} GiB/s ({sec}), "
            f"images {rec['criu_image_gib']:.2f} GiB",
            flush=True,
        )
        return rec


def reap(pid: int, timeout: float) -> int:
    """Wait for our child ``pid`` to exit, at most ``timeout`` s, then kill it; its
    wait status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def has_cuda_checkpoint() -> bool:
    """NVIDIA's cuda-checkpoint tool, which CRIU's cuda_plugin runs, is in PATH."""
    return shutil.which("cuda-checkpoint") is not None


def run(args: argparse.Namespace, out: dict[str, object]) -> None:
    """The check; fills ``out`` as it goes, so that a failure keeps what was measured."""
    if os.geteuid() != 0:
        raise CheckError("run as root (CRIU needs it)")
    binary = args.criu or os.environ.get("STASIS_CRIU") or shutil.which("criu")
    if not binary:
        raise CheckError("no CRIU: pass --criu PATH or set STASIS_CRIU")
    backend = gpu.load()
    if backend is None:
        raise CheckError("libcuda.so.1 without the checkpoint API (driver >= 550 needed)")
    inventory = backend.inventory()
    gpu.check_inventory(inventory or {}, inventory)  # the gate passes on the same machine
    plugin = args.plugin if args.plugin and has_cuda_checkpoint() else ""
    out.update(
        {
            "inventory": inventory,
            "criu": subprocess.run(
                [binary, "--version"], capture_output=True, text=True
            ).stdout.strip(),
            "gib": args.gib,
            "cpu_stand_in": args.cpu_stand_in,
            "thp": thp_mode(),
            "kernel": os.uname().release,
            "reference": "criu cuda_plugin" if plugin else "",
        }
    )
    if args.plugin and not plugin:
        out["reference_skipped"] = "no cuda-checkpoint in PATH (CRIU's cuda_plugin runs it)"
    print(f"GPUs: {gpu.describe(inventory)}; {out['criu']}", flush=True)
    # The restored worker is re-parented to us (criu restore -d exits): reap it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = pick_dir(args.gib, args.dir)
    out["dir"] = str(work)
    seconds: dict[str, float] = {}
    out["seconds"] = seconds
    worker: subprocess.Popen[bytes] | None = None
    current = 0  # the worker's PID once it was restored (our child, as subreaper)
    try:
        with open(work / "worker.out", "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-c", WORKER % (CPU_WORKER if args.cpu_stand_in else GPU_WORKER),
                 str(args.gib), str(work)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=work,
            )  # fmt: skip
        ready = wait_file(work / "ready", 180, worker)
        pid_s, nbytes, before = ready.split()
        pid = int(pid_s)
        size_gib = int(nbytes) / (1 << 30)
        out["tensor_gib"] = round(size_gib, 3)
        out["checksum_before"] = before
        state = backend.state(pid)
        if state != gpu.RUNNING:
            raise CheckError(
                f"the driver does not see the worker as a running CUDA process ({state})"
            )
        if backend.processes([1, pid]) != [pid]:
            raise CheckError("detection: the driver's answers do not single out the worker")

        # 1. The driver alone, in place: GPU memory to host and back, the worker running on.
        seconds["inplace_lock_checkpoint"] = timed(
            lambda: backend.suspend([pid], gpu.lock_timeout_ms())
        )
        if backend.state(pid) != gpu.CHECKPOINTED:
            raise CheckError(f"after the checkpoint the driver says {backend.state(pid)}")
        seconds["inplace_restore_unlock"] = timed(lambda: backend.resume([pid]))
        out["checksum_inplace"] = ask(work, 1, worker, 120)
        out["gpu_only_checkpoint_gib_s"] = rate(size_gib, seconds["inplace_lock_checkpoint"])
        out["gpu_only_restore_gib_s"] = rate(size_gib, seconds["inplace_restore_unlock"])
        print(
            f"driver only, in place: checkpoint {seconds['inplace_lock_checkpoint']:.2f} s,"
            f" restore {seconds['inplace_restore_unlock']:.2f} s,"
            f" checksum {'OK' if out['checksum_inplace'] == before else 'MISMATCH'}",
            flush=True,
        )

        # 2. Cycles: checkpoint leaving it running, kill, restore; Stasis's order,
        #    alternating with CRIU's cuda_plugin when that reference is asked for.
        def kill() -> None:
            nonlocal current
            if current:
                os.kill(current, signal.SIGKILL)
                os.waitpid(current, 0)
                current = 0
            elif worker is not None:
                worker.kill()
                worker.wait(timeout=30)

        cycle = Cycle(args, backend, binary, work, size_gib)
        cycles: list[dict[str, Any]] = []
        out["cycles"] = cycles
        k = 2
        plan = [by for _ in range(args.cycles) for by in (["", plugin] if plugin else [""])]
        for by in plan:
            try:
                rec = cycle(current or pid, k, kill, by)
            except (CheckError, subprocess.TimeoutExpired) as e:
                if not by:
                    raise
                # The reference failed: keep what Stasis's cycles measured.
                out["reference_error"] = str(e)
                print(f"criu cuda_plugin cycle FAILED: {e}", file=sys.stderr, flush=True)
                break
            current = rec["pid"]
            cycles.append(rec)
            k += 1
        checks = [before, out["checksum_inplace"]] + [
            c[f] for c in cycles for f in ("checksum_left_running", "checksum_after")
        ]
        ok = all(c == before for c in checks)
        out["checksum_ok"] = ok
        (work / "go").touch()
        if current:
            out["restored_exit_status"] = reap(current, 60)
            current = 0
        print(
            f"tensor {size_gib:.2f} GiB, {len(cycles)} cycles, every checksum "
            f"{'OK' if ok else 'MISMATCH'}: before {before}, last {checks[-1]}",
            flush=True,
        )
    finally:
        if current:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(current, signal.SIGKILL)
                os.waitpid(current, 0)
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        if args.logs:
            logs = Path(args.logs)
            logs.mkdir(parents=True, exist_ok=True)
            for f in [work / "worker.out", *sorted(work.glob("*.log"))]:
                if f.exists():
                    shutil.copyfile(f, logs / f.name)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent huge page mode (always, madvise or never), or ""."""
    try:
        text = THP.read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


def env_facts(text: str) -> dict[str, str]:
    """The machine's facts from bench/gpu_device.sh's env.txt."""
    facts: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("== "):
            facts["date"] = line[3:].strip()
        elif line.startswith("Linux "):
            facts["kernel"] = line.split()[2]
        elif line.startswith("name, driver_version") and i + 1 < len(lines):
            name, driver, memory = [f.strip() for f in lines[i + 1].split(",")[:3]]
            facts.update(gpu=name, driver=driver, gpu_memory=memory)
        elif line.startswith("Python "):
            facts["python"] = line.split()[1]
        elif line.startswith("torch "):
            facts["torch"] = line.split()[1]
        elif line.startswith("Version: "):
            facts["criu"] = line.split()[1]
        elif line.startswith("THP: "):
            facts["thp"] = line[line.find("[") + 1 : line.find("]")]
        elif line.startswith("Mem: "):
            facts["memory_gib"] = line.split()[1]
        elif line.isdigit():
            facts["cpus"] = line
    return facts


def collect(dirs: list[str], page: Path) -> dict[str, object]:
    """bench/results-gpu.json from bench/gpu_device.sh's output folders, one batch
    (one machine, one env.txt, runN/gpu.json) each."""
    batches = []
    for d in map(Path, dirs):
        runs = [
            json.loads(f.read_text())
            for f in sorted(d.glob("run*/gpu.json"), key=lambda f: int(f.parent.name[3:]))
        ]
        env = (d / "env.txt").read_text() if (d / "env.txt").exists() else ""
        batches.append({"env": env_facts(env), "runs": runs})
    doc: dict[str, object] = {"batches": batches}
    page.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=4.0, help="tensor size in GiB (default 4)")
    p.add_argument("--criu", help="the CRIU binary (default $STASIS_CRIU, else criu in PATH)")
    p.add_argument("--dir", help="where CRIU images go (default /dev/shm if room, else /var/tmp)")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the images and logs")
    p.add_argument(
        "--cpu-stand-in",
        action="store_true",
        help="no GPU: a CPU worker and the fake libcuda (checks the script only)",
    )
    p.add_argument("--logs", help="copy the worker's output and CRIU's logs into this folder")
    p.add_argument(
        "--cycles", type=int, default=1, help="checkpoint-kill-restore cycles (default 1)"
    )
    p.add_argument(
        "--plugin",
        help="CRIU's cuda_plugin folder: alternate each cycle with one by the plugin "
        "(the reference; needs NVIDIA's cuda-checkpoint in PATH, skipped without it)",
    )
    p.add_argument(
        "--collect",
        nargs="+",
        metavar="DIR",
        help="no check: gather bench/gpu_device.sh output folders into --json",
    )
    args = p.parse_args()
    if args.collect:
        collect(args.collect, Path(args.json or REPO / "bench" / "results-gpu.json"))
        return 0
    out: dict[str, object] = {}
    try:
        run(args, out)
    except (CheckError, gpu.CudaError, FailedPrecondition, subprocess.TimeoutExpired) as e:
        print(f"gpu check FAILED: {e}", file=sys.stderr)
        out["error"] = str(e)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0 if out.get("checksum_ok") else 1


if __name__ == "__main__":
    sys.exit(main())
