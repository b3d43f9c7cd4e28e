"""The contract of the tracked batch-norm ops (docs/DESIGN.md, "Op contracts").

``batch_norm_fwd``
    Normalises ``x`` (N, C, H, W) per channel, applies the (possibly ABRi-blended) affine,
    optionally a fused ReLU, and in the same pass counts, per channel, the pre-activation
    outputs ``<= 0`` and the samples whose whole HxW map is ``<= 0``. With batch statistics
    it also updates the running statistics in place. Returns ``(y, mean, invstd)``.
``batch_norm_bwd``
    Gradients of ``x`` and of every affine parameter, ABRi's ``alpha`` included, from the two
    per-channel sums ``S1 = sum(dy)`` and ``S2 = sum(dy * xhat)`` (docs/DESIGN.md, "ABRi as one
    BatchNorm"). The ReLU mask is recomputed from ``x``; nothing but ``x``, the parameters and
    ``(mean, invstd)`` is saved for it.
``tracked_batch_norm``
    ``batch_norm_fwd``'s output ``y``, differentiable: its autograd kernel calls the two ops
    above. This is what ``TrackedBN`` runs.
``batch_norm_fwd_differentiable``
    ``batch_norm_fwd``'s arguments and results from differentiable PyTorch ops: what
    ``tracked_batch_norm`` runs when an input carries a forward-mode tangent.
``batch_norm_bwd_differentiable``
    ``batch_norm_bwd``'s arguments and results from differentiable PyTorch ops, with the batch
    statistics' dependence on ``x`` restored: what the backward of ``tracked_batch_norm`` runs
    under ``create_graph=True``, so that its gradients can be differentiated again.

The parts of the batch-statistics ops, for synchronised BN, whose statistics and gradient sums
are those of the batch over all ranks (docs/DESIGN.md, "PyTorch conventions"); the same kernels
serve them as the whole ops:

``batch_norm_stats``
    ``(mean, var)`` (C,) of ``x``'s batch, ``var`` biased: the local statistics the ranks merge.
    The normalisation is ``batch_norm_fwd`` with the merged statistics as its running set.
``batch_norm_bwd_reduce``
    The batch-statistics backward's reductions: ``sums`` (2, C) = ``[S1, S2]`` and the parameter
    gradients (from these local sums), as ``batch_norm_bwd`` returns them.
``batch_norm_bwd_elemt``
    The batch-statistics ``grad_x`` from ``grad_means`` (2, C) = ``[S1 / M, S2 / M]``, the sums of
    the whole batch over its ``M`` elements per channel.

Conventions shared by all implementations (C++ on CPU, Triton on CUDA, the PyTorch reference):

* Accumulation in float64 for float64 input, else float32. ``mean``/``invstd`` have that dtype
  and shape (K, C): K = 1 with batch statistics; with running statistics K = 1 for plain BN and
  K = 2 for ABRi (row 0: the original BN's running set, row 1: the added BN's).
* ABRi: ``y = a * BN_orig(x) + (1 - a) * BN_new(x)`` with ``a = abri_alpha`` of shape (1,) or
  (C,); it is a single per-channel affine ``y = x * scale + shift``. ``weight``/``bias``
  absent mean 1/0.
* ``y`` and ``grad_x`` have ``x``'s dtype and the layout :func:`output_memory_format` gives.
* Running statistics are updated as ``r = (1 - momentum) * r + momentum * batch_stat`` with the
  unbiased batch variance; both ABRi sets see the same batch statistics.
* Dead counters (int64, mutated in place, all three present or all absent): ``dead_count`` (C,)
  outputs ``<= 0`` before the activation, ``dead_sample_count`` (C,) samples with a whole map
  ``<= 0``, ``seen`` (2,) elements per channel and samples counted so far.
* Parameter gradients have the parameter's dtype; an absent parameter gets an empty (0,) tensor.
* An empty batch (no elements), as in nn.BatchNorm2d: the running statistics stay as they are
  and the parameter gradients are zeros (its batch ``mean``/``invstd`` are NaN).
* Dtypes, as nn.BatchNorm2d accepts them on CPU: the parameters and running statistics share
  one dtype, ``x``'s, or float32 with float16/bfloat16 ``x``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avkernels.ops._library import OpSignature

# The affine parameters, in argument order: the ones that take a gradient.
PARAMETERS = ("weight", "bias", "abri_weight", "abri_bias", "abri_alpha")

FORWARD = OpSignature(
    "batch_norm_fwd",
    (
        ("x", "Tensor"),
        ("weight", "Tensor?"),
        ("bias", "Tensor?"),
        ("abri_weight", "Tensor?"),
        ("abri_bias", "Tensor?"),
        ("abri_alpha", "Tensor?"),
        ("running_mean", "Tensor(a!)?"),
        ("running_var", "Tensor(b!)?"),
        ("abri_running_mean", "Tensor(c!)?"),
        ("abri_running_var", "Tensor(d!)?"),
        ("dead_count", "Tensor(e!)?"),
        ("dead_sample_count", "Tensor(f!)?"),
        ("seen", "Tensor(g!)?"),
        ("use_batch_stats", "bool"),
        ("momentum", "float"),
        ("eps", "float"),
        ("relu", "bool"),
    ),
    "(Tensor, Tensor, Tensor)",
)
BACKWARD = OpSignature(
    "batch_norm_bwd",
    (
        ("grad_y", "Tensor"),
        ("x", "Tensor"),
        ("weight", "Tensor?"),
        ("bias", "Tensor?"),
        ("abri_weight", "Tensor?"),
        ("abri_bias", "Tensor?"),
        ("abri_alpha", "Tensor?"),
        ("mean", "Tensor"),
        ("invstd", "Tensor"),
        ("use_batch_stats", "bool"),
        ("relu", "bool"),
    ),
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
TRACKED = FORWARD.renamed("tracked_batch_norm", returns="Tensor")
# batch_norm_bwd written with differentiable PyTorch ops: the backward under create_graph=True
# (docs/DESIGN.md, "Double backward").
DIFFERENTIABLE_BACKWARD = BACKWARD.renamed("batch_norm_bwd_differentiable", BACKWARD.returns)
# batch_norm_fwd written with differentiable PyTorch ops: the forward under forward-mode AD.
DIFFERENTIABLE_FORWARD = FORWARD.renamed("batch_norm_fwd_differentiable", FORWARD.returns)

STATS = OpSignature("batch_norm_stats", (("x", "Tensor"),), "(Tensor, Tensor)")
# batch_norm_bwd with batch statistics (K = 1), without the flag.
_BATCH_STATS_BACKWARD = tuple(arg for arg in BACKWARD.arguments if arg[0] != "use_batch_stats")
BACKWARD_REDUCE = OpSignature("batch_norm_bwd_reduce", _BATCH_STATS_BACKWARD, BACKWARD.returns)
BACKWARD_ELEMT = OpSignature(
    "batch_norm_bwd_elemt",
    (*_BATCH_STATS_BACKWARD[:-1], ("grad_means", "Tensor"), _BATCH_STATS_BACKWARD[-1]),
    "Tensor",
)

ForwardArgs = FORWARD.record
BackwardArgs = BACKWARD.record
BackwardElemtArgs = BACKWARD_ELEMT.record


def batch_stats_backward_args(*args) -> BackwardArgs:
    """The :class:`BackwardArgs` of a ``batch_norm_bwd_reduce`` call (``use_batch_stats=True``)."""
    *tensors, relu = args
    return BackwardArgs(*tensors, True, relu)


def accumulation_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input, float32 for every other floating dtype."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def output_memory_format(x: Tensor) -> torch.memory_format:
    """channels_last when ``x`` is channels_last-dense (and not also NCHW-dense), else NCHW."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
