"""Tests for the stasis CLI's parser: one argparse tree, containerd's options before
or after the command, a help text on every argument."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import pytest

from runtime.cli import checkpoint
from runtime.cli import main as cli

LINES = [
    ["checkpoint", "c1", "--exit", "--json"],
    ["--address", "/run/c.sock", "-n", "k8s.io", "checkpoint", "c1", "--to", "/x", "--name", "n"],
    ["--address=/run/c.sock", "--namespace", "list", "list", "--json"],
    ["--addr", "rm", "list"],  # an abbreviated option whose value is a command's name
    ["-n", "checkpoint", "restore", "file:///x", "new"],
    ["gc", "--grace", "60"],
    ["kube", "restore", "file:///x", "--on-node", "--policy", "fresh", "--no-wait"],
    ["kube", "restore", "ckpt-1", "--namespace", "apps", "--name", "p2"],
    ["agent", "--node", "node-a", "--metrics-port", "9100"],
    ["controller", "--kubeconfig", "/k", "--lease-namespace", "x"],
    ["import", "a.tar", "--name", "n"],
    ["checkpoint", "--exit", "c1", "--tcp-established", "--json"],
    ["-n=ns", "checkpoint", "c1"],
    ["checkpoint", "c1", "--to", "a", "--to", "b", "--exit", "--exit"],
    ["checkpoint", "checkpoint"],  # a container named like the command
    ["checkpoint", "c1", "--name", "with space and é"],
    ["checkpoint", "--", "c1"],
]
REFUSED = [
    ["checkpoint"],
    ["checkpoint", "c1", "c2"],
    ["checkpoint", "c1", "--bogus"],
    ["checkpoint", "c1", "--json=yes"],
    ["checkpoint", "c1", "--to"],
    ["--exit", "checkpoint", "c1"],
    ["kube", "checkpoint", "ns/pod", "-n", "x"],
    [],
]


def parse(argv: list[str]) -> dict[str, Any]:
    ns = vars(cli.parser().parse_args(argv))
    ns.pop("run")
    return ns


@pytest.mark.parametrize("argv", LINES)
def test_command_lines_parse(argv: list[str]) -> None:
    parse(argv)


@pytest.mark.parametrize("argv", REFUSED)
def test_wrong_command_lines_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(argv)


def test_what_a_checkpoint_command_line_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONTAINERD_NAMESPACE", "env-ns")
    monkeypatch.delenv("CONTAINERD_ADDRESS", raising=False)
    assert parse(["checkpoint", "c1", "--exit", "--json"]) == {
        "address": "/run/containerd/containerd.sock", "namespace": "env-ns",
        "command": "checkpoint", "container": "c1", "to": None, "name": None,
        "exit": True, "tcp_established": False, "json": True,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "address", "namespace"),
    [
        (["--address", "/a", "-n", "ns", "checkpoint", "c1"], "/a", "ns"),
        (["checkpoint", "c1", "-n", "ns", "--address", "/a"], "/a", "ns"),
        (["checkpoint", "--address=/a", "c1", "--namespace=ns"], "/a", "ns"),
        (["-n", "first", "checkpoint", "c1", "-n", "later"], "/env", "later"),
        (["--address", "/a", "inspect", "r", "-n", "ns"], "/a", "ns"),
        (["kube", "-n", "ns", "install"], "/env", "ns"),
        (["list"], "/env", "default"),
    ],
)
def test_global_options_before_or_after_the_command(
    argv: list[str], address: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTAINERD_ADDRESS", "/env")
    monkeypatch.delenv("CONTAINERD_NAMESPACE", raising=False)
    ns = parse(argv)
    assert (ns["address"], ns["namespace"]) == (address, namespace)


def test_kube_options_named_like_global_ones_keep_their_meaning() -> None:
    ns = parse(["-n", "ctr-ns", "kube", "restore", "r", "--namespace", "pods"])
    assert (ns["namespace"], ns["kube_namespace"]) == ("ctr-ns", "pods")
    ns = parse(["--address", "/a", "kube", "checkpoint", "ns/p", "--address", "/b"])
    assert (ns["address"], ns["kube_address"]) == ("/a", "/b")


def test_errors_and_help_know_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bogus"])
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and "checkpoint" in err and "kube" in err


def parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``p`` and every parser below it."""
    found = [p]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += parsers(child)
    return found


def test_every_argument_has_a_help_text() -> None:
    missing = [
        f"{p.prog}: {a.dest}"
        for p in parsers(cli.parser())
        for a in p._actions
        if not a.help and not isinstance(a, argparse._SubParsersAction)
    ]
    assert missing == []


def test_import_help_names_its_argument(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["import", "--help"])
    out = capsys.readouterr().out
    assert "FILE.tar" in out and "the archive to read" in out
    assert " file\n" not in out and " file " not in out


def test_checkpoint_json_is_json_dumps(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    got = {"ref": 'file:///x/quote " é', "name": "c1", "size": 10**12, "criu_size": 0,
           "seconds": 1.326, "frozen_seconds": 0.1}  # fmt: skip
    monkeypatch.setattr(checkpoint, "checkpoint", lambda ns: got)
    assert cli.main(["checkpoint", "c1", "--json"]) == 0
    assert capsys.readouterr().out == json.dumps(got) + "\n"
    assert cli.main(["checkpoint", "c1"]) == 0
    assert capsys.readouterr().out == 'file:///x/quote " é\n'


# What a command may load: its own module and what it needs, nothing for the others.
_LOADED = """
import sys
from runtime.cli import main
ns = main.parser().parse_args(sys.argv[1:])
main._handler(ns.run)
print(" ".join(sorted(sys.modules)))
"""
_HEAVY = ("runtime.store", "runtime.rpc.containerd", "cryptography", "h2", "boto", "kubernetes")


@pytest.mark.parametrize(
    ("argv", "heavy"),
    [
        (["checkpoint", "c1"], ()),
        (["restore", "r", "n"], ("runtime.store", "cryptography")),
        (["list"], ("runtime.store", "cryptography")),
        (["kube", "install"], ()),  # the kubernetes client is loaded when the command runs
    ],
)
def test_a_command_loads_only_its_own_modules(argv: list[str], heavy: tuple[str, ...]) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _LOADED, *argv], capture_output=True, text=True, check=True
    ).stdout.split()
    loaded = {prefix for prefix in _HEAVY for m in out if m == prefix or m.startswith(prefix + ".")}
    assert loaded == set(heavy), argv
