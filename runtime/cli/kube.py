"""`stasis kube`: checkpoint and restore Kubernetes pods, register the RuntimeClass."""

from __future__ import annotations

import argparse
import json

from runtime.cli.common import progress, seconds


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """The ``kube`` command's parser, its handler as ``run``."""
    k = sub.add_parser(
        "kube", help="Kubernetes pods: checkpoint, restore, install", parents=[parent]
    )
    k.set_defaults(run=kube)
    ks = k.add_subparsers(dest="kube_command", required=True)
    kubeconfig = "the kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster)"
    kc = ks.add_parser("checkpoint", help="checkpoint every container of a pod (on its node)")
    kc.add_argument("pod", metavar="NAMESPACE/POD", help="the pod")
    kc.add_argument("--to", default="", help="store (default: the configured one)")
    kc.add_argument("--name", default="", help="name (default: NAMESPACE-POD-UTCTIME)")
    kc.add_argument(
        "--leave-running",
        action="store_true",
        help="resume the pod afterwards (default: delete it, like --exit)",
    )
    kc.add_argument(
        "--snapshot-volumes",
        action="store_true",
        help="snapshot every PVC the pod mounts (VolumeSnapshot)",
    )
    kc.add_argument("--snapshot-class", default=None, help="VolumeSnapshotClass to use")
    kc.add_argument("--kubeconfig", default=None, help=kubeconfig)
    kc.add_argument(
        "--address",
        dest="kube_address",
        default=None,
        help="containerd's socket (default: --address)",
    )
    kc.add_argument("--json", action="store_true", help="print the pod checkpoint as JSON")
    kr = ks.add_parser("restore", help="create a pod again from a pod checkpoint")
    kr.add_argument("ref", help="the pod checkpoint: a name, a path, file:// or s3:// URL")
    kr.add_argument("--name", default=None, help="pod name (default: the checkpointed pod's)")
    kr.add_argument(
        "--namespace",
        dest="kube_namespace",
        default=None,
        help="namespace (default: the checkpointed pod's)",
    )
    kr.add_argument("--node", default=None, help="bind it to this node (skip the scheduler)")
    kr.add_argument(
        "--policy",
        choices=("fail", "fresh"),
        default="fail",
        help="stasis.dev/restore-policy of the pod",
    )
    kr.add_argument(
        "--allow-cross-namespace",
        action="store_true",
        help="restore into another namespace than the checkpointed pod's",
    )
    kr.add_argument("--no-wait", action="store_true", help="do not wait until it runs")
    kr.add_argument(
        "--timeout",
        type=seconds,
        default=120.0,
        help="seconds to wait until it runs (default 120)",
    )
    kr.add_argument("--kubeconfig", default=None, help=kubeconfig)
    ki = ks.add_parser("install", help="register the stasis RuntimeClass")
    ki.add_argument("--kubeconfig", default=None, help=kubeconfig)


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
