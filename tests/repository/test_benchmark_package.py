"""The benchmarks measure a compiled avkernels wherever they run from, and leave the committed
results alone (benchmarks/package_under_test.py, benchmarks/conftest.py)."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

import pytest

from benchmarks import conftest as bench_conftest
from benchmarks import package_under_test
from benchmarks.package_under_test import NoCompiledAvkernels, find_avkernels, import_avkernels

EXTENSION = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]


def make_package(root: Path, *, built: bool) -> Path:
    """A stand-in avkernels under ``root`` whose HAS_EXTENSION says whether it is built."""
    package = root / "avkernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"HAS_EXTENSION = {built}\nWHERE = {str(root)!r}\n")
    if built:
        (package / EXTENSION).write_bytes(b"")
    return package


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    return tmp_path / "checkout"


def test_installed_package_wins_over_the_unbuilt_checkout(tmp_path, checkout):
    make_package(checkout, built=False)
    make_package(tmp_path / "site", built=True)
    spec = find_avkernels(checkout.resolve(), [str(checkout), str(tmp_path / "site")])
    assert Path(spec.origin).parent == (tmp_path / "site" / "avkernels")


def test_built_checkout_wins_over_an_installed_package(tmp_path, checkout):
    make_package(checkout, built=True)
    make_package(tmp_path / "site", built=True)
    spec = find_avkernels(checkout.resolve(), [str(tmp_path / "site"), str(checkout)])
    assert Path(spec.origin).parent == checkout / "avkernels"


def test_unbuilt_installed_package_is_not_chosen(tmp_path, checkout):
    make_package(checkout, built=False)
    make_package(tmp_path / "site", built=False)
    assert find_avkernels(checkout.resolve(), [str(checkout), str(tmp_path / "site")]) is None


def test_import_loads_the_installed_copy(tmp_path, checkout, monkeypatch):
    monkeypatch.delenv(package_under_test.ALLOW_REFERENCE, raising=False)
    make_package(checkout, built=False)
    make_package(tmp_path / "site", built=True)
    modules: dict = {}
    module = import_avkernels(checkout.resolve(), [str(checkout), str(tmp_path / "site")], modules)
    assert module.WHERE == str(tmp_path / "site")
    assert modules["avkernels"] is module


def test_only_an_unbuilt_copy_stops_with_what_to_do(checkout, monkeypatch):
    monkeypatch.delenv(package_under_test.ALLOW_REFERENCE, raising=False)
    make_package(checkout, built=False)
    modules: dict = {}
    with pytest.raises(NoCompiledAvkernels, match="pip install --no-build-isolation") as error:
        import_avkernels(checkout.resolve(), [str(checkout)], modules)
    assert "./dev" in str(error.value) and "AVKERNELS_ALLOW_NO_EXTENSION=1" in str(error.value)
    assert "avkernels" not in modules


def test_extension_that_fails_to_load_stops_the_run(tmp_path, checkout, monkeypatch):
    """A _C file is there but does not load (another torch): the package says so."""
    monkeypatch.delenv(package_under_test.ALLOW_REFERENCE, raising=False)
    package = make_package(tmp_path / "site", built=True)
    (package / "__init__.py").write_text("HAS_EXTENSION = False\n")
    with pytest.raises(NoCompiledAvkernels, match="imported without its compiled extension"):
        import_avkernels(checkout.resolve(), [str(tmp_path / "site")], {})


def test_reference_path_on_request(checkout, monkeypatch):
    monkeypatch.setenv(package_under_test.ALLOW_REFERENCE, "1")
    make_package(checkout, built=False)
    module = import_avkernels(checkout.resolve(), [str(checkout)], {})
    assert module.HAS_EXTENSION is False


class Options:
    def __init__(self, **values):
        self.values = {"bench_no_save": False, "bench_results_dir": None, "bench_quick": False}
        self.values.update(values)

    def getoption(self, name):
        return self.values[name]


def test_default_results_never_go_to_the_committed_folder():
    directory = bench_conftest._results_dir(Options())
    committed = bench_conftest.COMMITTED_RESULTS_DIR
    assert directory.parent == bench_conftest.RUNS_DIR
    assert committed not in directory.parents and directory != committed
    asked = bench_conftest._results_dir(Options(bench_results_dir=str(committed)))
    assert asked == committed
    assert bench_conftest._results_dir(Options(bench_quick=True)) is None


def test_runs_folder_is_ignored_by_git():
    ignored = (package_under_test.CHECKOUT / ".gitignore").read_text().split()
    relative = bench_conftest.RUNS_DIR.relative_to(package_under_test.CHECKOUT)
    assert any(Path(entry.strip("/")) in (relative, *relative.parents) for entry in ignored)
