"""Running the ``avkernels`` command in-process as a user would: the exit status whether it
is returned or comes from argparse's SystemExit, and what was printed."""

from __future__ import annotations

from avkernels.app.cli import main


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``avkernels ARGV``."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:  # argparse rejected an argument
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_line(text: str) -> str:
    """The message of an error (argparse prints its usage lines before it)."""
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""
