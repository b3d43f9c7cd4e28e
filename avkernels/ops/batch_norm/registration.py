"""Kernels of the tracked batch-norm ops registered from Python: fake (meta) kernels for
``torch.compile``, Triton on CUDA (traced into its kernels under ``torch.compile``), and, without
the compiled extension, the PyTorch reference on CPU with the Python autograd."""

from __future__ import annotations

import torch

from avkernels._extension import HAS_EXTENSION
from avkernels.ops import checks
from avkernels.ops._library import register_inductor_decomposition, register_python_kernels
from avkernels.ops.batch_norm import reference
from avkernels.ops.batch_norm.autograd import tracked_batch_norm_python_autograd
from avkernels.ops.batch_norm.definition import batch_norm_fwd
from avkernels.ops.batch_norm.schema import (
    BACKWARD,
    BACKWARD_ELEMT,
    BACKWARD_REDUCE,
    DIFFERENTIABLE_BACKWARD,
    DIFFERENTIABLE_FORWARD,
    FORWARD,
    PARAMETERS,
    STATS,
    TRACKED,
    BackwardArgs,
    BackwardElemtArgs,
    ForwardArgs,
    accumulation_dtype,
    batch_stats_backward_args,
    output_memory_format,
)


def reference_forward(*args):
    a = ForwardArgs(*args)
    checks.batch_norm_forward(a)
    return reference.forward(a)


def reference_backward(*args):
    a = BackwardArgs(*args)
    checks.batch_norm_backward(a, accumulation_dtype(a.x))
    return reference.backward(a)


def reference_stats(x):
    checks.batch_norm_input("batch_norm_stats: x", x)
    return reference.stats(x)


def reference_backward_reduce(*args):
    a = batch_stats_backward_args(*args)
    checks.batch_norm_backward(a, accumulation_dtype(a.x), op=BACKWARD_REDUCE.name)
    return reference.backward_reduce(a)


def reference_backward_elemt(*args):
    e = BackwardElemtArgs(*args)
    a = batch_stats_backward_args(*args[:-2], e.relu)
    checks.batch_norm_backward(a, accumulation_dtype(a.x), op=BACKWARD_ELEMT.name)
    checks.batch_norm_grad_means(a, e.grad_means)
    return reference.backward_elemt(a, e.grad_means)


def _differentiable_forward(*args):
    """``batch_norm_fwd_differentiable``: the argument checks of the fused kernels, then the
    reference forward."""
    a = ForwardArgs(*args)
    checks.batch_norm_forward(a)
    return reference.forward(a)


def reference_differentiable_backward(*args):
    return reference.differentiable_backward(BackwardArgs(*args))


def _tracked_forward(*args):
    """``tracked_batch_norm`` below autograd (inference mode): the forward alone."""
    return batch_norm_fwd(*args)[0]


@torch.library.register_fake(f"avkernels::{FORWARD.name}")
def _forward_fake(*args):
    a = ForwardArgs(*args)
    rows = 2 if (a.abri_alpha is not None and not a.use_batch_stats) else 1
    stats = a.x.new_empty((rows, a.x.shape[1]), dtype=accumulation_dtype(a.x))
    y = torch.empty_like(a.x, memory_format=output_memory_format(a.x))
    return y, stats, torch.empty_like(stats)


@torch.library.register_fake(f"avkernels::{BACKWARD.name}")
def _backward_fake(*args):
    a = BackwardArgs(*args)
    grad_x = torch.empty_like(a.x, memory_format=output_memory_format(a.x))
    # The added BN's parameters only count in ABRi mode (abri_alpha given), as in the reference.
    abri = a.abri_alpha is not None
    params = [getattr(a, name) for name in PARAMETERS]
    if not abri:
        params[2:4] = (None, None)
    return (grad_x, *(a.mean.new_empty(0) if p is None else torch.empty_like(p) for p in params))


@torch.library.register_fake(f"avkernels::{STATS.name}")
def _stats_fake(x):
    mean = x.new_empty(x.shape[1], dtype=accumulation_dtype(x))
    return mean, torch.empty_like(mean)


@torch.library.register_fake(f"avkernels::{BACKWARD_REDUCE.name}")
def _backward_reduce_fake(*args):
    a = batch_stats_backward_args(*args)
    sums = a.mean.new_empty((2, a.x.shape[1]))
    return (sums, *_backward_fake(*a)[1:])


@torch.library.register_fake(f"avkernels::{BACKWARD_ELEMT.name}")
def _backward_elemt_fake(*args):
    x = BackwardElemtArgs(*args).x
    return torch.empty_like(x, memory_format=output_memory_format(x))


@torch.library.register_fake(f"avkernels::{TRACKED.name}")
def _tracked_fake(x, *args):
    return torch.empty_like(x, memory_format=output_memory_format(x))


# Every device: the differentiable ops decompose into PyTorch ops, which autograd records.
register_python_kernels(
    DIFFERENTIABLE_FORWARD, {"CompositeImplicitAutograd": _differentiable_forward}
)
register_python_kernels(
    DIFFERENTIABLE_BACKWARD, {"CompositeImplicitAutograd": reference_differentiable_backward}
)

if not HAS_EXTENSION:
    register_python_kernels(FORWARD, {"CPU": reference_forward})
    register_python_kernels(BACKWARD, {"CPU": reference_backward})
    register_python_kernels(STATS, {"CPU": reference_stats})
    register_python_kernels(BACKWARD_REDUCE, {"CPU": reference_backward_reduce})
    register_python_kernels(BACKWARD_ELEMT, {"CPU": reference_backward_elemt})
    register_python_kernels(
        TRACKED,
        {
            "Autograd": tracked_batch_norm_python_autograd,
            "CompositeExplicitAutograd": _tracked_forward,
        },
    )

try:
    from avkernels.ops.batch_norm import triton_launch
except ImportError:  # no triton: CUDA tensors cannot use avkernels kernels
    triton_launch = None
if triton_launch is not None:
    torch.library.register_kernel(f"avkernels::{FORWARD.name}", "cuda", triton_launch.forward)
    torch.library.register_kernel(f"avkernels::{BACKWARD.name}", "cuda", triton_launch.backward)
    for signature, kernel in (
        (STATS, triton_launch.stats),
        (BACKWARD_REDUCE, triton_launch.backward_reduce),
        (BACKWARD_ELEMT, triton_launch.backward_elemt),
    ):
        torch.library.register_kernel(f"avkernels::{signature.name}", "cuda", kernel)
    register_inductor_decomposition(FORWARD, triton_launch.traced_forward)
    register_inductor_decomposition(BACKWARD, triton_launch.traced_backward)
