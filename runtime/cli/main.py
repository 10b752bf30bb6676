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
                     [--snapshot-volumes] [--snapshot-class C] [--json]
                     [--kubeconfig F] [--address CONTAINERD_SOCK]
                                     checkpoint every container of a pod at one moment
                                     (run on its node); stops (deletes) the pod unless
                                     --leave-running; prints the pod checkpoint's REF
  stasis kube restore REF [--name NEW] [--namespace NS] [--node NODE]
                     [--policy fail|fresh] [--allow-cross-namespace] [--no-wait]
                     [--kubeconfig F]
                                     create the pod again, restored; prints its name
  stasis kube install [--kubeconfig F]
                                     register the `stasis` RuntimeClass (idempotent)

containerd's --address and -n/--namespace go before or after the command. Errors
are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import sys

from runtime.cli import checkpoints, containers, kube
from runtime.cli.common import DEFAULT_ADDRESS, default_address, default_namespace
from runtime.errors import StasisError
from runtime.names import VERSION


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
    """The CLI's argument parser: each command's namespace carries its handler as ``run``."""
    p = argparse.ArgumentParser(
        prog="stasis",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_global_options(defaults=True)],
    )
    p.add_argument("--version", action="version", version=f"stasis {VERSION}")
    sub = p.add_subparsers(dest="command", required=True)
    later = _global_options(defaults=False)
    containers.add_parsers(sub, later)
    checkpoints.add_parsers(sub, later)
    kube.add_parsers(sub, later)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `stasis`."""
    ns = parser().parse_args(argv)
    try:
        code: int = ns.run(ns)
    except StasisError as e:
        print(f"stasis: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
