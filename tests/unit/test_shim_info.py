"""``containerd-shim-stasis-v2 -info``: containerd's runtime introspection (containerd 2.x
runs the binary with the runtime's options on stdin and reads a RuntimeInfo), answered
as containerd's runc shim answers it, with stand-in runc binaries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protos.containerd.runc.v1 import options_pb2
from protos.containerd.types import introspection_pb2
from runtime.names import VERSION
from shim.daemon import info

ROOT = Path(__file__).resolve().parents[2]
FEATURES = {"ociVersionMin": "1.0.0", "mountOptions": ["ro", "rro"], "linux": {}}


def _runc(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake-runc"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _options(binary: Path) -> bytes:
    any_ = introspection_pb2.RuntimeRequest().options
    any_.Pack(options_pb2.Options(binary_name=str(binary)), type_url_prefix="")
    return any_.SerializeToString()


def _info(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "shim.main", "-info"],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )


def test_info_reports_the_runtimes_features_and_echoes_the_options(tmp_path: Path) -> None:
    runc = _runc(tmp_path, f"[ \"$1\" = features ] && echo '{json.dumps(FEATURES)}'")
    stdin = _options(runc)
    done = _info(stdin)
    assert done.returncode == 0, done.stderr
    got = introspection_pb2.RuntimeInfo.FromString(done.stdout)
    assert got.name == "io.containerd.stasis.v2"
    assert got.version.version == VERSION
    assert got.options.SerializeToString() == stdin
    assert got.features.type_url == info.FEATURES_TYPE_URL
    assert json.loads(got.features.value) == FEATURES


def test_info_without_options_asks_runc_in_path() -> None:
    done = _info(b"")
    if done.returncode != 0 and b"not found in PATH" in done.stderr:
        pytest.skip("no runc on this machine")  # unit tests run anywhere
    got = introspection_pb2.RuntimeInfo.FromString(done.stdout)
    assert not got.HasField("options")
    assert "mountOptions" in json.loads(got.features.value)


def test_a_runtime_without_features_gives_an_answer_without_them(tmp_path: Path) -> None:
    runc = _runc(tmp_path, "echo 'unknown command' >&2; exit 1")
    done = _info(_options(runc))
    assert done.returncode == 0, done.stderr
    assert not introspection_pb2.RuntimeInfo.FromString(done.stdout).HasField("features")
    assert b"gave no answer" in done.stderr


@pytest.mark.parametrize(
    ("stdin", "error"),
    [
        (b"\xff" * 64, b"not a protobuf Any"),
        (b"\x0a" + b"\xff" * 5, b"not a protobuf Any"),
        (b"\x0a\x01x" * (info.MAX_OPTIONS // 3 + 1), b"exceed"),
    ],
)
def test_bad_options_are_refused_by_name(stdin: bytes, error: bytes) -> None:
    done = _info(stdin)
    assert done.returncode == 1
    assert error in done.stderr
    assert done.stdout == b""


def test_a_missing_runtime_is_named(tmp_path: Path) -> None:
    done = _info(_options(tmp_path / "no-such-runc"))
    assert done.returncode == 1
    assert b"no-such-runc" in done.stderr and b"not found" in done.stderr
