"""Write fast launchers for containerd-shim-stasis-v2 and the stasis CLI.

containerd runs the shim binary at least twice per container (``start`` and
``delete``), so interpreter start-up is on every container's critical path.
pip's console script starts Python with ``site`` (and, for editable installs,
an import finder), which costs tens of milliseconds. The launcher written here
runs Python isolated and without ``site`` (``-I -S``) and puts exactly the two
directories the shim needs on ``sys.path``.

It also builds the exec shepherd (``shim/bootstrap/shepherd.c``, a small static binary
that makes exec'd processes checkpointable) into the same directory, where the
shim looks for it (``SHEPHERD``). Without a C compiler the shim still works;
its execs are then left out of checkpoints.

And it compiles the packages' bytecode (``precompile``): a Python started with
``PYTHONDONTWRITEBYTECODE`` (``python -m runtime.cli``, pip's console scripts;
the isolated launchers ignore it) would otherwise compile every module it
imports, on every run.

Usage: ``python -m shim.bootstrap.launcher BINDIR`` (installers and the test bed run it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

NAME = "containerd-shim-stasis-v2"
SHEPHERD = "stasis-exec-shepherd"


CLI = "stasis"
# What each launcher runs: (module, function).
_ENTRY = {NAME: ("shim.main", "main"), CLI: ("runtime.cli.main", "main")}


def launcher_text(python: str, paths: list[str], name: str = NAME) -> str:
    """The launcher script of ``name`` for ``python`` with ``paths`` prepended to sys.path."""
    module, func = _ENTRY[name]
    return (
        f"#!{python} -IS\n"
        f"# {name} launcher (written by python -m shim.bootstrap.launcher)\n"
        "import sys\n"
        f"sys.path[0:0] = {paths!r}\n"
        f"from {module} import {func}\n"
        f"sys.exit({func}())\n"
    )


def write(bindir: str) -> str:
    """Write the launchers into ``bindir`` (atomically); returns the shim's path.

    The `stasis` CLI gets one too: ``site`` (the editable install's finder, .pth
    files) costs it ~40 ms a command, which `stasis checkpoint` adds to every
    checkpoint it takes.
    """
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    purelib = sysconfig.get_paths()["purelib"]
    paths = list(dict.fromkeys([package_root, purelib]))
    for name in (CLI, NAME):
        dest = os.path.join(bindir, name)
        tmp = f"{dest}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(launcher_text(sys.executable, paths, name))
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    return os.path.join(bindir, NAME)


def build_shepherd(bindir: str) -> str | None:
    """Compile the exec shepherd statically into ``bindir``; its path, or None
    (with the reason on stderr) when there is no working C compiler."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shepherd.c")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print(f"{SHEPHERD}: no C compiler; exec'd processes stay out of checkpoints",
              file=sys.stderr)  # fmt: skip
        return None
    dest = os.path.join(bindir, SHEPHERD)
    tmp = f"{dest}.tmp{os.getpid()}"
    done = subprocess.run(
        [cc, "-static", "-Os", "-s", "-Wall", "-o", tmp, source],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        with_reason = done.stderr.strip().splitlines()[-1:] or ["?"]
        print(f"{SHEPHERD}: build failed: {with_reason[0]}", file=sys.stderr)
        return None
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)
    return dest


def precompile() -> None:
    """Write the bytecode of shim/, runtime/ and protos/ where it is missing or stale."""
    import compileall

    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name in ("shim", "runtime", "protos"):
        compileall.compile_dir(os.path.join(package_root, name), quiet=1)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m shim.bootstrap.launcher BINDIR")
    print(write(sys.argv[1]))
    build_shepherd(sys.argv[1])
    precompile()
