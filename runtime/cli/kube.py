"""`stasis kube`: checkpoint and restore Kubernetes pods, register the RuntimeClass."""

from __future__ import annotations

import argparse
import json

from runtime.cli.common import progress


def kube(ns: argparse.Namespace) -> int:
    """`stasis kube ...`; the kubernetes client, a large import, only here."""
    from kubernetes import client

    from runtime.kube import pods as k

    api = k.connect(ns.kubeconfig)
    try:
        if ns.kube_command == "install":
            created = k.install_runtime_class(api)
            progress("RuntimeClass stasis " + ("created" if created else "already there"))
            print(k.RUNTIME_CLASS)
        elif ns.kube_command == "checkpoint":
            namespace, pod = k.split_pod(ns.pod)
            progress(f"checkpointing pod {namespace}/{pod} ...")
            out = k.checkpoint_pod(
                client.CoreV1Api(api), namespace, pod,
                address=ns.kube_address or ns.address, store=ns.to, name=ns.name,
                leave_running=ns.leave_running, custom=client.CustomObjectsApi(api),
                snapshot_volumes=ns.snapshot_volumes, snapshot_class=ns.snapshot_class,
            )  # fmt: skip
            print(json.dumps(out) if ns.json else out["ref"])
        elif ns.kube_command == "restore":
            progress(f"restoring pod from {ns.ref} ...")
            print(
                k.restore_pod(
                    client.CoreV1Api(api),
                    ns.ref,
                    name=ns.name,
                    namespace=ns.kube_namespace,
                    node=ns.node,
                    policy=ns.policy,
                    custom=client.CustomObjectsApi(api),
                    wait=not ns.no_wait,
                    timeout=ns.timeout,
                    allow_cross_namespace=ns.allow_cross_namespace,
                )
            )
    finally:
        api.close()
    return 0
