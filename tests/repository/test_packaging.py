"""setup.py's decisions (torch pin, no compiler, isolated builds), the extension's load warning,
and the one version source. setup.py runs in a scratch copy: it writes avkernels/_build_info.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import avkernels
from avkernels import _extension

ROOT = Path(__file__).resolve().parents[2]
VERSION_FILE = ROOT / "avkernels" / "_version.py"


@pytest.fixture
def scratch_tree(tmp_path: Path) -> Path:
    """What setup.py reads: itself, the version file, the package folders (no C++ sources, so
    nothing compiles)."""
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    (tmp_path / "avkernels").mkdir()
    shutil.copy(VERSION_FILE, tmp_path / "avkernels" / "_version.py")
    (tmp_path / "avkernels" / "__init__.py").write_text("")
    return tmp_path


def run_setup(tree: Path, *args: str, **environment: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "AVKERNELS_NO_EXTENSION"}
    env.update(environment)
    return subprocess.run(
        [sys.executable, "setup.py", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def build_info(tree: Path) -> dict:
    values: dict = {}
    exec((tree / "avkernels" / "_build_info.py").read_text(), values)
    return values


def requirements(tree: Path) -> list[str]:
    return (tree / "avkernels.egg-info" / "requires.txt").read_text().split("\n")


def test_wheel_pins_the_torch_release_it_was_built_with(scratch_tree):
    result = run_setup(scratch_tree, "-q", "egg_info")
    assert result.returncode == 0, result.stderr
    major, minor = torch.__version__.split(".")[:2]
    assert f"torch=={major}.{minor}.*" in requirements(scratch_tree)
    info = build_info(scratch_tree)
    assert info["TORCH_VERSION"] == torch.__version__ and info["EXTENSION_SKIPPED"] is None


def test_no_compiler_installs_without_the_extension_and_says_so(scratch_tree):
    result = run_setup(scratch_tree, "-q", "egg_info", CXX="/nonexistent")
    assert result.returncode == 0, result.stderr
    assert "no C++ compiler: `/nonexistent` cannot be run" in result.stderr
    assert "AVKERNELS_NO_EXTENSION=1" in result.stderr
    assert "torch>=2.4" in requirements(scratch_tree)  # no extension: no pin
    info = build_info(scratch_tree)
    assert info["TORCH_VERSION"] is None and "/nonexistent" in info["EXTENSION_SKIPPED"]


def test_torch_from_an_isolated_build_env_stops_the_build(scratch_tree, tmp_path):
    """A torch that lives in pip's throw-away build environment is not the user's."""
    fake = tmp_path / "pip-build-env-abc123" / "overlay" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('__version__ = "9.9.0"\n')
    result = run_setup(scratch_tree, "-q", "egg_info", PYTHONPATH=str(fake.parent))
    assert result.returncode != 0
    assert "isolated build environment has its own torch 9.9.0" in result.stderr
    assert "pip install --no-build-isolation ." in result.stderr


def explain(monkeypatch, built_against, skipped, error: ImportError) -> str:
    monkeypatch.setattr(_extension, "_build_info", lambda: (built_against, skipped))
    return _extension._why_not_loaded(error)


def test_warning_for_an_extension_built_against_another_torch(monkeypatch):
    error = ImportError("_C.so: undefined symbol: _ZN3c104impl")
    message = explain(monkeypatch, "2.11.0", None, error)
    assert "built against torch 2.11.0" in message
    assert f"torch {torch.__version__} is installed" in message
    assert "undefined symbol" in message and "pip install --no-build-isolation" in message


def test_warning_for_a_package_installed_without_its_extension(monkeypatch):
    error = ModuleNotFoundError("No module named 'avkernels._C'", name="avkernels._C")
    message = explain(monkeypatch, None, "no C++ compiler: `c++` cannot be run", error)
    assert "installed without its compiled CPU extension (no C++ compiler" in message
    assert "AVKERNELS_NO_EXTENSION=1" in message


def test_warning_for_a_checkout_never_built(monkeypatch):
    error = ModuleNotFoundError("No module named 'avkernels._C'", name="avkernels._C")
    message = explain(monkeypatch, None, None, error)
    assert "is missing (this copy of avkernels was never built)" in message
    assert "circular" not in message and "python setup.py build_ext --inplace" in message


def test_version_is_written_once():
    version = re.search(r'__version__ = "([^"]+)"', VERSION_FILE.read_text())[1]
    assert avkernels.__version__ == version
    offenders = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [
            name for name in subfolders if not name.startswith(".") and name != "build"
        ]
        for name in files:
            path = Path(folder, name)
            if path.suffix not in (".py", ".toml", ".cfg") or path == VERSION_FILE:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            if re.search(r"^\s*(__version__|version)\s*=\s*['\"]\d", text, re.MULTILINE):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"version written outside avkernels/_version.py: {offenders}"
