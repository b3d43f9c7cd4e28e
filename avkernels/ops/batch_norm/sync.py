"""Synchronised tracked batch norm: the statistics, dead counts and gradients of the global
batch over a process group.

Synchronized TrackedBN (``TrackedBN(..., sync=True)``, :func:`sync_tracked_batch_norm`) follows
the protocol of ``nn.SyncBatchNorm``: in a training forward every rank computes per-channel
``(count, mean, M2)`` of its own batch, the ranks all-gather them, and each merges them into the
statistics of the global batch; in backward the two per-channel sums ``S1 = sum(dy)`` and
``S2 = sum(dy * xhat)`` are all-reduced so that ``dx`` is the gradient of the global-batch BN.
Design choices:

* The gathered statistics are one float64 vector ``[count, mean (C), M2 (C)]`` per rank: counts
  stay exact past 2**24 elements and the merge adds no rounding worth a thought, whatever the
  input dtype. It is the parallel-variance (Chan) decomposition evaluated with the global mean,
  ``mean = sum(n_r mean_r) / n``, ``M2 = sum(M2_r + n_r (mean_r - mean)**2)``, summed over ranks
  in rank order, so every rank gets bitwise the same result. Ranks may hold different batch
  sizes, zero included.
* Normalisation, fused ReLU and dead counting reuse the forward op ``batch_norm_fwd`` (C++ on
  CPU, Triton on CUDA) in its running-statistics mode, fed the global ``(mean, biased var)`` as
  the running set (both sets for ABRi, whose two BNs share the batch statistics). The running
  statistics are updated here with the global unbiased variance, exactly as the op would
  (``momentum=None`` works through TrackedBN's cumulative average, as in the local path).
* Dead counts of the batch go to zeroed temporaries and are all-reduced (one int64 collective)
  before being added to the buffers: after a synced training forward every rank holds the same,
  global counts, so ``dead_fraction()`` needs no communication.
* Backward reuses the reference's reductions
  (:func:`avkernels.ops.batch_norm.reference.grad_sums`), all-reduces ``(S1, S2)`` in one
  collective and applies the batch-statistics ``dx`` formula with the global element count.
  Parameter gradients come from the local sums: DDP averages parameter gradients over ranks
  itself, as with ``nn.SyncBatchNorm``.
* Three collectives per layer and training step (stats, counts, gradient sums), two without
  dead counting. Eval forwards never communicate. The sync path is not written for
  ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from avkernels.ops.batch_norm.definition import batch_norm_fwd
from avkernels.ops.batch_norm.reference import (
    batch_stats_grad_input,
    grad_sums,
    parameter_grads,
    parameters,
    update_running_stats,
)
from avkernels.ops.batch_norm.schema import ForwardArgs, accumulation_dtype, output_memory_format


def check_process_group(process_group, owner: str) -> None:
    """Raise ``TypeError`` unless ``process_group`` is ``None`` or a ``torch.distributed``
    process group."""
    if process_group is None:
        return
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(
            f"{owner}: process_group must be None (the default group) or a "
            f"torch.distributed.ProcessGroup (e.g. from dist.new_group(ranks)), got "
            f"{type(process_group).__name__}"
        )


def sync_enabled(process_group: dist.ProcessGroup | None) -> bool:
    """Whether a synced layer communicates: ``torch.distributed`` is initialised and the group
    has more than one rank (``nn.SyncBatchNorm``'s rule; otherwise the layer runs locally)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def _global_batch_stats(x: Tensor, process_group) -> tuple[Tensor, Tensor, int]:
    """Per-channel ``(mean, biased var)`` of the batch of every rank, in ``x``'s accumulation
    dtype, and the global number of elements per channel."""
    n, channels, h, w = x.shape
    count = n * h * w
    if count:
        var, mean = torch.var_mean(x.to(accumulation_dtype(x)), dim=(0, 2, 3), correction=0)
        local = torch.cat([mean.new_full((1,), count), mean, var]).double()
        local[1 + channels :] *= count  # M2 = n * biased var
    else:  # an empty local batch contributes nothing (var_mean would give NaN)
        local = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=x.device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, local, group=process_group)
    stats = torch.stack(gathered)  # (ranks, 1 + 2C) in rank order
    counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + channels], stats[:, 1 + channels :]
    total = int(counts.sum().item())
    if total <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got "
            f"{total} over all ranks (local input size {tuple(x.shape)})"
        )
    mean = (counts * means).sum(dim=0) / total
    m2 = (m2s + counts * (means - mean).square()).sum(dim=0)
    acc = accumulation_dtype(x)
    return mean.to(acc), (m2 / total).to(acc), total


class SyncTrackedBNFunction(torch.autograd.Function):
    """Autograd of synchronized tracked BN (training, batch statistics): see the module docstring.

    Saves ``x``, the parameters and the global ``(mean, invstd)``, like ``tracked_batch_norm``.
    """

    @staticmethod
    def forward(ctx, *args_and_group):
        *args, process_group = args_and_group
        a = ForwardArgs(*args)
        x, weight, bias, abri_weight, abri_bias, abri_alpha = (a.x, *parameters(a))
        momentum, eps, relu = a.momentum, a.eps, a.relu
        running_mean, running_var = a.running_mean, a.running_var
        abri_running_mean, abri_running_var = a.abri_running_mean, a.abri_running_var
        dead_count, dead_sample_count, seen = a.dead_count, a.dead_sample_count, a.seen
        mean, var, count = _global_batch_stats(x, process_group)
        update_running_stats(
            ((running_mean, running_var), (abri_running_mean, abri_running_var)),
            mean,
            var,
            count,
            momentum,
        )
        abri_stats = (mean.clone(), var.clone()) if abri_alpha is not None else (None, None)
        counting = dead_count is not None
        channels = x.shape[1]
        # This batch's counts, in one flat tensor so that a single collective sums them.
        batch_counts, batch_dead = None, (None,) * 3
        if counting:
            batch_counts = torch.zeros(2 * channels + 2, dtype=torch.long, device=x.device)
            batch_dead = batch_counts.split([channels, channels, 2])
        y, mean_rows, invstd_rows = batch_norm_fwd(
            x,
            weight,
            bias,
            abri_weight,
            abri_bias,
            abri_alpha,
            mean,
            var,
            *abri_stats,
            *batch_dead,
            False,
            0.0,
            eps,
            relu,
        )
        if counting:
            dist.all_reduce(batch_counts, group=process_group)
            for buffer, total in zip((dead_count, dead_sample_count, seen), batch_dead):
                buffer += total
        ctx.save_for_backward(
            x, weight, bias, abri_weight, abri_bias, abri_alpha, mean_rows[:1], invstd_rows[:1]
        )
        ctx.count, ctx.relu, ctx.process_group = count, relu, process_group
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # create_graph=True (docs/DESIGN.md, "Double backward")
            raise RuntimeError(
                "synchronised TrackedBN (sync=True / process_group) cannot be differentiated "
                "twice: its gradient all-reduce is not differentiable. For a gradient penalty or "
                "Hessian-vector products use TrackedBN(sync=False) (nn.SyncBatchNorm has the "
                "same limit)"
            )
        x, *params, mean, invstd = ctx.saved_tensors
        xf, dy, scale, sum_dy, sum_dy_xhat = grad_sums(grad_y, x, *params, mean, invstd, ctx.relu)
        global_sums = torch.cat([sum_dy, sum_dy_xhat[0]])
        dist.all_reduce(global_sums, group=ctx.process_group)
        global_sum_dy, global_sum_dy_xhat = global_sums.chunk(2)
        grad_x = batch_stats_grad_input(
            xf, dy, scale, mean[0], invstd[0], global_sum_dy, global_sum_dy_xhat, ctx.count
        )
        grad_x = grad_x.to(x.dtype).contiguous(memory_format=output_memory_format(x))
        grads = parameter_grads(*params, sum_dy, sum_dy_xhat[0], sum_dy_xhat[0])
        grads = [None if p is None else g for p, g in zip(params, grads)]
        # No gradient for the buffers, flags and the process group.
        return (grad_x, *grads) + (None,) * (len(ForwardArgs._fields) - len(params))


def sync_tracked_batch_norm(args: ForwardArgs, process_group=None) -> Tensor:
    """``tracked_batch_norm(*args)`` with the batch statistics, dead counts and gradients of the
    global batch over ``process_group`` (a collective: every rank calls it).

    Only for batch statistics (``args.use_batch_stats``); running statistics never need a sync.
    """
    if not args.use_batch_stats:
        raise ValueError(
            "sync_tracked_batch_norm: synchronisation only applies to batch statistics"
        )
    return SyncTrackedBNFunction.apply(*args, process_group)
