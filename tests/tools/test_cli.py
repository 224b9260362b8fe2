"""`dpfl`: one command for the tools; each subcommand's --help shows its defaults."""

from __future__ import annotations

import argparse
import importlib
import re

import pytest

from dpfl_app.tools import cli


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_overview_lists_every_command(capsys):
    assert cli.main([]) == 2  # no command: the overview, and a usage error
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert re.search(rf"^  {re.escape(name)}\s", out, re.M), name


def test_unknown_command_is_one_clear_line(capsys):
    assert cli.main(["plna"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'plna'" in err and "plan" in err


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_shows_prog_and_every_default(name, capsys, monkeypatch):
    """Every option that has a default prints it, and the usage names `dpfl NAME`."""
    seen: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def spy(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    out = _help(capsys, name)
    assert f"usage: dpfl {name}" in out
    parser = seen[-1]
    assert isinstance(parser.formatter_class, type) and issubclass(parser.formatter_class, cli.HelpFormatter)
    flat = " ".join(out.split())
    for action in parser._actions:
        if (action.option_strings and action.help != argparse.SUPPRESS
                and action.default not in (None, False, argparse.SUPPRESS)):
            shown = '""' if action.default == "" else str(action.default)
            assert f"(default: {shown})" in flat or f"default: {shown}" in flat, (
                name, action.option_strings)
        assert flat.count("(default") == len(re.findall(r"\(default: ", flat))  # no double defaults


def test_every_command_module_has_main():
    for module, _ in cli.COMMANDS.values():
        assert callable(importlib.import_module(module).main), module


def test_sweep_help_names_both_engines(capsys):
    flat = " ".join(_help(capsys, "sweep").split())
    assert "--engine flwr" in flat and "--engine inprocess" in flat
    assert "(a real `flwr run` each)" not in flat
