"""The step from a shim process (forked by ``start``, or by the zygote) to a serving
daemon: the serving code imported with the collector off and frozen, then the group's
socket served until Shutdown.
"""

from __future__ import annotations

import os


def load_serving_code(restore: bool = False) -> None:
    """Import what a daemon serves with (asyncio, protobuf, the Task service), with
    the collector off, and freeze what the imports allocated so it is never rescanned;
    ``serve_group`` turns the collector back on. containerd's Create waits on these
    imports (unless the shim zygote, which calls this too, made them already).

    ``restore``: also the checkpoint machinery (``shim.checkpoint.restore``, with
    ``shim.checkpoint.take``), which a restoring Create would import; other daemons
    import it only if they checkpoint."""
    import gc

    gc.disable()
    import shim.daemon.serve

    if restore:
        import shim.checkpoint.restore  # noqa: F401
    gc.freeze()


def serve_group(fd: int, path: str, namespace: str, bundle: str, address: str, debug: bool) -> int:
    """Serve the group's shim socket ``fd`` (bound at ``path``) until Shutdown."""
    import gc
    import socket

    from shim.daemon.serve import serve

    gc.enable()
    return serve(
        socket.socket(fileno=fd),
        socket_path=path,
        namespace=namespace,
        bundle=bundle,
        address=address,
        ttrpc_address=os.environ.get("TTRPC_ADDRESS", address + ".ttrpc"),
        debug=debug,
    )
