"""The `stasis` command line.

Checkpoint, restore and store commands arrive with checkpointing; today the
CLI reports its version and runs the demo (a counting container on the local
containerd through Stasis) that the README's install command ends with.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import uuid

VERSION = "0.1.0"
RUNTIME = "io.containerd.stasis.v2"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"


def _ctr(
    address: str, namespace: str, *args: str, **kw: object
) -> subprocess.CompletedProcess[str]:
    ctr = shutil.which("ctr")
    if ctr is None:
        raise SystemExit("stasis: ctr (containerd's client) is not installed")
    return subprocess.run(
        [ctr, "--address", address, "--namespace", namespace, *args],
        text=True,
        capture_output=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def demo(ns: argparse.Namespace) -> int:
    """Run a counting container through Stasis and show that it counts."""
    images = _ctr(ns.address, ns.namespace, "images", "ls", "-q")
    if images.returncode != 0:
        print(
            f"stasis: cannot reach containerd at {ns.address}: {images.stderr.strip()}",
            file=sys.stderr,
        )
        return 1
    if ns.image not in images.stdout.split():
        print(
            f"stasis: image {ns.image} is not in namespace {ns.namespace}; import it first",
            file=sys.stderr,
        )
        return 1
    id = f"stasis-demo-{uuid.uuid4().hex[:6]}"
    script = "i=0; while true; do i=$((i+1)); echo count $i; sleep 0.2; done"
    started = _ctr(
        ns.address,
        ns.namespace,
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        ns.image,
        id,
        "sh",
        "-c",
        script,
    )
    if started.returncode != 0:
        print(f"stasis: demo container failed to start: {started.stderr.strip()}", file=sys.stderr)
        return 1
    try:
        time.sleep(ns.seconds)
        pids = _ctr(ns.address, ns.namespace, "task", "ps", id)
        print(f"container {id} runs on {RUNTIME}:")
        print(pids.stdout.rstrip())
    finally:
        _ctr(ns.address, ns.namespace, "task", "kill", "-s", "KILL", id)
        for _ in range(50):
            if _ctr(ns.address, ns.namespace, "task", "rm", id).returncode == 0:
                break
            time.sleep(0.1)
        _ctr(ns.address, ns.namespace, "containers", "rm", id)
    print("demo: ok")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `stasis`."""
    parser = argparse.ArgumentParser(prog="stasis", description=__doc__)
    parser.add_argument("--version", action="version", version=f"stasis {VERSION}")
    parser.add_argument("--address", default=os.environ.get("CONTAINERD_ADDRESS", DEFAULT_ADDRESS))
    parser.add_argument(
        "-n", "--namespace", default=os.environ.get("CONTAINERD_NAMESPACE", "default")
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run a counting container through Stasis")
    d.add_argument("--image", default="docker.io/stasis/busybox:test")
    d.add_argument("--seconds", type=float, default=2.0)
    d.set_defaults(func=demo)
    ns = parser.parse_args(argv)
    code: int = ns.func(ns)
    return code


if __name__ == "__main__":
    sys.exit(main())
