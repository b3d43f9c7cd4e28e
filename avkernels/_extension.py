"""Loads the compiled CPU kernels (``avkernels._C``) and says once, and why, when they are missing.

``setup.py`` writes ``avkernels/_build_info.py`` when it builds the package: the torch version the
extension was compiled against, or why it was not built. The warning uses it to tell a package
installed without its extension from one built against another torch.
"""

from __future__ import annotations

import importlib
import warnings

import torch  # libtorch must be loaded before the extension

REBUILD = (
    "pip install --no-build-isolation --force-reinstall --no-deps . (from a checkout: "
    "python setup.py build_ext --inplace)"
)


def _build_info() -> tuple[str | None, str | None]:
    """(torch version the extension was built against, why it was skipped); (None, None) for a
    checkout that was never built."""
    try:
        from avkernels import _build_info
    except ImportError:
        return None, None
    return _build_info.TORCH_VERSION, _build_info.EXTENSION_SKIPPED


def _why_not_loaded(error: ImportError) -> str:
    built_against, skipped = _build_info()
    running = torch.__version__
    if skipped is not None:
        return (
            f"the package was installed without its compiled CPU extension ({skipped}). To build "
            f"it, install a C++ compiler if needed and, with torch {running} installed, run "
            f"{REBUILD}; AVKERNELS_NO_EXTENSION=1 at install time skips it on purpose."
        )
    if error.name == "avkernels._C":
        history = (
            "this copy of avkernels was never built"
            if built_against is None
            else f"it was built against torch {built_against}, but its file is gone"
        )
        return (
            f"the compiled CPU extension avkernels._C is missing ({history}). Build it against "
            f"torch {running} with {REBUILD}; AVKERNELS_NO_EXTENSION=1 at install time skips it "
            "on purpose."
        )
    if built_against is not None and built_against != running:
        return (
            f"the compiled CPU extension avkernels._C was built against torch {built_against} "
            f"but torch {running} is installed, and failed to load ({error}). Rebuild it "
            f"against this torch: {REBUILD}."
        )
    return (
        f"the compiled CPU extension avkernels._C failed to load ({error}; built against torch "
        f"{built_against or 'unknown'}, running torch {running}). Rebuild it: {REBUILD}."
    )


try:
    importlib.import_module("avkernels._C")  # importing registers the kernels with the ops
    HAS_EXTENSION = True
except ImportError as error:
    HAS_EXTENSION = False
    warnings.warn(
        f"avkernels: {_why_not_loaded(error)} Until then CPU tensors use the slower PyTorch "
        "reference path.",
        RuntimeWarning,
        stacklevel=2,
    )
