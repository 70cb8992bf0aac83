"""The command line's face: every subcommand and benchmark has one home (tqstore/cli,
tqstore/bench) and every option says what it does."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from tqstore.cli import BENCHES, COMMANDS, build_parser


def _subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every leaf command, e.g. (("bench", "ssd"), parser)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _subparsers(child, path + (name,))


def test_every_command_and_benchmark_lives_in_its_package():
    assert all(module == f"tqstore.cli.{name.replace('-', '_')}" for name, module, _ in COMMANDS)
    assert all(module == f"tqstore.bench.{name}" for name, module, _ in BENCHES)
    leaves = {path for path, _ in _subparsers(build_parser())}
    assert leaves == ({(name,) for name, _, _ in COMMANDS}
                      | {("bench", name) for name, _, _ in BENCHES})
    assert ("serve",) in leaves and ("bench", "attention") in leaves and len(leaves) == 16


def test_every_option_of_every_subcommand_has_help():
    missing = []
    for path, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                option = "/".join(action.option_strings) or action.dest
                missing.append(f"tqstore {' '.join(path)} {option}")
    assert missing == []


def test_python_dash_m_runs_the_same_command():
    out = subprocess.run([sys.executable, "-m", "tqstore.cli", "serve", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--drain-seconds" in out.stdout and "in-flight calls" in out.stdout


def test_user_errors_print_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from tqstore import cli
    from tqstore.cli import serve
    from tqstore.errors import InvalidArgument

    def user_error(args):
        raise InvalidArgument("--listen must be unix:/path or host:port")

    monkeypatch.setattr(serve, "run", user_error)
    assert cli.main(["serve", "--path", "unused"]) == 2
    assert capsys.readouterr().err == "tqstore: error: --listen must be unix:/path or host:port\n"

    def bug(args):
        raise ValueError("an internal shape mismatch")

    monkeypatch.setattr(serve, "run", bug)
    with pytest.raises(ValueError, match="internal shape"):
        cli.main(["serve", "--path", "unused"])
