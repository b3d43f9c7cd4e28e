"""Atomic file writes: a crash mid-write leaves the old file or none, never a truncated one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Union

PathLike = Union[str, os.PathLike]


__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on a temporary binary file beside ``path``, flush it to disk, then
    rename it over ``path`` (creating the parent folders). Returns ``path`` as a ``Path``.

    The rename is atomic on POSIX and Windows, so readers see the old content or the new one;
    on any exception (KeyboardInterrupt included) the temporary file is removed. The file gets
    the permissions of one made by ``open(path, "w")`` (``tempfile.mkstemp`` would make it
    private to the owner).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    handle = os.open(temporary, flags, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text`` encoded as UTF-8 (newlines written as given)."""
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")))
