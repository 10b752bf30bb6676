"""Write a fast launcher for containerd-shim-stasis-v2.

containerd runs the shim binary at least twice per container (``start`` and
``delete``), so interpreter start-up is on every container's critical path.
pip's console script starts Python with ``site`` (and, for editable installs,
an import finder), which costs tens of milliseconds. The launcher written here
runs Python isolated and without ``site`` (``-I -S``) and puts exactly the two
directories the shim needs on ``sys.path``.

Usage: ``python -m shim.launcher BINDIR`` (installers and the test bed run it).
"""

from __future__ import annotations

import os
import sys
import sysconfig

NAME = "containerd-shim-stasis-v2"


def launcher_text(python: str, paths: list[str]) -> str:
    """The launcher script for ``python`` with ``paths`` prepended to sys.path."""
    return (
        f"#!{python} -IS\n"
        "# containerd-shim-stasis-v2 launcher (written by python -m shim.launcher)\n"
        "import sys\n"
        f"sys.path[0:0] = {paths!r}\n"
        "from shim.main import main\n"
        "sys.exit(main())\n"
    )


def write(bindir: str) -> str:
    """Write the launcher into ``bindir`` (atomically) and return its path."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    purelib = sysconfig.get_paths()["purelib"]
    paths = list(dict.fromkeys([package_root, purelib]))
    dest = os.path.join(bindir, NAME)
    tmp = f"{dest}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(launcher_text(sys.executable, paths))
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m shim.launcher BINDIR")
    print(write(sys.argv[1]))
