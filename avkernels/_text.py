"""One-line messages for errors that name keys, files and causes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

KEYS_SHOWN = 5


def shorten_keys(keys: Iterable[str], separator: str = ", ") -> str:
    """The first few keys, and how many more there are."""
    keys = list(keys)
    extra = f" (+{len(keys) - KEYS_SHOWN} more)" if len(keys) > KEYS_SHOWN else ""
    return separator.join(keys[:KEYS_SHOWN]) + extra


def first_line(error: BaseException) -> str:
    """``Type: first line of the message`` of an exception."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def one_line(message: Any, limit: int = 400) -> str:
    """``message`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
