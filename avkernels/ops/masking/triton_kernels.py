"""Triton kernels of the masking ops (CUDA): ``zero_masked_patches``, ``masked_concat`` and
``masked_concat_backward``; launched by :mod:`avkernels.ops.masking.triton_launch`.

The kernels reproduce :mod:`avkernels.ops.masking.reference` bit for bit (the mask is integer
arithmetic, masking is a copy or a zero).

Shared device functions (the mask, one copy for both kernels): :func:`_mix32`,
:func:`_round_keys`, :func:`_group_key`, :func:`_masked_count` and :func:`_kth_smallest_key`,
which finds the ``k``-th smallest of a row's distinct keys with a 32-step bitwise binary search
(each step counts the keys below a candidate), so the row is masked by ``key <= kth`` without
sorting or storing anything. Every program recomputes its row's ``kth`` (a few thousand integer
operations) instead of reading it from another launch.
"""

import triton
import triton.language as tl

from avkernels.ops.masking.reference import ROUND_MIX, SEED_MIX

_SEED_MIX = tl.constexpr(SEED_MIX)
_ROUND_MIX = tl.constexpr(ROUND_MIX)


# --- the mask (defined in avkernels/ops/masking/reference.py) ---------------------------------


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
def zero_masked_patches_kernel(
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
            # int64: channel * stride_c passes 2**31 on large inputs although both factors fit.
            tl.store(pointers + tl.cast(channel, tl.int64) * stride_c, zeros, mask=masked)


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
def masked_copy_pair_kernel(
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
