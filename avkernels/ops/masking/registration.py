"""Kernels of the masking ops registered from Python: fake kernels, Triton on CUDA, and the
PyTorch reference on CPU when the compiled extension is missing."""

from __future__ import annotations

import functools

import torch

from avkernels._extension import HAS_EXTENSION
from avkernels.ops import checks
from avkernels.ops._library import register_inductor_decomposition, register_python_kernels
from avkernels.ops.masking import definition, reference
from avkernels.ops.masking.schema import MASKED_CONCAT, MASKED_CONCAT_BACKWARD, ZERO_MASKED_PATCHES


def _checked(check, kernel):
    """``kernel`` preceded by the argument checks the C++ kernel makes."""

    def checked_kernel(*args):
        check(*args)
        return kernel(*args)

    return checked_kernel


REFERENCE_KERNELS = {
    ZERO_MASKED_PATCHES: _checked(
        checks.zero_masked_patches, reference.zero_masked_patches_reference
    ),
    MASKED_CONCAT: _checked(checks.masked_concat, reference.masked_concat_reference),
    MASKED_CONCAT_BACKWARD: _checked(
        checks.masked_concat_backward, reference.masked_concat_backward_reference
    ),
}

# The ops must be defined before kernels are registered on them.
assert definition.zero_masked_patches is not None


@torch.library.register_fake("avkernels::zero_masked_patches")
def _zero_masked_patches_fake(x, ratio, seeds, patch_h, patch_w):
    return None


@torch.library.register_fake("avkernels::masked_concat")
def _masked_concat_fake(a, v, ratio_a, ratio_v, seeds, group_a, group_v):
    return a.new_empty((a.shape[0], a.shape[1] + v.shape[1]))


@torch.library.register_fake("avkernels::masked_concat_backward")
def _masked_concat_backward_fake(grad, ratio_a, ratio_v, seeds, features_a, group_a, group_v):
    batch, features = grad.shape
    return grad.new_empty((batch, features_a)), grad.new_empty((batch, features - features_a))


if not HAS_EXTENSION:
    for signature, kernel in REFERENCE_KERNELS.items():
        register_python_kernels(signature, {"CPU": kernel})

try:
    from avkernels.ops.masking import triton_launch
except ImportError:  # no triton: CUDA tensors cannot use avkernels kernels
    triton_launch = None
if triton_launch is not None:
    for signature in REFERENCE_KERNELS:
        launcher = getattr(triton_launch, signature.name)
        torch.library.register_kernel(f"avkernels::{signature.name}", "cuda", launcher)
        register_inductor_decomposition(
            signature, functools.partial(launcher, launch=torch.library.wrap_triton)
        )
