"""Triton kernels and launchers of the masking ops (CUDA): ``zero_masked_patches``,
``masked_concat`` and ``masked_concat_backward``.

The launchers take exactly the arguments of the op schemas in :mod:`avkernels.ops.masking` and
reproduce the references there bit for bit (the mask is integer arithmetic, masking is a copy
or a zero); they are registered as the ops' CUDA kernels by ``masking._register_triton``.

Shared device functions (the mask, one copy for both kernels): :func:`_mix32`,
:func:`_round_keys`, :func:`_group_key`, :func:`_masked_count` and :func:`_kth_smallest_key`,
which finds the ``k``-th smallest of a row's distinct keys with a 32-step bitwise binary search
(each step counts the keys below a candidate), so the row is masked by ``key <= kth`` without
sorting or storing anything. Every program recomputes its row's ``kth`` (a few thousand integer
operations) instead of reading it from another launch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from avkernels.ops.masking import ROUND_MIX, SEED_MIX, patch_grid

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_BLOCK_GROUPS = 1024  # keys counted per step of the binary search
_MAX_BLOCK_PIXELS = 2048  # plane positions per patch program
_MAX_BLOCK_FEATURES = 1024  # features per step of a fusion row
_SEED_MIX = tl.constexpr(SEED_MIX)
_ROUND_MIX = tl.constexpr(ROUND_MIX)


# --- the mask (see avkernels/ops/masking.py for the definition) ---------------------------------


@triton.jit
def _mix32(x):
    """lowbias32 of a uint32 tensor (wrapping uint32 arithmetic)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _round_keys(seed):
    """uint32 round keys (k0, k1) of an int64 seed."""
    low = (seed & 0xFFFFFFFF).to(tl.uint32)
    high = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k0 = _mix32(low ^ _mix32(high ^ _SEED_MIX))
    return k0, _mix32(k0 ^ _ROUND_MIX)


@triton.jit
def _group_key(group, k0, k1):
    """uint32 key of each group index (a bijection of the index: no ties within a row)."""
    return _mix32(_mix32(group.to(tl.uint32) ^ k0) ^ k1)


@triton.jit
def _masked_count(ratio, num_groups):
    """floor(min(max(ratio, 0) * P, P)) of a float64 ratio as int32 (NaN counts as 0)."""
    ratio = tl.where(ratio > 0, ratio, 0.0)
    return tl.minimum(ratio * num_groups, num_groups.to(tl.float64)).to(tl.int32)


@triton.jit
def _kth_smallest_key(k0, k1, count, num_groups, BLOCK_GROUPS: tl.constexpr):
    """The count-th smallest key (1-based) of groups 0..num_groups-1, for count >= 1.

    Builds the answer from the top bit down: a bit is set when fewer than ``count`` keys lie
    below the answer with that bit set. The keys are recomputed at each step (no storage).
    """
    kth = tl.zeros((), dtype=tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        candidate = kth | (1 << bit)
        below = tl.zeros((), dtype=tl.int32)
        for start in range(0, num_groups, BLOCK_GROUPS):
            groups = start + tl.arange(0, BLOCK_GROUPS)
            keys = _group_key(groups, k0, k1)
            below += tl.sum(((keys < candidate) & (groups < num_groups)).to(tl.int32), axis=0)
        kth = tl.where(below < count, candidate, kth)
    return kth


# --- patches: zero in place ---------------------------------------------------------------------


@triton.jit
def _zero_masked_patches_kernel(
    x_ptr,  # x (B, C, T, H, W), any strides: the masked patches are zeroed in place
    ratio_ptr,  # float64 (B,): mask ratio of each sample
    seed_ptr,  # int64 (B, T) contiguous: seed of each frame
    channels, frames, height, width,  # C, T, H, W
    stride_b, stride_c, stride_t, stride_h, stride_w,  # strides of x, in elements
    patch_h, patch_w,  # patch size
    grid_h, grid_w,  # whole patches along H and W (P = grid_h * grid_w)
    BLOCK_PIXELS: tl.constexpr,  # plane positions per program
    BLOCK_GROUPS: tl.constexpr,  # keys per binary-search step
):
    # grid: (B * T, cdiv(H * W, BLOCK_PIXELS)); program (row, chunk) zeroes the masked pixels
    # among BLOCK_PIXELS positions of frame row = b * T + t, in every channel. Only masked
    # pixels are written; a row with no masked patch returns at once.
    row = tl.program_id(0)
    sample = row // frames
    num_groups = grid_h * grid_w
    count = _masked_count(tl.load(ratio_ptr + sample), num_groups)
    if count > 0:
        k0, k1 = _round_keys(tl.load(seed_ptr + row))
        kth = _kth_smallest_key(k0, k1, count, num_groups, BLOCK_GROUPS)
        pixel = tl.program_id(1) * BLOCK_PIXELS + tl.arange(0, BLOCK_PIXELS)
        h = pixel // width
        w = pixel % width
        patch = (h // patch_h) * grid_w + w // patch_w
        masked = ((pixel < height * width) & (h < grid_h * patch_h) & (w < grid_w * patch_w)
                  & (_group_key(patch, k0, k1) <= kth))
        pointers = (x_ptr + sample.to(tl.int64) * stride_b + (row % frames).to(tl.int64) * stride_t
                    + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w)
        zeros = tl.zeros((BLOCK_PIXELS,), dtype=x_ptr.dtype.element_ty)
        for channel in range(0, channels):
            tl.store(pointers + channel * stride_c, zeros, mask=masked)


def zero_masked_patches(x: Tensor, ratio: Tensor, seeds: Tensor, patch_h: int,
                        patch_w: int) -> None:
    _check_dtype(x)
    batch, channels, frames, height, width = x.shape
    grid_h, grid_w = patch_grid(height, width, patch_h, patch_w)
    pixels, num_groups = height * width, grid_h * grid_w
    if x.numel() == 0 or num_groups == 0:
        return
    block_pixels = min(triton.next_power_of_2(pixels), _MAX_BLOCK_PIXELS)
    grid = (batch * frames, triton.cdiv(pixels, block_pixels))
    _zero_masked_patches_kernel[grid](
        x, _checked_ratio(ratio), seeds.contiguous(), channels, frames, height, width, *x.stride(),
        patch_h, patch_w, grid_h, grid_w, BLOCK_PIXELS=block_pixels,
        BLOCK_GROUPS=_block_groups(num_groups))


# --- fusion: masked copy of two feature rows (forward: into the concat; backward: out of it) ----


@triton.jit
def _masked_copy_row(
    src_ptr, dst_ptr,  # the row's first feature in source and destination (contiguous features)
    ratio_ptr, row, seed,  # ratios (B,) float64, this row's index and int64 seed
    features, group,  # row length; features per group (the remainder is never masked)
    HAS_RATIO: tl.constexpr,  # False: the modality is not masked (ratio_ptr unused)
    BLOCK_FEATURES: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    num_groups = features // group
    count = tl.zeros((), dtype=tl.int32)
    if HAS_RATIO:
        count = _masked_count(tl.load(ratio_ptr + row), num_groups)
    k0, k1 = _round_keys(seed)
    kth = tl.zeros((), dtype=tl.uint32)
    if count > 0:
        kth = _kth_smallest_key(k0, k1, count, num_groups, BLOCK_GROUPS)
    for start in range(0, features, BLOCK_FEATURES):
        feature = start + tl.arange(0, BLOCK_FEATURES)
        inside = feature < features
        values = tl.load(src_ptr + feature, mask=inside, other=0)
        if count > 0:  # unmasked rows skip the keys
            groups = feature // group
            masked = (groups < num_groups) & (_group_key(groups, k0, k1) <= kth)
            values = tl.where(masked, tl.zeros_like(values), values)
        tl.store(dst_ptr + feature, values, mask=inside)


@triton.jit
def _masked_copy_pair_kernel(
    src_a_ptr, src_v_ptr,  # source rows of the two modalities (contiguous features)
    dst_a_ptr, dst_v_ptr,  # destination rows (contiguous features)
    src_a_stride, src_v_stride, dst_a_stride, dst_v_stride,  # row strides, in elements
    ratio_a_ptr, ratio_v_ptr,  # float64 (B,) mask ratios (unused when HAS_RATIO_* is False)
    seed_ptr,  # int64 (B, 2) contiguous: column 0 seeds modality a, column 1 modality v
    features_a, features_v, group_a, group_v,  # row lengths and group sizes
    HAS_RATIO_A: tl.constexpr, HAS_RATIO_V: tl.constexpr,
    BLOCK_FEATURES: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
):
    # grid: (B, 2); program (b, m) copies row b of modality m (0: a, 1: v) with its mask.
    row = tl.program_id(0)
    modality = tl.program_id(1)
    seed = tl.load(seed_ptr + row * 2 + modality)
    row64 = row.to(tl.int64)
    if modality == 0:
        _masked_copy_row(src_a_ptr + row64 * src_a_stride, dst_a_ptr + row64 * dst_a_stride,
                         ratio_a_ptr, row, seed, features_a, group_a, HAS_RATIO_A,
                         BLOCK_FEATURES, BLOCK_GROUPS)
    else:
        _masked_copy_row(src_v_ptr + row64 * src_v_stride, dst_v_ptr + row64 * dst_v_stride,
                         ratio_v_ptr, row, seed, features_v, group_v, HAS_RATIO_V,
                         BLOCK_FEATURES, BLOCK_GROUPS)


def _masked_copy_pair(src_a: Tensor, src_v: Tensor, dst_a: Tensor, dst_v: Tensor,
                      ratio_a: Optional[Tensor], ratio_v: Optional[Tensor], seeds: Tensor,
                      group_a: int, group_v: int) -> None:
    """dst_m = mask_m * src_m for both modalities; every row must have unit feature stride."""
    batch, features_a = src_a.shape
    features_v = src_v.shape[1]
    if batch == 0:
        return
    seeds = seeds.contiguous()
    groups = max(features_a // group_a, features_v // group_v, 1)
    _masked_copy_pair_kernel[(batch, 2)](
        src_a, src_v, dst_a, dst_v, src_a.stride(0), src_v.stride(0), dst_a.stride(0),
        dst_v.stride(0), _ratio_or(ratio_a, seeds), _ratio_or(ratio_v, seeds), seeds,
        features_a, features_v, group_a, group_v,
        HAS_RATIO_A=ratio_a is not None, HAS_RATIO_V=ratio_v is not None,
        BLOCK_FEATURES=min(triton.next_power_of_2(max(features_a, features_v, 1)),
                           _MAX_BLOCK_FEATURES),
        BLOCK_GROUPS=_block_groups(groups))


def masked_concat(a: Tensor, v: Tensor, ratio_a: Optional[Tensor], ratio_v: Optional[Tensor],
                  seeds: Tensor, group_a: int, group_v: int) -> Tensor:
    _check_dtype(a)
    a, v = a.contiguous(), v.contiguous()
    features_a = a.shape[1]
    out = a.new_empty((a.shape[0], features_a + v.shape[1]))
    _masked_copy_pair(a, v, out[:, :features_a], out[:, features_a:], ratio_a, ratio_v, seeds,
                      group_a, group_v)
    return out


def masked_concat_backward(grad: Tensor, ratio_a: Optional[Tensor], ratio_v: Optional[Tensor],
                           seeds: Tensor, features_a: int, group_a: int,
                           group_v: int) -> tuple[Tensor, Tensor]:
    _check_dtype(grad)
    grad = grad.contiguous()
    grad_a = grad.new_empty((grad.shape[0], features_a))
    grad_v = grad.new_empty((grad.shape[0], grad.shape[1] - features_a))
    _masked_copy_pair(grad[:, :features_a], grad[:, features_a:], grad_a, grad_v, ratio_a,
                      ratio_v, seeds, group_a, group_v)
    return grad_a, grad_v


# --- helpers ------------------------------------------------------------------------------------


def _block_groups(num_groups: int) -> int:
    return min(triton.next_power_of_2(max(num_groups, 1)), _MAX_BLOCK_GROUPS)


def _ratio_or(ratio: Optional[Tensor], placeholder: Tensor) -> Tensor:
    """The ratio tensor, or any tensor as a pointer the kernel never reads."""
    return placeholder if ratio is None else _checked_ratio(ratio)


def _checked_ratio(ratio: Tensor) -> Tensor:
    if ratio.dtype != torch.float64:
        raise TypeError(f"avkernels masking: ratios must be float64 (the count floor(P * ratio) "
                        f"is defined in float64), got {ratio.dtype}")
    return ratio.contiguous()


def _check_dtype(x: Tensor) -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"avkernels masking: unsupported dtype {x.dtype}; expected one of "
                        f"{[str(d) for d in _SUPPORTED_DTYPES]}")
