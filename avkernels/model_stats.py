"""Model-level dead-channel statistics: what every TrackedBN of a model counted while it ran.

The counters are the ones each :class:`~avkernels.TrackedBN` keeps inside its kernels
(``dead_count``, ``dead_sample_count``, ``seen``; docs/DESIGN.md, "Dead channels") during the
user's own training or evaluation, so reading them costs no extra pass over data (unlike
:func:`avkernels.diagnose` with ``data``).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from avkernels.distributed import _tracked_layers

__all__ = ["LayerDeadStats", "counting_layers", "dead_stats", "reset_dead_stats"]


class LayerDeadStats(NamedTuple):
    """One TrackedBN's counts since its last reset."""

    dead_fraction: Tensor  # (C,) float64: outputs <= 0 (before the activation) / outputs
    dead_sample_fraction: Tensor  # (C,) float64: samples whose whole HxW map was <= 0 / samples
    elements: int  # outputs counted per channel (NaN fractions while 0)
    samples: int  # samples counted


def counting_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The TrackedBN layers of ``model`` that count dead outputs, by qualified module name
    (empty when there are none)."""
    return {name: layer for name, layer in _tracked_layers(model) if layer.track_dead}


def _required_counting_layers(model: nn.Module) -> dict[str, nn.Module]:
    layers = counting_layers(model)
    if not layers:
        raise ValueError(
            f"model ({type(model).__name__}) has no TrackedBN that counts dead channels: swap "
            "its BatchNorm2d layers with avkernels.convert(model) (track_dead=True is the "
            "default), then train or evaluate it"
        )
    return layers


def dead_stats(model: nn.Module) -> dict[str, LayerDeadStats]:
    """Per TrackedBN of ``model`` (by qualified module name, e.g. ``"layer1.0.bn1"``), the dead
    fractions its counters hold: everything it saw in train and eval since the last reset.

    With DDP, call :func:`avkernels.distributed.all_reduce_dead_stats` first for whole-batch
    figures. Raises ``ValueError`` when no TrackedBN of the model counts.
    """
    return {
        name: LayerDeadStats(
            layer.dead_fraction(),
            layer.dead_sample_fraction(),
            int(layer.seen[0]),
            int(layer.seen[1]),
        )
        for name, layer in _required_counting_layers(model).items()
    }


def reset_dead_stats(model: nn.Module) -> None:
    """Zero the dead counters of every TrackedBN of ``model`` (e.g. at the start of an epoch).

    Raises ``ValueError`` when no TrackedBN of the model counts.
    """
    for layer in _required_counting_layers(model).values():
        layer.reset_dead_stats()
