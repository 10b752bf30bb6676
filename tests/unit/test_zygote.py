"""Tests for shim.bootstrap.zygote: a real zygote process forking real shim daemons.

Each test runs its own zygote under a key of its own (not the key of this
code's real zygote), launched from a helper process as ``start`` would launch
it, so nothing here forks pytest itself. The daemons serve the Task API on a
socket of the test's; the test ends them (SIGTERM, as containerd's Shutdown
would) and waits for its zygote to exit once idle.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.bootstrap import zygote

REPO = Path(__file__).resolve().parents[2]


def _wait(pred, timeout: float = 20.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return int(fh.read().rsplit(b")", 1)[1].split()[1])


def _zygote_pid(key: str) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.split(b"\0")[1:3] == [b"zygote", key.encode()]:
                return int(entry)
    return None


@contextlib.contextmanager
def _running_zygote(k: str) -> Iterator[int]:
    """A zygote for key ``k`` (1 s idle), launched the way ``start`` launches one; its pid.
    Afterwards it must have exited once idle, taking its socket and lock file along."""
    env = {**os.environ, zygote.IDLE_ENV: "1"}
    code = (
        "import sys; sys.argv = ['containerd-shim-stasis-v2']\n"
        f"from shim.bootstrap import zygote; zygote.launch({k!r})"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=30)
    sock_path, lock_path = zygote._paths(k)
    _wait(lambda: os.path.exists(sock_path), what="the zygote's socket")
    pid = _zygote_pid(k)
    assert pid is not None
    try:
        yield pid
    finally:
        try:
            _wait(lambda: not _alive(pid), timeout=30, what="the idle zygote to exit")
            assert not os.path.exists(sock_path) and not os.path.exists(lock_path)
        finally:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            for p in (sock_path, lock_path):
                if os.path.exists(p):
                    os.unlink(p)


@pytest.fixture
def key() -> Iterator[str]:
    """A zygote of this test's own (1 s idle), launched the way ``start`` launches one."""
    k = f"test{uuid.uuid4().hex[:12]}"
    with _running_zygote(k):
        yield k


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    d = tempfile.mkdtemp(prefix="stasis-zygote-")
    path = os.path.join(d, "shim.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    try:
        yield s, path
    finally:
        s.close()
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)


def _request(path: str, bundle: str) -> dict[str, object]:
    env = {**os.environ, "TTRPC_ADDRESS": "/nonexistent/containerd.sock.ttrpc"}
    return {
        "env": env,
        "bundle": bundle,
        "namespace": "zygote-test",
        "path": path,
        "address": "/nonexistent/containerd.sock",
        "debug": False,
    }


def _serves(path: str) -> None:
    """Something accepts connections on ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(path)


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    _wait(lambda: not _alive(pid), what=f"daemon {pid} to exit")


def test_zygote_shows_itself_plainly(key: str) -> None:
    pid = _zygote_pid(key)
    assert pid is not None
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert environ == b"STASIS_SHIM_ZYGOTE=1\0"  # none of its launcher's containerd
    assert oct(os.stat(zygote.ZYGOTE_DIR).st_mode & 0o777) == "0o700"


def test_daemon_forked_by_the_zygote_looks_started_by_its_caller(
    key: str, listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    os.environ["STASIS_ZYGOTE_TEST_MARK"] = "yes"
    try:
        pid, launch = zygote.spawn(sock, _request(path, os.path.dirname(path)), key=key)
    finally:
        del os.environ["STASIS_ZYGOTE_TEST_MARK"]
    assert launch is None
    assert pid is not None
    try:
        assert _ppid(pid) == _zygote_pid(key)
        # /proc shows what this process showed, as for a daemon it had forked itself.
        assert Path(f"/proc/{pid}/cmdline").read_bytes() == Path("/proc/self/cmdline").read_bytes()
        assert Path(f"/proc/{pid}/environ").read_bytes() == Path("/proc/self/environ").read_bytes()
        assert Path(f"/proc/{pid}/cgroup").read_text() == Path("/proc/self/cgroup").read_text()
        assert os.getsid(pid) == pid  # a session of its own
        with open(f"/proc/{pid}/status") as fh:
            umask = next(line.split()[1] for line in fh if line.startswith("Umask:"))
        mine = os.umask(0)
        os.umask(mine)
        assert int(umask, 8) == mine
        _serves(path)  # the Task API, on the socket it was handed
    finally:
        _stop(pid)


def test_a_caller_in_another_namespace_is_refused(
    key: str, listener: tuple[socket.socket, str]
) -> None:
    _, path = listener
    code = (
        "import socket, sys\n"
        "from shim.bootstrap import zygote\n"
        f"s = socket.socket(socket.AF_UNIX); s.bind({path + '.2'!r}); s.listen(1)\n"
        f"request = {{'env': {{}}, 'bundle': '/', 'namespace': 'n', 'path': {path + '.2'!r},"
        " 'address': '/x', 'debug': False}\n"
        f"print(zygote.spawn(s, request, key={key!r}))\n"
    )
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(None, None)"  # the caller forks its daemon itself


def test_refusal_names_the_namespace() -> None:
    child = subprocess.Popen(["unshare", "--uts", "sleep", "30"])
    try:
        mine = os.readlink("/proc/self/ns/uts")
        _wait(lambda: os.readlink(f"/proc/{child.pid}/ns/uts") != mine, what="unshare")
        with pytest.raises(PermissionError, match="another uts namespace"):
            zygote._caller_facts(child.pid)
    finally:
        child.kill()
        child.wait()


def test_without_a_zygote_the_caller_is_told_to_launch_one(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    missing = f"missing{uuid.uuid4().hex[:8]}"
    assert zygote.spawn(sock, _request(path, "/"), key=missing) == (None, missing)


def test_turned_off_by_environment(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = listener
    monkeypatch.setenv(zygote.ENABLE_ENV, "0")
    assert zygote.spawn(sock, _request(path, "/"), key="whatever") == (None, None)


def test_key_follows_the_code(tmp_path: Path) -> None:
    first = zygote.context_key()
    assert first == zygote.context_key()
    probe = REPO / "shim" / f"_zygote_probe_{uuid.uuid4().hex[:8]}.py"
    probe.write_text("")
    try:
        assert zygote.context_key() != first
    finally:
        probe.unlink()
    assert zygote.context_key() == first


def test_request_round_trip() -> None:
    request = {
        "bundle": "/run/containerd/io.containerd.runtime.v2.task/ns/id",
        "namespace": "k8s.io",
        "path": "/run/containerd/s/abc",
        "address": "/run/containerd/containerd.sock",
        "debug": True,
        "env": {"A": "1=2", "EMPTY": "", "BYTES": b"\xff\xfe".decode("utf-8", "surrogateescape")},
    }
    assert zygote._decode(zygote._encode(request)) == request
    assert zygote._decode(zygote._encode({**request, "debug": False, "env": {}}))["debug"] is False
    with pytest.raises(ValueError, match="malformed"):
        zygote._decode(b"only\0three\0fields")


def test_idle_zygote_exits_and_its_daemon_runs_on(
    key: str, listener: tuple[socket.socket, str]
) -> None:
    """The zygote leaves after its idle time even while a daemon it forked runs; the
    daemon is re-parented and keeps serving."""
    sock, path = listener
    zygote_pid = _zygote_pid(key)
    pid, _ = zygote.spawn(sock, _request(path, os.path.dirname(path)), key=key)
    assert pid is not None and zygote_pid is not None
    try:
        _wait(lambda: not _alive(zygote_pid), timeout=30, what="the idle zygote to exit")
        assert _alive(pid) and _ppid(pid) != zygote_pid
        _serves(path)
    finally:
        _stop(pid)


def test_refusal_names_a_privilege_that_differs() -> None:
    child = subprocess.Popen(["setpriv", "--no-new-privs", "sleep", "30"])
    try:
        _wait(
            lambda: (
                "1" in Path(f"/proc/{child.pid}/status").read_text().split("NoNewPrivs:")[1][:4]
            ),
            what="setpriv",
        )
        with pytest.raises(PermissionError, match="NoNewPrivs differs"):
            zygote._caller_facts(child.pid)
    finally:
        child.kill()
        child.wait()


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_restore_without_restore_zygote_is_served_by_the_plain_one(
    key: str, listener: tuple[socket.socket, str]
) -> None:
    """The plain zygote forks the restoring daemon (no start-up is lost) and the restore
    zygote is the one to launch; the plain daemon carries no checkpoint machinery."""
    sock, path = listener
    pid, launch = zygote.spawn(sock, _request(path, os.path.dirname(path)), key=key, restore=True)
    assert pid is not None
    try:
        assert launch == zygote.restore_key(key)
        assert _ppid(pid) == _zygote_pid(key)
        # hashlib's OpenSSL binding comes with the checkpoint machinery (sha256 of
        # every checkpoint file), not with the serving code.
        assert "_hashlib" not in _maps(pid)
        _serves(path)
    finally:
        _stop(pid)


def test_the_restore_zygote_forks_daemons_with_the_checkpoint_machinery_loaded(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    k = f"test{uuid.uuid4().hex[:12]}"
    with _running_zygote(zygote.restore_key(k)) as restore_zygote:
        pid, launch = zygote.spawn(sock, _request(path, os.path.dirname(path)), key=k, restore=True)
        assert pid is not None
        try:
            assert launch is None  # the plain zygote was not needed, nor launched
            assert _ppid(pid) == restore_zygote
            assert "_hashlib" in _maps(pid)
            _serves(path)
        finally:
            _stop(pid)
        # A plain start is never served by the restore zygote.
        assert zygote.spawn(sock, _request(path, "/"), key=k) == (None, k)


@pytest.mark.parametrize(
    ("key", "env", "idle"),
    [
        ("abc", {}, zygote.IDLE_SECONDS),
        (zygote.restore_key("abc"), {}, zygote.RESTORE_IDLE_SECONDS),
        ("abc", {zygote.IDLE_ENV: "2.5"}, 2.5),
        (zygote.restore_key("abc"), {zygote.IDLE_ENV: "1"}, 1.0),  # the setting wins
        ("abc", {zygote.IDLE_ENV: ""}, zygote.IDLE_SECONDS),
    ],
)
def test_idle_seconds(key: str, env: dict[str, str], idle: float) -> None:
    assert zygote.idle_seconds(key, env) == idle
    assert zygote.RESTORE_IDLE_SECONDS > zygote.IDLE_SECONDS  # restores come spread out
