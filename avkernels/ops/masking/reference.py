"""Per-sample exact-count masking of patches and feature groups (FusT stage 2; docs/DESIGN.md,
"Fusion Tuning (FusT)"): the mask's definition and the plain-PyTorch reference of the ops.

One mechanism serves every caller: a row (a sample, or one frame of a sample) with mask ratio
``r`` over ``P`` groups (whole patches of an image plane, or runs of features) has exactly
``k = floor(P * r)`` groups zeroed, chosen uniformly without replacement by a counter-based
generator keyed by the row's int64 seed. Nothing is stored: every pass (forward, backward, any
implementation) regenerates the same mask from ``(seed, ratio)``.

The mask, bit for bit the same in every implementation (C++ ``csrc/ops/cpu/masking_kernel.cpp``,
Triton :mod:`.triton_kernels`, the PyTorch reference here):

* ``mix32`` is the ``lowbias32`` integer hash (C. Wellons' hash-prospector), a bijection of
  32-bit integers; all arithmetic is modulo 2**32.
* Round keys of a seed: ``lo, hi`` = low and high 32 bits of the seed (two's complement),
  ``k0 = mix32(lo ^ mix32(hi ^ 0x9E3779B9))``, ``k1 = mix32(k0 ^ 0x85EBCA6B)``.
* Key of group ``g``: ``mix32(mix32(g ^ k0) ^ k1)``. Being a bijection of ``g``, it never
  ties within a row, so "the ``k`` groups with the smallest keys" is one well-defined set that
  any selection algorithm finds (a sort here, ``nth_element`` in C++, a bitwise binary search
  for the ``k``-th smallest key in Triton).
* ``k = floor(min(max(r, 0) * P, P))`` in float64 (NaN counts as 0): the official
  ``int(P * ratio)``; a ratio <= 0 masks nothing, a ratio >= 1 masks every group.

Patch geometry (the official loaders'): patches of ``patch_h x patch_w`` tile the last two
dims from the origin, ``P = (H // patch_h) * (W // patch_w)`` numbered row-major; a remainder
strip is never masked; leading channel dims share the patches. Feature groups are the same
with ``H = 1``: ``features // group`` runs of ``group`` features, a remainder never masked.
"""

from __future__ import annotations

import torch
from torch import Tensor

UINT32_MASK = 0xFFFFFFFF
MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)  # lowbias32
SEED_MIX = 0x9E3779B9  # 2**32 / golden ratio: keeps mix32(hi ^ SEED_MIX) away from mix32(0) = 0
ROUND_MIX = 0x85EBCA6B  # makes k1 differ from mix32(k0), which would give group 0 the key 0
SEED_HIGH = 2**63 - 1  # per-row seeds are drawn uniformly from [0, SEED_HIGH)


# --- the mask, in PyTorch (the reference every implementation must equal bit for bit) ----------


def _mul32(x: Tensor, multiplier: int) -> Tensor:
    """``x * multiplier mod 2**32`` for int64 tensors of uint32 values, without int64 overflow."""
    low = (x & 0xFFFF) * multiplier
    high = (((x >> 16) * multiplier) & 0xFFFF) << 16
    return (low + high) & UINT32_MASK


def mix32(x: Tensor) -> Tensor:
    """lowbias32 hash of an int64 tensor holding uint32 values (a bijection of [0, 2**32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_MULTIPLIERS[1])
    return x ^ (x >> 16)


def round_keys(seeds: Tensor) -> tuple[Tensor, Tensor]:
    """The two 32-bit round keys ``(k0, k1)`` of each int64 seed."""
    low, high = seeds & UINT32_MASK, (seeds >> 32) & UINT32_MASK
    k0 = mix32(low ^ mix32(high ^ SEED_MIX))
    return k0, mix32(k0 ^ ROUND_MIX)


def group_keys(seeds: Tensor, num_groups: int) -> Tensor:
    """Keys (*seeds.shape, num_groups), int64 holding uint32, distinct within each row."""
    k0, k1 = round_keys(seeds.long())
    groups = torch.arange(num_groups, device=seeds.device)
    return mix32(mix32(groups ^ k0[..., None]) ^ k1[..., None])


def masked_count(ratio: Tensor, num_groups: int) -> Tensor:
    """``floor(min(max(r, 0) * P, P))`` per ratio, as int64; NaN counts as 0."""
    ratio = ratio.double()
    ratio = torch.where(ratio > 0, ratio, 0.0)
    return torch.clamp_max(ratio * num_groups, num_groups).long()


def group_mask(ratio: Tensor, seeds: Tensor, num_groups: int) -> Tensor:
    """Bool (*seeds.shape, num_groups): the masked groups of every row.

    ``ratio`` broadcasts against ``seeds`` (e.g. (B, 1) ratios for (B, T) frame seeds).
    """
    keys = group_keys(seeds, num_groups)
    count = masked_count(ratio, num_groups).expand(seeds.shape)[..., None]
    kth_smallest = keys.sort(dim=-1).values.gather(-1, (count - 1).clamp_min(0))
    return (keys <= kth_smallest) & (count > 0)


def patch_grid(height: int, width: int, patch_h: int, patch_w: int) -> tuple[int, int]:
    """Whole patches along H and W (the remainder strip is never masked)."""
    return height // patch_h, width // patch_w


def _expand_groups(mask: Tensor, size: int, group: int, dim: int) -> Tensor:
    """Per-group mask -> per-element mask along ``dim`` of length ``size`` (remainder False)."""
    elements = mask.repeat_interleave(group, dim=dim)
    remainder = size - elements.shape[dim]
    if remainder:
        pad_shape = list(elements.shape)
        pad_shape[dim] = remainder
        elements = torch.cat([elements, elements.new_zeros(pad_shape)], dim=dim)
    return elements


def patch_mask(
    ratio: Tensor, seeds: Tensor, height: int, width: int, patch_h: int, patch_w: int
) -> Tensor:
    """Bool (B, T, H, W): the masked pixels of every frame (shared by all channels)."""
    grid_h, grid_w = patch_grid(height, width, patch_h, patch_w)
    mask = group_mask(ratio[:, None], seeds, grid_h * grid_w).view(*seeds.shape, grid_h, grid_w)
    return _expand_groups(_expand_groups(mask, height, patch_h, 2), width, patch_w, 3)


def feature_mask(ratio: Tensor | None, seeds: Tensor, features: int, group: int) -> Tensor:
    """Bool (B, features): the masked features of every sample (none when ``ratio`` is None)."""
    if ratio is None:
        return torch.zeros(seeds.shape[0], features, dtype=torch.bool, device=seeds.device)
    return _expand_groups(group_mask(ratio, seeds, features // group), features, group, 1)


def zero_masked_patches_reference(
    x: Tensor, ratio: Tensor, seeds: Tensor, patch_h: int, patch_w: int
) -> None:
    height, width = x.shape[-2:]
    x.masked_fill_(patch_mask(ratio, seeds, height, width, patch_h, patch_w)[:, None], 0)


def masked_concat_reference(
    a: Tensor,
    v: Tensor,
    ratio_a: Tensor | None,
    ratio_v: Tensor | None,
    seeds: Tensor,
    group_a: int,
    group_v: int,
) -> Tensor:
    mask_a = feature_mask(ratio_a, seeds[:, 0], a.shape[1], group_a)
    mask_v = feature_mask(ratio_v, seeds[:, 1], v.shape[1], group_v)
    return torch.cat([a.masked_fill(mask_a, 0), v.masked_fill(mask_v, 0)], dim=1)


def masked_concat_backward_reference(
    grad: Tensor,
    ratio_a: Tensor | None,
    ratio_v: Tensor | None,
    seeds: Tensor,
    features_a: int,
    group_a: int,
    group_v: int,
) -> tuple[Tensor, Tensor]:
    grad_a, grad_v = grad[:, :features_a], grad[:, features_a:]
    mask_a = feature_mask(ratio_a, seeds[:, 0], features_a, group_a)
    mask_v = feature_mask(ratio_v, seeds[:, 1], grad_v.shape[1], group_v)
    return (grad_a.masked_fill(mask_a, 0).contiguous(), grad_v.masked_fill(mask_v, 0).contiguous())
