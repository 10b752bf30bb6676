"""CRIU facts and failures: what a person needs when a dump or restore fails."""

from __future__ import annotations

import os

from runtime.errors import StasisError, Unavailable

_TAIL_LINES = 8


def log_tail(path: str, lines: int = _TAIL_LINES) -> list[str]:
    """The last error lines of a CRIU log (or its last lines when none says Error)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            text = f.read().decode(errors="replace").splitlines()
    except OSError:
        return []
    errors = [line for line in text if "Error" in line or "error" in line]
    return (errors or text)[-lines:]


def criu_failure(what: str, err: StasisError, work_path: str, log_name: str) -> Unavailable:
    """An error for a failed CRIU step: runc's message, CRIU's last errors, the log's path."""
    log = os.path.join(work_path, log_name) if work_path else ""
    tail = log_tail(log) if log else []
    message = f"{what} failed: {err}"
    if tail:
        message += "; CRIU says: " + " | ".join(line.strip() for line in tail)
    if log:
        message += f"; full log: {log}"
    return Unavailable(message)
