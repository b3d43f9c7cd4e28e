"""The masking ops' user-facing arguments: per-sample ratios, per-row seeds, patch and group
sizes, normalised and checked before any kernel runs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from avkernels.ops.masking.reference import SEED_HIGH


def draw_seeds(shape: Sequence[int], device: torch.device, seed: int | None = None) -> Tensor:
    """Per-row int64 seeds: from torch's default generator of ``device`` (so
    ``torch.manual_seed`` reproduces them), or from a generator seeded with ``seed``."""
    if seed is None:
        return torch.randint(0, SEED_HIGH, tuple(shape), device=device)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, SEED_HIGH, tuple(shape), generator=generator).to(device)


def per_sample_ratio(
    ratio: float | Tensor, batch: int, device: torch.device, name: str = "ratio"
) -> Tensor:
    """``ratio`` as a (batch,) float64 tensor on ``device``; a float applies to every sample."""
    if isinstance(ratio, Tensor):
        if ratio.dim() == 0:
            ratio = ratio.expand(batch)
        if ratio.shape != (batch,):
            raise ValueError(
                f"{name} must be a float or a tensor of shape ({batch},) (one ratio per sample), "
                f"got shape {tuple(ratio.shape)}"
            )
        if not ratio.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {ratio.dtype}")
        # NaN compares false: it would mask nothing, silently. A CPU tensor is checked here; a
        # device tensor by an asynchronous device-side assert, so the check costs no host sync.
        nan_message = f"{name} holds NaN; ratios are numbers (<= 0 masks nothing)"
        if ratio.device.type != "cpu":
            torch._assert_async(~torch.isnan(ratio).any(), nan_message)
        elif not torch.compiler.is_compiling() and torch.isnan(ratio).any():
            raise ValueError(nan_message)
        return ratio.to(device=device, dtype=torch.float64)
    if math.isnan(float(ratio)):
        raise ValueError(f"{name} is NaN; ratios are numbers (<= 0 masks nothing)")
    return torch.full((batch,), float(ratio), dtype=torch.float64, device=device)


def positive_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``value`` as a pair of positive ints (one int stands for both)."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def frame_seeds(
    seed: None | int | Tensor, batch: int, num_frames: int, device: torch.device
) -> Tensor:
    if not isinstance(seed, Tensor):
        return draw_seeds((batch, num_frames), device, seed)
    if seed.dtype != torch.int64 or seed.shape not in ((batch,), (batch, num_frames)):
        raise ValueError(
            f"mask_patches: a seed tensor must be int64 of shape ({batch},) or ({batch}, "
            f"{num_frames}) (one seed per sample or per frame), got {describe(seed)}"
        )
    if seed.dim() == 1:
        if num_frames != 1:
            raise ValueError(
                f"mask_patches: x has {num_frames} frames per sample, so seed must have shape "
                f"({batch}, {num_frames}): one seed per frame"
            )
        seed = seed[:, None]
    return seed.to(device).contiguous()


def describe(value) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
