"""Tests for the stasis CLI's parser: built for the named subcommand alone, it reads
every command line as the whole tree does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime.cli import main as cli

LINES = [
    ["checkpoint", "c1", "--exit", "--json"],
    ["--address", "/run/c.sock", "-n", "k8s.io", "checkpoint", "c1", "--to", "/x", "--name", "n"],
    ["--address=/run/c.sock", "--namespace", "list", "list", "--json"],
    ["--addr", "rm", "list"],  # an abbreviated option whose value is a command's name
    ["-n", "checkpoint", "restore", "file:///x", "new"],
    ["gc", "--grace", "60"],
    ["kube", "restore", "file:///x", "--policy", "fresh", "--no-wait"],
    ["import", "a.tar", "--name", "n"],
]


@pytest.mark.parametrize("argv", LINES)
def test_one_subcommand_reads_as_the_whole_tree(argv: list[str]) -> None:
    full = cli._parser().parse_args(argv)
    assert cli._parser(cli._command_in(argv)).parse_args(argv) == full


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["checkpoint", "x"], "checkpoint"),
        (["-n", "ns", "--address", "a", "inspect", "r"], "inspect"),
        (["--namespace=ns", "rm", "r"], "rm"),
        (["--nam", "ns", "rm", "r"], "rm"),
        (["--version"], None),
        ([], None),
        (["bogus", "x"], None),
    ],
)
def test_command_in(argv: list[str], command: str | None) -> None:
    assert cli._command_in(argv) == command


def test_errors_and_help_still_know_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["bogus"])
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and "checkpoint" in err and "kube" in err


def test_commands_are_the_parsers() -> None:
    # COMMANDS is what _command_in recognises; a subcommand missing from it would
    # only cost the whole tree, one in it without a parser would break that command.
    sub = next(a for a in cli._parser()._actions if a.dest == "command")
    assert set(sub.choices) == cli.COMMANDS  # type: ignore[arg-type]


# Command lines `stasis checkpoint` may get; the fast reading must equal argparse's
# whenever it gives one, and must give one for the plain forms.
CHECKPOINT_LINES = [
    (["checkpoint", "c1"], True),
    (["checkpoint", "c1", "--exit", "--json"], True),
    (["checkpoint", "--exit", "c1", "--tcp-established", "--json"], True),
    (["--address", "/run/c.sock", "-n", "k8s.io", "checkpoint", "c1", "--to", "/x"], True),
    (["--address=/run/c.sock", "--namespace=ns", "checkpoint", "c1", "--name=n", "--to="], True),
    (["-n=ns", "checkpoint", "c1"], True),
    (["checkpoint", "c1", "--to", "a", "--to", "b", "--exit", "--exit"], True),
    (["checkpoint", "checkpoint"], True),  # a container named like the command
    (["checkpoint", "c1", "--to", ""], True),
    (["checkpoint", "c1", "--name", "with space and é"], True),
    # argparse's to read: abbreviations, attached short values, options as values
    (["--addr", "/a", "checkpoint", "c1"], False),
    (["-nns", "checkpoint", "c1"], False),
    (["checkpoint", "c1", "--tcp"], False),
    (["checkpoint", "c1", "--to", "-x"], False),
    (["checkpoint", "--", "c1"], False),
]
# ... and those argparse refuses (the fast reading must leave them to it)
REFUSED = [
    ["checkpoint"],
    ["checkpoint", "c1", "c2"],
    ["checkpoint", "c1", "--bogus"],
    ["checkpoint", "c1", "--json=yes"],
    ["checkpoint", "c1", "--to"],
    ["checkpoint", "c1", "--address", "/a"],  # a top-level option after the command
    ["--exit", "checkpoint", "c1"],
    ["checkpoint", "c1", "-h"],
    ["--version"],
    [],
]


@pytest.mark.parametrize(("argv", "fast"), CHECKPOINT_LINES)
def test_fast_checkpoint_args_read_as_argparse(
    argv: list[str], fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTAINERD_NAMESPACE", "env-ns")
    got = cli.fast_checkpoint_args(argv)
    assert (got is not None) == fast
    if got is not None:
        assert vars(got) == vars(cli._parser().parse_args(argv))


@pytest.mark.parametrize("argv", REFUSED)
def test_fast_checkpoint_args_leave_errors_to_argparse(argv: list[str]) -> None:
    assert cli.fast_checkpoint_args(argv) is None
    with pytest.raises(SystemExit):
        cli._parser().parse_args(argv)


@pytest.mark.parametrize("argv", [line for line, _ in CHECKPOINT_LINES] + LINES)
def test_other_commands_are_never_read_fast(argv: list[str]) -> None:
    if argv[:1] != ["checkpoint"] and "checkpoint" not in argv:
        assert cli.fast_checkpoint_args(argv) is None


@pytest.mark.parametrize(
    "obj",
    [
        {"ref": "file:///var/lib/stasis/checkpoints/c1", "name": "c1", "size": 1073999930,
         "criu_size": 0, "seconds": 1.326, "frozen_seconds": 0.1},
        {"ref": 'quote " backslash \\ tab \t é \u2028 \x00', "n": -1, "t": True, "f": False},
        {"none": None, "big": 10**30, "tiny": 1e-300, "neg": -0.0},
        {"nan": float("nan")},
        {"inf": float("inf")},
        {},
    ],
)  # fmt: skip
def test_flat_json_is_json_dumps(obj: dict[str, object]) -> None:
    import json

    assert cli.flat_json(obj) == json.dumps(obj)  # type: ignore[arg-type]


def test_checkpoint_command_line_imports_neither_argparse_nor_json() -> None:
    """`stasis checkpoint` waits for every import of the CLI: argparse and json
    (with re, which both pull in) cost it ~20 ms."""
    repo = Path(__file__).resolve().parents[2]
    code = (
        f"import sys; sys.path.insert(0, {str(repo)!r})\n"
        "from runtime.cli import main as cli\n"
        "ns = cli.fast_checkpoint_args(['-n', 'ns', 'checkpoint', 'c1', '--exit', '--json'])\n"
        "out = cli.flat_json({'ref': 'file:///x', 'seconds': 1.5})\n"
        "print(ns.container, out, [m for m in ('argparse', 'json', 're') if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == 'c1 {"ref": "file:///x", "seconds": 1.5} []'
