"""The error every data problem raises: which file, and why."""

from __future__ import annotations

from pathlib import Path


class DataError(Exception):
    """A missing, corrupt or inconsistent data file: ``path`` and ``reason``."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ClipError(DataError):
    """A clip of a manifest whose file is missing or unreadable; ``AVDataset(on_error='skip')``
    (``--on-error skip`` on the command line) leaves such clips out."""
