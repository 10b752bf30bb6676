"""Tests for shim.main: the containerd-shim-stasis-v2 binary's flags, ids, socket and actions.

The ``start``/``delete`` tests run the installed binary itself, like containerd
does; no containerd and no runc are involved (``delete`` finds a stand-in
``runc`` script first on PATH).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protos.containerd.task.v2 import shim_pb2
from runtime.linux import cgroups
from runtime.names import RESTORE_ANNOTATION, SOCKET_DIR, VERSION
from runtime.rpc.ttrpc_server import Client
from shim import main as shim_main
from shim.bootstrap.delete import _encode_delete_response, delete, remove_empty_cgroups
from shim.bootstrap.flags import Flags, parse_flags
from shim.bootstrap.start import bundle_facts, parse_json, socket_path

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / ".venv" / "bin" / "containerd-shim-stasis-v2"
TASK_SERVICE = "containerd.task.v2.Task"
ADDRESS_RE = re.compile(r"unix:///run/containerd/s/[0-9a-f]{64}")


# --------------------------------------------------------------------------- flags


def test_flags_space_and_equals_forms() -> None:
    f = parse_flags(
        [
            "-namespace",
            "k8s.io",
            "-address=/run/containerd/containerd.sock",
            "-publish-binary",
            "/usr/bin/containerd",
            "-id=abc",
            "-bundle",
            "/b",
            "start",
        ]
    )
    assert f.namespace == "k8s.io"
    assert f.address == "/run/containerd/containerd.sock"
    assert f.publish_binary == "/usr/bin/containerd"
    assert f.id == "abc"
    assert f.bundle == "/b"
    assert f.action == "start"
    assert not f.debug
    assert not f.version


def test_flags_double_dash_and_socket_ignored() -> None:
    f = parse_flags(["--id", "x", "--socket", "/ignored", "--debug", "delete"])
    assert f.id == "x"
    assert f.debug is True
    assert f.action == "delete"


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("-debug", True),
        ("--debug", True),
        ("-debug=true", True),
        ("-debug=1", True),
        ("-debug=false", False),
        ("-debug=FALSE", False),
        ("-debug=0", False),
    ],
)
def test_bool_flags(arg: str, expected: bool) -> None:
    assert parse_flags([arg]).debug is expected


def test_bool_flag_takes_no_value_argument() -> None:
    # Go's flag package: "-debug false" is -debug followed by a positional.
    f = parse_flags(["-debug", "start"])
    assert f.debug is True
    assert f.action == "start"


def test_version_flag() -> None:
    assert parse_flags(["-v"]).version is True
    assert parse_flags(["-v=false"]).version is False


def test_value_that_looks_like_a_flag_is_taken() -> None:
    assert parse_flags(["-id", "-weird"]).id == "-weird"


def test_action_position_first_or_last() -> None:
    first = parse_flags(["start", "-id", "x", "-namespace", "ns"])
    last = parse_flags(["-id", "x", "-namespace", "ns", "start"])
    assert vars(first) == vars(last)
    assert first.action == "start"


def test_empty_argv() -> None:
    assert vars(parse_flags([])) == vars(Flags())


def test_unknown_flag_is_an_error() -> None:
    with pytest.raises(SystemExit, match=r"flag provided but not defined: -bogus"):
        parse_flags(["-bogus", "x", "start"])
    with pytest.raises(SystemExit, match=r"flag provided but not defined: -nope"):
        parse_flags(["--nope=1"])


def test_missing_flag_value_is_an_error() -> None:
    with pytest.raises(SystemExit, match=r"flag needs an argument: -id"):
        parse_flags(["-id"])


def test_two_actions_are_an_error() -> None:
    with pytest.raises(SystemExit, match=r"unexpected argument 'delete'"):
        parse_flags(["start", "delete"])


def test_main_version_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert shim_main.main(["-v"]) == 0
    assert capsys.readouterr().out.strip() == (f"containerd-shim-stasis-v2 version {VERSION}")
    assert shim_main.main(["-id", "x"]) == 2
    assert "actions: start, delete" in capsys.readouterr().err


# --------------------------------------------------------------------------- group id


def _bundle_with(tmp_path: Path, config: object | str | None) -> str:
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (tmp_path / "config.json").write_text(text)
    return str(tmp_path)


def test_group_id_runc_group_wins(tmp_path: Path) -> None:
    bundle = _bundle_with(
        tmp_path,
        {
            "annotations": {
                "io.kubernetes.cri.sandbox-id": "sandbox",
                "io.containerd.runc.v2.group": "group",
            }
        },
    )
    assert bundle_facts(bundle, "ctr")[0] == "group"


def test_group_id_sandbox_when_no_group(tmp_path: Path) -> None:
    bundle = _bundle_with(
        tmp_path,
        {
            "annotations": {
                "io.kubernetes.cri.sandbox-id": "sandbox",
                "io.containerd.runc.v2.group": "",
            }
        },
    )
    assert bundle_facts(bundle, "ctr")[0] == "sandbox"


@pytest.mark.parametrize(
    "config",
    [
        None,  # no config.json at all
        "{not json",
        "",
        [],
        {},
        {"annotations": None},
        {"annotations": {}},
        {"annotations": {"other": "x"}},
    ],
)
def test_group_id_falls_back_to_id(tmp_path: Path, config: object | str | None) -> None:
    assert bundle_facts(_bundle_with(tmp_path, config), "ctr")[0] == "ctr"


def test_group_id_missing_bundle() -> None:
    assert bundle_facts("/nonexistent/stasis/bundle", "ctr")[0] == "ctr"


@pytest.mark.parametrize(
    ("annotations", "facts"),
    [
        ({RESTORE_ANNOTATION: "file:///ckpt/one"}, ("ctr", True)),
        ({RESTORE_ANNOTATION: "x", "io.kubernetes.cri.sandbox-id": "sb"}, ("sb", True)),
        ({RESTORE_ANNOTATION: ""}, ("ctr", False)),
        ({"io.kubernetes.cri.sandbox-id": "sb"}, ("sb", False)),
        ({"other": RESTORE_ANNOTATION}, ("ctr", False)),  # the key, not a value, counts
    ],
)
def test_bundle_facts_say_whether_the_container_restores(
    tmp_path: Path, annotations: dict[str, str], facts: tuple[str, bool]
) -> None:
    bundle = _bundle_with(tmp_path, {"annotations": annotations})
    assert bundle_facts(bundle, "ctr") == facts


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": [1, 2.5, -3e5, true, false, null, "x\\u00e9\\n"], "b": {"c": NaN}}',
        b' \n\t{"annotations": {"k": "v"}}\r\n ',
        b'\xef\xbb\xbf{"bom": 1}',
        b"[]",
        b'"text"',
        b"-0.5",
        json.dumps({"ociVersion": "1.1.0", "annotations": {RESTORE_ANNOTATION: "é"}}).encode(),
    ],
)
def test_parse_json_is_json_loads(raw: bytes) -> None:
    assert repr(parse_json(raw)) == repr(json.loads(raw.decode("utf-8-sig")))


@pytest.mark.parametrize(
    "raw",
    [b"", b"   ", b"{not json", b'{"a": 1} extra', b"\xff{}", b'{"a":', b"[1,]", b"[" * 100000],
)
def test_parse_json_rejects_what_json_loads_rejects(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_json(raw)


def test_bundle_facts_import_neither_json_nor_re(tmp_path: Path) -> None:
    """start reads a CRI container's or a restore's annotations on every start:
    without json's import (and re's, which it pulls in)."""
    bundle = _bundle_with(
        tmp_path, {"annotations": {RESTORE_ANNOTATION: "x", "io.kubernetes.cri.sandbox-id": "sb"}}
    )
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from shim.bootstrap.start import bundle_facts\n"
        f"facts = bundle_facts({bundle!r}, 'ctr')\n"
        "print(facts, 'json' in sys.modules, 're' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "('sb', True) False False"


def test_load_serving_code_for_a_restore_loads_the_checkpoint_machinery() -> None:
    code = (
        "import sys\n"
        "from shim.bootstrap.serving import load_serving_code\n"
        "load_serving_code(restore=sys.argv[1] == '1')\n"
        "print('shim.checkpoint.take' in sys.modules, 'shim.daemon.serve' in sys.modules)\n"
    )
    for restore, want in (("0", "False True"), ("1", "True True")):
        done = subprocess.run(
            [sys.executable, "-c", code, restore],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert done.stdout.strip() == want


# --------------------------------------------------------------------------- socket path


def test_socket_path_is_stable_and_short() -> None:
    a = socket_path("/run/containerd/containerd.sock", "k8s.io", "sandbox")
    b = socket_path("/run/containerd/containerd.sock", "k8s.io", "sandbox")
    assert a == b
    assert os.path.dirname(a) == SOCKET_DIR == "/run/containerd/s"
    assert re.fullmatch(r"[0-9a-f]{64}", os.path.basename(a))
    # sun_path holds 108 bytes; containerd keeps its shim sockets under 106.
    long = socket_path("/" + "a" * 300, "n" * 300, "g" * 300)
    assert len(a) < 106
    assert len(long) < 106


def test_socket_path_differs_per_namespace_address_group() -> None:
    base = ("/run/containerd/containerd.sock", "default", "g")
    paths = {
        socket_path(*base),
        socket_path("/run/other/containerd.sock", "default", "g"),
        socket_path(base[0], "k8s.io", "g"),
        socket_path(base[0], "default", "h"),
    }
    assert len(paths) == 4


def test_socket_path_differs_from_runc_shims() -> None:
    # containerd's runc shim hashes address/namespace/id without a prefix.
    import hashlib

    plain = hashlib.sha256(b"/run/containerd/containerd.sock/default/g").hexdigest()
    ours = socket_path("/run/containerd/containerd.sock", "default", "g")
    assert os.path.basename(ours) != plain


# --------------------------------------------------------------------------- delete response


@pytest.mark.parametrize(
    ("exit_status", "at_ns"),
    [
        (0, 0),
        (137, 1_700_000_000_123_456_789),
        (1, 999_999_999),
        (255, 1_000_000_000),
        (128 + 15, 2**62),
        (2**32 - 1, 253_402_300_799 * 10**9 + 999_999_999),  # uint32 max; year 9999
    ],
)
def test_encode_delete_response_parses(exit_status: int, at_ns: int) -> None:
    raw = _encode_delete_response(exit_status, at_ns)
    msg = shim_pb2.DeleteResponse.FromString(raw)
    assert msg.pid == 0
    assert msg.exit_status == exit_status
    assert msg.HasField("exited_at")
    assert msg.exited_at.seconds == at_ns // 10**9
    assert msg.exited_at.nanos == at_ns % 10**9
    assert msg.exited_at.ToNanoseconds() == at_ns


def test_encode_delete_response_matches_protobuf() -> None:
    at_ns = 1_712_345_678_900_000_001
    ref = shim_pb2.DeleteResponse(exit_status=137)
    ref.exited_at.FromNanoseconds(at_ns)
    assert _encode_delete_response(137, at_ns) == ref.SerializeToString()


# --------------------------------------------------------------------------- the binary


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short and under /tmp: bundle paths show up in argv and error messages.
    d = Path(tempfile.mkdtemp(prefix="stasis-main-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _env(workdir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NAMESPACE", None)
    # The daemon publishes events here; nobody listens, so nothing leaves the test.
    env["TTRPC_ADDRESS"] = str(workdir / "nobody.ttrpc")
    env.update(extra)
    return env


def _shim(
    workdir: Path, bundle: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(SHIM), *args],
        cwd=bundle,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env if env is not None else _env(workdir),
        timeout=10,
        check=False,
    )


def _make_bundle(root: Path, name: str, annotations: dict[str, str]) -> Path:
    bundle = root / name
    bundle.mkdir()
    (bundle / "config.json").write_text(
        json.dumps({"ociVersion": "1.0.2", "annotations": annotations})
    )
    return bundle


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (it is not our child to reap)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Daemons:
    """Shim daemons (by PID) and sockets a test started; killed/removed at the end."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.pids: list[int] = []
        self.sockets: list[str] = []

    def cleanup(self) -> None:
        for pid in self.pids:
            # Guard against PID reuse: only our daemon carries our namespace.
            if _running(pid) and self.namespace in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for path in self.sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@pytest.fixture
def daemons(workdir: Path) -> Iterator[Daemons]:
    d = Daemons(f"stasis-test-{os.getpid()}-{workdir.name}")
    try:
        yield d
    finally:
        d.cleanup()


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.02)
    return False


def _shutdown(address: str) -> None:
    async def go() -> None:
        async with asyncio.timeout(5):
            client = await Client.connect(address, timeout=2)
            async with client:
                payload = shim_pb2.ShutdownRequest(id="x").SerializeToString()
                reply = await client.call(TASK_SERVICE, "Shutdown", payload, timeout=2)
                assert reply == b""

    asyncio.run(go())


def _start(
    workdir: Path, bundle: Path, id: str, namespace: str
) -> subprocess.CompletedProcess[bytes]:
    return _shim(
        workdir,
        bundle,
        "-namespace",
        namespace,
        "-address",
        str(workdir / "containerd.sock"),
        "-publish-binary",
        "/nonexistent/containerd",
        "-id",
        id,
        "start",
    )


def test_start_reuse_and_shutdown(workdir: Path, daemons: Daemons) -> None:
    ns = daemons.namespace
    ann = {"io.kubernetes.cri.sandbox-id": "pod1"}
    b1 = _make_bundle(workdir, "b1", ann)
    b2 = _make_bundle(workdir, "b2", ann)
    expected = socket_path(str(workdir / "containerd.sock"), ns, "pod1")
    daemons.sockets.append(expected)

    first = _start(workdir, b1, "pod1", ns)
    pid_file = b1 / "shim.pid"
    if pid_file.exists():
        daemons.pids.append(int(pid_file.read_text()))
    assert first.returncode == 0, first.stderr
    assert first.stderr == b""
    out = first.stdout.decode()
    assert ADDRESS_RE.fullmatch(out), out
    assert out == f"unix://{expected}"
    assert (b1 / "address").read_text() == out
    daemon = int(pid_file.read_text())
    assert _running(daemon)
    st = os.stat(expected)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert not [p for p in os.listdir(b1) if p.endswith(".tmp")]

    # Another container of the same pod: same shim, no new daemon.
    second = _start(workdir, b2, "ctr2", ns)
    assert second.returncode == 0, second.stderr
    assert second.stdout.decode() == out
    assert (b2 / "address").read_text() == out
    assert not (b2 / "shim.pid").exists()
    assert _running(daemon)

    _shutdown(out)
    assert _wait_gone(daemon), "shim daemon did not exit after Shutdown"
    assert not os.path.exists(expected), "daemon left its socket behind"


def test_start_replaces_a_stale_socket(workdir: Path, daemons: Daemons) -> None:
    ns = daemons.namespace
    bundle = _make_bundle(workdir, "b", {})
    path = socket_path(str(workdir / "containerd.sock"), ns, "solo")
    daemons.sockets.append(path)
    os.makedirs(SOCKET_DIR, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # bound, never listening: what a killed shim leaves
    stale.close()

    res = _start(workdir, bundle, "solo", ns)
    if (bundle / "shim.pid").exists():
        daemons.pids.append(int((bundle / "shim.pid").read_text()))
    assert res.returncode == 0, res.stderr
    assert res.stdout.decode() == f"unix://{path}"
    daemon = daemons.pids[0]
    assert _running(daemon)
    _shutdown(res.stdout.decode())
    assert _wait_gone(daemon)


def test_start_needs_id_namespace_address(workdir: Path) -> None:
    bundle = _make_bundle(workdir, "b", {})
    res = _shim(workdir, bundle, "-id", "x", "start")
    assert res.returncode != 0
    assert b"start needs -id, -namespace and -address" in res.stderr
    assert res.stdout == b""
    assert not (bundle / "shim.pid").exists()


def test_unknown_flag_exits_non_zero(workdir: Path) -> None:
    res = _shim(workdir, workdir, "-bogus", "start")
    assert res.returncode != 0
    assert b"flag provided but not defined: -bogus" in res.stderr


def _fake_runc(workdir: Path) -> tuple[Path, Path]:
    record = workdir / "runc-argv"
    script = workdir / "fake-runc"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\nexit 1\n')
    script.chmod(0o755)
    return script, record


def _delete_response(res: subprocess.CompletedProcess[bytes]) -> shim_pb2.DeleteResponse:
    assert res.returncode == 0, res.stderr
    return shim_pb2.DeleteResponse.FromString(res.stdout)


def test_delete_in_empty_bundle(workdir: Path) -> None:
    bundle = workdir / "bundle"
    bundle.mkdir()
    before = time.time_ns()
    t0 = time.monotonic()
    res = _shim(workdir, bundle, "-namespace", "ns1", "-address", "/x.sock", "-id", "c1", "delete")
    assert time.monotonic() - t0 < 5
    msg = _delete_response(res)
    assert msg.exit_status == 137
    assert msg.pid == 0
    assert before <= msg.exited_at.ToNanoseconds() <= time.time_ns()
    assert os.listdir(bundle) == []


def test_delete_force_deletes_a_container_runc_still_knows(workdir: Path) -> None:
    runc, record = _fake_runc(workdir)
    root = workdir / "runc-root"
    (root / "ns1" / "c1").mkdir(parents=True)  # runc's state dir: the container exists
    bundle = workdir / "bundle"
    (bundle / "rootfs").mkdir(parents=True)  # not a mount point: nothing to unmount
    (bundle / "options.json").write_text(json.dumps({"binary_name": str(runc), "root": str(root)}))
    res = _shim(workdir, bundle, "-namespace", "ns1", "-id", "c1", "delete")
    assert _delete_response(res).exit_status == 137
    assert record.read_text().splitlines() == [
        "--root",
        str(root / "ns1"),
        "delete",
        "--force",
        "c1",
    ]


def test_delete_skips_runc_for_an_unknown_container(workdir: Path) -> None:
    runc, record = _fake_runc(workdir)
    bundle = workdir / "bundle"
    bundle.mkdir()
    (bundle / "options.json").write_text(
        json.dumps({"binary_name": str(runc), "root": str(workdir / "runc-root")})
    )
    res = _shim(workdir, bundle, "-namespace", "ns1", "-id", "c1", "delete")
    assert _delete_response(res).exit_status == 137
    assert not record.exists()


@pytest.mark.parametrize("options", ["{broken", "[]", '{"binary_name": "/nonexistent/runc"}'])
def test_delete_survives_bad_options_and_missing_runc(workdir: Path, options: str) -> None:
    bundle = workdir / "bundle"
    bundle.mkdir()
    (bundle / "options.json").write_text(options)
    res = _shim(workdir, bundle, "-namespace", "ns1", "-id", "c1", "delete")
    assert _delete_response(res).exit_status == 137


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_delete_unmounts_a_leftover_rootfs(workdir: Path) -> None:
    from runtime.linux.mount import Mount, is_mountpoint, mount, unmount_all

    bundle = workdir / "bundle with space"
    rootfs = bundle / "rootfs"
    rootfs.mkdir(parents=True)
    try:
        mount(Mount("tmpfs", "tmpfs", options=("size=1m",)), str(rootfs))
        mount(Mount("tmpfs", "tmpfs", options=("size=1m",)), str(rootfs))
        res = _shim(workdir, bundle, "-namespace", "ns1", "-id", "c1", "delete")
        assert _delete_response(res).exit_status == 137
        assert not is_mountpoint(str(rootfs))
    finally:
        unmount_all(str(rootfs))


def test_delete_removes_a_dead_shim_socket_and_keeps_a_live_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    import socket as socketlib

    from shim.bootstrap import delete as delete_mod

    sockets = tmp_path / "s"
    sockets.mkdir()
    monkeypatch.setattr(delete_mod, "SOCKET_DIR", str(sockets))
    dead, live = sockets / "dead", sockets / "live"
    with socketlib.socket(socketlib.AF_UNIX) as s:
        s.bind(str(dead))  # bound, never listening: what a killed shim leaves
    listener = socketlib.socket(socketlib.AF_UNIX)
    try:
        listener.bind(str(live))
        listener.listen(1)
        for name, path in (("b1", dead), ("b2", live)):
            bundle = tmp_path / name
            bundle.mkdir()
            (bundle / "address").write_text(f"unix://{path}")
            f = Flags()
            f.bundle, f.namespace = str(bundle), "ns"
            assert delete(f) == 0
        capsysbinary.readouterr()
        assert not dead.exists()
        assert live.exists()
    finally:
        listener.close()


def test_launchers_run_isolated_without_site(tmp_path: Path) -> None:
    """Both launchers start Python with -IS and find every package they need."""
    from shim.bootstrap import launcher

    launcher.write(str(tmp_path))
    for name, args, want in (
        ("containerd-shim-stasis-v2", ["-v"], "containerd-shim-stasis-v2 version"),
        ("stasis", ["--version"], "stasis"),
    ):
        path = tmp_path / name
        assert path.read_text().splitlines()[0].endswith(" -IS")
        done = subprocess.run([str(path), *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert want in done.stdout


def _fake_cgroup_root(root: Path, v2: bool) -> None:
    """A directory laid out like /sys/fs/cgroup (the files a kernel would show are
    left out: plain directories stand for cgroups)."""
    if v2:
        root.mkdir()
        (root / "cgroup.controllers").write_text("cpu memory pids\n")
        return
    for h in ("freezer", "memory", "pids", "cpu,cpuacct", "unified"):
        (root / h).mkdir(parents=True)
    (root / "cpu").symlink_to("cpu,cpuacct")


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_delete_removes_the_containers_empty_cgroups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, v2: bool
) -> None:
    root = tmp_path / "cgroup"
    _fake_cgroup_root(root, v2)
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(cgroups, "unified", lambda: v2)
    hierarchies = [root] if v2 else [root / h for h in ("freezer", "memory", "pids", "unified")]
    for h in hierarchies:
        (h / "ns" / "ctr").mkdir(parents=True)
        (h / "ns" / "other").mkdir()  # a sibling: never touched
    if not v2:
        (root / "pids" / "ns" / "ctr" / "child").mkdir()  # not empty: kept
    bundle = _bundle_with(tmp_path, {"linux": {"cgroupsPath": "/ns/ctr"}})
    remove_empty_cgroups(bundle)
    for h in hierarchies:
        assert (h / "ns" / "other").is_dir()
        assert (h / "ns" / "ctr").exists() == (not v2 and h.name == "pids")
        assert (h / "ns").is_dir()  # the namespace's cgroup is containerd's


@pytest.mark.parametrize(
    "cgroups_path",
    ["", "system.slice:cri-containerd:ctr", "ns/ctr", "/", "/..", None],
)
def test_delete_leaves_cgroups_it_does_not_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cgroups_path: str | None
) -> None:
    root = tmp_path / "cgroup"
    _fake_cgroup_root(root, v2=False)
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(cgroups, "unified", lambda: False)
    (root / "memory" / "ns" / "ctr").mkdir(parents=True)
    config = None if cgroups_path is None else {"linux": {"cgroupsPath": cgroups_path}}
    remove_empty_cgroups(_bundle_with(tmp_path, config))
    assert (root / "memory" / "ns" / "ctr").is_dir()
    assert sorted(p.name for p in root.iterdir()) == [
        "cpu", "cpu,cpuacct", "freezer", "memory", "pids", "unified"
    ]  # fmt: skip


def test_start_imports_no_slow_standard_modules() -> None:
    """Every container start runs `start`, which waits for every import: shim.main
    and shim.bootstrap.zygote keep to modules the interpreter has loaded anyway."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "before = set(sys.modules)\n"
        "import shim.main, shim.bootstrap.zygote\n"
        "slow = ('contextlib', 'json', 're', 'enum', 'typing', 'dataclasses', 'socket')\n"
        "print(sorted(m for m in slow if m in sys.modules and m not in before))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
