#!/usr/bin/env python3
"""Restore of a pod from a local pod checkpoint against a cold start of the same pod,
on a real Kubernetes 1.20 cluster started the way the tests start it.

    .venv/bin/python bench/kube.py [--runs 3] [--json OUT]

Starts a private containerd 1.7 with CRI and a KubeCluster (tests/bed/kube.py), then:

* cold: `--runs` times, create the counting pod (RuntimeClass stasis, busybox) and time
  until it is Running with its container ready;
* restore: checkpoint one such pod that has counted for a while (`stasis kube
  checkpoint --leave-running`, local store), then `--runs` times create a pod
  restored from it (`runtime.kube.pods.restore_pod`, what `stasis kube restore` calls) and
  time until it is Running *and* its counter is read past the checkpointed count
  (exec `cat /tmp/count`, the check included in the time);
* prints the medians and the ratio restore / cold.

Pods are deleted as it goes (without waiting), the cluster and containerd are stopped
at the end, also on failure or ^C. Raw numbers go to bench/results-kube.json (or
--json OUT).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
for _p in (REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from bed.containerd import CRI_NAMESPACE, Containerd, images_dir, unique_id  # noqa: E402
from bed.images import BUSYBOX_REF  # noqa: E402
from bed.kube import KubeCluster, kube_bed_missing  # noqa: E402

COUNTER = "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
DEFAULT_JSON = BENCH / "results-kube.json"


def shim_path() -> list[Path]:
    dirs = [REPO / ".venv" / "bin", Path(sys.prefix) / "bin"]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d not in dirs[:i]]


def pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "runtimeClassName": "stasis",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": BUSYBOX_REF,
                    "imagePullPolicy": "Never",
                    "command": ["sh", "-c", COUNTER],
                }
            ],
        },
    }


def count(cluster: KubeCluster, name: str) -> int:
    r = cluster.kubectl("exec", name, "-c", "main", "--", "cat", "/tmp/count", check=False)
    text = r.stdout.strip()
    return int(text) if r.returncode == 0 and text.isdigit() else 0


def cold(cluster: KubeCluster) -> float:
    name = unique_id("cold")
    t0 = time.monotonic()
    cluster.api("POST", "/api/v1/namespaces/default/pods", pod(name))
    cluster.wait_pod(name, timeout=180)
    took = time.monotonic() - t0
    cluster.kubectl("delete", "pod", name, "--wait=false", check=False)
    return took


def restore(cluster: KubeCluster, core: Any, ref: str, at_least: int) -> float:
    from runtime.kube import pods as kube

    name = unique_id("restored")
    t0 = time.monotonic()
    kube.restore_pod(core, ref, name=name, timeout=180)
    n = count(cluster, name)
    took = time.monotonic() - t0
    cluster.kubectl("delete", "pod", name, "--wait=false", check=False)
    if n < at_least:
        raise RuntimeError(f"restored pod counted {n}, checkpoint was at >= {at_least}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ns = ap.parse_args()
    if why := kube_bed_missing():
        print(why, file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="stasis-bench-kube-"))
    if "STASIS_CONFIG" not in os.environ:  # never the machine's /etc/stasis/config.toml
        # restores may read the bench's own store (storage.restore_sources)
        (work / "config.toml").write_text(f'[storage]\nrestore_sources = ["file://{work}"]\n')
        os.environ["STASIS_CONFIG"] = str(work / "config.toml")
    if not os.environ.get("STASIS_SIGNING_KEY_FILE"):  # nor the machine's signing key
        os.environ["STASIS_SIGNING_KEY_FILE"] = str(work / "signing" / "signing.key")
    containerd = Containerd.in_run_dir("1.7", shim_path(), cri=True)
    cluster: KubeCluster | None = None
    try:
        containerd.start()
        for image in ("pause.tar", "busybox.tar"):
            containerd.import_image(images_dir() / image, namespace=CRI_NAMESPACE)
        cluster = KubeCluster.in_run_dir(containerd)
        cluster.start()
        from kubernetes import client

        from runtime.kube import pods as kube

        api = kube.connect(str(cluster.kubeconfig))
        core = client.CoreV1Api(api)
        colds = [cold(cluster) for _ in range(ns.runs)]
        source = unique_id("source")
        cluster.api("POST", "/api/v1/namespaces/default/pods", pod(source))
        cluster.wait_pod(source, timeout=180)
        time.sleep(3)
        before = count(cluster, source)  # a lower bound of the checkpointed count
        done = subprocess.run(
            [sys.executable, "-m", "runtime.cli", "--address", str(containerd.address),
             "kube", "checkpoint", "--on-node", f"default/{source}", "--to", str(work / "store"),
             "--leave-running", "--json", f"--kubeconfig={cluster.kubeconfig}"],
            cwd=REPO, capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        ckpt = json.loads(done.stdout.strip().splitlines()[-1])
        cluster.kubectl("delete", "pod", source, "--wait=false", check=False)
        restores = [restore(cluster, core, ckpt["ref"], before) for _ in range(ns.runs)]
        api.close()
    finally:
        if cluster is not None:
            leaks = cluster.stop()
            if leaks:
                print(f"left behind (cleaned up): {leaks}", file=sys.stderr)
        containerd.stop()
    c, r = statistics.median(colds), statistics.median(restores)
    print(f"cold start until Running:            median {c:.2f} s  {colds}")
    print(f"restore until Running + count read:  median {r:.2f} s  {restores}")
    print(f"checkpoint (pod of 1 container):     {ckpt['seconds']} s, "
          f"frozen {ckpt['frozen_seconds']} s; count at checkpoint >= {before}")  # fmt: skip
    print(f"ratio restore / cold: {r / c:.2f}")
    result = {
        "cold_s": colds, "restore_s": restores, "ratio": r / c, "checkpoint": ckpt,
        "nproc": os.cpu_count(), "kernel": platform.release(), "load": os.getloadavg(),
    }  # fmt: skip
    ns.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
