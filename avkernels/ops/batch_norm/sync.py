"""Synchronised tracked batch norm: the statistics, dead counts and gradients of the global
batch over a process group.

Synchronized TrackedBN (``TrackedBN(..., sync=True)``, :func:`sync_tracked_batch_norm`) follows
the protocol of ``nn.SyncBatchNorm``: in a training forward every rank computes per-channel
``(count, mean, M2)`` of its own batch, the ranks all-gather them, and each merges them into the
statistics of the global batch; in backward the two per-channel sums ``S1 = sum(dy)`` and
``S2 = sum(dy * xhat)`` are all-reduced so that ``dx`` is the gradient of the global-batch BN.
Design choices (docs/DESIGN.md, "PyTorch conventions"):

* The op is split the way ATen splits ``nn.SyncBatchNorm`` (``batch_norm_stats``,
  ``..._gather_stats_with_counts``, ``..._elemt``, ``..._backward_reduce``,
  ``..._backward_elemt``), and every part runs the kernels of the local op (C++ on CPU, Triton on
  CUDA): ``batch_norm_stats`` (the training forward's statistics pass), the merge (a few
  C-sized PyTorch ops), ``batch_norm_fwd`` in its running-statistics mode fed the global
  ``(mean, biased var)`` as the running set (both sets for ABRi, whose two BNs share the batch
  statistics), ``batch_norm_bwd_reduce`` (the backward's sums pass) and ``batch_norm_bwd_elemt``
  (its grad_x pass, fed the global sums over the global count).
* One collective per layer and direction. Forward: an all-gather of one float64 vector
  ``[count, mean (C), M2 (C)]`` per rank; counts stay exact (float64 holds integers below
  2**53) and the merge is the parallel-variance (Chan) decomposition evaluated with the global
  mean, ``mean = sum(n_r mean_r) / n``, ``M2 = sum(M2_r + n_r (mean_r - mean)**2)``, summed
  over ranks in rank order, so every rank gets bitwise the same result. Ranks may hold
  different batch sizes, zero included. Backward: an all-reduce of one float64 vector
  ``[S1 (C), S2 (C), dead counts (2C + 2)]``: the dead counts of a training forward depend on
  the global statistics, so they are known only after the forward's collective, and travel with
  the backward's. After ``backward()`` every rank holds the same, global counts, so
  ``dead_fraction()`` needs no communication. A synced training forward that autograd does not
  record (``torch.no_grad()``, frozen layer and input) has no backward: it all-reduces its dead
  counts at once (a second collective). A recorded forward whose backward never runs (a graph
  discarded without ``backward()``) does not count its batch.
* No host synchronisation: the global count stays on the device (the running variance's
  ``n / (n - 1)`` and the gradient means use it there). Only a rank whose own batch has at most
  one value per channel reads the global total, to raise as ``nn.BatchNorm2d`` does when the
  global batch has one.
* Parameter gradients come from the local sums: DDP averages parameter gradients over ranks
  itself, as with ``nn.SyncBatchNorm``. Eval forwards never communicate. The sync path is not
  written for ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from avkernels.ops.batch_norm.definition import (
    batch_norm_bwd_elemt,
    batch_norm_bwd_reduce,
    batch_norm_fwd,
    batch_norm_stats,
)
from avkernels.ops.batch_norm.reference import parameters, update_running_stats
from avkernels.ops.batch_norm.schema import ForwardArgs, accumulation_dtype


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


def _merge_rank_stats(x: Tensor, process_group) -> tuple[Tensor, Tensor, Tensor, bool]:
    """``(mean, biased var)`` per channel of the batch of every rank, in ``x``'s accumulation
    dtype, the global number of elements per channel (a float64 0-d tensor, exact below 2**53),
    and whether that global batch is empty (then the statistics are NaN): one all-gather of each
    rank's ``[count, mean, M2]``, merged on the device."""
    n, channels, h, w = x.shape
    count = n * h * w
    if count:
        mean, var = batch_norm_stats(x)
        exact_count = torch.full((1,), count, dtype=torch.float64, device=x.device)
        local = torch.cat([exact_count, mean.double(), var.double() * count])  # M2 = n * var
    else:  # an empty local batch contributes nothing (its statistics are NaN)
        local = torch.zeros(1 + 2 * channels, dtype=torch.float64, device=x.device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, local, group=process_group)
    stats = torch.stack(gathered)  # (ranks, 1 + 2C) in rank order
    counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + channels], stats[:, 1 + channels :]
    total = counts.sum()
    # More than one local value makes the global batch valid: only a rank with at most one
    # value asks for the total, the one host synchronisation, and only in that rare case (then
    # every rank has at most one, so all of them read it and agree).
    empty = False
    if count <= 1:
        values = int(total.item())
        if values == 1:
            raise ValueError(
                "Expected more than 1 value per channel when training, got 1 over all ranks "
                f"(local input size {tuple(x.shape)})"
            )
        empty = values == 0  # as nn.BatchNorm2d: an empty output, the running statistics kept
    mean = (counts * means).sum(dim=0) / total
    m2 = (m2s + counts * (means - mean).square()).sum(dim=0)
    acc = accumulation_dtype(x)
    return mean.to(acc), (m2 / total).to(acc), total, empty


def will_backward(args: ForwardArgs) -> bool:
    """Whether autograd records this call, so that a backward (and its collective) may follow."""
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (args.x, *parameters(args))
    )


class SyncTrackedBNFunction(torch.autograd.Function):
    """Autograd of synchronized tracked BN (training, batch statistics): see the module docstring.

    Saves ``x``, the parameters, the global ``(mean, invstd)`` (like ``tracked_batch_norm``) and
    the global element count; the dead counts of the batch wait in ``ctx`` for the backward.
    """

    @staticmethod
    def forward(ctx, *args_and_group):
        *args, backward_follows, process_group = args_and_group
        a = ForwardArgs(*args)
        x, weight, bias, abri_weight, abri_bias, abri_alpha = (a.x, *parameters(a))
        mean, var, count, empty = _merge_rank_stats(x, process_group)
        if not empty:
            update_running_stats(
                ((a.running_mean, a.running_var), (a.abri_running_mean, a.abri_running_var)),
                mean,
                var,
                count,
                a.momentum,
            )
        abri_stats = (mean.clone(), var.clone()) if abri_alpha is not None else (None, None)
        counters = (a.dead_count, a.dead_sample_count, a.seen)
        channels = x.shape[1]
        # This batch's counts, in one flat tensor so that a single collective sums them.
        batch_counts, batch_dead = None, (None,) * 3
        if a.dead_count is not None:
            batch_counts = torch.zeros(2 * channels + 2, dtype=torch.long, device=x.device)
            batch_dead = _counter_parts(batch_counts, channels)
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
            a.eps,
            a.relu,
        )
        ctx.pending_counts = None
        if batch_counts is not None:
            if backward_follows:  # the backward's collective carries them
                ctx.pending_counts, ctx.counters = batch_counts, counters
            else:
                dist.all_reduce(batch_counts, group=process_group)
                _add_counts(counters, batch_counts, channels)
        ctx.save_for_backward(
            x,
            weight,
            bias,
            abri_weight,
            abri_bias,
            abri_alpha,
            mean_rows[:1],
            invstd_rows[:1],
            count,
        )
        ctx.relu, ctx.process_group = a.relu, process_group
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
        x, *params, mean, invstd, count = ctx.saved_tensors
        sums, *grads = batch_norm_bwd_reduce(grad_y, x, *params, mean, invstd, ctx.relu)
        # One collective: the gradient sums and this step's dead counts (exact in float64).
        carried = [sums.flatten().double()]
        if ctx.pending_counts is not None:
            carried.append(ctx.pending_counts.double())
        buffer = torch.cat(carried)
        dist.all_reduce(buffer, group=ctx.process_group)
        channels = x.shape[1]
        if ctx.pending_counts is not None:
            _add_counts(ctx.counters, buffer[2 * channels :].round().long(), channels)
            ctx.pending_counts = None
        grad_x = None
        if ctx.needs_input_grad[0]:  # else (a data input) the collective was for the others
            grad_means = (buffer[: 2 * channels].view(2, channels) / count).to(sums.dtype)
            grad_x = batch_norm_bwd_elemt(grad_y, x, *params, mean, invstd, grad_means, ctx.relu)
        # Parameter gradients come from the local sums (DDP averages them over the ranks).
        grads = [None if p is None else g for p, g in zip(params, grads)]
        # No gradient for the buffers, flags, the backward flag and the process group.
        return (grad_x, *grads) + (None,) * (len(ForwardArgs._fields) - len(params) + 1)


def _counter_parts(flat: Tensor, channels: int) -> tuple[Tensor, Tensor, Tensor]:
    """``flat`` (``2C + 2`` values) as views shaped like ``(dead_count, dead_sample_count,
    seen)``: the layout in which one collective carries a batch's dead counts."""
    return flat.split([channels, channels, 2])


def _add_counts(counters: tuple, totals: Tensor, channels: int) -> None:
    """Adds ``totals`` (see :func:`_counter_parts`) to the dead counters."""
    for buffer, total in zip(counters, _counter_parts(totals, channels)):
        buffer += total


def sync_tracked_batch_norm(args: ForwardArgs, process_group=None) -> Tensor:
    """``tracked_batch_norm(*args)`` with the batch statistics, dead counts and gradients of the
    global batch over ``process_group`` (a collective: every rank calls it).

    Only for batch statistics (``args.use_batch_stats``); running statistics never need a sync.
    """
    if not args.use_batch_stats:
        raise ValueError(
            "sync_tracked_batch_norm: synchronisation only applies to batch statistics"
        )
    return SyncTrackedBNFunction.apply(*args, will_backward(args), process_group)
