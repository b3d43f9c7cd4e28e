"""Triton kernels and launchers of ``avkernels::batch_norm_fwd`` / ``batch_norm_bwd`` (CUDA).

:func:`forward` and :func:`backward` take exactly the arguments of the op schemas in
:mod:`avkernels.ops.batch_norm` and reproduce ``batch_norm_fwd_reference`` /
``batch_norm_bwd_reference``; they are pure launchers (no synchronisation, no data-dependent
Python control flow), registered as the ops' CUDA kernels by ``batch_norm._register_triton``.

Addressing. ``x`` (N, C, H, W) is read through its strides as (N, C, HW): NCHW, channels_last,
other strided views and stride-0 (expanded) gradients work without copies. When every tensor of a
launch can merge H and W into one stride the kernels use ``hw * stride``; otherwise
``SPLIT_HW`` recovers (h, w) with one division. A tile is ``BLOCK_HW`` spatial positions of one
sample by ``BLOCK_C`` channels; the heuristic of :func:`_plan` lays it along the contiguous axis
(HW for NCHW, C for channels_last) so loads coalesce.

Work split (every kernel that touches the N*C*H*W elements uses the same one): grid axis 1
walks channel blocks, grid axis 0 "row programs". A row program owns either
``samples_per_program`` whole samples, or, when there are too few samples to fill the GPU, one
``hw_chunk`` of one sample (``hw_splits`` chunks per sample). Reductions over N*H*W are thus split
across row programs; their per-program partials are merged in a fixed order, so float results
are bitwise repeatable (no float atomics; integer atomics only for the dead counters).

Launches:

* training forward: partial Welford statistics -> finalize (Chan merge, mean/invstd, running
  statistics) -> normalize (affine, ABRi blend, ReLU, dead counters): 3 kernels, 3 passes over x
  and y (plus a zero-filled flag buffer when a sample's map is split across programs and dead
  counters are on);
* eval forward: normalize only (statistics from the running buffers, in-kernel): 1 kernel;
* training backward: partial sums of dy and dy*(x - mean) -> finalize (S1, S2, parameter
  gradients) -> grad_x: 3 kernels;
* eval backward: partial sums fused with grad_x = dy * scale -> finalize: 2 kernels.

A scalar ``abri_alpha`` adds one ``torch.sum`` over the C per-channel alpha gradients.
"""

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from avkernels.ops.batch_norm import accumulation_dtype, output_memory_format

_TRITON_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Heuristic constants (see _plan): elements per tile, tile extents, and how many programs per SM
# an element-wise launch aims for (enough loads in flight to saturate HBM). 1024-element tiles on
# 4 warps keep the kernels at <= 128 registers per thread on sm_90 for 16- and 32-bit input
# (float64 takes up to 168; no spills either way), as tests/test_triton_compile.py checks.
_TILE_ELEMENTS = 1024
_MAX_BLOCK_HW = 256
_MAX_BLOCK_C_CHANNELS_INNER = 64
_PROGRAMS_PER_SM = 8
# The interpreter (CPU tensors, TRITON_INTERPRET=1) runs programs one after another: few of them.
_INTERPRETER_PROGRAMS = 4
# Finalize kernels: narrow channel blocks and tall row blocks, so that even ~1000 partial rows
# take a few dependent load rounds and C = 64 still gets several programs.
_FINALIZE_BLOCK_C = 16
_FINALIZE_TILE_ELEMENTS = 4096


# --- shared device helpers -----------------------------------------------------------------------
# Float scalar arguments (eps, momentum) are annotated tl.float64 and turned into ACC scalars with
# tl.full, not tl.cast: under the interpreter tl.cast would first round a Python float to fp32.


@triton.jit
def _rsqrt(value, ACC: tl.constexpr):
    """1/sqrt(value): tl.rsqrt in fp32; in fp64 (no fast rsqrt there) the IEEE sqrt and division."""
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(value)
    else:
        return tl.rsqrt(value)


# The interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest even), so
# under it stores round explicitly; compiled kernels use the hardware conversion.
_EMULATE_BF16_ROUNDING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _store_rounded(pointers, value, mask):
    """Stores ``value`` converted to the pointers' dtype, rounding to nearest even."""
    dtype = pointers.dtype.element_ty
    if _EMULATE_BF16_ROUNDING and dtype == tl.bfloat16:
        value = value.to(tl.float32)
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))
    tl.store(pointers, value.to(dtype), mask=mask)


@triton.jit
def _tile_pointers(base_pointer, n, hw, c_offsets, W, stride_n, stride_c, stride_h, stride_w,
                   SPLIT_HW: tl.constexpr):
    """Pointers of a [BLOCK_HW, BLOCK_C] tile of sample ``n``.

    The sample offset is int64 (the tensor may exceed 2**31 elements); offsets inside one sample
    are int32 (the launcher checks they fit).
    """
    if SPLIT_HW:
        spatial = (hw // W) * stride_h + (hw % W) * stride_w
    else:
        spatial = hw * stride_w
    return (base_pointer + tl.cast(n, tl.int64) * stride_n
            + (spatial[:, None] + c_offsets[None, :] * stride_c))


@triton.jit
def _row_program_range(pid_rows, N, HW, samples_per_program, hw_splits, hw_chunk):
    """Samples [n_start, n_end) and positions [hw_start, hw_end) owned by row program pid_rows."""
    n_start = (pid_rows // hw_splits) * samples_per_program
    n_end = tl.minimum(n_start + samples_per_program, N)
    hw_start = (pid_rows % hw_splits) * hw_chunk
    hw_end = tl.minimum(hw_start + hw_chunk, HW)
    return n_start, n_end, hw_start, hw_end


@triton.jit
def _chan_merge(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
    """Chan et al. merge of two (mean, M2 = sum of squared deviations, count) summaries.

    Empty summaries (count 0) are neutral, so masked lanes can take part in a reduction.
    """
    count = count_a + count_b
    fraction_b = tl.where(count > 0, count_b / tl.maximum(count, 1), 0)
    delta = mean_b - mean_a
    mean = mean_a + delta * fraction_b
    m2 = m2_a + m2_b + delta * delta * count_a * fraction_b
    return mean, m2, count


@triton.jit
def _affine_term(c_offsets, c_mask, mean, invstd, blend, gamma_pointer, beta_pointer,
                 HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC: tl.constexpr):
    """One BN's share ``blend * (gamma * (x - mean) * invstd + beta)`` as (scale, shift)."""
    term_scale = blend * invstd
    if HAS_GAMMA:
        term_scale = term_scale * tl.load(gamma_pointer + c_offsets, mask=c_mask, other=0).to(ACC)
    term_shift = -(mean * term_scale)
    if HAS_BETA:
        term_shift = term_shift + blend * tl.load(beta_pointer + c_offsets, mask=c_mask,
                                                  other=0).to(ACC)
    return term_scale, term_shift


@triton.jit
def _load_alpha(alpha_pointer, c_offsets, c_mask, ALPHA_PER_CHANNEL: tl.constexpr,
                ACC: tl.constexpr):
    """ABRi's blend weight: a [BLOCK_C] vector, or a scalar broadcast over channels."""
    if ALPHA_PER_CHANNEL:
        return tl.load(alpha_pointer + c_offsets, mask=c_mask, other=0).to(ACC)
    else:
        return tl.load(alpha_pointer).to(ACC)


@triton.jit
def _effective_affine(c_offsets, c_mask, mean, invstd, abri_mean, abri_invstd,
                      weight_pointer, bias_pointer, abri_weight_pointer, abri_bias_pointer,
                      alpha_pointer, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_ABRI_WEIGHT: tl.constexpr, HAS_ABRI_BIAS: tl.constexpr,
                      ABRI: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (scale, shift) of the pre-activation output, as ``effective_affine``."""
    if ABRI:
        alpha = _load_alpha(alpha_pointer, c_offsets, c_mask, ALPHA_PER_CHANNEL, ACC)
        scale, shift = _affine_term(c_offsets, c_mask, mean, invstd, alpha, weight_pointer,
                                    bias_pointer, HAS_WEIGHT, HAS_BIAS, ACC)
        abri_scale, abri_shift = _affine_term(c_offsets, c_mask, abri_mean, abri_invstd, 1 - alpha,
                                              abri_weight_pointer, abri_bias_pointer,
                                              HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ACC)
        scale = scale + abri_scale
        shift = shift + abri_shift
    else:
        scale, shift = _affine_term(c_offsets, c_mask, mean, invstd, 1.0, weight_pointer,
                                    bias_pointer, HAS_WEIGHT, HAS_BIAS, ACC)
    return scale, shift


@triton.jit
def _saved_affine(mean_pointer, invstd_pointer, abri_row_offset, c_offsets, c_mask,
                  weight_pointer, bias_pointer, abri_weight_pointer, abri_bias_pointer,
                  alpha_pointer, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  HAS_ABRI_WEIGHT: tl.constexpr, HAS_ABRI_BIAS: tl.constexpr,
                  ABRI: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr, ACC: tl.constexpr):
    """The forward's saved mean and invstd (row 0), mean of row K - 1 (``abri_row_offset`` =
    (K - 1) * C), and the per-channel (scale, shift) built from both rows: what the backward
    kernels need."""
    mean = tl.load(mean_pointer + c_offsets, mask=c_mask, other=0)
    invstd = tl.load(invstd_pointer + c_offsets, mask=c_mask, other=1)
    abri_mean = tl.load(mean_pointer + abri_row_offset + c_offsets, mask=c_mask, other=0)
    abri_invstd = tl.load(invstd_pointer + abri_row_offset + c_offsets, mask=c_mask, other=1)
    scale, shift = _effective_affine(
        c_offsets, c_mask, mean, invstd, abri_mean, abri_invstd, weight_pointer, bias_pointer,
        abri_weight_pointer, abri_bias_pointer, alpha_pointer, HAS_WEIGHT, HAS_BIAS,
        HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ABRI, ALPHA_PER_CHANNEL, ACC)
    return mean, invstd, abri_mean, scale, shift


# --- forward kernels -----------------------------------------------------------------------------


@triton.jit
def _fwd_partial_stats_kernel(
    x_pointer, partial_pointer,
    N, C, HW, W,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    samples_per_program, hw_splits, hw_chunk, row_programs,
    SPLIT_HW: tl.constexpr, ACC: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-channel Welford summaries of the elements one row program owns.

    Grid: (row_programs, cdiv(C, BLOCK_C)).

    Args:
        x_pointer: Pointer to the input x, shape [N, C, H, W], addressed through the strides.
        partial_pointer: Pointer to the output partials, contiguous [3, row_programs, C] in the
            accumulation dtype: rows mean, M2 (sum of squared deviations) and element count.
        N, C, HW, W: Batch size, channels, H*W and W of x.
        x_stride_*: Strides of x; with SPLIT_HW false x_stride_w is the merged H*W stride.
        samples_per_program, hw_splits, hw_chunk: The work split (module docstring).
        row_programs: Size of grid axis 0 (rows of the partial buffer).
        SPLIT_HW: Address (h, w) separately because H and W do not merge into one stride.
        ACC: Accumulation dtype (float32, or float64 for float64 input).
        BLOCK_HW, BLOCK_C: Tile extents.
    """
    pid_rows = tl.program_id(0)
    c_offsets = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offsets < C
    n_start, n_end, hw_start, hw_end = _row_program_range(
        pid_rows, N, HW, samples_per_program, hw_splits, hw_chunk)

    # Element-wise Welford: each tile row lane keeps its own summary (its count is shared by the
    # channels), merged across lanes once at the end instead of a cross-thread reduction per tile.
    mean = tl.zeros([BLOCK_HW, BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=ACC)
    count = tl.zeros([BLOCK_HW], dtype=ACC)
    for n in range(n_start, n_end):
        for hw_tile in range(hw_start, hw_end, BLOCK_HW):
            hw = hw_tile + tl.arange(0, BLOCK_HW)
            hw_mask = hw < hw_end
            mask = hw_mask[:, None] & c_mask[None, :]
            pointers = _tile_pointers(x_pointer, n, hw, c_offsets, W, x_stride_n, x_stride_c,
                                      x_stride_h, x_stride_w, SPLIT_HW)
            x = tl.load(pointers, mask=mask, other=0).to(ACC)
            count += hw_mask.to(ACC)
            weight = tl.where(hw_mask, 1 / tl.maximum(count, 1), 0)
            delta = x - mean
            mean += delta * weight[:, None]
            m2 += tl.where(mask, delta * (x - mean), 0)

    counts = tl.broadcast_to(count[:, None], (BLOCK_HW, BLOCK_C))
    mean, m2, counts = tl.reduce((mean, m2, counts), 0, _chan_merge)
    row_size = row_programs * C
    offsets = pid_rows * C + c_offsets
    tl.store(partial_pointer + offsets, mean, mask=c_mask)
    tl.store(partial_pointer + row_size + offsets, m2, mask=c_mask)
    tl.store(partial_pointer + 2 * row_size + offsets, counts, mask=c_mask)


@triton.jit
def _fwd_finalize_kernel(
    partial_pointer, mean_pointer, invstd_pointer,
    running_mean_pointer, running_var_pointer, abri_running_mean_pointer,
    abri_running_var_pointer,
    C, row_programs,
    eps: tl.float64, momentum: tl.float64, keep: tl.float64, unbiased_momentum: tl.float64,
    UPDATE_RUNNING: tl.constexpr, UPDATE_ABRI_RUNNING: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merges the partial summaries in a fixed order into batch mean/invstd; updates running stats.

    Grid: (cdiv(C, BLOCK_C),).

    Args:
        partial_pointer: Pointer to the partials of _fwd_partial_stats_kernel,
            contiguous [3, row_programs, C].
        mean_pointer, invstd_pointer: Pointers to the outputs, contiguous [1, C], accumulation
            dtype: batch mean and 1/sqrt(biased variance + eps).
        running_mean_pointer, running_var_pointer: Pointers to the original BN's running
            statistics, [C], updated in place in their own dtype.
        abri_running_mean_pointer, abri_running_var_pointer: The same for ABRi's added BN.
        C: Number of channels.
        row_programs: Number of partial rows.
        eps: Added to the variance.
        momentum, keep: Weight of the batch statistic and of the old value (1 - momentum).
        unbiased_momentum: momentum * count / (count - 1), weight of the biased batch variance.
        UPDATE_RUNNING, UPDATE_ABRI_RUNNING: Which running sets exist.
        ACC: Accumulation dtype.
        BLOCK_R, BLOCK_C: Partial rows and channels loaded per step.
    """
    c_offsets = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offsets < C
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    count = tl.zeros([BLOCK_C], dtype=ACC)
    row_size = row_programs * C
    for row_start in range(0, row_programs, BLOCK_R):
        rows = row_start + tl.arange(0, BLOCK_R)
        mask = (rows < row_programs)[:, None] & c_mask[None, :]
        offsets = rows[:, None] * C + c_offsets[None, :]
        # Masked slots load count 0, which _chan_merge treats as empty.
        block_mean = tl.load(partial_pointer + offsets, mask=mask, other=0)
        block_m2 = tl.load(partial_pointer + row_size + offsets, mask=mask, other=0)
        block_count = tl.load(partial_pointer + 2 * row_size + offsets, mask=mask, other=0)
        block_mean, block_m2, block_count = tl.reduce((block_mean, block_m2, block_count), 0,
                                                      _chan_merge)
        mean, m2, count = _chan_merge(mean, m2, count, block_mean, block_m2, block_count)

    var = m2 / tl.where(c_mask, count, 1)  # masked lanes: no 0/0
    tl.store(mean_pointer + c_offsets, mean, mask=c_mask)
    tl.store(invstd_pointer + c_offsets, _rsqrt(var + tl.full((), eps, ACC), ACC), mask=c_mask)

    batch_mean_term = mean * tl.full((), momentum, ACC)
    batch_var_term = var * tl.full((), unbiased_momentum, ACC)
    if UPDATE_RUNNING:
        _update_running(running_mean_pointer, running_var_pointer, c_offsets, c_mask,
                        batch_mean_term, batch_var_term, tl.full((), keep, ACC), ACC)
    if UPDATE_ABRI_RUNNING:
        _update_running(abri_running_mean_pointer, abri_running_var_pointer, c_offsets, c_mask,
                        batch_mean_term, batch_var_term, tl.full((), keep, ACC), ACC)


@triton.jit
def _update_running(running_mean_pointer, running_var_pointer, c_offsets, c_mask,
                    batch_mean_term, batch_var_term, keep, ACC: tl.constexpr):
    """running = keep * running + momentum-weighted batch statistic, in the buffers' dtype."""
    running_mean = tl.load(running_mean_pointer + c_offsets, mask=c_mask, other=0).to(ACC)
    running_var = tl.load(running_var_pointer + c_offsets, mask=c_mask, other=0).to(ACC)
    running_mean = running_mean * keep + batch_mean_term
    running_var = running_var * keep + batch_var_term
    _store_rounded(running_mean_pointer + c_offsets, running_mean, c_mask)
    _store_rounded(running_var_pointer + c_offsets, running_var, c_mask)


@triton.jit
def _fwd_normalize_kernel(
    x_pointer, y_pointer, mean_pointer, invstd_pointer,
    running_mean_pointer, running_var_pointer, abri_running_mean_pointer,
    abri_running_var_pointer,
    weight_pointer, bias_pointer, abri_weight_pointer, abri_bias_pointer, alpha_pointer,
    dead_count_pointer, dead_sample_count_pointer, seen_pointer, map_alive_pointer,
    N, C, HW, W,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    y_stride_n, y_stride_c, y_stride_h, y_stride_w,
    samples_per_program, hw_splits, hw_chunk,
    eps: tl.float64,
    USE_BATCH_STATS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ABRI_WEIGHT: tl.constexpr, HAS_ABRI_BIAS: tl.constexpr, ABRI: tl.constexpr,
    ALPHA_PER_CHANNEL: tl.constexpr, RELU: tl.constexpr, COUNT_DEAD: tl.constexpr,
    MAP_SPLIT: tl.constexpr, SPLIT_HW: tl.constexpr, ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = [ReLU](x * scale + shift) with the per-channel ABRi-blended affine; dead counters.

    Grid: (row_programs, cdiv(C, BLOCK_C)).

    Args:
        x_pointer: Pointer to the input x, shape [N, C, H, W], addressed through the strides.
        y_pointer: Pointer to the output y, same shape, addressed through its strides.
        mean_pointer, invstd_pointer: Pointers to [K, C] contiguous statistics, accumulation
            dtype. With batch statistics (K = 1) they are read (written by the finalize kernel);
            with running statistics they are written here (K = 2 for ABRi: row 1 is the added
            BN's set) by the programs of grid row 0.
        running_mean_pointer, running_var_pointer: Pointers to the original BN's running
            statistics, [C] (read in eval only).
        abri_running_mean_pointer, abri_running_var_pointer: The same for ABRi's added BN.
        weight_pointer, bias_pointer: Pointers to the original BN's affine parameters, [C].
        abri_weight_pointer, abri_bias_pointer: Pointers to the added BN's parameters, [C].
        alpha_pointer: Pointer to ABRi's blend weight, [C] or [1].
        dead_count_pointer: Pointer to int64 [C]: += outputs <= 0 before the activation.
        dead_sample_count_pointer: Pointer to int64 [C]: += samples whose whole map is <= 0.
        seen_pointer: Pointer to int64 [2]: += [N*H*W, N] (by program (0, 0)).
        map_alive_pointer: Pointer to a zero-filled int32 [N, C] scratch, one flag per map
            ("some output > 0 seen"); used only when MAP_SPLIT.
        N, C, HW, W: Batch size, channels, H*W and W of x.
        x_stride_*, y_stride_*: Strides; with SPLIT_HW false *_stride_w is the merged H*W stride.
        samples_per_program, hw_splits, hw_chunk: The work split (module docstring).
        eps: Added to the running variance (eval).
        USE_BATCH_STATS: Normalise with the finalized batch statistics, else the running ones.
        HAS_*: Which optional parameters exist (absent gamma/beta mean 1/0).
        ABRI: Blend two BNs with alpha; ALPHA_PER_CHANNEL: alpha has C entries, else 1.
        RELU: Apply the fused ReLU to y.
        COUNT_DEAD: Update the dead counters.
        MAP_SPLIT: A sample's map is split across row programs (hw_splits > 1).
        SPLIT_HW: Address (h, w) separately because H and W do not merge into one stride.
        ACC: Accumulation dtype.
        BLOCK_HW, BLOCK_C: Tile extents.
    """
    pid_rows = tl.program_id(0)
    pid_c = tl.program_id(1)
    c_offsets = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offsets < C

    if USE_BATCH_STATS:
        mean = tl.load(mean_pointer + c_offsets, mask=c_mask, other=0)
        invstd = tl.load(invstd_pointer + c_offsets, mask=c_mask, other=1)
        abri_mean = mean
        abri_invstd = invstd
    else:
        write_stats = c_mask & (pid_rows == 0)
        mean = tl.load(running_mean_pointer + c_offsets, mask=c_mask, other=0).to(ACC)
        var = tl.load(running_var_pointer + c_offsets, mask=c_mask, other=1).to(ACC)
        invstd = _rsqrt(var + tl.full((), eps, ACC), ACC)
        tl.store(mean_pointer + c_offsets, mean, mask=write_stats)
        tl.store(invstd_pointer + c_offsets, invstd, mask=write_stats)
        if ABRI:
            abri_mean = tl.load(abri_running_mean_pointer + c_offsets, mask=c_mask,
                                other=0).to(ACC)
            abri_var = tl.load(abri_running_var_pointer + c_offsets, mask=c_mask,
                               other=1).to(ACC)
            abri_invstd = _rsqrt(abri_var + tl.full((), eps, ACC), ACC)
            tl.store(mean_pointer + C + c_offsets, abri_mean, mask=write_stats)
            tl.store(invstd_pointer + C + c_offsets, abri_invstd, mask=write_stats)
        else:
            abri_mean = mean
            abri_invstd = invstd
    scale, shift = _effective_affine(
        c_offsets, c_mask, mean, invstd, abri_mean, abri_invstd, weight_pointer, bias_pointer,
        abri_weight_pointer, abri_bias_pointer, alpha_pointer, HAS_WEIGHT, HAS_BIAS,
        HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ABRI, ALPHA_PER_CHANNEL, ACC)

    n_start, n_end, hw_start, hw_end = _row_program_range(
        pid_rows, N, HW, samples_per_program, hw_splits, hw_chunk)
    # Element-wise counters, reduced across tile rows once per sample / per program.
    dead_elements = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.int32)
    dead_samples = tl.zeros([BLOCK_C], dtype=tl.int32)
    for n in range(n_start, n_end):
        alive = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.int32)
        for hw_tile in range(hw_start, hw_end, BLOCK_HW):
            hw = hw_tile + tl.arange(0, BLOCK_HW)
            mask = (hw < hw_end)[:, None] & c_mask[None, :]
            x = tl.load(_tile_pointers(x_pointer, n, hw, c_offsets, W, x_stride_n, x_stride_c,
                                       x_stride_h, x_stride_w, SPLIT_HW),
                        mask=mask, other=0).to(ACC)
            z = x * scale[None, :] + shift[None, :]
            if COUNT_DEAD:
                non_positive = z <= 0
                dead_elements += (non_positive & mask).to(tl.int32)
                # "alive" is not(z <= 0), so a NaN keeps its map alive as in the reference.
                alive = alive | (~non_positive & mask).to(tl.int32)
            if RELU:
                z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
            _store_rounded(_tile_pointers(y_pointer, n, hw, c_offsets, W, y_stride_n, y_stride_c,
                                          y_stride_h, y_stride_w, SPLIT_HW), z, mask)
        if COUNT_DEAD:
            map_alive = tl.max(alive, axis=0)
            if MAP_SPLIT:
                # The map is shared by hw_splits programs: the one holding its first chunk counts
                # it dead (+1); the first program to see a positive output takes that back (-1).
                # The sum is exact once every program has run, whatever the order.
                previously_alive = tl.atomic_or(map_alive_pointer + n * C + c_offsets, 1,
                                                mask=c_mask & (map_alive > 0), sem="relaxed")
                first_alive = (map_alive > 0) & (previously_alive == 0)
                dead_samples += tl.cast(hw_start == 0, tl.int32) - first_alive.to(tl.int32)
            else:
                dead_samples += 1 - map_alive

    if COUNT_DEAD:
        tl.atomic_add(dead_count_pointer + c_offsets, tl.sum(dead_elements, axis=0).to(tl.int64),
                      mask=c_mask, sem="relaxed")
        tl.atomic_add(dead_sample_count_pointer + c_offsets, dead_samples.to(tl.int64),
                      mask=c_mask, sem="relaxed")
        seen_offsets = tl.arange(0, 2)
        owns_seen = (pid_rows == 0) & (pid_c == 0)
        seen = tl.load(seen_pointer + seen_offsets, mask=owns_seen & (seen_offsets < 2), other=0)
        seen_delta = tl.where(seen_offsets == 0, tl.cast(N, tl.int64) * HW, N)
        tl.store(seen_pointer + seen_offsets, seen + seen_delta, mask=owns_seen)


# --- backward kernels ----------------------------------------------------------------------------


@triton.jit
def _bwd_partial_sums_kernel(
    grad_y_pointer, x_pointer, grad_x_pointer, mean_pointer, invstd_pointer,
    weight_pointer, bias_pointer, abri_weight_pointer, abri_bias_pointer, alpha_pointer,
    partial_pointer,
    N, C, HW, W,
    grad_y_stride_n, grad_y_stride_c, grad_y_stride_h, grad_y_stride_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    grad_x_stride_n, grad_x_stride_c, grad_x_stride_h, grad_x_stride_w,
    samples_per_program, hw_splits, hw_chunk, row_programs, abri_row_offset,
    TWO_ROWS: tl.constexpr, COMPUTE_GRAD_X: tl.constexpr, RELU: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ABRI_WEIGHT: tl.constexpr,
    HAS_ABRI_BIAS: tl.constexpr, ABRI: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr,
    SPLIT_HW: tl.constexpr, ACC: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per-program partial sums of dy and dy * (x - mean_k); with running stats also grad_x.

    dy is the incoming gradient, zeroed where the fused ReLU was inactive (mask recomputed from
    x). Grid: (row_programs, cdiv(C, BLOCK_C)).

    Args:
        grad_y_pointer: Pointer to dL/dy, shape [N, C, H, W], any strides (stride 0 allowed).
        x_pointer: Pointer to the forward input x, same shape, addressed through its strides.
        grad_x_pointer: Pointer to dL/dx, same shape; written only when COMPUTE_GRAD_X.
        mean_pointer, invstd_pointer: Pointers to the forward's [K, C] statistics (accumulation
            dtype); row abri_row_offset / C is the added ABRi BN's (row 0 when K = 1).
        weight_pointer ... alpha_pointer: As in _fwd_normalize_kernel.
        partial_pointer: Pointer to the output partials, contiguous [1 + K, row_programs, C]:
            sum(dy), then sum(dy * (x - mean_k)) for each statistics row k.
        N, C, HW, W: Batch size, channels, H*W and W of x.
        *_stride_*: Strides; with SPLIT_HW false *_stride_w is the merged H*W stride.
        samples_per_program, hw_splits, hw_chunk: The work split (module docstring).
        row_programs: Size of grid axis 0.
        abri_row_offset: (K - 1) * C, offset of the last statistics row.
        TWO_ROWS: K = 2 (ABRi with running statistics).
        COMPUTE_GRAD_X: Running statistics are constants, so grad_x = dy * scale is written here.
        RELU, HAS_*, ABRI, ALPHA_PER_CHANNEL, SPLIT_HW, ACC, BLOCK_HW, BLOCK_C: As in
            _fwd_normalize_kernel.
    """
    pid_rows = tl.program_id(0)
    c_offsets = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offsets < C
    mean, invstd, abri_mean, scale, shift = _saved_affine(
        mean_pointer, invstd_pointer, abri_row_offset, c_offsets, c_mask, weight_pointer,
        bias_pointer, abri_weight_pointer, abri_bias_pointer, alpha_pointer, HAS_WEIGHT, HAS_BIAS,
        HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ABRI, ALPHA_PER_CHANNEL, ACC)

    n_start, n_end, hw_start, hw_end = _row_program_range(
        pid_rows, N, HW, samples_per_program, hw_splits, hw_chunk)
    # Element-wise accumulators, reduced across the tile rows once at the end.
    sum_dy = tl.zeros([BLOCK_HW, BLOCK_C], dtype=ACC)
    sum_dy_centered = tl.zeros([BLOCK_HW, BLOCK_C], dtype=ACC)
    abri_sum_dy_centered = tl.zeros([BLOCK_HW, BLOCK_C], dtype=ACC)
    for n in range(n_start, n_end):
        for hw_tile in range(hw_start, hw_end, BLOCK_HW):
            hw = hw_tile + tl.arange(0, BLOCK_HW)
            mask = (hw < hw_end)[:, None] & c_mask[None, :]
            x = tl.load(_tile_pointers(x_pointer, n, hw, c_offsets, W, x_stride_n, x_stride_c,
                                       x_stride_h, x_stride_w, SPLIT_HW),
                        mask=mask, other=0).to(ACC)
            dy = tl.load(_tile_pointers(grad_y_pointer, n, hw, c_offsets, W, grad_y_stride_n,
                                        grad_y_stride_c, grad_y_stride_h, grad_y_stride_w,
                                        SPLIT_HW),
                         mask=mask, other=0).to(ACC)
            if RELU:
                dy = tl.where(x * scale[None, :] + shift[None, :] > 0, dy, 0)
            sum_dy += dy
            sum_dy_centered += dy * (x - mean[None, :])
            if TWO_ROWS:
                abri_sum_dy_centered += dy * (x - abri_mean[None, :])
            if COMPUTE_GRAD_X:
                grad_x = dy * scale[None, :]
                _store_rounded(_tile_pointers(grad_x_pointer, n, hw, c_offsets, W,
                                              grad_x_stride_n, grad_x_stride_c, grad_x_stride_h,
                                              grad_x_stride_w, SPLIT_HW), grad_x, mask)

    row_size = row_programs * C
    offsets = pid_rows * C + c_offsets
    tl.store(partial_pointer + offsets, tl.sum(sum_dy, axis=0), mask=c_mask)
    tl.store(partial_pointer + row_size + offsets, tl.sum(sum_dy_centered, axis=0), mask=c_mask)
    if TWO_ROWS:
        tl.store(partial_pointer + 2 * row_size + offsets, tl.sum(abri_sum_dy_centered, axis=0),
                 mask=c_mask)


@triton.jit
def _sum_partial_rows(partial_pointer, row_programs, C, c_offsets, c_mask, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fixed-order sum over the row_programs rows of one contiguous [row_programs, C] plane."""
    total = tl.zeros([BLOCK_C], dtype=ACC)
    for row_start in range(0, row_programs, BLOCK_R):
        rows = row_start + tl.arange(0, BLOCK_R)
        mask = (rows < row_programs)[:, None] & c_mask[None, :]
        block = tl.load(partial_pointer + rows[:, None] * C + c_offsets[None, :], mask=mask,
                        other=0)
        total += tl.sum(block, axis=0)
    return total


@triton.jit
def _alpha_branch(gamma_pointer, beta_pointer, c_offsets, c_mask, sum_dy, sum_dy_xhat,
                  HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC: tl.constexpr):
    """d(one BN's output)/d(its blend weight), summed: gamma * S2 + beta * S1."""
    branch = sum_dy_xhat
    if HAS_GAMMA:
        branch = branch * tl.load(gamma_pointer + c_offsets, mask=c_mask, other=0).to(ACC)
    if HAS_BETA:
        branch = branch + sum_dy * tl.load(beta_pointer + c_offsets, mask=c_mask, other=0).to(ACC)
    return branch


@triton.jit
def _bwd_finalize_kernel(
    partial_pointer, invstd_pointer, sums_pointer,
    weight_pointer, bias_pointer, abri_weight_pointer, abri_bias_pointer, alpha_pointer,
    grad_weight_pointer, grad_bias_pointer, grad_abri_weight_pointer, grad_abri_bias_pointer,
    grad_alpha_pointer,
    C, row_programs, abri_row_offset,
    TWO_ROWS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ABRI_WEIGHT: tl.constexpr, HAS_ABRI_BIAS: tl.constexpr, ABRI: tl.constexpr,
    ALPHA_PER_CHANNEL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """S1 = sum(dy), S2_k = sum(dy * xhat_k) in a fixed order, and the parameter gradients.

    Grid: (cdiv(C, BLOCK_C),).

    Args:
        partial_pointer: Pointer to the [1 + K, row_programs, C] partials of
            _bwd_partial_sums_kernel.
        invstd_pointer: Pointer to the forward's [K, C] invstd.
        sums_pointer: Pointer to the output [2, C] (accumulation dtype): S1 and S2 of row 0, read
            by _bwd_grad_x_kernel.
        weight_pointer ... alpha_pointer: As in _fwd_normalize_kernel.
        grad_weight_pointer, grad_bias_pointer: Outputs [C] in the parameters' dtypes:
            alpha * S2_0 and alpha * S1 (alpha = 1 without ABRi).
        grad_abri_weight_pointer, grad_abri_bias_pointer: Outputs [C]: (1 - alpha) * S2_last and
            (1 - alpha) * S1.
        grad_alpha_pointer: Output [C]: per-channel d/d alpha (the launcher sums it over channels
            for a scalar alpha).
        C, row_programs: Channels and partial rows.
        abri_row_offset: (K - 1) * C, offset of the last statistics row.
        TWO_ROWS, HAS_*, ABRI, ALPHA_PER_CHANNEL, ACC: As in _bwd_partial_sums_kernel.
        BLOCK_R, BLOCK_C: Partial rows and channels loaded per step.
    """
    c_offsets = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offsets < C
    row_size = row_programs * C
    sum_dy = _sum_partial_rows(partial_pointer, row_programs, C, c_offsets, c_mask, ACC,
                               BLOCK_R, BLOCK_C)
    invstd = tl.load(invstd_pointer + c_offsets, mask=c_mask, other=0)
    sum_dy_xhat = _sum_partial_rows(partial_pointer + row_size, row_programs, C, c_offsets,
                                    c_mask, ACC, BLOCK_R, BLOCK_C) * invstd
    if TWO_ROWS:
        abri_invstd = tl.load(invstd_pointer + abri_row_offset + c_offsets, mask=c_mask, other=0)
        abri_sum_dy_xhat = _sum_partial_rows(partial_pointer + 2 * row_size, row_programs, C,
                                             c_offsets, c_mask, ACC, BLOCK_R,
                                             BLOCK_C) * abri_invstd
    else:
        abri_sum_dy_xhat = sum_dy_xhat
    tl.store(sums_pointer + c_offsets, sum_dy, mask=c_mask)
    tl.store(sums_pointer + C + c_offsets, sum_dy_xhat, mask=c_mask)

    if ABRI:
        alpha = _load_alpha(alpha_pointer, c_offsets, c_mask, ALPHA_PER_CHANNEL, ACC)
        if HAS_WEIGHT:
            _store_rounded(grad_weight_pointer + c_offsets, alpha * sum_dy_xhat, c_mask)
        if HAS_BIAS:
            _store_rounded(grad_bias_pointer + c_offsets, alpha * sum_dy, c_mask)
        if HAS_ABRI_WEIGHT:
            _store_rounded(grad_abri_weight_pointer + c_offsets, (1 - alpha) * abri_sum_dy_xhat,
                           c_mask)
        if HAS_ABRI_BIAS:
            _store_rounded(grad_abri_bias_pointer + c_offsets, (1 - alpha) * sum_dy, c_mask)
        grad_alpha = (
            _alpha_branch(weight_pointer, bias_pointer, c_offsets, c_mask, sum_dy, sum_dy_xhat,
                          HAS_WEIGHT, HAS_BIAS, ACC)
            - _alpha_branch(abri_weight_pointer, abri_bias_pointer, c_offsets, c_mask, sum_dy,
                            abri_sum_dy_xhat, HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ACC))
        _store_rounded(grad_alpha_pointer + c_offsets, grad_alpha, c_mask)
    else:
        if HAS_WEIGHT:
            _store_rounded(grad_weight_pointer + c_offsets, sum_dy_xhat, c_mask)
        if HAS_BIAS:
            _store_rounded(grad_bias_pointer + c_offsets, sum_dy, c_mask)


@triton.jit
def _bwd_grad_x_kernel(
    grad_y_pointer, x_pointer, grad_x_pointer, mean_pointer, invstd_pointer, sums_pointer,
    weight_pointer, bias_pointer, abri_weight_pointer, abri_bias_pointer, alpha_pointer,
    N, C, HW, W,
    grad_y_stride_n, grad_y_stride_c, grad_y_stride_h, grad_y_stride_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    grad_x_stride_n, grad_x_stride_c, grad_x_stride_h, grad_x_stride_w,
    samples_per_program, hw_splits, hw_chunk, abri_row_offset,
    RELU: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ABRI_WEIGHT: tl.constexpr, HAS_ABRI_BIAS: tl.constexpr, ABRI: tl.constexpr,
    ALPHA_PER_CHANNEL: tl.constexpr, SPLIT_HW: tl.constexpr, ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Batch-statistics grad_x = scale * (dy - S1 / M - xhat * S2 / M), M = N*H*W.

    Grid: (row_programs, cdiv(C, BLOCK_C)).

    Args:
        grad_y_pointer, x_pointer, grad_x_pointer: As in _bwd_partial_sums_kernel (grad_x is
            always written here).
        mean_pointer, invstd_pointer: Pointers to the forward's [K, C] statistics.
        sums_pointer: Pointer to [2, C]: S1 and S2 of statistics row 0 (_bwd_finalize_kernel).
        weight_pointer ... alpha_pointer: As in _fwd_normalize_kernel.
        N, C, HW, W, *_stride_*, samples_per_program, hw_splits, hw_chunk, abri_row_offset:
            As in _bwd_partial_sums_kernel.
        RELU, HAS_*, ABRI, ALPHA_PER_CHANNEL, SPLIT_HW, ACC, BLOCK_HW, BLOCK_C: As in
            _bwd_partial_sums_kernel.
    """
    pid_rows = tl.program_id(0)
    c_offsets = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offsets < C
    mean, invstd, abri_mean, scale, shift = _saved_affine(
        mean_pointer, invstd_pointer, abri_row_offset, c_offsets, c_mask, weight_pointer,
        bias_pointer, abri_weight_pointer, abri_bias_pointer, alpha_pointer, HAS_WEIGHT, HAS_BIAS,
        HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ABRI, ALPHA_PER_CHANNEL, ACC)
    count = (tl.cast(N, tl.int64) * HW).to(ACC)
    mean_dy = tl.load(sums_pointer + c_offsets, mask=c_mask, other=0) / count
    # xhat * S2 / M = (x - mean) * projection
    projection = tl.load(sums_pointer + C + c_offsets, mask=c_mask, other=0) / count * invstd

    n_start, n_end, hw_start, hw_end = _row_program_range(
        pid_rows, N, HW, samples_per_program, hw_splits, hw_chunk)
    for n in range(n_start, n_end):
        for hw_tile in range(hw_start, hw_end, BLOCK_HW):
            hw = hw_tile + tl.arange(0, BLOCK_HW)
            mask = (hw < hw_end)[:, None] & c_mask[None, :]
            x = tl.load(_tile_pointers(x_pointer, n, hw, c_offsets, W, x_stride_n, x_stride_c,
                                       x_stride_h, x_stride_w, SPLIT_HW),
                        mask=mask, other=0).to(ACC)
            dy = tl.load(_tile_pointers(grad_y_pointer, n, hw, c_offsets, W, grad_y_stride_n,
                                        grad_y_stride_c, grad_y_stride_h, grad_y_stride_w,
                                        SPLIT_HW),
                         mask=mask, other=0).to(ACC)
            if RELU:
                dy = tl.where(x * scale[None, :] + shift[None, :] > 0, dy, 0)
            grad_x = scale[None, :] * (dy - mean_dy[None, :]
                                       - (x - mean[None, :]) * projection[None, :])
            _store_rounded(_tile_pointers(grad_x_pointer, n, hw, c_offsets, W, grad_x_stride_n,
                                          grad_x_stride_c, grad_x_stride_h, grad_x_stride_w,
                                          SPLIT_HW), grad_x, mask)


# --- launch planning -----------------------------------------------------------------------------


class _Plan(NamedTuple):
    """Tile shape and work split shared by every kernel that walks the N*C*H*W elements."""

    block_hw: int
    block_c: int
    num_warps: int
    channel_blocks: int
    samples_per_program: int
    hw_splits: int
    hw_chunk: int
    row_programs: int
    split_hw: bool

    @property
    def grid(self) -> tuple[int, int]:
        return (self.row_programs, self.channel_blocks)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None
                                            else torch.cuda.current_device())
    return _INTERPRETER_PROGRAMS


def _merged_hw_stride(t: Tensor) -> Optional[int]:
    """The one stride that walks H*W positions of ``t`` in order, or None if there is none."""
    height, width = t.shape[2:]
    stride_h, stride_w = t.stride()[2:]
    if width == 1:
        return stride_h
    if height == 1 or stride_h == width * stride_w:
        return stride_w
    return None


def _stride_args(tensors: tuple[Tensor, ...]) -> tuple[bool, list[int]]:
    """(SPLIT_HW, [stride_n, stride_c, stride_h, stride_w] per tensor) for one launch."""
    merged = [_merged_hw_stride(t) for t in tensors]
    split_hw = any(stride is None for stride in merged)
    args: list[int] = []
    for t, merged_stride in zip(tensors, merged):
        stride_n, stride_c, stride_h, stride_w = t.stride()
        if split_hw:
            args += [stride_n, stride_c, stride_h, stride_w]
        else:
            args += [stride_n, stride_c, 0, merged_stride]
    return split_hw, args


def _plan(x: Tensor, split_hw: bool) -> _Plan:
    """Tile along the contiguous axis; split rows over samples, then over H*W, to fill the GPU."""
    batch, channels, height, width = x.shape
    spatial = height * width
    if x.stride(1) == 1:  # channels_last (or 1x1 maps): channels are contiguous
        block_c = min(triton.next_power_of_2(max(channels, 1)), _MAX_BLOCK_C_CHANNELS_INNER)
        block_hw = min(_TILE_ELEMENTS // block_c, triton.next_power_of_2(max(spatial, 1)))
    else:
        block_hw = min(triton.next_power_of_2(max(spatial, 1)), _MAX_BLOCK_HW)
        block_c = min(_TILE_ELEMENTS // block_hw, triton.next_power_of_2(max(channels, 1)))
    num_warps = max(1, min(4, block_hw * block_c // 256))
    channel_blocks = max(1, triton.cdiv(channels, block_c))
    hw_blocks = max(1, triton.cdiv(spatial, block_hw))
    rows_wanted = max(1, triton.cdiv(_target_programs(x.device), channel_blocks))
    if batch >= rows_wanted:
        samples_per_program, hw_splits = triton.cdiv(batch, rows_wanted), 1
        blocks_per_split = hw_blocks
    else:
        samples_per_program = 1
        blocks_per_split = triton.cdiv(hw_blocks, min(hw_blocks, triton.cdiv(rows_wanted,
                                                                             max(batch, 1))))
        hw_splits = triton.cdiv(hw_blocks, blocks_per_split)
    row_programs = max(1, triton.cdiv(batch, samples_per_program) * hw_splits)
    return _Plan(block_hw, block_c, num_warps, channel_blocks, samples_per_program, hw_splits,
                 blocks_per_split * block_hw, row_programs, split_hw)


def _finalize_launch(channels: int, row_programs: int) -> tuple[tuple[int], dict]:
    """Grid and block/warp options of the finalize kernels."""
    block_c = min(triton.next_power_of_2(max(channels, 1)), _FINALIZE_BLOCK_C)
    block_r = min(triton.next_power_of_2(row_programs), _FINALIZE_TILE_ELEMENTS // block_c)
    num_warps = max(1, min(8, block_r * block_c // 256))
    grid = (max(1, triton.cdiv(channels, block_c)),)
    return grid, dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)


# --- input checks --------------------------------------------------------------------------------


def _check_input(name: str, x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (N, C, H, W) tensor, got shape "
                         f"{tuple(x.shape)}; reshape 2-D/3-D input to 4-D first")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported; use float16, bfloat16, "
                        "float32 or float64")
    # Offsets inside one sample are int32 in the kernels (the sample offset is int64).
    sample_extent = sum((size - 1) * abs(stride)
                        for size, stride in zip(x.shape[1:], x.stride()[1:]) if size > 0)
    if sample_extent >= 2**31:
        raise ValueError(f"{name}: one sample spans {sample_extent} elements, more than the "
                         "2**31 the Triton kernels address; split the channels")


def _check_per_channel(name: str, t: Optional[Tensor], channels: int, device: torch.device,
                       mutable: bool) -> None:
    if t is None:
        return
    if t.shape != (channels,):
        raise ValueError(f"{name}: expected shape ({channels},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; move it to x's device")
    if mutable and not t.is_contiguous():
        raise ValueError(f"{name} is updated in place and must be contiguous")


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _affine_flags(weight, bias, abri_weight, abri_bias, abri_alpha) -> dict:
    return dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                HAS_ABRI_WEIGHT=abri_weight is not None, HAS_ABRI_BIAS=abri_bias is not None,
                ABRI=abri_alpha is not None,
                ALPHA_PER_CHANNEL=abri_alpha is not None and abri_alpha.numel() > 1)


def _check_params(x, weight, bias, abri_weight, abri_bias, abri_alpha) -> None:
    channels = x.shape[1]
    for name, param in (("weight", weight), ("bias", bias), ("abri_weight", abri_weight),
                        ("abri_bias", abri_bias)):
        _check_per_channel(name, param, channels, x.device, mutable=False)
    if abri_alpha is not None:
        if abri_alpha.shape not in ((1,), (channels,)):
            raise ValueError(f"abri_alpha: expected shape (1,) or ({channels},), got "
                             f"{tuple(abri_alpha.shape)}")
        if abri_alpha.device != x.device:
            raise ValueError(f"abri_alpha is on {abri_alpha.device} but x is on {x.device}; "
                             "move it to x's device")


# --- launchers -----------------------------------------------------------------------------------


def forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    abri_weight: Optional[Tensor],
    abri_bias: Optional[Tensor],
    abri_alpha: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    abri_running_mean: Optional[Tensor],
    abri_running_var: Optional[Tensor],
    dead_count: Optional[Tensor],
    dead_sample_count: Optional[Tensor],
    seen: Optional[Tensor],
    use_batch_stats: bool,
    momentum: float,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``avkernels::batch_norm_fwd`` on CUDA: returns ``(y, mean, invstd)`` (see batch_norm.py)."""
    _check_input("batch_norm_fwd: x", x)
    batch, channels, height, width = x.shape
    _check_params(x, weight, bias, abri_weight, abri_bias, abri_alpha)
    for name, buffer in (("running_mean", running_mean), ("running_var", running_var),
                         ("abri_running_mean", abri_running_mean),
                         ("abri_running_var", abri_running_var),
                         ("dead_count", dead_count), ("dead_sample_count", dead_sample_count)):
        _check_per_channel(name, buffer, channels, x.device, mutable=True)
    if (running_mean is None) != (running_var is None) or (
            (abri_running_mean is None) != (abri_running_var is None)):
        raise ValueError("batch_norm_fwd: a running mean and its running var come together")
    count_dead = dead_count is not None
    if count_dead != (dead_sample_count is not None) or count_dead != (seen is not None):
        raise ValueError("batch_norm_fwd: dead_count, dead_sample_count and seen are all "
                         "given or all None")
    if count_dead and (seen.shape != (2,) or not seen.is_contiguous() or seen.device != x.device):
        raise ValueError(f"batch_norm_fwd: seen must be a contiguous (2,) tensor on x's device, "
                         f"got {tuple(seen.shape)} on {seen.device}")
    abri = abri_alpha is not None
    if not use_batch_stats and (running_mean is None or (abri and abri_running_mean is None)):
        raise ValueError("batch_norm_fwd: use_batch_stats=False needs the running statistics "
                         "(both sets with ABRi)")
    spatial = height * width
    count = batch * spatial
    update_running = use_batch_stats and running_mean is not None
    update_abri_running = use_batch_stats and abri_running_mean is not None
    if (update_running or update_abri_running) and count < 2:
        raise ValueError("batch_norm_fwd: expected more than 1 value per channel when training "
                         f"(got input of shape {tuple(x.shape)})")

    acc = accumulation_dtype(x)
    weight, bias, abri_weight, abri_bias, abri_alpha = map(
        _contiguous, (weight, bias, abri_weight, abri_bias, abri_alpha))
    stats_rows = 2 if abri and not use_batch_stats else 1
    y = torch.empty_like(x, memory_format=output_memory_format(x))
    mean = x.new_empty((stats_rows, channels), dtype=acc)
    invstd = torch.empty_like(mean)
    split_hw, strides = _stride_args((x, y))
    plan = _plan(x, split_hw)
    common = dict(SPLIT_HW=split_hw, ACC=_TRITON_ACC[acc], BLOCK_HW=plan.block_hw,
                  BLOCK_C=plan.block_c, num_warps=plan.num_warps)
    work_split = (plan.samples_per_program, plan.hw_splits, plan.hw_chunk)

    if use_batch_stats:
        partial = x.new_empty((3, plan.row_programs, channels), dtype=acc)
        _fwd_partial_stats_kernel[plan.grid](
            x, partial, batch, channels, spatial, width, *strides[:4], *work_split,
            plan.row_programs, **common)
        finalize_grid, finalize_options = _finalize_launch(channels, plan.row_programs)
        unbiased_momentum = momentum * count / (count - 1) if count > 1 else 0.0
        _fwd_finalize_kernel[finalize_grid](
            partial, mean, invstd, running_mean if update_running else mean,
            running_var if update_running else mean,
            abri_running_mean if update_abri_running else mean,
            abri_running_var if update_abri_running else mean,
            channels, plan.row_programs, float(eps), float(momentum), 1.0 - momentum,
            float(unbiased_momentum),
            UPDATE_RUNNING=update_running, UPDATE_ABRI_RUNNING=update_abri_running,
            ACC=_TRITON_ACC[acc], **finalize_options)

    map_split = count_dead and plan.hw_splits > 1
    map_alive = (torch.zeros((batch, channels), dtype=torch.int32, device=x.device)
                 if map_split else mean)
    # Absent optional tensors are never read (their HAS_* / mode flag is off); any pointer does.
    unused = mean
    _fwd_normalize_kernel[plan.grid](
        x, y, mean, invstd,
        *(unused if t is None else t for t in (
            running_mean, running_var, abri_running_mean, abri_running_var,
            weight, bias, abri_weight, abri_bias, abri_alpha,
            dead_count, dead_sample_count, seen)),
        map_alive, batch, channels, spatial, width, *strides, *work_split, float(eps),
        USE_BATCH_STATS=use_batch_stats, RELU=relu, COUNT_DEAD=count_dead, MAP_SPLIT=map_split,
        **_affine_flags(weight, bias, abri_weight, abri_bias, abri_alpha), **common)
    return y, mean, invstd


def backward(
    grad_y: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    abri_weight: Optional[Tensor],
    abri_bias: Optional[Tensor],
    abri_alpha: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    use_batch_stats: bool,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``avkernels::batch_norm_bwd`` on CUDA: ``(grad_x, grad_weight, grad_bias,
    grad_abri_weight, grad_abri_bias, grad_abri_alpha)`` (see batch_norm.py)."""
    _check_input("batch_norm_bwd: x", x)
    batch, channels, height, width = x.shape
    if grad_y.shape != x.shape:
        raise ValueError(f"batch_norm_bwd: grad_y has shape {tuple(grad_y.shape)}, expected "
                         f"x's {tuple(x.shape)}")
    _check_input("batch_norm_bwd: grad_y", grad_y)
    _check_params(x, weight, bias, abri_weight, abri_bias, abri_alpha)
    if mean.dim() != 2 or mean.shape[0] not in (1, 2) or mean.shape[1] != channels or (
            invstd.shape != mean.shape) or mean.dtype not in _TRITON_ACC or (
            invstd.dtype != mean.dtype):
        raise ValueError("batch_norm_bwd: mean and invstd must be the forward's (K, C) float32/"
                         f"float64 statistics, got {tuple(mean.shape)} {mean.dtype} and "
                         f"{tuple(invstd.shape)} {invstd.dtype}")
    for name, t in (("grad_y", grad_y), ("mean", mean), ("invstd", invstd)):
        if t.device != x.device:
            raise ValueError(f"batch_norm_bwd: {name} is on {t.device} but x is on {x.device}")
    acc = mean.dtype
    mean, invstd = mean.contiguous(), invstd.contiguous()
    weight, bias, abri_weight, abri_bias, abri_alpha = map(
        _contiguous, (weight, bias, abri_weight, abri_bias, abri_alpha))
    abri = abri_alpha is not None
    flags = _affine_flags(weight, bias, abri_weight, abri_bias, abri_alpha)
    two_rows = mean.shape[0] == 2
    abri_row_offset = (mean.shape[0] - 1) * channels
    spatial = height * width

    grad_x = torch.empty_like(x, memory_format=output_memory_format(x))
    split_hw, strides = _stride_args((grad_y, x, grad_x))
    plan = _plan(x, split_hw)
    common = dict(SPLIT_HW=split_hw, ACC=_TRITON_ACC[acc], BLOCK_HW=plan.block_hw,
                  BLOCK_C=plan.block_c, num_warps=plan.num_warps)
    work_split = (plan.samples_per_program, plan.hw_splits, plan.hw_chunk)
    unused = mean
    params = tuple(unused if p is None else p
                   for p in (weight, bias, abri_weight, abri_bias, abri_alpha))

    partial = x.new_empty((1 + mean.shape[0], plan.row_programs, channels), dtype=acc)
    _bwd_partial_sums_kernel[plan.grid](
        grad_y, x, grad_x, mean, invstd, *params, partial,
        batch, channels, spatial, width, *strides, *work_split, plan.row_programs,
        abri_row_offset, TWO_ROWS=two_rows, COMPUTE_GRAD_X=not use_batch_stats, RELU=relu,
        **flags, **common)

    def param_grad(param: Optional[Tensor], is_abri_param: bool) -> Tensor:
        if param is None or (is_abri_param and not abri):
            return mean.new_empty(0)
        return torch.empty_like(param)

    grad_weight, grad_bias = param_grad(weight, False), param_grad(bias, False)
    grad_abri_weight, grad_abri_bias = param_grad(abri_weight, True), param_grad(abri_bias, True)
    per_channel_alpha = flags["ALPHA_PER_CHANNEL"]
    if per_channel_alpha:
        grad_alpha_per_channel = torch.empty_like(abri_alpha)
    else:  # summed over channels below
        grad_alpha_per_channel = mean.new_empty(channels if abri else 0)
    sums = mean.new_empty((2, channels))
    finalize_grid, finalize_options = _finalize_launch(channels, plan.row_programs)
    _bwd_finalize_kernel[finalize_grid](
        partial, invstd, sums, *params,
        *(unused if g.numel() == 0 else g for g in (
            grad_weight, grad_bias, grad_abri_weight, grad_abri_bias, grad_alpha_per_channel)),
        channels, plan.row_programs, abri_row_offset, TWO_ROWS=two_rows, **flags,
        ACC=_TRITON_ACC[acc], **finalize_options)

    if use_batch_stats:
        _bwd_grad_x_kernel[plan.grid](
            grad_y, x, grad_x, mean, invstd, sums, *params,
            batch, channels, spatial, width, *strides, *work_split, abri_row_offset, RELU=relu,
            **flags, **common)

    if not abri:
        grad_alpha = mean.new_empty(0)
    elif per_channel_alpha:
        grad_alpha = grad_alpha_per_channel
    else:
        grad_alpha = grad_alpha_per_channel.sum().reshape(1).to(abri_alpha.dtype)
    return grad_x, grad_weight, grad_bias, grad_abri_weight, grad_abri_bias, grad_alpha
