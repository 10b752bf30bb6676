"""containerd-shim-stasis-v2: the binary containerd runs for runtime io.containerd.stasis.v2.

The entry point only: ``start`` and ``delete`` (shim.bootstrap) run on every
container's lifecycle and keep to the import budget; ``-info`` answers containerd's
runtime introspection. Nothing imports this module.
"""

from __future__ import annotations

import sys

from runtime.names import VERSION
from shim.bootstrap.flags import parse_flags


def main(argv: list[str] | None = None) -> int:
    """Entry point of containerd-shim-stasis-v2."""
    f = parse_flags(sys.argv[1:] if argv is None else argv)
    if f.version:
        print(f"containerd-shim-stasis-v2 version {VERSION}")
        return 0
    if f.info:  # containerd's runtime introspection; not on a container's path
        from shim.daemon import info

        return info.main(VERSION)
    if f.action == "start":
        from shim.bootstrap.start import start

        return start(f)
    if f.action == "delete":
        from shim.bootstrap.delete import delete

        return delete(f)
    sys.stderr.write(
        "containerd-shim-stasis-v2 is started by containerd (actions: start, delete)\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
