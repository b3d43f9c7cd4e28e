"""docs/cli.md against the argparse parsers, so that the page cannot drift from the command:
one section per command, each option table naming exactly the command's options and
positionals with all their choices, and every example command line parsing."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from avkernels.app.cli import build_parser
from tests.helpers import markdown

PAGE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
SECTION = re.compile(r"^## `avkernels ([a-z-]+)`$", re.MULTILINE)
CODE = re.compile(r"`([^`]+)`")
EXAMPLES = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def documented_name(action: argparse.Action) -> list[str]:
    """How the page names an argument: its option strings, or a positional's name in capitals."""
    return list(action.option_strings) or [action.dest.upper()]


def sections(text: str) -> dict[str, str]:
    """The text of each ``## `avkernels NAME` `` section, by command name."""
    return markdown.sections(text, SECTION)


def option_rows(section: str) -> dict[str, str]:
    """Each option-table row of a section by the names in its first cell (a row per option)."""
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 2:
            continue
        for name in CODE.findall(cells[0]):
            rows[name] = line
    return rows


def example_lines(text: str) -> list[list[str]]:
    """The arguments of every ``avkernels`` (or ``-m avkernels.app``) line in the bash blocks."""
    commands = []
    for block in EXAMPLES.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["avkernels"]:
                commands.append(words[1:])
            elif "avkernels.app" in words and words[words.index("avkernels.app") - 1] == "-m":
                commands.append(words[words.index("avkernels.app") + 1 :])
    return commands


def table_problems(parser: argparse.ArgumentParser, section: str) -> list[str]:
    """What a command's option table gets wrong: arguments it lacks, rows for arguments the
    command does not have, choices it does not show."""
    rows = option_rows(section)
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    expected = {option for action in actions for option in documented_name(action)}
    problems = [f"undocumented {option}" for option in sorted(expected - set(rows))]
    problems += [f"no such argument {option}" for option in sorted(set(rows) - expected)]
    for action in actions:
        name = documented_name(action)[0]
        shown = set(CODE.findall(rows.get(name, "")))
        missing = [str(choice) for choice in action.choices or () if str(choice) not in shown]
        if name in rows and missing:
            problems.append(f"{name}: choices {missing} not shown")
    return problems


def unparsable_examples(text: str) -> list[str]:
    """The example command lines of ``text`` that the parser rejects (``--help`` lines aside;
    the files an example names need not exist here)."""
    parser, failed = build_parser(), []
    for words in example_lines(text):
        if "--help" in words:
            continue
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                parser.parse_args(words)
        except SystemExit:
            if not re.search(r"no such (file|folder)", errors.getvalue()):
                failed.append("avkernels " + shlex.join(words))
    return failed


TEXT = PAGE.read_text(encoding="utf-8")
COMMANDS = subcommands()


def test_every_command_has_one_section():
    assert sorted(sections(TEXT)) == sorted(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_option_table_names_exactly_the_commands_arguments(name):
    assert table_problems(COMMANDS[name], sections(TEXT)[name]) == []


def test_every_command_has_examples_and_they_parse():
    assert {words[0] for words in example_lines(TEXT) if words} >= set(COMMANDS)
    assert unparsable_examples(TEXT) == []


def test_the_checks_see_a_missing_a_stale_and_an_incomplete_row_and_a_bad_example():
    """The comparisons can fail."""
    train = sections(TEXT)["train"]
    assert table_problems(COMMANDS["train"], train.replace("| `--seed` |", "| seed |")) == [
        "undocumented --seed"
    ]
    stale = train + "| `--colour` | | | gone |\n"
    assert table_problems(COMMANDS["train"], stale) == ["no such argument --colour"]
    incomplete = train.replace("`input`, `features`, `both`", "`input`, `both`")
    assert table_problems(COMMANDS["train"], incomplete) == [
        "--mask-target: choices ['features'] not shown"
    ]
    assert unparsable_examples("```bash\navkernels demo --colour red\n```\n") == [
        "avkernels demo --colour red"
    ]
