"""When to show progress bars: one rule for every long-running loop of the package."""

from __future__ import annotations

import sys


def progress_enabled(progress: bool | None) -> bool:
    """``progress`` when given, else whether stderr is a terminal (quiet in logs and CI)."""
    return sys.stderr.isatty() if progress is None else progress
