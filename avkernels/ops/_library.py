"""Defines an ``avkernels::`` op once, whichever of C++ and Python provides it.

The compiled extension defines each schema with ``TORCH_LIBRARY`` and registers its CPU kernel;
without the extension the same schema is defined here with the PyTorch reference as the CPU
kernel. CUDA kernels (Triton) and fake (meta) kernels are registered from Python either way.
"""

from __future__ import annotations

from typing import Callable

import torch

from avkernels._extension import HAS_EXTENSION

NAMESPACE = "avkernels"


def define_op(schema: str, cpu_reference: Callable) -> torch._ops.OpOverload:
    """Return ``avkernels::<name>`` for ``schema``, defining it from Python if C++ did not."""
    name, signature = schema.split("(", 1)
    qualname = f"{NAMESPACE}::{name}"
    if not HAS_EXTENSION:
        torch.library.define(qualname, "(" + signature)
        torch.library.impl(qualname, "cpu", cpu_reference)
    return getattr(getattr(torch.ops, NAMESPACE), name).default
