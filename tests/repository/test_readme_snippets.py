"""Every ```python block of README.md and docs/*.md runs as written (a fresh interpreter each,
in an empty folder, on the CPU), unless the line before it is
``<!-- snippet: no-run (reason) -->`` with the reason why it cannot run standalone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*snippet:\s*(.*?)\s*-->")
NO_RUN = re.compile(r"no-run \((\S[^()]*)\)")
SNIPPET_TIMEOUT_S = 60


def snippets() -> list:
    """(document:line, code, marker text or None) of every python block."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for block in BLOCK.finditer(text):
            before = text[: block.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = MARKER.fullmatch(before.strip())
            line = text.count("\n", 0, block.start()) + 1
            name = f"{document.relative_to(ROOT)}:{line}"
            found.append((name, block.group(1), marker.group(1) if marker else None))
    return found


SNIPPETS = snippets()


def test_every_marker_says_why_and_precedes_a_block():
    markers = sum(len(MARKER.findall(d.read_text())) for d in DOCUMENTS)
    assert markers == sum(marker is not None for _, _, marker in SNIPPETS), (
        "a snippet marker must be the line right before a ```python block"
    )
    for name, _, marker in SNIPPETS:
        assert marker is None or NO_RUN.fullmatch(marker), (
            f"{name}: write the marker as <!-- snippet: no-run (why it cannot run standalone) -->"
        )


@pytest.mark.parametrize(
    "code",
    [code for _, code, marker in SNIPPETS if marker is None],
    ids=[name for name, _, marker in SNIPPETS if marker is None],
)
def test_snippet_runs(code, tmp_path):
    environment = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        CUDA_VISIBLE_DEVICES="",
        MPLBACKEND="Agg",
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=SNIPPET_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
