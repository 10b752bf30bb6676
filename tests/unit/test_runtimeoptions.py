"""A Create's runtime options: runc's Options, and the runtimeoptions.v1.Options
containerd's CRI sends a handler of Stasis's own runtime type (the options table as
TOML in config_body, or a ConfigPath), read into the same RuncOptions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from protos.containerd.runc.v1 import options_pb2
from protos.containerd.runtimeoptions.v1 import options_pb2 as runtimeoptions_pb2
from runtime.errors import InvalidArgument
from shim.daemon import runtimeoptions
from shim.task.container import RuncOptions

RUNC_URL = "containerd.runc.v1.Options"
GENERIC_URL = "runtimeoptions.v1.Options"


def _body(toml: str) -> bytes:
    return runtimeoptions_pb2.Options(config_body=toml.encode()).SerializeToString()


def _path(path: str | Path, type_url: str = "") -> bytes:
    return runtimeoptions_pb2.Options(config_path=str(path), type_url=type_url).SerializeToString()


def test_no_options_or_another_type_gives_the_defaults() -> None:
    assert runtimeoptions.decode("", b"") == RuncOptions()
    assert runtimeoptions.decode("example.com/other.Options", b"\x0a\x01x") == RuncOptions()
    assert runtimeoptions.decode(GENERIC_URL, b"") == RuncOptions()


def test_runc_options_as_before() -> None:
    o = options_pb2.Options(
        root="/r", binary_name="crun", systemd_cgroup=True, no_pivot_root=True, no_new_keyring=True
    )
    got = runtimeoptions.decode(RUNC_URL, o.SerializeToString())
    assert got == RuncOptions("/r", "crun", True, True, True)


def test_options_table_in_config_body() -> None:
    # as containerd 2.1 (go-toml v2: literal strings) and 1.7 (basic strings) write it
    for body in (
        "BinaryName = '/usr/local/bin/runc'\nNoNewKeyring = true\nNoPivotRoot = true\n"
        "Root = '/run/stasis-runc'\nSystemdCgroup = true\n",
        'BinaryName = "/usr/local/bin/runc"\nNoNewKeyring = true\nNoPivotRoot = true\n'
        'Root = "/run/stasis-runc"\nSystemdCgroup = true\n',
    ):
        got = runtimeoptions.decode(GENERIC_URL, _body(body))
        assert got == RuncOptions("/run/stasis-runc", "/usr/local/bin/runc", True, True, True)


def test_keys_match_regardless_of_case_as_for_runc() -> None:
    got = runtimeoptions.decode(GENERIC_URL, _body("systemdcgroup = true\nbinaryName = 'crun'"))
    assert got == RuncOptions(binary_name="crun", systemd_cgroup=True)


def test_runc_keys_stasis_does_not_use_have_no_effect() -> None:
    body = "ShimCgroup = '/x'\nIoUid = 1000\nIoGid = 1000\nCriuPath = '/c'\nTypeUrl = 'x'\n"
    body += "SystemdCgroup = false\n"
    assert runtimeoptions.decode(GENERIC_URL, _body(body)) == RuncOptions()


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ("SystemdCgroup = 'true'", ["SystemdCgroup", "a boolean", "'true'"]),
        ("SystemdCgroup = 1", ["SystemdCgroup", "a boolean"]),
        ("NoPivotRoot = 'yes'", ["NoPivotRoot", "a boolean"]),
        ("BinaryName = true", ["BinaryName", "a string"]),
        ("Root = ['/a']", ["Root", "a string"]),
        ("Root = 'run/runc'", ["Root", "'run/runc'", "not absolute"]),
        ("SystemCgroup = true", ["unknown key 'SystemCgroup'", "SystemdCgroup"]),
        ("[extra]\nSystemdCgroup = true", ["unknown key 'extra'"]),
        ("SystemdCgroup = true\nsystemdcgroup = false", ["'systemdcgroup'", "same key"]),
        ("SystemdCgroup = ", ["not TOML"]),
        ("SystemdCgroup = true # " + "x" * runtimeoptions.MAX_TOML, ["over 65536 bytes"]),
    ],
)
def test_bad_options_table_names_the_key(body: str, names: list[str]) -> None:
    with pytest.raises(InvalidArgument) as e:
        runtimeoptions.decode(GENERIC_URL, _body(body))
    for name in names:
        assert name in str(e.value)
    assert "the handler's options table" in str(e.value)


def test_bad_utf8_in_config_body_is_invalid() -> None:
    raw = runtimeoptions_pb2.Options(config_body=b"Root = '\xff'").SerializeToString()
    with pytest.raises(InvalidArgument, match="not TOML"):
        runtimeoptions.decode(GENERIC_URL, raw)


def test_config_path_file_is_read(tmp_path: Path) -> None:
    conf = tmp_path / "stasis-options.toml"
    conf.write_text("SystemdCgroup = true\nRoot = '/run/stasis-runc'\n")
    link = tmp_path / "link.toml"
    link.symlink_to(conf)  # a link to a regular file is fine (config managers use them)
    for path in (conf, link):
        got = runtimeoptions.decode(GENERIC_URL, _path(path, type_url="toml"))
        assert got == RuncOptions(root="/run/stasis-runc", systemd_cgroup=True)


def test_config_path_wins_over_config_body(tmp_path: Path) -> None:
    conf = tmp_path / "o.toml"
    conf.write_text("NoPivotRoot = true\n")
    raw = runtimeoptions_pb2.Options(
        config_path=str(conf), config_body=b"SystemdCgroup = true"
    ).SerializeToString()
    assert runtimeoptions.decode(GENERIC_URL, raw) == RuncOptions(no_pivot_root=True)


def test_bad_config_path_is_invalid(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # would block a plain open: refused before opening
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * runtimeoptions.MAX_TOML + "\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("Root = 3\n")
    cases = [
        ("relative.toml", "is not an absolute path"),
        (tmp_path / "missing.toml", "No such file"),
        (tmp_path, "is not a regular file"),
        (fifo, "is not a regular file"),
        ("/dev/null", "is not a regular file"),
        (big, "over 65536 bytes"),
        (bad, "Root must be a string"),
    ]
    for path, why in cases:
        with pytest.raises(InvalidArgument) as e:
            runtimeoptions.decode(GENERIC_URL, _path(path))
        assert why in str(e.value), (path, str(e.value))
        assert str(path) in str(e.value)
