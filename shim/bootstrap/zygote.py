"""The shim zygote: shim daemons forked from a process that has already imported
their serving code, so that a daemon serves at once and shares that code's pages.

Guarantees: a forked daemon is indistinguishable from one ``start`` forked itself.
The zygote serves only callers in its own context (credentials, capabilities,
seccomp, no_new_privs, CPU and memory placement, nice, cgroups, namespaces, and the
exact code: all in ``context_key``, and checked again against the caller's /proc
entry), and the daemon takes the caller's environment, umask, limits, OOM score and
/proc command line. Whatever goes wrong, the caller starts its daemon itself: the
zygote only ever saves time. Restores have their own zygote (key ``<key>-restore``)
that also preloads the checkpoint machinery. The protocol and lifetimes are in
docs/architecture.md ("Processes"). Imported by ``start``: standard library only.
"""

from __future__ import annotations

import _socket
import os
import sys

TYPE_CHECKING = False  # typing stays unimported on the start path; mypy reads True
if TYPE_CHECKING:
    import socket
    from collections.abc import Mapping
    from typing import Any

ZYGOTE_DIR = "/run/stasis/zygote"
ENABLE_ENV = "STASIS_SHIM_ZYGOTE"
IDLE_ENV = "STASIS_SHIM_ZYGOTE_IDLE"
IDLE_SECONDS = 60.0
RESTORE_IDLE_SECONDS = 300.0
RESTORE_SUFFIX = "-restore"
_NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "user", "uts")
_CODE_DIRS = ("shim", "runtime", "protos")
_TIMEOUT = 5.0


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1").lower() not in ("0", "false", "no", "off")


def _code_stats(root: str, out: list[str]) -> None:
    try:
        entries = os.scandir(root)
    except OSError:
        return
    with entries:
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if e.name != "__pycache__":
                    _code_stats(e.path, out)
            elif e.name.endswith(".py"):
                st = e.stat()
                out.append(f"{e.path}:{st.st_size}:{st.st_mtime_ns}")


# What a forked daemon inherits from its forker and no request can set: credentials,
# capabilities, no_new_privs, seccomp, CPU and memory placement (and the nice value).
_STATUS_FIELDS = (
    "Uid",
    "Gid",
    "Groups",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
    "Cpus_allowed_list",
    "Mems_allowed_list",
)


def _privileges(pid: str) -> dict[str, str]:
    """The inherited attributes of process ``pid`` ("self" or a number)."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in _STATUS_FIELDS:
                out[name] = value.strip()
    who = 0 if pid == "self" else int(pid)
    out["nice"] = str(os.getpriority(os.PRIO_PROCESS, who))
    return out


def _context() -> list[str]:
    """This process's credentials and privileges, cgroups and namespaces."""
    parts = [f"{k}={v}" for k, v in sorted(_privileges("self").items())]
    with open("/proc/self/cgroup", encoding="utf-8") as fh:
        parts.append(fh.read())
    parts.extend(os.readlink(f"/proc/self/ns/{ns}") for ns in _NAMESPACES)
    return parts


def context_key() -> str:
    """The key of the zygote that may serve this process: same code, same context."""
    from _sha256 import sha256  # type: ignore[import-not-found]  # builtin, no OpenSSL

    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parts = [sys.executable, repr(sys.path), *_context()]
    for entry in sys.path:
        if entry == package_root:  # its code files are listed below
            continue
        try:
            parts.append(f"{entry}:{os.stat(entry).st_mtime_ns}")
        except OSError:
            pass
    for d in _CODE_DIRS:
        _code_stats(os.path.join(package_root, d), parts)
    digest: str = sha256("\n".join(parts).encode()).hexdigest()
    return digest[:32]


def _paths(key: str) -> tuple[str, str]:
    return os.path.join(ZYGOTE_DIR, f"{key}.sock"), os.path.join(ZYGOTE_DIR, f"{key}.lock")


# -- the caller (start) ---------------------------------------------------------------------


def _read_line(s: _socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < 4096:
        chunk = s.recv(4096 - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").strip()


def restore_key(key: str) -> str:
    """The key of the zygote whose daemons come with the checkpoint machinery loaded."""
    return f"{key}{RESTORE_SUFFIX}"


def spawn(
    listener: _socket.socket,
    request: dict[str, Any],
    key: str | None = None,
    restore: bool = False,
) -> tuple[int | None, str | None]:
    """Have a zygote fork this container's shim daemon serving ``listener``.

    ``restore``: the container restores from a checkpoint; the restore zygote's
    daemons have the checkpoint machinery loaded already. Without one, the plain
    zygote serves, and the restore zygote is the one to launch.

    Returns the daemon's pid, or None when the caller must fork it itself (after
    any refusal or failure); and the key of a zygote to ``launch`` once the
    caller has answered containerd, when there is none yet.
    """
    if not enabled():
        return None, None
    try:
        key = key or context_key()
    except OSError:
        return None, None
    missing = None
    for k in (restore_key(key), key) if restore else (key,):
        pid = _ask(k, listener, request)
        if pid == _NO_ZYGOTE:
            missing = missing or k
            continue
        return pid, missing
    return None, missing


_NO_ZYGOTE = -1


def _ask(key: str, listener: _socket.socket, request: dict[str, Any]) -> int | None:
    """The pid of the daemon the zygote of ``key`` forked, None after a refusal or a
    failure, _NO_ZYGOTE when none listens."""
    sock_path, _ = _paths(key)
    c = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        c.settimeout(_TIMEOUT)
        try:
            c.connect(sock_path)
        except OSError:
            return _NO_ZYGOTE
        body = _encode(request)
        fd = listener.fileno().to_bytes(4, sys.byteorder)
        c.sendmsg(
            [len(body).to_bytes(4, "big") + body],
            [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd)],
        )
        reply = _read_line(c)
        if not reply.startswith("ready "):
            return None
        pid = int(reply.split()[1])
        c.sendall(b"go\n")
        return pid
    except (OSError, ValueError):
        return None
    finally:
        c.close()


def launch(key: str) -> None:
    """Start a zygote for ``key`` in the background (double fork, own session)."""
    try:
        pid = os.fork()
    except OSError:
        return
    if pid:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, 1 << 16)  # nothing of the caller's (its shim socket!) stays open
        os.setsid()
        if os.fork() == 0:
            code = 1
            try:
                code = _zygote(key)
            finally:
                os._exit(code)
    finally:
        os._exit(0)


# -- the zygote -----------------------------------------------------------------------------


def _set_display(cmdline: bytes, environ: bytes) -> None:
    """Make /proc/self/cmdline and /proc/self/environ read ``cmdline`` and ``environ``
    (NUL-separated) by pointing the kernel at new buffers: PR_SET_MM_MAP, which
    needs no capability when the executable stays the same (CRIU restores with it)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    bufs = []
    for data in (cmdline, environ):
        data = data if data.endswith(b"\0") else data + b"\0"
        bufs.append(ctypes.create_string_buffer(data, len(data)))
    with open("/proc/self/stat", "rb") as fh:
        # Fields after "(comm)": field N of proc(5) is at N - 3.
        f = [int(x) for x in fh.read().rsplit(b")", 1)[1].split()[1:]]

    def field(n: int) -> int:
        return f[n - 4]

    libc.sbrk.restype = ctypes.c_void_p
    brk = libc.sbrk(0)
    mm_map = (ctypes.c_uint64 * 13)(
        field(26),  # start_code
        field(27),  # end_code
        field(45),  # start_data
        field(46),  # end_data
        field(47),  # start_brk
        brk,
        field(28),  # start_stack
        ctypes.addressof(bufs[0]),
        ctypes.addressof(bufs[0]) + len(bufs[0]),
        ctypes.addressof(bufs[1]),
        ctypes.addressof(bufs[1]) + len(bufs[1]),
        0,  # auxv: left as it is (auxv_size 0)
        0xFFFFFFFF << 32,  # auxv_size 0, exe_fd -1: the executable stays
    )
    pr_set_mm, pr_set_mm_map = 35, 14
    if libc.prctl(pr_set_mm, pr_set_mm_map, mm_map, ctypes.sizeof(mm_map), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_MM_MAP): {os.strerror(err)}")
    _DISPLAY.extend(bufs)  # the kernel reads them for as long as the process lives


_DISPLAY: list[Any] = []


def idle_seconds(key: str, env: Mapping[str, str]) -> float:
    """How long the zygote of ``key`` waits for a request before it exits."""
    if env.get(IDLE_ENV):
        return float(env[IDLE_ENV])
    return RESTORE_IDLE_SECONDS if key.endswith(RESTORE_SUFFIX) else IDLE_SECONDS


def _zygote(key: str) -> int:
    import fcntl

    sock_path, lock_path = _paths(key)
    os.makedirs(ZYGOTE_DIR, mode=0o700, exist_ok=True)
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another zygote for this key is starting or running
    os.chdir("/")
    os.umask(0o022)
    idle = idle_seconds(key, os.environ)
    os.environ.clear()
    os.environ["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    name = os.path.basename(sys.argv[0] if sys.argv else "") or "containerd-shim-stasis-v2"
    _set_display(f"{name}\0zygote\0{key}\0".encode(), b"STASIS_SHIM_ZYGOTE=1\0")

    # Exactly what a daemon imports before it serves, and nothing more: a lone shim
    # would keep every preloaded page to itself once the zygote is gone.
    from shim.bootstrap.serving import load_serving_code

    load_serving_code(restore=key.endswith(RESTORE_SUFFIX))

    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{sock_path}.{os.getpid()}"
    listener.bind(tmp)
    listener.listen(64)
    os.rename(tmp, sock_path)
    return _Zygote(listener, sock_path, lock, idle).run()


class _Zygote:
    def __init__(self, listener: socket.socket, sock_path: str, lock: int, idle: float) -> None:
        self.listener = listener
        self.sock_path = sock_path
        self.lock = lock
        self.inode = os.stat(sock_path).st_ino
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.idle = idle

    def _ours(self) -> bool:
        try:
            return os.stat(self.sock_path).st_ino == self.inode
        except OSError:
            return False

    def run(self) -> int:
        import select
        import time

        last = time.monotonic()
        while True:
            wait = min(self.idle, 5.0)
            listen_fd = self.listener.fileno()
            ready, _, _ = select.select([listen_fd, *self.children], [], [], wait)
            for fd in ready:
                if fd in self.children:
                    self._reap(fd)
            if listen_fd in ready:
                last = time.monotonic()
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    continue
                self._serve(conn)
            if not self._ours():
                break
            if time.monotonic() - last >= self.idle:
                break
        try:
            if self._ours():
                os.unlink(self.sock_path)
                # A zygote starting now may hold the old lock file: it then binds
                # anew, and whichever socket is not in place makes its zygote exit.
                os.unlink(f"{self.sock_path.removesuffix('.sock')}.lock")
        except OSError:
            pass
        return 0

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        os.close(pidfd)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass

    def _serve(self, conn: _socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.settimeout(_TIMEOUT)
            request, fds = _receive(conn)
            if len(fds) != 1:
                raise ValueError(f"expected one socket, got {len(fds)} descriptors")
            import struct

            peer, uid, _ = struct.unpack("3i", conn.getsockopt(_socket.SOL_SOCKET, 17, 12))
            if uid != os.geteuid():
                raise PermissionError(f"caller uid {uid} is not {os.geteuid()}")
            facts = _caller_facts(peer)
            pid = os.fork()
            if pid == 0:
                self._daemon(conn, fds[0], request, facts)  # never returns
            self.children[os.pidfd_open(pid)] = pid
        except Exception as e:  # the caller starts its daemon itself
            _tell(conn, f"err {e}\n")
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    def _daemon(
        self, conn: _socket.socket, listener_fd: int, request: dict[str, Any], facts: _Facts
    ) -> None:
        code = 1
        try:
            self.listener.close()
            os.close(self.lock)
            for pidfd in self.children:
                os.close(pidfd)
            os.setsid()
            facts.apply(request.get("env") or {})
            conn.sendall(f"ready {os.getpid()}\n".encode())
            if _read_line(conn) != "go":
                os._exit(0)
            conn.close()
            from shim.bootstrap.serving import serve_group

            code = serve_group(
                listener_fd,
                request["path"],
                request["namespace"],
                request["bundle"],
                request["address"],
                bool(request.get("debug")),
            )
        except BaseException as e:
            _tell(conn, f"err {e}\n")
        finally:
            os._exit(code)


def _tell(conn: _socket.socket, line: str) -> None:
    """Send ``line``, if the caller still listens."""
    try:
        conn.sendall(line.encode(errors="replace"))
    except OSError:
        pass


def _receive(conn: _socket.socket) -> tuple[dict[str, Any], list[int]]:
    fds: list[int] = []
    buf = b""
    want = -1
    while want < 0 or len(buf) < want:
        data, ancdata, _, _ = conn.recvmsg(65536, _socket.CMSG_SPACE(16))
        for level, kind, raw in ancdata:
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                usable = len(raw) - len(raw) % 4
                fds.extend(
                    int.from_bytes(raw[i : i + 4], sys.byteorder) for i in range(0, usable, 4)
                )
        if not data:
            raise ConnectionError("the caller closed the connection")
        buf += data
        if want < 0 and len(buf) >= 4:
            want = 4 + int.from_bytes(buf[:4], "big")
            if want > 1 << 20:
                raise ValueError("request too large")
    return _decode(buf[4:want]), fds


# The request: its string fields, then the environment, NUL-separated (no json
# import on start's critical path; NUL is the one byte neither can contain).
_FIELDS = ("bundle", "namespace", "path", "address")


def _encode(request: dict[str, Any]) -> bytes:
    parts = [str(request[k]) for k in _FIELDS]
    parts.append("1" if request.get("debug") else "")
    parts.extend(f"{k}={v}" for k, v in (request.get("env") or {}).items())
    return "\0".join(parts).encode("utf-8", "surrogateescape")


def _decode(body: bytes) -> dict[str, Any]:
    parts = body.decode("utf-8", "surrogateescape").split("\0")
    if len(parts) < len(_FIELDS) + 1:
        raise ValueError("malformed request")
    request: dict[str, Any] = dict(zip(_FIELDS, parts, strict=False))
    request["debug"] = parts[len(_FIELDS)] == "1"
    env = {}
    for item in parts[len(_FIELDS) + 1 :]:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"malformed environment entry {item!r}")
        env[key] = value
    request["env"] = env
    return request


class _Facts:
    """What a daemon takes over from its caller, read from /proc while the caller waits."""

    def __init__(self, pid: int) -> None:
        import resource

        base = f"/proc/{pid}"
        with open(f"{base}/cmdline", "rb") as fh:
            self.cmdline = fh.read()
        with open(f"{base}/environ", "rb") as fh:
            self.environ = fh.read()
        with open(f"{base}/oom_score_adj", encoding="ascii") as fh:
            self.oom_score_adj = fh.read().strip()
        self.umask = 0o022
        with open(f"{base}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    self.umask = int(line.split()[1], 8)
        self.limits = {
            r: resource.prlimit(pid, r)
            for name, r in vars(resource).items()
            if name.startswith("RLIMIT_") and isinstance(r, int)
        }

    def apply(self, env: dict[str, str]) -> None:
        import resource

        os.umask(self.umask)
        os.environ.clear()
        os.environ.update(env)
        with open("/proc/self/oom_score_adj", "w", encoding="ascii") as fh:
            fh.write(self.oom_score_adj)
        for r, limit in self.limits.items():
            resource.setrlimit(r, limit)
        _set_display(self.cmdline, self.environ)
        sys.argv = [a.decode(errors="replace") for a in self.cmdline.split(b"\0")[:-1]]


def _caller_facts(pid: int) -> _Facts:
    """The caller's facts, after checking it shares this zygote's context."""
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as fh:
        theirs = fh.read()
    with open("/proc/self/cgroup", encoding="utf-8") as fh:
        if fh.read() != theirs:
            raise PermissionError("the caller is in other cgroups")
    for ns in _NAMESPACES:
        if os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"):
            raise PermissionError(f"the caller is in another {ns} namespace")
    mine, theirs_ = _privileges("self"), _privileges(str(pid))
    for name, value in mine.items():
        if theirs_.get(name) != value:
            raise PermissionError(f"the caller's {name} differs ({theirs_.get(name)!r})")
    return _Facts(pid)
