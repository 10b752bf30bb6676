"""Tests for the stasis CLI's parser: built for the named subcommand alone, it reads
every command line as the whole tree does."""

from __future__ import annotations

import pytest

from runtime import cli

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
