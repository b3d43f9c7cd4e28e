"""`avkernels --version` names the package version, the torch and whether the extension loaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from avkernels.app.cli import main

VERSION_FILE = Path(__file__).resolve().parents[2] / "avkernels" / "_version.py"


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    version = re.search(r'__version__ = "([^"]+)"', VERSION_FILE.read_text())[1]
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"avkernels {version} (torch {torch.__version__}, ")
    assert re.search(r"C\+\+ extension loaded: (True|False)\)$", printed)
