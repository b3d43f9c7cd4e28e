"""Reading the docs/ pages that tests check against the code."""

from __future__ import annotations

import re


def sections(text: str, heading: re.Pattern[str]) -> dict[str, str]:
    """The text under each heading ``heading`` matches (up to the next one), by its group 1."""
    found = list(heading.finditer(text))
    ends = [match.start() for match in found[1:]] + [len(text)]
    return {match.group(1): text[match.end() : end] for match, end in zip(found, ends)}
