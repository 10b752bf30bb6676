"""stasis: checkpoint and restore containers that run on the Stasis runtime.

  stasis checkpoint CONTAINER [--to STORE] [--name NAME] [--exit] [--tcp-established] [--json]
  stasis restore REF NEW_ID          create and start a container from a checkpoint
  stasis list [--store STORE]        complete checkpoints of a store
  stasis inspect REF [--json]        a checkpoint's metadata and files
  stasis rm REF                      remove a checkpoint
  stasis trust REF                   sign a local checkpoint this node did not sign (an
                                     older or foreign one), its files checked first; logged
  stasis export REF FILE.tar         the checkpoint as a containerd/Podman-style archive
  stasis import FILE.tar [--name N] [--trust]
                                     an archive into the default store; one not signed
                                     by a trusted key only with --trust (then signed
                                     by this node, and logged)
  stasis gc [--store STORE] [--grace SECONDS]
                                     remove partial leftovers older than SECONDS (3600);
                                     for an S3 store, also the local spools its failed
                                     uploads kept, and spools never committed
  stasis push SPOOL_DIR [--to STORE] [--name NAME]
                                     upload again a checkpoint whose S3 upload failed
                                     (to the store it was meant for, by default)
  stasis demo                        a counter checkpointed, killed and restored
  stasis keygen FILE                 a new checkpoint encryption key (encryption.key_file)
  stasis keygen --signing FILE       a new checkpoint signing key (signing.key_file),
                                     its public key in FILE.pub
  stasis kube checkpoint NAMESPACE/POD [--to STORE] [--name NAME] [--leave-running]
                     [--json] [--timeout S] [--kubeconfig F]
                                     checkpoint every container of a pod at one moment:
                                     a Checkpoint resource, taken by the agent of the
                                     pod's node; stops (deletes) the pod unless
                                     --leave-running; prints the pod checkpoint's REF
                     --on-node [--address SOCK] [--snapshot-volumes] [--snapshot-class C]
                                     the same, directly, on the pod's node
  stasis kube restore CHECKPOINT|REF [--name NEW] [--namespace NS] [--node NODE]
                     [--no-wait] [--kubeconfig F]
                                     create the pod again, restored (a Restore resource);
                                     prints its name
                     --on-node [--policy fail|fresh] [--allow-cross-namespace]
                                     the same, directly, from this node's stores
  stasis kube install [--kubeconfig F]
                                     register the `stasis` RuntimeClass (idempotent)
  stasis agent --node NODE           the node agent: takes the node's Checkpoints
  stasis controller                  the controller: assigns Checkpoints, runs Restores
                                     and CheckpointPolicies (one leader, a Lease)

containerd's --address and -n/--namespace go before or after the command. Errors
are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from runtime.cli.common import DEFAULT_ADDRESS, default_address, default_namespace, seconds
from runtime.errors import StasisError
from runtime.names import VERSION

DEMO_IMAGE = "docker.io/stasis/busybox:test"
DEFAULT_GC_GRACE = 3600.0
REF_HELP = "the checkpoint: a name, a path, file:// or s3:// URL"
ON_NODE_HELP = (
    "through this node's containerd and stores directly, without the cluster's agent and "
    "controller (run on the pod's node, as root)"
)
KUBECONFIG_HELP = "the kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster)"


def _global_options(defaults: bool) -> argparse.ArgumentParser:
    """containerd's address and namespace: given before the command (``defaults``:
    the top level) or after it (suppressed defaults, so the later one wins)."""
    p = argparse.ArgumentParser(add_help=False)
    suppress = argparse.SUPPRESS
    p.add_argument(
        "--address",
        default=default_address() if defaults else suppress,
        help=f"containerd's socket (default: $CONTAINERD_ADDRESS or {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "-n",
        "--namespace",
        default=default_namespace() if defaults else suppress,
        help="containerd namespace (default: $CONTAINERD_NAMESPACE or default)",
    )
    return p


def parser() -> argparse.ArgumentParser:
    """The CLI's argument parser. Each command's namespace names its handler as ``run``,
    ``MODULE:FUNCTION`` of runtime.cli, imported only when that command runs."""
    p = argparse.ArgumentParser(
        prog="stasis",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(defaults=True)],
    )
    p.add_argument("--version", action="version", version=f"stasis {VERSION}")
    sub = p.add_subparsers(dest="command", required=True)
    later = _global_options(defaults=False)

    def command(name: str, run: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help, parents=[later])
        c.set_defaults(run=run)
        return c

    _container_commands(command)
    _store_commands(command)
    _kube_commands(command)
    _control_commands(command)
    return p


Command = Callable[[str, str, str], argparse.ArgumentParser]


def _container_commands(command: Command) -> None:
    c = command("checkpoint", "checkpoint:checkpoint_command", "checkpoint a running container")
    c.add_argument("container", help="the container's id")
    c.add_argument("--to", help="store: a directory, file:///dir or s3://bucket/prefix")
    c.add_argument("--name", help="checkpoint name (default: CONTAINER-UTCTIME)")
    c.add_argument("--exit", action="store_true", help="stop the container once checkpointed")
    c.add_argument("--tcp-established", action="store_true", help="allow open TCP connections")
    c.add_argument("--json", action="store_true", help="print what the shim reported as JSON")
    r = command(
        "restore", "containers:restore_command", "create and start a container from a checkpoint"
    )
    r.add_argument("ref", help=REF_HELP)
    r.add_argument("new_id", help="the id of the container to create")
    r.add_argument("--image", help="image to create it from (default: the checkpoint's)")
    d = command("demo", "containers:demo", "checkpoint, kill and restore a counting container")
    d.add_argument("--image", default=DEMO_IMAGE, help=f"the image to run (default {DEMO_IMAGE})")
    d.add_argument(
        "--seconds", type=float, default=2.0, help="how long it counts before the checkpoint"
    )
    d.add_argument("--keep", action="store_true", help="keep the demo's checkpoint")


def _store_commands(command: Command) -> None:
    li = command("list", "store:list_command", "list checkpoints")
    li.add_argument("--store", default="", help="the store (default: the configured one)")
    li.add_argument("--json", action="store_true", help="print JSON")
    i = command("inspect", "store:inspect", "show a checkpoint")
    i.add_argument("ref", help=REF_HELP)
    i.add_argument(
        "--json", action="store_true", help="print its name, ref, path and manifest as JSON"
    )
    rm = command("rm", "store:remove_command", "remove a checkpoint")
    rm.add_argument("ref", help=REF_HELP)
    t = command(
        "trust",
        "store:trust",
        "sign a local checkpoint this node did not sign (an older or a foreign one) "
        "after checking every file against its manifest; logged",
    )
    t.add_argument("ref", help="the checkpoint: a name, a path or file:// URL")
    e = command("export", "store:export", "write a checkpoint archive")
    e.add_argument("ref", help=REF_HELP)
    e.add_argument("file", metavar="FILE.tar", help="the archive to write")
    im = command(
        "import", "store:import_command", "read a checkpoint archive into the default store"
    )
    im.add_argument("file", metavar="FILE.tar", help="the archive to read")
    im.add_argument("--name", help="checkpoint name (default: the archive's, less .tar)")
    im.add_argument(
        "--trust",
        action="store_true",
        help="import an archive not signed by a trusted key (it is signed by this node)",
    )
    g = command(
        "gc", "store:gc_command", "remove partial checkpoints, stray objects and kept spools"
    )
    g.add_argument("--store", default="", help="default: the configured store")
    g.add_argument(
        "--grace",
        type=seconds,
        default=DEFAULT_GC_GRACE,
        metavar="SECONDS",
        help=f"only leftovers untouched for this long (default {DEFAULT_GC_GRACE:g})",
    )
    g.add_argument("--json", action="store_true", help="print what was removed as JSON")
    pu = command(
        "push", "store:push_command", "upload a kept spool again (after a failed S3 upload)"
    )
    pu.add_argument("spool", metavar="SPOOL_DIR", help="the spool directory the upload kept")
    pu.add_argument(
        "--to",
        default="",
        help="s3://bucket/prefix (default: the spool's own store, else the configured one)",
    )
    pu.add_argument("--name", help="checkpoint name (default: the one the spool records)")
    pu.add_argument("--json", action="store_true", help="print ref, name and size as JSON")
    kg = command("keygen", "store:keygen", "write a new checkpoint encryption key (mode 0600)")
    kg.add_argument("file", metavar="FILE", help="the key file to create (never overwritten)")
    kg.add_argument(
        "--signing",
        action="store_true",
        help="an Ed25519 signing key (PEM) instead, its public key in FILE.pub",
    )


def _kube_commands(command: Command) -> None:
    k = command("kube", "kube:kube", "Kubernetes pods: checkpoint, restore, install")
    ks = k.add_subparsers(dest="kube_command", required=True)
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
    kc.add_argument("--on-node", action="store_true", help=ON_NODE_HELP)
    kc.add_argument(
        "--timeout",
        type=seconds,
        default=600.0,
        help="seconds to wait for the Checkpoint (default 600)",
    )
    kc.add_argument("--kubeconfig", default=None, help=KUBECONFIG_HELP)
    kc.add_argument(
        "--address",
        dest="kube_address",
        default=None,
        help="containerd's socket (default: --address)",
    )
    kc.add_argument("--json", action="store_true", help="print the pod checkpoint as JSON")
    kr = ks.add_parser("restore", help="create a pod again from a pod checkpoint")
    kr.add_argument(
        "ref",
        help="a Checkpoint (in --namespace) or a pod checkpoint's file:// or s3:// URL; "
        "with --on-node also a name or a path in this node's stores",
    )
    kr.add_argument("--on-node", action="store_true", help=ON_NODE_HELP)
    kr.add_argument("--name", default=None, help="pod name (default: the checkpointed pod's)")
    kr.add_argument(
        "--namespace",
        dest="kube_namespace",
        default=None,
        help="namespace (default: the checkpointed pod's; of the Restore: default)",
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
    kr.add_argument("--kubeconfig", default=None, help=KUBECONFIG_HELP)
    ki = ks.add_parser("install", help="register the stasis RuntimeClass")
    ki.add_argument("--kubeconfig", default=None, help=KUBECONFIG_HELP)


def _control_commands(command: Command) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--kubeconfig", default=None, help=KUBECONFIG_HELP)
        p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics on it")
        p.add_argument("--metrics-address", default="0.0.0.0", help="address of /metrics")
        p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")

    a = command("agent", "control:agent", "take the checkpoints of this node's pods")
    a.add_argument("--node", default="", help="this node's name (default: $NODE_NAME)")
    a.add_argument(
        "--containerd",
        dest="kube_address",
        default=None,
        help="containerd's socket (default: --address)",
    )
    a.add_argument("--workers", type=int, default=4, help="checkpoints at once (default 4)")
    common(a)
    c = command("controller", "control:controller", "assign checkpoints, restore, run policies")
    c.add_argument("--lease-namespace", default="stasis-system", help="namespace of its Lease")
    c.add_argument("--lease-name", default="stasis-controller", help="name of its Lease")
    c.add_argument("--identity", default="", help="its name in the Lease (default: host-pid)")
    common(c)


def _handler(spec: str) -> Callable[[argparse.Namespace], int]:
    """The function a command's ``run`` names: only its own module is imported."""
    module, _, name = spec.partition(":")
    handler: Callable[[argparse.Namespace], int] = getattr(
        importlib.import_module(f"runtime.cli.{module}"), name
    )
    return handler


def main(argv: list[str] | None = None) -> int:
    """Entry point of `stasis`."""
    ns = parser().parse_args(argv)
    try:
        code: int = _handler(ns.run)(ns)
    except StasisError as e:
        print(f"stasis: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
