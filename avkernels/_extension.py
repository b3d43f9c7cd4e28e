"""Loads the compiled CPU kernels (``avkernels._C``) and says once when they are missing."""

from __future__ import annotations

import warnings

try:
    import torch  # noqa: F401  (libtorch must be loaded before the extension)

    from avkernels import _C  # noqa: F401  (importing registers the TORCH_LIBRARY ops)

    HAS_EXTENSION = True
except ImportError as error:  # not built, or built against another torch
    HAS_EXTENSION = False
    warnings.warn(
        f"avkernels: the compiled CPU extension could not be loaded ({error}); CPU tensors use "
        "the slower PyTorch reference path. Build it with "
        "`pip install --no-build-isolation .` in an environment that has torch.",
        RuntimeWarning,
        stacklevel=2,
    )
