"""Write the launchers of containerd-shim-stasis-v2 and the stasis CLI, build the exec
shepherd, and compile the packages' bytecode.

A launcher runs Python isolated and without ``site`` (``-I -S``) with exactly the
package root and site-packages on ``sys.path``: containerd runs the shim binary twice
per container. The shepherd (``shim/bootstrap/shepherd.c``, a small static binary that
makes exec'd processes checkpointable) goes next to it, where the shim looks for it
(``SHEPHERD``); without a C compiler, execs are left out of checkpoints.

Usage: ``python -m shim.bootstrap.launcher BINDIR`` (installers and the test bed).
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
    """Write the launchers (the shim's and the CLI's) into ``bindir`` (atomically);
    returns the shim's path."""
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
