"""``delete``: clean up after a shim that is gone (containerd runs it after a shim's
death, and on every container's teardown): force-delete the container, unmount its
rootfs, remove what a killed restore left. Standard library only on its usual path.
"""

from __future__ import annotations

import os
import sys
import time

from runtime.linux.leftovers import mounted, remove_criu_root
from runtime.names import SOCKET_DIR
from shim.bootstrap.flags import Flags
from shim.bootstrap.start import alive, parse_json


def _encode_delete_response(exit_status: int, at_ns: int) -> bytes:
    # DeleteResponse{pid=1, exit_status=2, exited_at=3 Timestamp{seconds=1, nanos=2}},
    # hand-encoded so `delete` stays free of the protobuf import.
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    ts = b"\x08" + varint(at_ns // 1_000_000_000) + b"\x10" + varint(at_ns % 1_000_000_000)
    return b"\x10" + varint(exit_status) + b"\x1a" + varint(len(ts)) + ts


def _remove_dead_socket(bundle: str) -> None:
    # A shim that was killed leaves its socket behind; nothing else removes
    # it. A group's socket still served by a live shim stays.
    try:
        with open(os.path.join(bundle, "address"), encoding="utf-8") as fh:
            address = fh.read().strip()
    except OSError:
        return
    path = address.removeprefix("unix://")
    if os.path.dirname(path) == SOCKET_DIR and os.path.exists(path) and not alive(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_empty_cgroups(bundle: str) -> None:
    """Remove the container's cgroup (its spec's linux.cgroupsPath) where it is left
    empty (``runtime.linux.cgroups.remove_empty``): a restore killed half-way (CRIU had made
    it, runc had not recorded the container, so ``runc delete`` knows nothing of it)
    leaves it behind."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as fh:
            path = str((parse_json(fh.read()).get("linux") or {}).get("cgroupsPath") or "")
    except (OSError, ValueError, AttributeError):
        return
    from runtime.linux import cgroups  # delete only: start never needs it

    cgroups.remove_empty(path)


def delete(f: Flags) -> int:
    """Clean up after a shim that is gone: force-delete the container and unmount its rootfs.

    After a clean teardown the daemon has done all of this already, so each
    step first checks whether there is anything left to do.
    """
    bundle = f.bundle or os.getcwd()
    namespace = f.namespace or os.environ.get("NAMESPACE", "")
    root = "/run/containerd/runc"
    binary = "runc"
    options = os.path.join(bundle, "options.json")
    if os.path.exists(options):  # written only when Create had non-default options
        import json

        try:
            with open(options, "rb") as fh:
                opts = json.load(fh)
            root = opts.get("root") or root
            binary = opts.get("binary_name") or binary
        except (OSError, ValueError, AttributeError):
            pass
    if f.id and os.path.isdir(os.path.join(root, namespace, f.id)):
        argv = [binary, "--root", os.path.join(root, namespace), "delete", "--force", f.id]
        try:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                actions = [(os.POSIX_SPAWN_DUP2, null, i) for i in (0, 1, 2)]
                pid = os.posix_spawnp(binary, argv, os.environ, file_actions=actions)
            finally:
                os.close(null)
            os.waitpid(pid, 0)
        except OSError:
            pass
    rootfs = os.path.join(bundle, "rootfs")
    if mounted(rootfs):
        from runtime.linux.mount import unmount_all

        try:
            unmount_all(rootfs)
        except OSError:
            pass
    if f.id:
        remove_criu_root(os.path.join(root, namespace), f.id)
    remove_empty_cgroups(bundle)
    _remove_dead_socket(bundle)
    sys.stdout.buffer.write(_encode_delete_response(128 + 9, time.time_ns()))
    sys.stdout.flush()
    return 0
