"""The application's user-facing errors: ``main()`` prints them as one line and exits with
their ``exit_code`` (docs/cli.md). A module of their own, so that commands and helpers import
them without importing the CLI that imports the commands."""

from __future__ import annotations


class CommandError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""

    exit_code = 2


class RunError(CommandError):
    """The work failed (a file could not be written, data broke mid-run): one line, exit 1."""

    exit_code = 1
