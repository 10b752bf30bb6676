#!/usr/bin/env python3
"""The real-GPU check of GPU state in checkpoints (needs an NVIDIA GPU, driver >= 550).

    sudo python3 bench/gpu_check.py [--gib 4] [--criu PATH] [--dir DIR] [--json OUT]

What it does, in under 5 minutes on an H100/H200 with Python 3.12 + PyTorch and no
network:

1. starts a worker process (its own session, stdio in files) that puts a >= --gib GiB
   int32 tensor of seeded random values on the GPU and computes its checksum there
   (two int64 sums: plain and position-weighted);
2. moves the worker's GPU state into host memory through the driver API, with
   Stasis's own backend (runtime/gpu.py over libcuda.so.1: cuCheckpointProcessLock,
   then cuCheckpointProcessCheckpoint), timed;
3. dumps the worker with CRIU (`criu dump`, the worker ends), timed;
4. restores it with CRIU (`criu restore -d`, same PID), then gives the GPU state
   back (cuCheckpointProcessRestore, cuCheckpointProcessUnlock), timed;
5. lets the restored worker recompute the checksum on the GPU: it must match.

It prints each step's seconds, the CRIU image size and the checkpoint and restore
rates in GiB/s (tensor GiB over driver + CRIU time), and exits 0 only when the
checksums match. No containerd or runc is involved: this checks the driver calls and
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from runtime import gpu  # noqa: E402  (the backend under test)

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
go = os.path.join(work, "go")
while not os.path.exists(go):
    time.sleep(0.01)
say("after", checksum())
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


def run(args: argparse.Namespace) -> dict[str, object]:
    if os.geteuid() != 0:
        raise CheckError("run as root (CRIU needs it)")
    binary = args.criu or os.environ.get("STASIS_CRIU") or shutil.which("criu")
    if not binary:
        raise CheckError("no CRIU: pass --criu PATH or set STASIS_CRIU")
    backend = gpu.load()
    if backend is None:
        raise CheckError("libcuda.so.1 without the checkpoint API (driver >= 550 needed)")
    inventory = backend.inventory()
    out: dict[str, object] = {
        "inventory": inventory,
        "criu": subprocess.run(
            [binary, "--version"], capture_output=True, text=True
        ).stdout.strip(),
        "gib": args.gib,
        "cpu_stand_in": args.cpu_stand_in,
    }
    print(f"GPUs: {gpu.describe(inventory)}; {out['criu']}", flush=True)
    # The restored worker is re-parented to us (criu restore -d exits): reap it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = pick_dir(args.gib, args.dir)
    images = work / "images"
    images.mkdir()
    out["dir"] = str(work)
    worker: subprocess.Popen[bytes] | None = None
    restored = 0  # the restored worker, our child (subreaper) until reaped
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
        state = backend.state(pid)
        if state != gpu.RUNNING:
            raise CheckError(
                f"the driver does not see the worker as a running CUDA process ({state})"
            )

        t0 = time.monotonic()
        backend.suspend([pid], gpu.lock_timeout_ms())
        gpu_suspend = time.monotonic() - t0
        dump = criu(
            binary, ["dump", "-t", str(pid), "-D", str(images), "--link-remap"], work, "dump.log"
        )
        worker.wait(timeout=30)  # CRIU ended it: its PID is free for the restore
        image_bytes = sum(p.stat().st_size for p in images.iterdir() if p.is_file())

        restore = criu(
            binary,
            ["restore", "-D", str(images), "-d", "--pidfile", str(work / "restored.pid")],
            work,
            "restore.log",
        )
        restored = int((work / "restored.pid").read_text().strip())
        t0 = time.monotonic()
        backend.resume([restored])
        gpu_resume = time.monotonic() - t0
        (work / "go").touch()
        after = wait_file(work / "after", 120)
        with_status = os.waitpid(restored, 0)[1]
        restored = 0

        ok = after == before
        ckpt_s, rest_s = gpu_suspend + dump, restore + gpu_resume
        out.update(
            {
                "checksum_before": before,
                "checksum_after": after,
                "checksum_ok": ok,
                "restored_pid": pid,
                "restored_exit_status": with_status,
                "criu_image_gib": round(image_bytes / (1 << 30), 3),
                "seconds": {
                    "gpu_lock_checkpoint": round(gpu_suspend, 3),
                    "criu_dump": round(dump, 3),
                    "criu_restore": round(restore, 3),
                    "gpu_restore_unlock": round(gpu_resume, 3),
                },
                "checkpoint_gib_s": round(size_gib / ckpt_s, 3),
                "restore_gib_s": round(size_gib / rest_s, 3),
                "gpu_only_checkpoint_gib_s": round(size_gib / gpu_suspend, 3),
                "gpu_only_restore_gib_s": round(size_gib / gpu_resume, 3),
            }
        )
        print(
            f"tensor {size_gib:.2f} GiB, CRIU images {image_bytes / (1 << 30):.2f} GiB in {work}\n"
            f"checkpoint: GPU lock+checkpoint {gpu_suspend:.2f} s + CRIU dump {dump:.2f} s"
            f" = {size_gib / ckpt_s:.2f} GiB/s\n"
            f"restore:    CRIU restore {restore:.2f} s + GPU restore+unlock {gpu_resume:.2f} s"
            f" = {size_gib / rest_s:.2f} GiB/s\n"
            f"checksum {'OK' if ok else 'MISMATCH'}: before {before}, after {after}",
            flush=True,
        )
        return out
    finally:
        if restored:
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(restored, 9)
                os.waitpid(restored, 0)
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


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
    args = p.parse_args()
    try:
        out = run(args)
    except (CheckError, gpu.CudaError, subprocess.TimeoutExpired) as e:
        print(f"gpu check FAILED: {e}", file=sys.stderr)
        out = {"error": str(e)}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0 if out.get("checksum_ok") else 1


if __name__ == "__main__":
    sys.exit(main())
