"""containerd-shim-stasis-v2: the binary containerd runs for runtime io.containerd.stasis.v2.

``start`` picks (or reuses) the shim serving the container's group and prints
its socket address; ``delete`` cleans up after a dead shim. Both run on every
container lifecycle, so this module imports only the standard library: the
serving code (asyncio, protobuf) is imported in the forked daemon alone, and
even standard modules that are slow to import (dataclasses, socket, hashlib's
OpenSSL binding, contextlib) are avoided here: every millisecond is paid twice
per container.
"""

from __future__ import annotations

import _socket
import os
import sys
import time

TYPE_CHECKING = False  # typing is not imported at run time (see the module's docstring)
if TYPE_CHECKING:
    from typing import Any

try:
    from _sha256 import sha256  # type: ignore[import-not-found]  # builtin, no OpenSSL
except ImportError:  # pragma: no cover - interpreters without the builtin
    from hashlib import sha256

SOCKET_DIR = "/run/containerd/s"
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
# A container restored from a checkpoint; the daemon then loads the checkpoint
# machinery before it serves (shim.service.RESTORE_FROM is the same annotation).
RESTORE_ANNOTATION = "stasis.dev/restore-from"
VERSION = "0.1.0"


class Flags:
    """The flags containerd passes (Go flag syntax: -name value or -name=value)."""

    def __init__(self) -> None:
        self.namespace = ""
        self.id = ""
        self.address = ""
        self.publish_binary = ""
        self.bundle = ""
        self.debug = False
        self.version = False
        self.info = False
        self.action = ""


def parse_flags(argv: list[str]) -> Flags:
    """Parse containerd's shim command line; unknown flags are an error."""
    f = Flags()
    names = {
        "namespace", "id", "address", "publish-binary", "bundle", "socket", "debug", "v", "info"
    }  # fmt: skip
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg == "-":
            if f.action:
                raise SystemExit(f"unexpected argument {arg!r}")
            f.action = arg
            i += 1
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if name not in names:
            raise SystemExit(f"flag provided but not defined: -{name}")
        if name in ("debug", "v", "info"):
            on = value.lower() not in ("false", "0") if eq else True
            setattr(f, {"v": "version"}.get(name, name), on)
            i += 1
            continue
        if not eq:
            i += 1
            if i >= len(argv):
                raise SystemExit(f"flag needs an argument: -{name}")
            value = argv[i]
        if name != "socket":
            setattr(f, name.replace("-", "_"), value)
        i += 1
    return f


def bundle_facts(bundle: str, id: str) -> tuple[str, bool]:
    """From the bundle's config.json: the id whose shim serves this container (its
    pod's sandbox, or itself), and whether the container (or, for a pod, its sandbox,
    which carries the pod's annotations) names a checkpoint to restore from."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as fh:
            raw = fh.read()
    except OSError:
        return id, False
    if not any(key.encode() in raw for key in (*GROUP_ANNOTATIONS, RESTORE_ANNOTATION)):
        return id, False  # nothing to look up
    try:
        annotations = parse_json(raw).get("annotations") or {}
        restore = bool(annotations.get(RESTORE_ANNOTATION))
    except (ValueError, AttributeError):
        return id, False
    for key in GROUP_ANNOTATIONS:
        value = annotations.get(key)
        if value:
            return str(value), restore
    return id, restore


class _JsonContext:
    """What CPython's C JSON scanner reads from its decoder: json.loads's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity


def parse_json(raw: bytes) -> Any:
    """``json.loads(raw)``, without importing ``json``.

    ``json`` imports ``re`` (and ``enum``) and compiles patterns: ~15 ms of every
    ``start`` that reads a CRI container's or a restore's annotations. The C
    scanner under it (``_json``) needs none of that. Raises ValueError on
    malformed input, as ``json.loads`` does.
    """
    try:
        import _json

        scan = _json.make_scanner(_JsonContext)  # type: ignore[arg-type]  # duck-typed
    except (ImportError, AttributeError):  # another Python: the module, then
        import json

        return json.loads(raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8: {e}") from None
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        value, end = scan(text, start)
    except StopIteration as e:
        raise ValueError(f"no JSON value at offset {e.value}") from None
    except RecursionError as e:
        raise ValueError(str(e)) from None
    # The C scanner raises json.decoder.JSONDecodeError (a ValueError) itself.
    if text[end:].strip(_JSON_SPACE):
        raise ValueError(f"extra data at offset {end}")
    return value


_JSON_SPACE = " \t\n\r"


def socket_path(containerd_address: str, namespace: str, group: str) -> str:
    """The shim socket for a group; distinct from the runc shim's for the same group."""
    key = os.path.normpath(os.path.join("/", containerd_address, namespace, group))
    digest = sha256(f"stasis:{key}".encode()).hexdigest()
    return os.path.join(SOCKET_DIR, digest)


def _alive(path: str) -> bool:
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _listen(path: str) -> _socket.socket | None:
    """Bind the group's socket (mode 0600); None when a live shim already owns it."""
    os.makedirs(SOCKET_DIR, mode=0o711, exist_ok=True)
    for _ in range(2):
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(path)
        except OSError as e:
            s.close()
            if e.errno != 98:  # EADDRINUSE
                raise
            if _alive(path):
                return None
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            continue
        finally:
            os.umask(old)
        s.listen(128)
        return s
    raise SystemExit(f"cannot bind shim socket {path}")


def _write_atomic(path: str, data: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(data)
    os.rename(tmp, path)


def start(f: Flags) -> int:
    """Print the address of the shim for this container, starting one if needed."""
    bundle = f.bundle or os.getcwd()
    namespace = f.namespace or os.environ.get("NAMESPACE", "")
    if not f.id or not namespace or not f.address:
        raise SystemExit("start needs -id, -namespace and -address")
    try:
        sys.stdin.buffer.read()  # the runtime options; Create carries them again
    except OSError:
        pass
    group, restore = bundle_facts(bundle, f.id)
    path = socket_path(f.address, namespace, group)
    sock = _listen(path)
    launch_zygote = None
    if sock is not None:
        from shim import zygote

        request = {
            "env": dict(os.environ),
            "bundle": bundle,
            "namespace": namespace,
            "path": path,
            "address": f.address,
            "debug": f.debug,
        }
        pid, launch_zygote = zygote.spawn(sock, request, restore=restore)
        if pid is None:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _daemon(sock, f, namespace, bundle, path, restore)
                finally:
                    os._exit(code)
        sock.close()
        _write_atomic(os.path.join(bundle, "shim.pid"), str(pid))
    address = f"unix://{path}"
    _write_atomic(os.path.join(bundle, "address"), address)
    sys.stdout.write(address)
    sys.stdout.flush()
    if launch_zygote is not None:  # for the next start, now that this one has answered
        zygote.launch(launch_zygote)
    return 0


def _daemon(
    sock: _socket.socket, f: Flags, namespace: str, bundle: str, path: str, restore: bool
) -> int:
    """The forked shim daemon: detach from start's stdio and session, then serve."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.chdir("/")
    load_serving_code(restore)
    return serve_group(sock.detach(), path, namespace, bundle, f.address, f.debug)


def load_serving_code(restore: bool = False) -> None:
    """Import what a daemon serves with (asyncio, protobuf, the Task service), with
    the collector off, and freeze what the imports allocated so it is never rescanned;
    ``serve_group`` turns the collector back on. containerd's Create waits on these
    imports (unless the shim zygote, which calls this too, made them already).

    ``restore``: also the checkpoint machinery (``shim.checkpointing``, ~40 ms), which
    a restoring Create would import; other daemons import it only if they checkpoint."""
    import gc

    gc.disable()
    # asyncio imports ssl only for TLS transports, which a shim never uses;
    # hiding it during that one import saves every shim ~10 ms of start-up.
    sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        import asyncio  # noqa: F401
    finally:
        del sys.modules["ssl"]
    import shim.serve

    if restore:
        import shim.checkpointing  # noqa: F401
    gc.freeze()


def serve_group(fd: int, path: str, namespace: str, bundle: str, address: str, debug: bool) -> int:
    """Serve the group's shim socket ``fd`` (bound at ``path``) until Shutdown."""
    import gc
    import socket

    from shim.serve import serve

    gc.enable()
    return serve(
        socket.socket(fileno=fd),
        socket_path=path,
        namespace=namespace,
        bundle=bundle,
        ttrpc_address=os.environ.get("TTRPC_ADDRESS", address + ".ttrpc"),
        debug=debug,
    )


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


def _mounted(path: str) -> bool:
    # A substring scan of mountinfo (field 5 is the mount point): no parsing
    # module needed. Paths with spaces appear octal-escaped there.
    needle = " " + path.replace("\\", "\\134").replace(" ", "\\040") + " "
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            return any(needle in line for line in fh)
    except OSError:
        return False


def _remove_dead_socket(bundle: str) -> None:
    # A shim that was killed leaves its socket behind; nothing else removes
    # it. A group's socket still served by a live shim stays.
    try:
        with open(os.path.join(bundle, "address"), encoding="utf-8") as fh:
            address = fh.read().strip()
    except OSError:
        return
    path = address.removeprefix("unix://")
    if os.path.dirname(path) == SOCKET_DIR and os.path.exists(path) and not _alive(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_empty_cgroups(bundle: str) -> None:
    """Remove the container's cgroup (its spec's linux.cgroupsPath) where it is left
    empty (``runtime.cgroups.remove_empty``): a restore killed half-way (CRIU had made
    it, runc had not recorded the container, so ``runc delete`` knows nothing of it)
    leaves it behind."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as fh:
            path = str((parse_json(fh.read()).get("linux") or {}).get("cgroupsPath") or "")
    except (OSError, ValueError, AttributeError):
        return
    from runtime import cgroups  # delete only: start never needs it

    cgroups.remove_empty(path)


def remove_criu_root(runc_root: str, id: str) -> None:
    """Unmount and remove what a `runc restore` killed half-way left: the bind mount
    of the rootfs it prepares for CRIU (<runc root>/<id>/criu-root), and the
    container's directory when nothing else is in it."""
    directory = os.path.join(runc_root, id)
    criu_root = os.path.join(directory, "criu-root")
    if _mounted(criu_root):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(criu_root.encode(), 2)  # MNT_DETACH
    for path in (criu_root, directory):
        try:
            os.rmdir(path)
        except OSError:
            pass


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
    if _mounted(rootfs):
        from runtime.mount import unmount_all

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


def main(argv: list[str] | None = None) -> int:
    """Entry point of containerd-shim-stasis-v2."""
    f = parse_flags(sys.argv[1:] if argv is None else argv)
    if f.version:
        print(f"containerd-shim-stasis-v2 version {VERSION}")
        return 0
    if f.info:  # containerd's runtime introspection; not on a container's path
        from shim import info

        return info.main(VERSION)
    if f.action == "start":
        return start(f)
    if f.action == "delete":
        return delete(f)
    sys.stderr.write(
        "containerd-shim-stasis-v2 is started by containerd (actions: start, delete)\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
