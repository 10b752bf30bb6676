"""``start``: print the address of the shim serving a container's group, forking one
(or taking the zygote's) when there is none.

Runs on every container's start: standard library only, and of that only what is
cheap to import (the import budget: tests/unit/test_bootstrap_budget.py). The serving
code is imported in the forked daemon alone.
"""

from __future__ import annotations

import _socket
import os
import sys

from runtime.names import GROUP_ANNOTATIONS, RESTORE_ANNOTATION, SOCKET_DIR, socket_key
from shim.bootstrap.flags import Flags

TYPE_CHECKING = False  # typing is not imported at run time
if TYPE_CHECKING:
    from typing import Any

try:
    from _sha256 import sha256  # type: ignore[import-not-found]  # builtin, no OpenSSL
except ImportError:  # pragma: no cover - interpreters without the builtin
    from hashlib import sha256


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

    ``json`` imports ``re`` and ``enum`` and compiles patterns, on every ``start``
    that reads a CRI container's or a restore's annotations; the C scanner under it
    (``_json``) needs none of that. Raises ValueError on malformed input, as
    ``json.loads`` does.
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
    """``runtime.names.socket_path``, hashed without hashlib's OpenSSL import."""
    digest = sha256(socket_key(containerd_address, namespace, group)).hexdigest()
    return os.path.join(SOCKET_DIR, digest)


def alive(path: str) -> bool:
    """Whether a shim listens on socket ``path`` (a connection is accepted)."""
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
            if alive(path):
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
        from shim.bootstrap import zygote

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
    from shim.bootstrap.serving import load_serving_code, serve_group

    load_serving_code(restore)
    return serve_group(sock.detach(), path, namespace, bundle, f.address, f.debug)
