"""Which avkernels the benchmarks measure: a compiled one, wherever pytest is run from.

Run from the checkout, the checkout's own ``avkernels/`` comes first on ``sys.path`` (pytest
puts the checkout there to import ``benchmarks``). After a non-editable
``pip install --no-build-isolation .`` that copy has no compiled ``_C``, and every CPU case
would time the PyTorch reference path. :func:`import_avkernels` imports the checkout's copy
only when it is built (``./dev``, an editable install, ``build_ext --inplace``), else the
installed package, and refuses to measure a package without its extension.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import MutableMapping, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

CHECKOUT = Path(__file__).resolve().parent.parent
ALLOW_REFERENCE = "AVKERNELS_ALLOW_NO_EXTENSION"
HOW_TO_BUILD = (
    "Install it with `pip install --no-build-isolation .` (torch installed first; README.md, "
    '"Install"), or build the checkout with `./dev test` or `python setup.py build_ext '
    f"--inplace`; set {ALLOW_REFERENCE}=1 to time the PyTorch reference path on purpose."
)


class NoCompiledAvkernels(ImportError):
    """Only an avkernels without its compiled extension can be imported."""


def has_compiled_extension(package_dir: Path) -> bool:
    """Whether ``package_dir`` holds a built ``_C`` extension module (it may still fail to load)."""
    return any(
        (package_dir / f"_C{suffix}").is_file() for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


def find_avkernels(checkout: Path, search_path: Sequence[str]) -> ModuleSpec | None:
    """The avkernels to import: the checkout's copy when built, else the first one installed
    outside the checkout (on ``search_path``) that is built; None when there is neither."""
    local = importlib.machinery.PathFinder.find_spec("avkernels", [str(checkout)])
    if local is not None and has_compiled_extension(checkout / "avkernels"):
        return local
    outside = [entry for entry in search_path if Path(entry or ".").resolve() != checkout]
    installed = importlib.machinery.PathFinder.find_spec("avkernels", outside)
    if installed is None or not installed.submodule_search_locations:
        return None
    if not has_compiled_extension(Path(installed.submodule_search_locations[0])):
        return None
    return installed


def import_avkernels(
    checkout: Path = CHECKOUT,
    search_path: Sequence[str] | None = None,
    modules: MutableMapping[str, ModuleType] | None = None,
) -> ModuleType:
    """Import (or return the already imported) avkernels that has its compiled extension.

    Raises :class:`NoCompiledAvkernels` with what to do when there is none, unless
    ``AVKERNELS_ALLOW_NO_EXTENSION=1`` asks for the reference path.
    """
    modules = sys.modules if modules is None else modules
    allow_reference = os.environ.get(ALLOW_REFERENCE) == "1"
    module = modules.get("avkernels")
    if module is None:
        spec = find_avkernels(checkout, sys.path if search_path is None else search_path)
        if spec is None and allow_reference:
            spec = importlib.machinery.PathFinder.find_spec("avkernels", [str(checkout)])
        if spec is None:
            raise NoCompiledAvkernels(
                f"benchmarks: no compiled avkernels to measure: {checkout / 'avkernels'} has no "
                "built extension avkernels._C, and no avkernels installed outside the checkout "
                f"has one. {HOW_TO_BUILD}"
            )
        module = importlib.util.module_from_spec(spec)
        modules["avkernels"] = module
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del modules["avkernels"]
                raise
        why = "".join(f" {warning.message}" for warning in caught)
    else:
        why = ""
    if not module.HAS_EXTENSION and not allow_reference:
        raise NoCompiledAvkernels(
            f"benchmarks: avkernels at {Path(module.__file__).parent} was imported without its "
            f"compiled extension.{why} {HOW_TO_BUILD}"
        )
    return module
