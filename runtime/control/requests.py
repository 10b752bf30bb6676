"""Checkpoints and restores asked of the cluster, as `stasis kube` does from anywhere
with a kubeconfig: the custom resource created, then followed until it is done.
A Failed one raises with its message; a timeout leaves it to finish on its own."""

from __future__ import annotations

import time
from typing import Any

from runtime.control import resources as r
from runtime.control.cluster import Cluster, Obj
from runtime.errors import DeadlineExceeded, FailedPrecondition


def checkpoint(
    cluster: Cluster, ns: str, pod: str, *, store: str = "", stop_pod: bool = False,
    name: str = "", wait: bool = True, timeout: float = 600.0,
) -> Obj:  # fmt: skip
    """A Checkpoint of ``ns/pod``; with ``wait``, once Succeeded."""
    meta: dict[str, Any] = {"name": name} if name else {"generateName": f"{pod[:57]}-"}
    spec: dict[str, Any] = {"podName": pod, "stopPod": stop_pod}
    if store:
        spec["store"] = store
    body = {"apiVersion": f"{r.GROUP}/{r.VERSION}", "kind": "Checkpoint", "metadata": meta,
            "spec": spec}  # fmt: skip
    obj = cluster.create(r.CHECKPOINTS, ns, body)
    return follow(cluster, r.CHECKPOINTS, obj, timeout) if wait else obj


def restore(
    cluster: Cluster, ns: str, *, checkpoint: str = "", ref: str = "", pod: str = "",
    node: str = "", name: str = "", wait: bool = True, timeout: float = 600.0,
) -> Obj:  # fmt: skip
    """A Restore of Checkpoint ``checkpoint`` (or of pod checkpoint ``ref``); with
    ``wait``, once its pod runs."""
    spec: dict[str, Any] = {"checkpointName": checkpoint} if checkpoint else {"ref": ref}
    if pod:
        spec["podName"] = pod
    if node:
        spec["nodeName"] = node
    stem = checkpoint or pod or "restore"
    meta: dict[str, Any] = {"name": name} if name else {"generateName": f"{stem[:57]}-"}
    body = {"apiVersion": f"{r.GROUP}/{r.VERSION}", "kind": "Restore", "metadata": meta,
            "spec": spec}  # fmt: skip
    obj = cluster.create(r.RESTORES, ns, body)
    return follow(cluster, r.RESTORES, obj, timeout) if wait else obj


def follow(cluster: Cluster, plural: str, obj: Obj, timeout: float) -> Obj:
    """The object once Succeeded; FailedPrecondition with its message once Failed."""
    meta = obj["metadata"]
    ns, name = meta["namespace"], meta["name"]
    deadline = time.monotonic() + timeout
    while True:
        now = cluster.get(plural, ns, name)
        if now is None:
            raise FailedPrecondition(f"{plural} {ns}/{name} was deleted")
        if r.phase(now) == r.SUCCEEDED:
            return now
        if r.phase(now) == r.FAILED:
            raise FailedPrecondition(
                f"{plural} {ns}/{name} failed: {r.status(now).get('message') or 'no reason given'}"
            )
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"{plural} {ns}/{name} is {r.phase(now) or 'new'} after {timeout:.0f} s "
                "(is the stasis controller running, and the agent of the pod's node?)"
            )
        time.sleep(0.3)
