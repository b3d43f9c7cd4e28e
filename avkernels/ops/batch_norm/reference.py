"""The plain-PyTorch reference of the tracked batch-norm ops: the test oracle, and the CPU
kernels when the compiled extension is missing.

:func:`forward` and :func:`backward` implement ``batch_norm_fwd`` and ``batch_norm_bwd`` exactly as
the contract in :mod:`avkernels.ops.batch_norm.schema` states, :func:`stats`,
:func:`backward_reduce` and :func:`backward_elemt` the parts synchronised BN runs around its
collectives; they share the helpers (:func:`effective_affine`, :func:`grad_sums`,
:func:`batch_stats_grad_input`, :func:`parameter_grads`, :func:`update_running_stats`;
docs/DESIGN.md, "ABRi as one BatchNorm" gives the formulas).
"""

from __future__ import annotations

import torch
from torch import Tensor

from avkernels.ops.batch_norm.schema import (
    PARAMETERS,
    BackwardArgs,
    ForwardArgs,
    accumulation_dtype,
    output_memory_format,
)


def parameters(args) -> tuple[Tensor | None, ...]:
    """``(weight, bias, abri_weight, abri_bias, abri_alpha)`` of a forward or backward record."""
    return tuple(getattr(args, name) for name in PARAMETERS)


def effective_affine(
    weight: Tensor | None,
    bias: Tensor | None,
    abri_weight: Tensor | None,
    abri_bias: Tensor | None,
    abri_alpha: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
) -> tuple[Tensor, Tensor]:
    """Per-channel ``(scale, shift)`` such that the pre-activation output is ``x*scale + shift``.

    Row 0 of ``mean``/``invstd`` normalises the original BN, the last row the ABRi one (the
    same row when both use batch statistics).
    """
    channels, acc = mean.shape[1], mean.dtype
    if abri_alpha is None:
        terms = [(weight, bias, 0, torch.ones((), dtype=acc, device=mean.device))]
    else:
        alpha = abri_alpha.to(acc).expand(channels)
        terms = [(weight, bias, 0, alpha), (abri_weight, abri_bias, mean.shape[0] - 1, 1 - alpha)]
    scale = torch.zeros(channels, dtype=acc, device=mean.device)
    shift = torch.zeros_like(scale)
    for gamma, beta, row, blend in terms:
        term_scale = blend * invstd[row] * (1 if gamma is None else gamma.to(acc))
        scale = scale + term_scale
        shift = shift - mean[row] * term_scale + (0 if beta is None else blend * beta.to(acc))
    return scale, shift


def _per_channel(v: Tensor) -> Tensor:
    return v[:, None, None]


@torch.no_grad()
def update_running_stats(running_sets, mean: Tensor, var: Tensor, count, momentum: float) -> None:
    """``r = (1 - momentum) * r + momentum * batch_stat`` for every ``(running_mean,
    running_var)`` pair that is not None, with the unbiased variance of ``count`` values
    (``var`` is the biased one; ``count``, an int or a 0-d tensor, is more than 1). An empty
    batch must not come here: it leaves them as they are, as nn.BatchNorm2d does."""
    # no_grad does not stop forward-mode AD: detached, the buffers take no tangent.
    mean, var = mean.detach(), var.detach()
    for r_mean, r_var in running_sets:
        if r_mean is not None:
            r_mean.copy_(r_mean.to(mean.dtype) * (1 - momentum) + mean * momentum)
            r_var.copy_(
                r_var.to(var.dtype) * (1 - momentum) + var * (momentum * count / (count - 1))
            )


def stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """``batch_norm_stats``: per-channel ``(mean, biased var)`` of the batch, in the accumulation
    dtype (NaN for an empty batch)."""
    var, mean = torch.var_mean(x.to(accumulation_dtype(x)), dim=(0, 2, 3), correction=0)
    return mean, var


def forward(a: ForwardArgs) -> tuple[Tensor, Tensor, Tensor]:
    """``batch_norm_fwd`` in plain PyTorch: ``(y, mean, invstd)``."""
    x = a.x
    acc = accumulation_dtype(x)
    n, _, h, w = x.shape
    xf = x.to(acc)
    if a.use_batch_stats:
        mean, var = stats(xf)
        if n * h * w:
            update_running_stats(
                ((a.running_mean, a.running_var), (a.abri_running_mean, a.abri_running_var)),
                mean,
                var,
                n * h * w,
                a.momentum,
            )
        mean, invstd = mean[None], torch.rsqrt(var + a.eps)[None]
    else:
        sets = [(a.running_mean, a.running_var)]
        if a.abri_alpha is not None:
            sets.append((a.abri_running_mean, a.abri_running_var))
        mean = torch.stack([m.to(acc) for m, _ in sets])
        invstd = torch.rsqrt(torch.stack([v.to(acc) for _, v in sets]) + a.eps)
    scale, shift = effective_affine(*parameters(a), mean, invstd)
    z = xf * _per_channel(scale) + _per_channel(shift)
    if a.dead_count is not None:
        non_positive = z <= 0
        a.dead_count.add_(non_positive.sum(dim=(0, 2, 3)))
        a.dead_sample_count.add_(non_positive.all(dim=3).all(dim=2).sum(dim=0))
        a.seen.add_(torch.tensor([n * h * w, n], dtype=a.seen.dtype, device=a.seen.device))
    y = z.clamp_min(0) if a.relu else z
    return y.to(x.dtype).contiguous(memory_format=output_memory_format(x)), mean, invstd


def backward(a: BackwardArgs) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``batch_norm_bwd`` in plain PyTorch: ``(grad_x, *parameter gradients)``."""
    x, mean, invstd = a.x, a.mean, a.invstd
    params = parameters(a)
    n, _, h, w = x.shape
    xf, dy, scale, sum_dy, sum_dy_xhat = grad_sums(a.grad_y, x, *params, mean, invstd, a.relu)
    if a.use_batch_stats:
        grad_x = batch_stats_grad_input(
            xf, dy, scale, mean[0], invstd[0], sum_dy, sum_dy_xhat[0], n * h * w
        )
    else:
        grad_x = dy * _per_channel(scale)
    grad_x = grad_x.to(x.dtype).contiguous(memory_format=output_memory_format(x))
    grads = parameter_grads(*params, sum_dy, sum_dy_xhat[0], sum_dy_xhat[-1])
    return (grad_x, *grads)


def backward_reduce(a: BackwardArgs) -> tuple[Tensor, ...]:
    """``batch_norm_bwd_reduce`` (``a.use_batch_stats`` is True): ``(sums, *parameter
    gradients)`` with ``sums = [S1, S2]``."""
    params = parameters(a)
    _, _, _, sum_dy, sum_dy_xhat = grad_sums(a.grad_y, a.x, *params, a.mean, a.invstd, a.relu)
    grads = parameter_grads(*params, sum_dy, sum_dy_xhat[0], sum_dy_xhat[0])
    return (torch.stack([sum_dy, sum_dy_xhat[0]]), *grads)


def backward_elemt(a: BackwardArgs, grad_means: Tensor) -> Tensor:
    """``batch_norm_bwd_elemt``: the batch-statistics ``grad_x`` from ``grad_means = [S1 / M,
    S2 / M]`` of the whole (global) batch."""
    x, mean, invstd = a.x, a.mean, a.invstd
    xf, dy, scale, _, _ = grad_sums(a.grad_y, x, *parameters(a), mean, invstd, a.relu)
    grad_x = batch_stats_grad_input(xf, dy, scale, mean[0], invstd[0], *grad_means, 1)
    return grad_x.to(x.dtype).contiguous(memory_format=output_memory_format(x))


def differentiable_backward(a: BackwardArgs) -> tuple[Tensor, ...]:
    """``batch_norm_bwd_differentiable``: :func:`backward` with the saved batch statistics
    turned back into functions of ``x``, so that autograd differentiates the gradients again
    (docs/DESIGN.md, "Double backward").

    The forward kernel's ``mean``/``invstd`` reach the backward as constants. Adding the
    zero-valued ``s - s.detach()`` of the same statistic ``s`` recomputed from ``x`` keeps their
    values and gives them the derivatives of every order; ``invstd = (var + eps) ** -0.5`` is
    rebuilt from its own value, so ``eps`` is not needed.
    """
    if a.use_batch_stats and a.x.numel():
        var, mean = torch.var_mean(a.x.to(a.mean.dtype), dim=(0, 2, 3), correction=0)
        a = a._replace(
            mean=a.mean + (mean - mean.detach()),
            invstd=(a.invstd.pow(-2) + (var - var.detach())).rsqrt(),
        )
    return backward(a)


def grad_sums(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    abri_weight: Tensor | None,
    abri_bias: Tensor | None,
    abri_alpha: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward's per-channel reductions over the batch in ``x``.

    Returns ``(xf, dy, scale, sum_dy, sum_dy_xhat)``: ``x`` and ``grad_y`` in the accumulation
    dtype (``dy`` zeroed where the fused ReLU was off), the effective scale, ``S1 = sum(dy)``
    (C,) and ``S2 = sum(dy * xhat)`` (K, C), one row per normalisation of ``mean``/``invstd``.
    """
    acc = mean.dtype
    xf, dy = x.to(acc), grad_y.to(acc)
    if x.numel() == 0:
        # An empty batch sums nothing: its (NaN) batch invstd must not turn the zero sums into
        # NaN parameter gradients (nn.BatchNorm2d gives zeros).
        invstd = torch.zeros_like(invstd)
    scale, shift = effective_affine(weight, bias, abri_weight, abri_bias, abri_alpha, mean, invstd)
    if relu:
        dy = torch.where(xf * _per_channel(scale) + _per_channel(shift) > 0, dy, 0)
    sum_dy = dy.sum(dim=(0, 2, 3))
    # sum_dy_xhat[k] = sum(dy * (x - mean[k]) * invstd[k]), one row per normalisation.
    sum_dy_xhat = torch.stack(
        [(dy * (xf - _per_channel(m))).sum(dim=(0, 2, 3)) * r for m, r in zip(mean, invstd)]
    )
    return xf, dy, scale, sum_dy, sum_dy_xhat


def batch_stats_grad_input(
    xf: Tensor,
    dy: Tensor,
    scale: Tensor,
    mean: Tensor,
    invstd: Tensor,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count,
) -> Tensor:
    """``dx = scale * (dy - S1 / M - xhat * S2 / M)`` for batch statistics over ``M = count``
    elements per channel (the whole global batch when the sums are all-reduced across ranks)."""
    xhat = (xf - _per_channel(mean)) * _per_channel(invstd)
    return _per_channel(scale) * (
        dy - _per_channel(sum_dy / count) - xhat * _per_channel(sum_dy_xhat / count)
    )


def parameter_grads(
    weight: Tensor | None,
    bias: Tensor | None,
    abri_weight: Tensor | None,
    abri_bias: Tensor | None,
    abri_alpha: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    abri_sum_dy_xhat: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (weight, bias, abri_weight, abri_bias, abri_alpha) from the per-channel sums."""
    acc = sum_dy.dtype

    def cast(grad: Tensor, param: Tensor | None) -> Tensor:
        if param is None:
            return sum_dy.new_empty(0)
        return grad.to(param.dtype)

    if abri_alpha is None:
        return (
            cast(sum_dy_xhat, weight),
            cast(sum_dy, bias),
            sum_dy.new_empty(0),
            sum_dy.new_empty(0),
            sum_dy.new_empty(0),
        )
    alpha = abri_alpha.to(acc).expand_as(sum_dy)

    def branch(gamma: Tensor | None, beta: Tensor | None, s2: Tensor) -> Tensor:
        out = s2 * (1 if gamma is None else gamma.to(acc))
        return out if beta is None else out + sum_dy * beta.to(acc)

    grad_alpha = branch(weight, bias, sum_dy_xhat) - branch(
        abri_weight, abri_bias, abri_sum_dy_xhat
    )
    if abri_alpha.numel() == 1:
        grad_alpha = grad_alpha.sum().reshape(1)
    return (
        cast(alpha * sum_dy_xhat, weight),
        cast(alpha * sum_dy, bias),
        cast((1 - alpha) * abri_sum_dy_xhat, abri_weight),
        cast((1 - alpha) * sum_dy, abri_bias),
        cast(grad_alpha, abri_alpha),
    )
