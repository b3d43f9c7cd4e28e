"""Device functions shared by the Triton batch-norm kernels (:mod:`.triton_kernels`): addressing,
the work split of a row program, Chan merges, the effective (ABRi-blended) affine, rounding."""

import os

import triton
import triton.language as tl

# --- shared device helpers -----------------------------------------------------------------------
# Float scalar arguments (eps, momentum) are annotated tl.float64 and turned into ACC scalars with
# tl.full, not tl.cast: under the interpreter tl.cast would first round a Python float to fp32.


@triton.jit
def rsqrt(value, ACC: tl.constexpr):
    """1/sqrt(value): tl.rsqrt in fp32; in fp64 (no fast rsqrt there) the IEEE sqrt and division."""
    if ACC == tl.float64:
        return 1.0 / tl.sqrt(value)
    else:
        return tl.rsqrt(value)


# The interpreter converts float32 to bfloat16 by truncation (a GPU rounds to nearest even), so
# under it stores round explicitly; compiled kernels use the hardware conversion.
EMULATE_BF16_ROUNDING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def store_rounded(pointers, value, mask):
    """Stores ``value`` converted to the pointers' dtype, rounding to nearest even."""
    dtype = pointers.dtype.element_ty
    if EMULATE_BF16_ROUNDING and dtype == tl.bfloat16:
        value = value.to(tl.float32)
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))
    tl.store(pointers, value.to(dtype), mask=mask)


@triton.jit
def tile_pointers(base_pointer, n, hw, c_offsets, W, stride_n, stride_c, stride_h, stride_w,
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
def row_program_range(pid_rows, N, HW, samples_per_program, hw_splits, hw_chunk):
    """Samples [n_start, n_end) and positions [hw_start, hw_end) owned by row program pid_rows."""
    n_start = (pid_rows // hw_splits) * samples_per_program
    n_end = tl.minimum(n_start + samples_per_program, N)
    hw_start = (pid_rows % hw_splits) * hw_chunk
    hw_end = tl.minimum(hw_start + hw_chunk, HW)
    return n_start, n_end, hw_start, hw_end


@triton.jit
def chan_merge(mean_a, m2_a, count_a, mean_b, m2_b, count_b):
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
def affine_term(c_offsets, c_mask, mean, invstd, blend, gamma_pointer, beta_pointer,
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
def load_alpha(alpha_pointer, c_offsets, c_mask, ALPHA_PER_CHANNEL: tl.constexpr,
                ACC: tl.constexpr):
    """ABRi's blend weight: a [BLOCK_C] vector, or a scalar broadcast over channels."""
    if ALPHA_PER_CHANNEL:
        return tl.load(alpha_pointer + c_offsets, mask=c_mask, other=0).to(ACC)
    else:
        return tl.load(alpha_pointer).to(ACC)


@triton.jit
def effective_affine(c_offsets, c_mask, mean, invstd, abri_mean, abri_invstd,
                      weight_pointer, bias_pointer, abri_weight_pointer, abri_bias_pointer,
                      alpha_pointer, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_ABRI_WEIGHT: tl.constexpr, HAS_ABRI_BIAS: tl.constexpr,
                      ABRI: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (scale, shift) of the pre-activation output, as ``effective_affine``."""
    if ABRI:
        alpha = load_alpha(alpha_pointer, c_offsets, c_mask, ALPHA_PER_CHANNEL, ACC)
        scale, shift = affine_term(c_offsets, c_mask, mean, invstd, alpha, weight_pointer,
                                    bias_pointer, HAS_WEIGHT, HAS_BIAS, ACC)
        abri_scale, abri_shift = affine_term(c_offsets, c_mask, abri_mean, abri_invstd, 1 - alpha,
                                              abri_weight_pointer, abri_bias_pointer,
                                              HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ACC)
        scale = scale + abri_scale
        shift = shift + abri_shift
    else:
        scale, shift = affine_term(c_offsets, c_mask, mean, invstd, 1.0, weight_pointer,
                                    bias_pointer, HAS_WEIGHT, HAS_BIAS, ACC)
    return scale, shift


@triton.jit
def saved_affine(mean_pointer, invstd_pointer, abri_row_offset, c_offsets, c_mask,
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
    scale, shift = effective_affine(
        c_offsets, c_mask, mean, invstd, abri_mean, abri_invstd, weight_pointer, bias_pointer,
        abri_weight_pointer, abri_bias_pointer, alpha_pointer, HAS_WEIGHT, HAS_BIAS,
        HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ABRI, ALPHA_PER_CHANNEL, ACC)
    return mean, invstd, abri_mean, scale, shift
