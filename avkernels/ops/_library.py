"""Defines an ``avkernels::`` op once, whichever of C++ and Python provides it.

The compiled extension defines each schema with ``TORCH_LIBRARY`` and registers its C++ kernels;
without the extension the same schema is defined here with Python kernels (the PyTorch
reference on CPU). CUDA kernels (Triton) and fake (meta) kernels are registered from Python
either way.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from avkernels._extension import HAS_EXTENSION

NAMESPACE = "avkernels"

# Holds the Python definitions; only created (and only needed) without the extension.
_LIBRARY = None if HAS_EXTENSION else torch.library.Library(NAMESPACE, "FRAGMENT")


def define_op(schema: str, python_kernels: Mapping[str, Callable]) -> torch._ops.OpOverload:
    """Return ``avkernels::<name>`` for ``schema``; if C++ did not define it, define it here with
    ``python_kernels`` (dispatch key, e.g. ``"CPU"``, to kernel)."""
    name = schema.split("(", 1)[0]
    if _LIBRARY is not None:
        _LIBRARY.define(schema)
        for dispatch_key, kernel in python_kernels.items():
            _LIBRARY.impl(name, kernel, dispatch_key)
    return getattr(getattr(torch.ops, NAMESPACE), name).default
