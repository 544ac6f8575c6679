"""``evse --version`` and ``--help``: every command's help is plain text with examples and its
exit codes (issue 9: no version, raw markup)."""

from __future__ import annotations

import argparse
import re
from importlib.metadata import version

import pytest

from ops.cli import build_parser, main


def commands() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand the parser has, as it has them (a new one is checked too)."""
    parser = build_parser()
    for action in parser._actions:  # argparse exposes subparsers only this way
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("evse has no subcommands")


def help_of(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main([*args, "--help"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


#: Markup that reads as noise in a terminal: reST literals, roles, directives, and
#: literal blocks ("::" ending a line), Markdown code and emphasis.
MARKUP = re.compile(r"``|:[a-z]+:`|^\s*\.\. |::$|`[^`]+`|\*\*", re.MULTILINE)


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert out == f"evse {version('evse-firmware')}\n"
    assert err == ""


def test_the_top_help_names_every_command_and_the_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = help_of(capsys)
    for name in commands():
        assert re.search(rf"^\s+evse {name}\b", out, re.MULTILINE), f"evse {name} not listed"
    assert "exit codes" in out and "--version" in out
    assert not MARKUP.search(out), MARKUP.search(out)


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_has_examples_and_exit_codes_in_plain_text(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    out = help_of(capsys, name)
    assert not MARKUP.search(out), MARKUP.search(out)
    examples = out.split("\nexamples:\n", 1)[1].split("\n\n", 1)[0]
    lines = [line.split() for line in examples.splitlines() if not line.startswith("     ")]
    # Every example is a command line to copy (the simulator's also shows a curl; an
    # install's runs under sudo; a script pipes a password in).
    assert lines and all(
        words[0] in ("evse", "curl")
        or (words[0] == "sudo" and "evse" in words[1])
        or "| evse" in " ".join(words)
        for words in lines
    ), examples
    assert f"evse {name}" in examples
    codes = out.split("\nexit codes", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^\s+(\d+)\s", codes, re.MULTILINE)
    assert listed[:1] == ["0"] and "2" in listed, codes
    # The texts are laid out for 80 columns (RawDescriptionHelpFormatter keeps them).
    assert max(len(line) for line in out.splitlines()) <= 80


def test_run_help_lists_every_exit_code_of_systemd_py(capsys: pytest.CaptureFixture[str]) -> None:
    from ops import systemd  # noqa: PLC0415

    out = help_of(capsys, "run")
    codes = {int(c) for c in re.findall(r"^\s+(\d+)\s", out.split("exit codes", 1)[1], re.M)}
    declared = {v for k, v in vars(systemd).items() if k.startswith("EXIT_")}
    assert codes == declared
    assert "--log-format" in out
