"""`stasis kube`: checkpoint and restore Kubernetes pods (through the cluster's
Checkpoint and Restore resources, or directly on the pod's node with --on-node),
register the RuntimeClass."""

from __future__ import annotations

import argparse
import json

from runtime.cli.common import progress
from runtime.errors import InvalidArgument


def kube(ns: argparse.Namespace) -> int:
    """`stasis kube ...`; the kubernetes client, a large import, only here."""
    from runtime.kube import pods as k

    api = k.connect(ns.kubeconfig)
    try:
        if ns.kube_command == "install":
            created = k.install_runtime_class(api)
            progress("RuntimeClass stasis " + ("created" if created else "already there"))
            print(k.RUNTIME_CLASS)
        elif ns.kube_command == "checkpoint":
            (_checkpoint_on_node if ns.on_node else _checkpoint)(ns, api)
        elif ns.kube_command == "restore":
            (_restore_on_node if ns.on_node else _restore)(ns, api)
    finally:
        api.close()
    return 0


def _only_on_node(ns: argparse.Namespace, **options: object) -> None:
    given = [name for name, value in options.items() if value]
    if given:
        raise InvalidArgument(f"{', '.join(given)}: only with --on-node")


def _checkpoint(ns: argparse.Namespace, api: object) -> None:
    from runtime.control import requests
    from runtime.control.cluster import Cluster
    from runtime.kube import pods as k

    _only_on_node(
        ns, **{"--address": ns.kube_address, "--snapshot-volumes": ns.snapshot_volumes,
               "--snapshot-class": ns.snapshot_class}
    )  # fmt: skip
    namespace, pod = k.split_pod(ns.pod)
    progress(f"checkpointing pod {namespace}/{pod} ...")
    obj = requests.checkpoint(
        Cluster(api), namespace, pod, store=ns.to, stop_pod=not ns.leave_running,
        name=ns.name, timeout=ns.timeout,
    )  # fmt: skip
    status = obj.get("status") or {}
    out = {"checkpoint": obj["metadata"]["name"], **status}
    print(json.dumps(out) if ns.json else status.get("ref", ""))


def _checkpoint_on_node(ns: argparse.Namespace, api: object) -> None:
    from kubernetes import client

    from runtime.kube import pods as k

    namespace, pod = k.split_pod(ns.pod)
    progress(f"checkpointing pod {namespace}/{pod} ...")
    out = k.checkpoint_pod(
        client.CoreV1Api(api), namespace, pod,
        address=ns.kube_address or ns.address, store=ns.to, name=ns.name,
        leave_running=ns.leave_running, custom=client.CustomObjectsApi(api),
        snapshot_volumes=ns.snapshot_volumes, snapshot_class=ns.snapshot_class,
    )  # fmt: skip
    print(json.dumps(out) if ns.json else out["ref"])


def _restore(ns: argparse.Namespace, api: object) -> None:
    from runtime.control import requests
    from runtime.control.cluster import Cluster

    _only_on_node(
        ns, **{"--policy fresh": ns.policy != "fail",
               "--allow-cross-namespace": ns.allow_cross_namespace}
    )  # fmt: skip
    url = "://" in ns.ref
    progress(f"restoring pod from {ns.ref} ...")
    obj = requests.restore(
        Cluster(api), ns.kube_namespace or "default",
        checkpoint="" if url else ns.ref, ref=ns.ref if url else "",
        pod=ns.name or "", node=ns.node or "", wait=not ns.no_wait, timeout=ns.timeout,
    )  # fmt: skip
    print((obj.get("status") or {}).get("podName") or obj["metadata"]["name"])


def _restore_on_node(ns: argparse.Namespace, api: object) -> None:
    from kubernetes import client

    from runtime.kube import pods as k

    progress(f"restoring pod from {ns.ref} ...")
    print(
        k.restore_pod(
            client.CoreV1Api(api), ns.ref, name=ns.name, namespace=ns.kube_namespace,
            node=ns.node, policy=ns.policy, custom=client.CustomObjectsApi(api),
            wait=not ns.no_wait, timeout=ns.timeout,
            allow_cross_namespace=ns.allow_cross_namespace,
        )
    )  # fmt: skip
