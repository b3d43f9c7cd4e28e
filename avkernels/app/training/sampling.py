"""The order of the data: the epoch permutation as a function of ``(seed, epoch)`` only, each
rank's share of every batch, and the seeds of the ranks' own random streams
(:mod:`avkernels.app.training`, "Reproducibility" and "Several processes")."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from avkernels.distributed import Ranks


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that depends on ``(seed, epoch)`` only."""
    return _seed_of(np.random.SeedSequence([seed, epoch]))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends on ``(seed, epoch, index)`` only: the random augmentation of
    sample ``index`` in epoch ``epoch``, the same on whichever rank loads it."""
    return _seed_of(np.random.SeedSequence(epoch_seed(seed, epoch), spawn_key=(index,)))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random stream (masks, augmentation, worker seeds): rank 0
    keeps ``seed`` (one process is unchanged), the others get independent streams."""
    return seed if rank == 0 else _seed_of(np.random.SeedSequence(seed, spawn_key=(rank,)))


def _seed_of(sequence: np.random.SeedSequence) -> int:
    return int(sequence.generate_state(2, np.uint64)[0] >> np.uint64(1))


class EpochSampler(Sampler[int]):
    """A random permutation of the dataset that is a function of (seed, epoch), starting at a
    given batch (to resume mid-epoch without replaying the skipped samples)."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator)
        return iter(order[self.start_batch * self.batch_size :].tolist())

    def __len__(self) -> int:
        return max(0, self.size - self.start_batch * self.batch_size)


class RankBatchSampler(Sampler[list]):
    """This rank's share (:meth:`Ranks.shard`) of each batch of an :class:`EpochSampler`.

    Every rank walks the same batches, so in each step the shares of the ranks, in rank order,
    make up the batch one process would train on. A rank whose share of a short last batch is
    empty gets the batch's first sample as padding (it must still step with the others); the
    trainer weighs it 0 and does not record it (:meth:`Ranks.shard` tells which ranks pad).
    """

    def __init__(self, sampler: EpochSampler, ranks: Ranks) -> None:
        self.sampler, self.ranks = sampler, ranks

    def __iter__(self) -> Iterator[list]:
        order, size = list(self.sampler), self.sampler.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            yield [batch[i] for i in self.ranks.shard(len(batch))] or batch[:1]

    def __len__(self) -> int:
        return batches_per_epoch(len(self.sampler), self.sampler.batch_size)


def batches_per_epoch(size: int, batch_size: int) -> int:
    return math.ceil(size / batch_size)
