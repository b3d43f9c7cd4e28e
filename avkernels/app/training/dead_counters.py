"""The dead-output counters of a run's TrackedBN layers, per epoch: reset at its start, read
into ``metrics.jsonl`` at its end, and saved in the checkpoint so that an epoch resumed midway
counts from its first step."""

from __future__ import annotations

from torch import Tensor, nn

from avkernels.distributed import all_reduce_dead_stats
from avkernels.model_stats import counting_layers


def reset_counters(model: nn.Module) -> None:
    for bn in counting_layers(model).values():
        bn.reset_dead_stats()


def counter_state(model: nn.Module) -> dict[str, list[Tensor]]:
    """This rank's counters of the epoch so far (CPU copies, for the checkpoint)."""
    return {
        name: [bn.dead_count.cpu(), bn.dead_sample_count.cpu(), bn.seen.cpu()]
        for name, bn in counting_layers(model).items()
    }


def load_counter_state(model: nn.Module, counters: dict[str, list[Tensor]]) -> None:
    for name, bn in counting_layers(model).items():
        if name in counters:
            for buffer, value in zip(
                (bn.dead_count, bn.dead_sample_count, bn.seen), counters[name]
            ):
                buffer.copy_(value)


def epoch_dead_fractions(model: nn.Module) -> dict[str, float]:
    """Per counting layer that saw data this epoch, its dead fraction averaged over channels
    (the counters hold the epoch's training steps, summed over the ranks: a collective)."""
    all_reduce_dead_stats(model)
    return {
        name: float(bn.dead_fraction().mean())
        for name, bn in counting_layers(model).items()
        if int(bn.seen[0])
    }
