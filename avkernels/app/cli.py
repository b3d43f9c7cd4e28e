"""``avkernels`` command line: one sub-command per module in ``avkernels.app.commands``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
:func:`main` is the one place that turns errors into messages and exit codes: a
:class:`CommandError` (bad input, exit 2) or :class:`RunError` (a failure while working, exit 1)
prints one line; Ctrl-C exits with 130; anything unexpected prints one line and exits with 1.
``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

import torch

from avkernels import HAS_EXTENSION, __version__
from avkernels.app.errors import CommandError

COMMANDS = ("demo", "diagnose", "prepare", "data_stats", "train", "fust", "plot")
DEBUG_HELP = "show the traceback of an error"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avkernels",
        description="Dead-channel tracking, ABRi and Fusion Tuning for audio-visual learning.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"avkernels {__version__} (torch {torch.__version__}, "
        f"C++ extension loaded: {HAS_EXTENSION})",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"avkernels.app.commands.{name}")
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        # SUPPRESS: `avkernels --debug COMMAND` keeps the top-level value.
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP
        )
        command.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prefix = f"avkernels {args.command}"
    try:
        return args.run(args)
    except CommandError as error:
        _traceback(args)
        print(f"{prefix}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as stop:
        _traceback(args)
        saved = str(stop) or "every file written so far is complete (writes are atomic)"
        print(f"{prefix}: interrupted: {saved}", file=sys.stderr)
        return 130
    except OSError as error:
        _traceback(args)
        where = f" {error.filename}" if error.filename else ""
        print(f"{prefix}: error:{where}: {error.strerror or error}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - the last line of defence: never a bare traceback
        _traceback(args)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(
            f"{prefix}: error: unexpected {type(error).__name__}: {reason} (run again with "
            "--debug for the traceback, and report it)",
            file=sys.stderr,
        )
        return 1


def _traceback(args: argparse.Namespace) -> None:
    if args.debug:
        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
