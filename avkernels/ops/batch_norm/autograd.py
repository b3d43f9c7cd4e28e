"""Autograd of ``tracked_batch_norm`` in Python, for when the compiled extension (whose C++
autograd kernel, ``csrc/ops/autograd/batch_norm_kernel.cpp``, serves otherwise) is missing."""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from avkernels.ops.batch_norm.definition import (
    batch_norm_bwd,
    batch_norm_bwd_differentiable,
    batch_norm_fwd,
    batch_norm_fwd_differentiable,
)
from avkernels.ops.batch_norm.schema import PARAMETERS, ForwardArgs


class TrackedBNFunction(torch.autograd.Function):
    """Forward calls ``batch_norm_fwd``, backward ``batch_norm_bwd`` (under ``create_graph=True``
    ``batch_norm_bwd_differentiable``).

    ``apply(*args)`` takes ``tracked_batch_norm``'s arguments in order. Saves only ``x``, the
    parameters and the per-channel ``(mean, invstd)``; the fused ReLU's mask is recomputed in
    backward.
    """

    @staticmethod
    def forward(ctx, *args):
        a = ForwardArgs(*args)
        y, mean, invstd = batch_norm_fwd(*a)
        ctx.save_for_backward(a.x, *(getattr(a, name) for name in PARAMETERS), mean, invstd)
        ctx.use_batch_stats, ctx.relu = a.use_batch_stats, a.relu
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, *params, mean, invstd = ctx.saved_tensors
        # Grad mode is on here only under create_graph=True (docs/DESIGN.md, "Double backward").
        backward_op = batch_norm_bwd_differentiable if torch.is_grad_enabled() else batch_norm_bwd
        grad_x, *param_grads = backward_op(
            grad_y, x, *params, mean, invstd, ctx.use_batch_stats, ctx.relu
        )
        grads = [None if p is None else g for p, g in zip(params, param_grads)]
        return (grad_x, *grads) + (None,) * (len(ForwardArgs._fields) - 1 - len(params))


def tracked_batch_norm_python_autograd(*args):
    """``tracked_batch_norm``'s Autograd kernel without the extension: ``TrackedBNFunction``, or
    under forward-mode AD ``batch_norm_fwd_differentiable`` (docs/DESIGN.md, "Double backward")."""
    if any(has_tangent(arg) for arg in args):
        return batch_norm_fwd_differentiable(*args)[0]
    return TrackedBNFunction.apply(*args)


def has_tangent(value) -> bool:
    """Whether ``value`` is a tensor with a forward-mode tangent at the current dual level."""
    return isinstance(value, torch.Tensor) and forward_ad.unpack_dual(value).tangent is not None
