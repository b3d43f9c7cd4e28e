"""``avkernels`` command line: one sub-command per module in ``avkernels.app.commands``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
User errors raise :class:`CommandError`; they print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from avkernels import HAS_EXTENSION, __version__

COMMANDS = ("demo", "diagnose", "prepare", "data_stats", "train", "fust")


class CommandError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"avkernels.app.commands.{name}")
        command = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandError as error:
        print(f"avkernels {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"avkernels {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
