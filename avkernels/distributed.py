"""TrackedBN across processes: the process-rank helper, DDP wrapping and dead-counter reduction.

Synchronised TrackedBN (``TrackedBN(..., sync=True)``) lives with its op,
:mod:`avkernels.ops.batch_norm.sync`. Here: :class:`Ranks` (this process's place among the
training processes, with the few collectives the training loop needs), :func:`wrap_ddp` wraps a
model in ``DistributedDataParallel`` without letting DDP's buffer broadcast (rank 0's buffers
copied to every rank before each forward) overwrite the dead counters, and
:func:`all_reduce_dead_stats` sums the per-rank counters of unsynced layers over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from avkernels.nn.tracked_bn import TrackedBN

__all__ = ["DEAD_COUNTERS", "Ranks", "all_reduce_dead_stats", "dead_counter_names", "wrap_ddp"]

# TrackedBN's dead-channel counters (non-persistent int64 buffers), kept out of DDP's broadcast.
DEAD_COUNTERS = ("dead_count", "dead_sample_count", "seen")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes: ``rank`` of ``world_size``.

    :meth:`current` reads the initialised default ``torch.distributed`` group, else one process
    (0 of 1), for which every method is local and free. :meth:`gather`, :meth:`any`,
    :meth:`barrier` and :meth:`broadcast_float_buffers` are collectives: every rank calls them
    at the same point.
    """

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """This process's rank and the world size of the default group (0 of 1 without one)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that writes files and shows progress."""
        return self.rank == 0

    def shard(self, size: int) -> range:
        """This rank's contiguous share of ``range(size)``: the shares differ by at most one,
        the first ranks take the larger ones, and in rank order they make up the range."""
        base, extra = divmod(size, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable, tensors on the CPU), in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on some rank (so that all ranks take the same branch)."""
        return flag if self.world_size == 1 else any(self.gather(bool(flag)))

    def barrier(self) -> None:
        """Wait until every rank reaches this point (nothing to do in one process)."""
        if self.world_size > 1:
            dist.barrier()

    @torch.no_grad()
    def broadcast_float_buffers(self, module: nn.Module) -> None:
        """Rank 0's floating-point buffers (BN running statistics) on every rank, as DDP's
        ``broadcast_buffers`` does before each training forward; integer buffers (the per-rank
        dead counters) are left alone."""
        if self.world_size > 1:
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    dist.broadcast(buffer, 0)


def _tracked_layers(model: nn.Module):
    """``(qualified name, layer)`` of every TrackedBN in ``model``."""

    return [(name, m) for name, m in model.named_modules() if isinstance(m, TrackedBN)]


def dead_counter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of every TrackedBN dead counter in ``model``, e.g.
    ``"layer1.0.bn1.seen"``."""
    return [
        f"{name}.{counter}" if name else counter
        for name, _ in _tracked_layers(model)
        for counter in DEAD_COUNTERS
    ]


def wrap_ddp(model: nn.Module, **ddp_kwargs: object) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` that leaves TrackedBN's dead counters alone.

    DDP copies every buffer from rank 0 to the other ranks before each forward
    (``broadcast_buffers=True``, its default): the per-rank dead counters would be overwritten
    with rank 0's. They are therefore added to the names DDP ignores (keeping any already set
    on ``model``); the running statistics are broadcast as usual. Needs an initialised process
    group, like DDP itself.
    """
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    ignored.update(dead_counter_names(model))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, sorted(ignored)
    )
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


@torch.no_grad()
def all_reduce_dead_stats(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum the dead counters of every TrackedBN with ``sync=False`` over the ranks of ``group``,
    in place, so that each rank holds the global counts and ``dead_fraction()`` describes the
    union of the ranks' batches.

    A collective: every rank of ``group`` must call it at the same point, with the same model.
    Call it once per counting window (e.g. after ``reset_dead_stats()`` and an epoch, before
    reading): it sums whatever the counters hold, so a second call would count everything once
    more per rank. Layers with ``sync=True`` are left alone: their training steps already
    all-reduce their counts, in the backward's collective (their eval forwards count each
    rank's own batches, as eval never communicates). ``model`` may be the DDP wrapper or the
    wrapped module. One collective for the whole model; without an initialised process group
    it does nothing.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    counters = [
        getattr(layer, counter)
        for _, layer in _tracked_layers(model)
        if not layer.sync
        for counter in DEAD_COUNTERS
    ]
    if not counters:
        return
    flat = torch.cat(counters)
    dist.all_reduce(flat, group=group)
    for counter, total in zip(counters, flat.split([c.numel() for c in counters])):
        counter.copy_(total)
