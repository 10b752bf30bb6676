"""Tests for runtime.linux.runc: the argv of every command, output parsing and error mapping.

A recording fake spawner stands in for the process layer; one test runs a
stand-in runc *script* through the real ForkSpawner, as containerd's own
shim tests do with ``/bin/true``-style binaries.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import FailedPrecondition, NotFound, Unavailable
from runtime.linux.proc import Completed, ForkSpawner, Stdio
from runtime.linux.runc import CreateOpts, ExecOpts, Runc, RuncError, last_error


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(5):
            return await coro

    return asyncio.run(guarded())


@dataclass
class Call:
    argv: list[str]
    stdio: Stdio
    capture: bool
    input: bytes | None
    env: Mapping[str, str] | None


@dataclass
class FakeSpawner:
    """Records every command; answers with ``status`` and ``stdout``."""

    status: int = 0
    stdout: bytes = b""
    calls: list[Call] = field(default_factory=list)
    on_run: Any = None

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdio: Stdio = Stdio(),
        capture: bool = False,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Completed:
        self.calls.append(Call(list(argv), stdio, capture, input, env))
        if self.on_run is not None:
            self.on_run(list(argv))
        return Completed(tuple(argv), self.status, self.stdout if capture else b"")

    @property
    def argv(self) -> list[str]:
        assert len(self.calls) == 1, self.calls
        return self.calls[0].argv


BASE = ["runc", "--root", "/run/test-runc"]


def make(**kw: Any) -> tuple[Runc, FakeSpawner]:
    sp = FakeSpawner(**{k: kw.pop(k) for k in ("status", "stdout") if k in kw})
    return Runc(sp, root="/run/test-runc", **kw), sp


# --------------------------------------------------------------------------- argv


def test_create_minimal() -> None:
    r, sp = make()
    stdio = Stdio(10, 11, 12)
    run(r.create("c1", "/b", CreateOpts(pid_file="/b/init.pid"), stdio))
    assert sp.argv == [*BASE, "create", "--bundle", "/b", "--pid-file", "/b/init.pid", "c1"]
    assert sp.calls[0].stdio == stdio
    assert sp.calls[0].capture is False
    assert sp.calls[0].input is None
    assert sp.calls[0].env is None


def test_create_all_options() -> None:
    r, sp = make()
    opts = CreateOpts(
        pid_file="/b/init.pid",
        console_socket="/tmp/pty.sock",
        no_pivot=True,
        no_new_keyring=True,
    )
    run(r.create("c1", "/b", opts, Stdio()))
    assert sp.argv == [
        *BASE,
        "create",
        "--bundle",
        "/b",
        "--pid-file",
        "/b/init.pid",
        "--console-socket",
        "/tmp/pty.sock",
        "--no-pivot",
        "--no-new-keyring",
        "c1",
    ]


def test_start() -> None:
    r, sp = make()
    run(r.start("c1"))
    assert sp.argv == [*BASE, "start", "c1"]


def test_exec() -> None:
    r, sp = make()
    stdio = Stdio(3, 4, 5)
    run(r.exec("c1", ExecOpts("/b/p.json", "/b/e.pid", console_socket="/s"), stdio))
    assert sp.argv == [
        *BASE,
        "exec",
        "--detach",
        "--process",
        "/b/p.json",
        "--pid-file",
        "/b/e.pid",
        "--console-socket",
        "/s",
        "c1",
    ]
    assert sp.calls[0].stdio == stdio


def test_exec_without_console() -> None:
    r, sp = make()
    run(r.exec("c1", ExecOpts("/p.json", "/e.pid"), Stdio()))
    assert sp.argv == [
        *BASE,
        "exec",
        "--detach",
        "--process",
        "/p.json",
        "--pid-file",
        "/e.pid",
        "c1",
    ]


@pytest.mark.parametrize(
    ("kwargs", "tail"),
    [
        ({}, ["kill", "c1", "15"]),
        ({"sig": signal.SIGKILL}, ["kill", "c1", "9"]),
        ({"sig": 10}, ["kill", "c1", "10"]),
        ({"sig": signal.SIGKILL, "all": True}, ["kill", "--all", "c1", "9"]),
    ],
)
def test_kill(kwargs: dict[str, Any], tail: list[str]) -> None:
    r, sp = make()
    run(r.kill("c1", **kwargs))
    assert sp.argv == [*BASE, *tail]


def test_delete() -> None:
    r, sp = make()
    run(r.delete("c1"))
    run(r.delete("c1", force=True))
    assert [c.argv for c in sp.calls] == [
        [*BASE, "delete", "c1"],
        [*BASE, "delete", "--force", "c1"],
    ]


def test_pause_resume() -> None:
    r, sp = make()
    run(r.pause("c1"))
    run(r.resume("c1"))
    assert [c.argv for c in sp.calls] == [[*BASE, "pause", "c1"], [*BASE, "resume", "c1"]]


def test_state_parses_json() -> None:
    state = {"ociVersion": "1.0.2", "id": "c1", "pid": 4242, "status": "running", "bundle": "/b"}
    r, sp = make(stdout=json.dumps(state).encode())
    assert run(r.state("c1")) == state
    assert sp.argv == [*BASE, "state", "c1"]
    assert sp.calls[0].capture is True


@pytest.mark.parametrize(
    ("stdout", "pids"),
    [(b"[1,2,3]\n", [1, 2, 3]), (b"null\n", []), (b"", []), (b"[]", [])],
)
def test_ps(stdout: bytes, pids: list[int]) -> None:
    r, sp = make(stdout=stdout)
    assert run(r.ps("c1")) == pids
    assert sp.argv == [*BASE, "ps", "--format", "json", "c1"]
    assert sp.calls[0].capture is True


def test_update_reads_resources_from_stdin() -> None:
    r, sp = make()
    resources = json.dumps({"memory": {"limit": 1 << 30}}).encode()
    run(r.update("c1", resources))
    assert sp.argv == [*BASE, "update", "--resources", "-", "c1"]
    assert sp.calls[0].input == resources


def test_global_flags() -> None:
    r, sp = make(log="/b/log.json", systemd_cgroup=True, binary="/opt/runc")
    run(r.start("c1"))
    assert sp.argv == [
        "/opt/runc",
        "--root",
        "/run/test-runc",
        "--log",
        "/b/log.json",
        "--log-format",
        "json",
        "--systemd-cgroup",
        "start",
        "c1",
    ]


def test_checkpoint_and_restore_die_with_the_shim() -> None:
    import shutil

    from runtime.linux.runc import CheckpointOpts, RestoreOpts

    setpriv = shutil.which("setpriv")
    assert setpriv, "util-linux's setpriv"
    r, sp = make(die_with_parent=True)
    run(r.checkpoint("c1", CheckpointOpts(image_path="/img")))
    opts = RestoreOpts(CheckpointOpts(image_path="/img"), pid_file="/p")
    run(r.restore("c1", "/b", opts, Stdio()))
    run(r.start("c1"))
    wrapped = [setpriv, "--pdeathsig", "KILL", "--", *BASE]
    assert sp.calls[0].argv[:8] == [*wrapped, "checkpoint"]
    assert sp.calls[1].argv[:8] == [*wrapped, "restore"]
    assert sp.calls[2].argv == [*BASE, "start", "c1"]  # short commands stay plain
    r, sp = make()
    run(r.checkpoint("c1", CheckpointOpts(image_path="/img")))
    assert sp.argv[:4] == [*BASE, "checkpoint"]


def test_default_root() -> None:
    sp = FakeSpawner()
    run(Runc(sp).start("c1"))
    assert sp.argv == ["runc", "--root", "/run/containerd/runc", "start", "c1"]


def test_extra_env_is_merged_with_environ() -> None:
    r, sp = make(extra_env={"STASIS_TEST_VAR": "1"})
    run(r.start("c1"))
    env = sp.calls[0].env
    assert env is not None
    assert env["STASIS_TEST_VAR"] == "1"
    assert env["PATH"] == os.environ["PATH"]


def test_version() -> None:
    r, sp = make(stdout=b"runc version 1.2.3\ncommit: abc\nspec: 1.2.0\n")
    assert run(r.version()) == "runc version 1.2.3"
    assert sp.argv == ["runc", "--version"]
    r2, _ = make(stdout=b"")
    assert run(r2.version()) == ""


# --------------------------------------------------------------------------- errors


def _log(path: Path, *entries: dict[str, str] | str) -> str:
    with open(path, "a", encoding="utf-8") as f:
        for e in entries:
            f.write((e if isinstance(e, str) else json.dumps(e)) + "\n")
    return str(path)


def test_error_carries_runcs_last_error_line(tmp_path: Path) -> None:
    log = _log(
        tmp_path / "log.json",
        {"level": "error", "msg": "an earlier error", "time": "t"},
        {"level": "warning", "msg": "a warning", "time": "t"},
        {"level": "error", "msg": "unable to apply cgroup configuration: boom", "time": "t"},
        {"level": "info", "msg": "after the error", "time": "t"},
        "not json at all",
    )
    r, _ = make(status=1, log=log)
    with pytest.raises(RuncError) as info:
        run(r.start("c1"))
    err = info.value
    assert isinstance(err, Unavailable)
    assert err.command == "start"
    assert err.status == 1
    assert err.detail == "unable to apply cgroup configuration: boom"
    assert str(err) == "runc start failed (exit 1): unable to apply cgroup configuration: boom"


def test_fatal_level_counts(tmp_path: Path) -> None:
    log = _log(tmp_path / "log.json", {"level": "fatal", "msg": "fatal thing"})
    assert last_error(log) == "fatal thing"


@pytest.mark.parametrize(
    ("msg", "cls"),
    [
        ("container does not exist", NotFound),
        ('container "c1" does not exist', NotFound),
        ("no such process", NotFound),
        ("container not running", FailedPrecondition),
        ("cannot start an already running container", FailedPrecondition),
        ("container is stopped", FailedPrecondition),
        ("unable to freeze", RuncError),
    ],
)
def test_classification(tmp_path: Path, msg: str, cls: type[Exception]) -> None:
    log = _log(tmp_path / "log.json", {"level": "error", "msg": msg})
    r, _ = make(status=1, log=log)
    with pytest.raises(cls) as info:
        run(r.pause("c1"))
    assert type(info.value) is cls
    assert msg in str(info.value)
    assert "runc pause failed (exit 1)" in str(info.value)


@pytest.mark.parametrize(
    ("msg", "cls"),
    [
        ("container not running", NotFound),  # the init has exited: the runc shim's NotFound
        ("container does not exist", NotFound),
        ("container is paused", FailedPrecondition),
        ("unable to signal", RuncError),
        # the init exited between runc's state check and its kill(2)
        ("unable to signal init: os: process already finished", NotFound),
    ],
)
def test_kill_classification(tmp_path: Path, msg: str, cls: type[Exception]) -> None:
    log = _log(tmp_path / "log.json", {"level": "error", "msg": msg})
    r, _ = make(status=1, log=log)
    with pytest.raises(cls) as info:
        run(r.kill("c1"))
    assert type(info.value) is cls
    assert msg in str(info.value)
    assert "runc kill failed (exit 1)" in str(info.value)


def test_error_without_log() -> None:
    r, _ = make(status=2)
    with pytest.raises(RuncError, match=r"runc delete failed \(exit 2\): no runc log"):
        run(r.delete("c1"))


def test_error_with_missing_or_errorless_log(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.json")
    assert last_error(missing) == f"no runc log at {missing}"
    quiet = _log(tmp_path / "quiet.json", {"level": "info", "msg": "fine"})
    assert last_error(quiet) == f"see {quiet}"
    assert last_error(None) == "no runc log"


def test_last_error_reads_only_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    filler = [{"level": "info", "msg": "x" * 200} for _ in range(1000)]  # > 64 KiB
    log = _log(path, {"level": "error", "msg": "too old to matter"}, *filler)
    assert last_error(log) == f"see {log}"
    _log(path, {"level": "error", "msg": "recent"})
    assert last_error(log) == "recent"


def test_per_call_log_overrides_default(tmp_path: Path) -> None:
    r, sp = make(log=str(tmp_path / "default.json"))
    run(r._run("start", ["c1"], log=str(tmp_path / "other.json")))
    assert sp.argv[3:5] == ["--log", str(tmp_path / "other.json")]


# --------------------------------------------------------------------------- stand-in runc binary


STAND_IN = """#!/bin/sh
# A stand-in runc: records its argv, writes runc-style JSON log lines, fails.
log=""
prev=""
for a in "$@"; do
    [ "$prev" = "--log" ] && log="$a"
    prev="$a"
done
printf '%s\\n' "$@" > "$(dirname "$0")/argv"
case " $* " in
    *" state "*) printf '{"id":"c1","pid":77,"status":"running"}'; exit 0 ;;
esac
printf '{"level":"info","msg":"starting","time":"t"}\\n' >> "$log"
printf '{"level":"error","msg":"container does not exist","time":"t"}\\n' >> "$log"
exit 1
"""


def test_stand_in_runc_through_fork_spawner(tmp_path: Path) -> None:
    binary = tmp_path / "runc"
    binary.write_text(STAND_IN)
    binary.chmod(0o755)
    log = tmp_path / "log.json"
    r = Runc(ForkSpawner(), root=str(tmp_path / "root"), binary=str(binary), log=str(log))

    with pytest.raises(NotFound) as info:
        run(r.kill("c1", signal.SIGKILL, all=True))
    assert str(info.value) == "runc kill failed (exit 1): container does not exist"
    assert (tmp_path / "argv").read_text().splitlines() == [
        "--root",
        str(tmp_path / "root"),
        "--log",
        str(log),
        "--log-format",
        "json",
        "kill",
        "--all",
        "c1",
        "9",
    ]

    assert run(r.state("c1")) == {"id": "c1", "pid": 77, "status": "running"}


def test_missing_executable_is_not_container_not_found(tmp_path: Path) -> None:
    msg = (
        'runc create failed: unable to start container process: exec: "nope": '
        "executable file not found in $PATH"
    )
    r, _ = make(status=1, log=_log(tmp_path / "log.json", {"level": "error", "msg": msg}))
    with pytest.raises(RuncError) as info:
        run(r.create("c1", "/b", CreateOpts(pid_file="/b/init.pid"), Stdio()))
    assert not isinstance(info.value, NotFound)
