"""Running a test module as a script in a subprocess (for runs that need another environment:
no TRITON_INTERPRET, another ATEN_CPU_CAPABILITY, a hidden extension)."""

from __future__ import annotations

import os
from pathlib import Path


def script_environment(**changes: str | None) -> dict[str, str]:
    """The environment for a test module run as a script in a subprocess: this one, with the
    repository root on PYTHONPATH and ``changes`` applied (None removes a variable)."""
    environment = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    for name, value in changes.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return environment
