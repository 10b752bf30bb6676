"""What the stasis CLI's command modules share: containerd's defaults, progress
lines on a terminal, and ``ctr`` for what containerd's own client does."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from runtime.errors import StasisError, Unavailable

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"


def default_address() -> str:
    """containerd's socket: $CONTAINERD_ADDRESS, else containerd's default."""
    return os.environ.get("CONTAINERD_ADDRESS", DEFAULT_ADDRESS)


def default_namespace() -> str:
    """containerd's namespace: $CONTAINERD_NAMESPACE, else ``default``."""
    return os.environ.get("CONTAINERD_NAMESPACE", "default")


def seconds(text: str) -> float:
    """argparse type of a duration: a finite number of seconds, >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds >= 0")
    return value


def progress(msg: str) -> None:
    """One line on stderr for a person watching (nothing when stderr is no terminal)."""
    if sys.stderr.isatty():
        print(f"stasis: {msg}", file=sys.stderr, flush=True)


def ctr(ns: argparse.Namespace, *args: str, check: bool = True) -> str:
    """Run containerd's ``ctr`` in the namespace's containerd; its stdout."""
    binary = shutil.which("ctr")
    if binary is None:
        raise Unavailable("ctr (containerd's client) is not installed")
    done = subprocess.run(
        [binary, "--address", ns.address, "--namespace", ns.namespace, *args],
        text=True,
        capture_output=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and done.returncode != 0:
        raise StasisError(f"ctr {' '.join(args[:2])}: {done.stderr.strip()}")
    return done.stdout
