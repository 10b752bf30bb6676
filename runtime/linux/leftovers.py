"""What a killed runc or CRIU leaves behind, found and removed without parsing modules.

Standard library only: the shim's ``delete`` (on every container's teardown) uses it.
"""

from __future__ import annotations

import os


def mounted(path: str) -> bool:
    # A substring scan of mountinfo (field 5 is the mount point): no parsing
    # module needed. Paths with spaces appear octal-escaped there.
    needle = " " + path.replace("\\", "\\134").replace(" ", "\\040") + " "
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            return any(needle in line for line in fh)
    except OSError:
        return False


def remove_criu_root(runc_root: str, id: str) -> None:
    """Unmount and remove what a `runc restore` killed half-way left: the bind mount
    of the rootfs it prepares for CRIU (<runc root>/<id>/criu-root), and the
    container's directory when nothing else is in it."""
    directory = os.path.join(runc_root, id)
    criu_root = os.path.join(directory, "criu-root")
    if mounted(criu_root):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(criu_root.encode(), 2)  # MNT_DETACH
    for path in (criu_root, directory):
        try:
            os.rmdir(path)
        except OSError:
            pass
