"""What the stasis CLI's command modules share: containerd's defaults, durations,
progress lines on a terminal. Cheap to import: every command loads it."""

from __future__ import annotations

import argparse
import os
import sys

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
