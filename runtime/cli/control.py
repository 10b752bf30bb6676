"""`stasis agent` and `stasis controller`: the long-lived processes of the cluster's
control plane, run until SIGTERM or SIGINT (the agent lets checkpoints under way
finish; the controller releases its lease)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from types import FrameType

from runtime import config
from runtime.control.agent import Agent
from runtime.control.cluster import Cluster
from runtime.control.controller import Controller
from runtime.control.lease import Lease
from runtime.control.metrics import Metrics
from runtime.kube import pods


def _serve(ns: argparse.Namespace) -> tuple[Cluster, Metrics, threading.Event]:
    logging.basicConfig(
        level=logging.DEBUG if ns.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("stasis").info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics = Metrics()
    if ns.metrics_port:
        metrics.serve(ns.metrics_port, ns.metrics_address)
    return Cluster(pods.connect(ns.kubeconfig)), metrics, stop


def agent(ns: argparse.Namespace) -> int:
    node = ns.node or os.environ.get("NODE_NAME", "")
    if not node:
        raise SystemExit("stasis agent: give --node (or $NODE_NAME)")
    cluster, metrics, stop = _serve(ns)
    Agent(
        cluster, node, address=ns.kube_address or ns.address, config=config.load(),
        metrics=metrics, workers=ns.workers,
    ).run(stop)  # fmt: skip
    return 0


def controller(ns: argparse.Namespace) -> int:
    cluster, metrics, stop = _serve(ns)
    identity = ns.identity or f"{socket.gethostname()}-{os.getpid()}"
    lease = Lease(cluster, ns.lease_namespace, ns.lease_name, identity)
    if not lease.acquire(stop):
        return 0
    lost = threading.Event()

    def hold() -> None:
        lease.hold(stop)
        if not stop.is_set():
            lost.set()
            stop.set()

    holder = threading.Thread(target=hold, name="lease", daemon=True)
    holder.start()
    Controller(cluster, config=config.load(), metrics=metrics).run(stop)
    holder.join(timeout=10)
    if lost.is_set():
        print("stasis controller: lost the lease; exiting", file=sys.stderr)
        return 1
    return 0
