"""Tracked batch normalisation: one forward/backward op pair for plain, ReLU-fused and ABRi BN.

Ops, namespace ``avkernels`` (schemas below; every implementation follows them exactly):

``batch_norm_fwd``
    Normalises ``x`` (N, C, H, W) per channel, applies the (possibly ABRi-blended) affine,
    optionally a fused ReLU, and in the same pass counts, per channel, the pre-activation
    outputs ``<= 0`` and the samples whose whole HxW map is ``<= 0``. With batch statistics
    it also updates the running statistics in place. Returns ``(y, mean, invstd)``.
``batch_norm_bwd``
    Gradients of ``x`` and of every affine parameter, ABRi's ``alpha`` included, from the two
    per-channel sums ``S1 = sum(dy)`` and ``S2 = sum(dy * xhat)`` (SPEC section 2). The ReLU
    mask is recomputed from ``x``; nothing but ``x``, the parameters and ``(mean, invstd)`` is
    saved for it.
``tracked_batch_norm``
    ``batch_norm_fwd``'s output ``y``, differentiable: its autograd kernel calls the two ops
    above. This is what ``TrackedBN`` runs.

Implementations: C++ on CPU (``csrc/batch_norm.cpp``), Triton on CUDA
(``avkernels/ops/batch_norm_triton.py``) and the PyTorch reference in this file, which is the
test oracle and the CPU implementation when the compiled extension is missing.
``tracked_batch_norm``'s autograd is C++ for every device (``csrc/batch_norm_autograd.cpp``),
or :class:`TrackedBNFunction` when the extension is missing.

Conventions shared by all implementations:

* Accumulation in float64 for float64 input, else float32. ``mean``/``invstd`` have that dtype
  and shape (K, C): K = 1 with batch statistics; with running statistics K = 1 for plain BN and
  K = 2 for ABRi (row 0: the original BN's running set, row 1: the added BN's).
* ABRi: ``y = a * BN_orig(x) + (1 - a) * BN_new(x)`` with ``a = abri_alpha`` of shape (1,) or
  (C,); it is a single per-channel affine ``y = x * scale + shift``, see
  :func:`effective_affine`. ``weight``/``bias`` absent mean 1/0.
* ``y`` and ``grad_x`` have ``x``'s dtype and the layout :func:`output_memory_format` gives.
* Running statistics are updated as ``r = (1 - momentum) * r + momentum * batch_stat`` with the
  unbiased batch variance; both ABRi sets see the same batch statistics.
* Dead counters (int64, mutated in place, all three present or all absent): ``dead_count`` (C,)
  outputs ``<= 0`` before the activation, ``dead_sample_count`` (C,) samples with a whole map
  ``<= 0``, ``seen`` (2,) elements per channel and samples counted so far.
* Parameter gradients have the parameter's dtype; an absent parameter gets an empty (0,) tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FWD_SCHEMA = (
    "batch_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? abri_weight, "
    "Tensor? abri_bias, Tensor? abri_alpha, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
    "Tensor(c!)? abri_running_mean, Tensor(d!)? abri_running_var, Tensor(e!)? dead_count, "
    "Tensor(f!)? dead_sample_count, Tensor(g!)? seen, bool use_batch_stats, float momentum, "
    "float eps, bool relu) -> (Tensor, Tensor, Tensor)"
)
BWD_SCHEMA = (
    "batch_norm_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor? abri_weight, "
    "Tensor? abri_bias, Tensor? abri_alpha, Tensor mean, Tensor invstd, bool use_batch_stats, "
    "bool relu) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
TRACKED_SCHEMA = FWD_SCHEMA.replace("batch_norm_fwd(", "tracked_batch_norm(").replace(
    "-> (Tensor, Tensor, Tensor)", "-> Tensor"
)


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input, float32 for every other floating dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def output_memory_format(x: Tensor) -> torch.memory_format:
    """channels_last when ``x`` is channels_last-dense (and not also NCHW-dense), else NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def effective_affine(
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    abri_weight: Optional[Tensor],
    abri_bias: Optional[Tensor],
    abri_alpha: Optional[Tensor],
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
def update_running_stats(running_sets, mean: Tensor, var: Tensor, count: int,
                         momentum: float) -> None:
    """``r = (1 - momentum) * r + momentum * batch_stat`` for every ``(running_mean,
    running_var)`` pair that is not None, with the unbiased variance of ``count`` values
    (``var`` is the biased one)."""
    for r_mean, r_var in running_sets:
        if r_mean is not None:
            r_mean.copy_(r_mean.to(mean.dtype) * (1 - momentum) + mean * momentum)
            r_var.copy_(r_var.to(var.dtype) * (1 - momentum) + var * (momentum * count / (count - 1)))


def batch_norm_fwd_reference(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    abri_weight: Optional[Tensor],
    abri_bias: Optional[Tensor],
    abri_alpha: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    abri_running_mean: Optional[Tensor],
    abri_running_var: Optional[Tensor],
    dead_count: Optional[Tensor],
    dead_sample_count: Optional[Tensor],
    seen: Optional[Tensor],
    use_batch_stats: bool,
    momentum: float,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    acc = accumulation_dtype(x)
    n, _, h, w = x.shape
    xf = x.to(acc)
    if use_batch_stats:
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        update_running_stats(
            ((running_mean, running_var), (abri_running_mean, abri_running_var)),
            mean, var, n * h * w, momentum,
        )
        mean, invstd = mean[None], torch.rsqrt(var + eps)[None]
    else:
        sets = [(running_mean, running_var)]
        if abri_alpha is not None:
            sets.append((abri_running_mean, abri_running_var))
        mean = torch.stack([m.to(acc) for m, _ in sets])
        invstd = torch.rsqrt(torch.stack([v.to(acc) for _, v in sets]) + eps)
    scale, shift = effective_affine(weight, bias, abri_weight, abri_bias, abri_alpha, mean, invstd)
    z = xf * _per_channel(scale) + _per_channel(shift)
    if dead_count is not None:
        non_positive = z <= 0
        dead_count += non_positive.sum(dim=(0, 2, 3))
        dead_sample_count += non_positive.all(dim=3).all(dim=2).sum(dim=0)
        seen += torch.tensor([n * h * w, n], dtype=seen.dtype, device=seen.device)
    y = z.clamp_min(0) if relu else z
    return y.to(x.dtype).contiguous(memory_format=output_memory_format(x)), mean, invstd


def batch_norm_bwd_reference(
    grad_y: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    abri_weight: Optional[Tensor],
    abri_bias: Optional[Tensor],
    abri_alpha: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    use_batch_stats: bool,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    n, _, h, w = x.shape
    xf, dy, scale, sum_dy, sum_dy_xhat = grad_sums(
        grad_y, x, weight, bias, abri_weight, abri_bias, abri_alpha, mean, invstd, relu
    )
    if use_batch_stats:
        grad_x = batch_stats_grad_input(
            xf, dy, scale, mean[0], invstd[0], sum_dy, sum_dy_xhat[0], n * h * w
        )
    else:
        grad_x = dy * _per_channel(scale)
    grad_x = grad_x.to(x.dtype).contiguous(memory_format=output_memory_format(x))
    grads = parameter_grads(
        weight, bias, abri_weight, abri_bias, abri_alpha, sum_dy, sum_dy_xhat[0], sum_dy_xhat[-1]
    )
    return (grad_x, *grads)


def grad_sums(
    grad_y: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    abri_weight: Optional[Tensor],
    abri_bias: Optional[Tensor],
    abri_alpha: Optional[Tensor],
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
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    abri_weight: Optional[Tensor],
    abri_bias: Optional[Tensor],
    abri_alpha: Optional[Tensor],
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    abri_sum_dy_xhat: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (weight, bias, abri_weight, abri_bias, abri_alpha) from the per-channel sums."""
    acc = sum_dy.dtype

    def cast(grad: Tensor, param: Optional[Tensor]) -> Tensor:
        if param is None:
            return sum_dy.new_empty(0)
        return grad.to(param.dtype)

    if abri_alpha is None:
        return (cast(sum_dy_xhat, weight), cast(sum_dy, bias), sum_dy.new_empty(0),
                sum_dy.new_empty(0), sum_dy.new_empty(0))
    alpha = abri_alpha.to(acc).expand_as(sum_dy)

    def branch(gamma: Optional[Tensor], beta: Optional[Tensor], s2: Tensor) -> Tensor:
        out = s2 * (1 if gamma is None else gamma.to(acc))
        return out if beta is None else out + sum_dy * beta.to(acc)

    grad_alpha = branch(weight, bias, sum_dy_xhat) - branch(abri_weight, abri_bias, abri_sum_dy_xhat)
    if abri_alpha.numel() == 1:
        grad_alpha = grad_alpha.sum().reshape(1)
    return (
        cast(alpha * sum_dy_xhat, weight),
        cast(alpha * sum_dy, bias),
        cast((1 - alpha) * abri_sum_dy_xhat, abri_weight),
        cast((1 - alpha) * sum_dy, abri_bias),
        cast(grad_alpha, abri_alpha),
    )


# --- op registration ---------------------------------------------------------------------------

from avkernels.ops._library import define_op  # noqa: E402

batch_norm_fwd = define_op(FWD_SCHEMA, {"CPU": batch_norm_fwd_reference})
batch_norm_bwd = define_op(BWD_SCHEMA, {"CPU": batch_norm_bwd_reference})


@torch.library.register_fake("avkernels::batch_norm_fwd")
def _batch_norm_fwd_fake(x, weight, bias, abri_weight, abri_bias, abri_alpha, running_mean,
                         running_var, abri_running_mean, abri_running_var, dead_count,
                         dead_sample_count, seen, use_batch_stats, momentum, eps, relu):
    rows = 2 if (abri_alpha is not None and not use_batch_stats) else 1
    stats = x.new_empty((rows, x.shape[1]), dtype=accumulation_dtype(x))
    return torch.empty_like(x, memory_format=output_memory_format(x)), stats, torch.empty_like(stats)


@torch.library.register_fake("avkernels::batch_norm_bwd")
def _batch_norm_bwd_fake(grad_y, x, weight, bias, abri_weight, abri_bias, abri_alpha, mean, invstd,
                         use_batch_stats, relu):
    grad_x = torch.empty_like(x, memory_format=output_memory_format(x))
    # The added BN's parameters only count in ABRi mode (abri_alpha given), as in the reference.
    abri = abri_alpha is not None
    params = (weight, bias, abri_weight if abri else None, abri_bias if abri else None, abri_alpha)
    return (grad_x, *(mean.new_empty(0) if p is None else torch.empty_like(p) for p in params))


class TrackedBNFunction(torch.autograd.Function):
    """Autograd of ``tracked_batch_norm`` when the compiled extension (whose C++ autograd serves
    otherwise) is missing: forward calls ``batch_norm_fwd``, backward ``batch_norm_bwd``.

    ``apply(x, weight, bias, abri_weight, abri_bias, abri_alpha, state)``, ``state`` being the
    rest of ``batch_norm_fwd``'s arguments, in order, as one tuple: they take no gradient.
    Saves only ``x``, the parameters and the per-channel ``(mean, invstd)``; the fused ReLU's
    mask is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, abri_weight, abri_bias, abri_alpha, state):
        y, mean, invstd = batch_norm_fwd(x, weight, bias, abri_weight, abri_bias, abri_alpha,
                                         *state)
        ctx.save_for_backward(x, weight, bias, abri_weight, abri_bias, abri_alpha, mean, invstd)
        ctx.use_batch_stats, ctx.relu = state[-4], state[-1]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, *params, mean, invstd = ctx.saved_tensors
        grad_x, *param_grads = batch_norm_bwd(
            grad_y, x, *params, mean, invstd, ctx.use_batch_stats, ctx.relu)
        return (grad_x, *(None if p is None else g for p, g in zip(params, param_grads)), None)


def tracked_batch_norm_python_autograd(x, weight, bias, abri_weight, abri_bias, abri_alpha,
                                       *state):
    """``tracked_batch_norm``'s Autograd kernel without the extension: ``TrackedBNFunction``."""
    return TrackedBNFunction.apply(x, weight, bias, abri_weight, abri_bias, abri_alpha, state)


def _tracked_batch_norm_forward(*args):
    return batch_norm_fwd(*args)[0]


# The functional form of TrackedBN: batch_norm_fwd's arguments, its output y, differentiable.
tracked_batch_norm = define_op(TRACKED_SCHEMA, {
    "Autograd": tracked_batch_norm_python_autograd,
    # Below autograd (inference mode): the forward alone.
    "CompositeExplicitAutograd": _tracked_batch_norm_forward,
})


@torch.library.register_fake("avkernels::tracked_batch_norm")
def _tracked_batch_norm_fake(x, *args):
    return torch.empty_like(x, memory_format=output_memory_format(x))


def _register_triton() -> None:
    try:
        from avkernels.ops import batch_norm_triton
    except ImportError:  # no triton: CUDA tensors cannot use avkernels kernels
        return
    torch.library.register_kernel("avkernels::batch_norm_fwd", "cuda", batch_norm_triton.forward)
    torch.library.register_kernel("avkernels::batch_norm_bwd", "cuda", batch_norm_triton.backward)


_register_triton()
