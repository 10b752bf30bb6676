"""Build and read the fake libcuda (libcuda_fake.c): a test-only stand-in for the
CUDA driver's checkpoint API that Stasis loads through STASIS_LIBCUDA."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("libcuda_fake.c")
CHECKPOINT_CALLS = (
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
)


def compiler() -> str | None:
    """A C compiler (cc, gcc or clang), or None."""
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def build(directory: Path) -> Path:
    """Compile the fake into ``directory``/libcuda_fake.so and return its path."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler")
    out = Path(directory) / "libcuda_fake.so"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(out), str(SOURCE)],
        check=True,
        capture_output=True,
    )
    return out


@dataclass(frozen=True)
class Call:
    """One line of the fake's log."""

    name: str
    pid: int
    nspid: int
    timeout: int
    frozen: bool
    result: int
    state: int
    time: float


def calls(log: Path, pid: int | None = None) -> list[Call]:
    """The cuCheckpointProcess* calls the fake logged (for ``pid`` only, if given)."""
    if not log.exists():
        return []
    found = []
    for line in log.read_text().splitlines():
        name, *fields = line.split()
        kv = dict(f.split("=", 1) for f in fields)
        call = Call(
            name,
            int(kv["pid"]),
            int(kv["nspid"]),
            int(kv["timeout"]),
            kv["frozen"] == "1",
            int(kv["result"]),
            int(kv["state"]),
            float(kv["time"]),
        )
        if pid is None or call.pid == pid:
            found.append(call)
    return found


def names(log: Path, pid: int | None = None) -> list[str]:
    """Short names (Lock, Checkpoint ...) of the logged calls, in order."""
    return [c.name.removeprefix("cuCheckpointProcess") for c in calls(log, pid)]
