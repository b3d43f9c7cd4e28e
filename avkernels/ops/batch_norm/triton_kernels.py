"""Triton kernels of ``avkernels::batch_norm_fwd`` / ``batch_norm_bwd`` (CUDA); launched by
:mod:`avkernels.ops.batch_norm.triton_launch`, which documents each launch and its grid.

:func:`forward` and :func:`backward` take exactly the arguments of the op schemas in
:mod:`avkernels.ops.batch_norm` and reproduce ``batch_norm_fwd_reference`` /
``batch_norm_bwd_reference``; they are pure launchers (no synchronisation, no data-dependent
Python control flow), registered as the ops' CUDA kernels by ``batch_norm._register_triton``.

Addressing. ``x`` (N, C, H, W) is read through its strides as (N, C, HW): NCHW, channels_last,
other strided views and stride-0 (expanded) gradients work without copies. When every tensor of a
launch can merge H and W into one stride the kernels use ``hw * stride``; otherwise
``SPLIT_HW`` recovers (h, w) with one division. A tile is ``BLOCK_HW`` spatial positions of one
sample by ``BLOCK_C`` channels; the heuristic of ``triton_plans.split_work`` lays it along the
contiguous axis (HW for NCHW, C for channels_last) so loads coalesce.

Why one file of ~640 lines (over the project's ~500-line guide): the four kernels share the
addressing and work split described here, and the launch plans in ``triton_plans`` rely on them
agreeing; one file keeps that contract, and its description, in one place.

Work split (every kernel that touches the N*C*H*W elements uses the same one): grid axis 0
walks channel blocks (axis 0 allows 2**31 - 1 programs, so any C fits), grid axis 1 "row
programs" (at most about twice the programs the launcher aims at, far below axis 1's 65,535).
A row program owns either
``samples_per_program`` whole samples, or, when there are too few samples to fill the GPU, one
``hw_chunk`` of one sample (``hw_splits`` chunks per sample). Reductions over N*H*W are thus split
across row programs; their per-program partials are merged in a fixed order, so float results
are bitwise repeatable (no float atomics; integer atomics only for the dead counters).

Launches (a reduction's finalize runs in the program that finishes last, found with an integer
atomic counter per channel block in a zeroed scratch buffer that the kernels leave zeroed):

* training forward: partial Welford statistics, the last program per channel block merging them
  (Chan merge, mean/invstd, running statistics) -> normalize (affine, ABRi blend, ReLU, dead
  counters): 2 kernels, 3 passes over x and y;
* eval forward: normalize only (statistics from the running buffers, in-kernel): 1 kernel;
* training backward: partial sums of dy and dy*(x - mean), the last program per channel block
  reducing them (S1, S2, parameter gradients; the last channel block sums a layer-wise alpha's
  gradient) -> grad_x: 2 kernels;
* eval backward: partial sums fused with grad_x = dy * scale, and the same reductions: 1 kernel.
"""

import triton
import triton.language as tl

from avkernels.ops.batch_norm.triton_device import (
    chan_merge,
    effective_affine,
    load_alpha,
    row_program_range,
    rsqrt,
    saved_affine,
    store_rounded,
    tile_pointers,
)

# Integer arguments that change with the batch size. Triton would specialise each on being 1 or
# a multiple of 16 and so compile new variants for a new N (the last batch of an epoch, another
# eval batch); as runtime values they keep one variant per geometry (docs/DESIGN.md, "Kernel
# designs and launch plans"). hw_chunk stays specialised: it is a whole number of tiles, and its
# alignment lets the loads of a chunk vectorise.
_BATCH_DEPENDENT = ("N", "samples_per_program", "hw_splits", "row_programs", "count")

# --- forward kernels -----------------------------------------------------------------------------


@triton.jit(do_not_specialize=_BATCH_DEPENDENT)
def fwd_partial_stats_kernel(
    x_pointer, partial_pointer, mean_pointer, invstd_pointer,
    running_mean_pointer, running_var_pointer, abri_running_mean_pointer,
    abri_running_var_pointer, counter_pointer,
    N, C, HW, W,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    samples_per_program, hw_splits, hw_chunk, row_programs,
    eps: tl.float64, momentum: tl.float64, keep: tl.float64, unbiased_momentum: tl.float64,
    UPDATE_RUNNING: tl.constexpr, UPDATE_ABRI_RUNNING: tl.constexpr, STORE_VAR: tl.constexpr,
    SPLIT_HW: tl.constexpr, ACC: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Per-channel Welford summaries of the elements one row program owns; the last program of
    each channel block to finish merges them into the batch statistics.

    Grid: (cdiv(C, BLOCK_C), row_programs).

    Args:
        x_pointer: Pointer to the input x, shape [N, C, H, W], addressed through the strides.
        partial_pointer: Pointer to the partials, contiguous [3, row_programs, C] in the
            accumulation dtype: rows mean, M2 (sum of squared deviations) and element count.
        mean_pointer, invstd_pointer: Pointers to the outputs, contiguous [1, C], accumulation
            dtype: batch mean and 1/sqrt(biased variance + eps) (the biased variance itself with
            STORE_VAR).
        running_mean_pointer, running_var_pointer: Pointers to the original BN's running
            statistics, [C], updated in place in their own dtype.
        abri_running_mean_pointer, abri_running_var_pointer: The same for ABRi's added BN.
        counter_pointer: Pointer to int32 [>= cdiv(C, BLOCK_C)] zeros: programs finished per
            channel block; the last one sets its counter back to 0.
        N, C, HW, W: Batch size, channels, H*W and W of x.
        x_stride_*: Strides of x; with SPLIT_HW false x_stride_w is the merged H*W stride.
        samples_per_program, hw_splits, hw_chunk: The work split (module docstring).
        row_programs: Size of grid axis 1 (rows of the partial buffer).
        eps: Added to the variance.
        momentum, keep: Weight of the batch statistic and of the old value (1 - momentum).
        unbiased_momentum: momentum * count / (count - 1), weight of the biased batch variance.
        UPDATE_RUNNING, UPDATE_ABRI_RUNNING: Which running sets exist.
        STORE_VAR: Store the biased variance instead of invstd (``batch_norm_stats``).
        SPLIT_HW: Address (h, w) separately because H and W do not merge into one stride.
        ACC: Accumulation dtype (float32, or float64 for float64 input).
        BLOCK_HW, BLOCK_C: Tile extents; BLOCK_R: partial rows merged per step.
    """
    pid_c = tl.program_id(0)
    pid_rows = tl.program_id(1)
    c_offsets = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offsets < C
    n_start, n_end, hw_start, hw_end = row_program_range(
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
            pointers = tile_pointers(x_pointer, n, hw, c_offsets, W, x_stride_n, x_stride_c,
                                      x_stride_h, x_stride_w, SPLIT_HW)
            x = tl.load(pointers, mask=mask, other=0).to(ACC)
            count += hw_mask.to(ACC)
            weight = tl.where(hw_mask, 1 / tl.maximum(count, 1), 0)
            delta = x - mean
            mean += delta * weight[:, None]
            m2 += tl.where(mask, delta * (x - mean), 0)

    counts = tl.broadcast_to(count[:, None], (BLOCK_HW, BLOCK_C))
    mean, m2, counts = tl.reduce((mean, m2, counts), 0, chan_merge)
    row_size = row_programs * C
    offsets = pid_rows * C + c_offsets
    tl.store(partial_pointer + offsets, mean, mask=c_mask)
    tl.store(partial_pointer + row_size + offsets, m2, mask=c_mask)
    tl.store(partial_pointer + 2 * row_size + offsets, counts, mask=c_mask)

    # Every thread's partials, then (barrier) one release; the last program acquires them all.
    tl.debug_barrier()
    finished = tl.atomic_add(counter_pointer + pid_c, 1, sem="acq_rel")
    if finished == row_programs - 1:
        _finalize_statistics(
            partial_pointer, mean_pointer, invstd_pointer, running_mean_pointer,
            running_var_pointer, abri_running_mean_pointer, abri_running_var_pointer, c_offsets,
            c_mask, C, row_programs, eps, momentum, keep, unbiased_momentum, UPDATE_RUNNING,
            UPDATE_ABRI_RUNNING, STORE_VAR, ACC, BLOCK_R, BLOCK_C)
        tl.store(counter_pointer + pid_c, 0)


@triton.jit
def _finalize_statistics(
    partial_pointer, mean_pointer, invstd_pointer,
    running_mean_pointer, running_var_pointer, abri_running_mean_pointer,
    abri_running_var_pointer, c_offsets, c_mask,
    C, row_programs,
    eps, momentum, keep, unbiased_momentum,
    UPDATE_RUNNING: tl.constexpr, UPDATE_ABRI_RUNNING: tl.constexpr, STORE_VAR: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merges the partial summaries of channels ``c_offsets`` in a fixed order into the batch
    mean/invstd, and updates the running statistics (arguments as fwd_partial_stats_kernel)."""
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    count = tl.zeros([BLOCK_C], dtype=ACC)
    row_size = row_programs * C
    for row_start in range(0, row_programs, BLOCK_R):
        rows = row_start + tl.arange(0, BLOCK_R)
        mask = (rows < row_programs)[:, None] & c_mask[None, :]
        offsets = rows[:, None] * C + c_offsets[None, :]
        # Masked slots load count 0, which chan_merge treats as empty. ".cg": other programs
        # wrote these, so read them from L2, not from this SM's (incoherent) L1.
        block_mean = tl.load(partial_pointer + offsets, mask=mask, other=0, cache_modifier=".cg")
        block_m2 = tl.load(partial_pointer + row_size + offsets, mask=mask, other=0,
                           cache_modifier=".cg")
        block_count = tl.load(partial_pointer + 2 * row_size + offsets, mask=mask, other=0,
                              cache_modifier=".cg")
        block_mean, block_m2, block_count = tl.reduce((block_mean, block_m2, block_count), 0,
                                                      chan_merge)
        mean, m2, count = chan_merge(mean, m2, count, block_mean, block_m2, block_count)

    var = m2 / tl.where(c_mask, count, 1)  # masked lanes: no 0/0
    tl.store(mean_pointer + c_offsets, mean, mask=c_mask)
    if STORE_VAR:
        tl.store(invstd_pointer + c_offsets, var, mask=c_mask)
    else:
        tl.store(invstd_pointer + c_offsets, rsqrt(var + tl.full((), eps, ACC), ACC),
                 mask=c_mask)

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
    store_rounded(running_mean_pointer + c_offsets, running_mean, c_mask)
    store_rounded(running_var_pointer + c_offsets, running_var, c_mask)


@triton.jit(do_not_specialize=_BATCH_DEPENDENT)
def fwd_normalize_kernel(
    x_pointer, y_pointer, mean_pointer, invstd_pointer,
    running_mean_pointer, running_var_pointer, abri_running_mean_pointer,
    abri_running_var_pointer,
    weight_pointer, bias_pointer, abri_weight_pointer, abri_bias_pointer, alpha_pointer,
    dead_count_pointer, dead_sample_count_pointer, seen_pointer, map_slots_pointer,
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

    Grid: (cdiv(C, BLOCK_C), row_programs).

    Args:
        x_pointer: Pointer to the input x, shape [N, C, H, W], addressed through the strides.
        y_pointer: Pointer to the output y, same shape, addressed through its strides.
        mean_pointer, invstd_pointer: Pointers to [K, C] contiguous statistics, accumulation
            dtype. With batch statistics (K = 1) they are read (written by the finalize kernel);
            with running statistics they are written here (K = 2 for ABRi: row 1 is the added
            BN's set) by the programs of row 0.
        running_mean_pointer, running_var_pointer: Pointers to the original BN's running
            statistics, [C] (read in eval only).
        abri_running_mean_pointer, abri_running_var_pointer: The same for ABRi's added BN.
        weight_pointer, bias_pointer: Pointers to the original BN's affine parameters, [C].
        abri_weight_pointer, abri_bias_pointer: Pointers to the added BN's parameters, [C].
        alpha_pointer: Pointer to ABRi's blend weight, [C] or [1].
        dead_count_pointer: Pointer to int64 [C]: += outputs <= 0 before the activation.
        dead_sample_count_pointer: Pointer to int64 [C]: += samples whose whole map is <= 0.
        seen_pointer: Pointer to int64 [2]: += [N*H*W, N] (by program (0, 0)).
        map_slots_pointer: Pointer to int32 [>= N * C] zeros, one slot per map, left zeroed;
            used only when MAP_SPLIT.
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
    pid_c = tl.program_id(0)
    pid_rows = tl.program_id(1)
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
        invstd = rsqrt(var + tl.full((), eps, ACC), ACC)
        tl.store(mean_pointer + c_offsets, mean, mask=write_stats)
        tl.store(invstd_pointer + c_offsets, invstd, mask=write_stats)
        if ABRI:
            abri_mean = tl.load(abri_running_mean_pointer + c_offsets, mask=c_mask,
                                other=0).to(ACC)
            abri_var = tl.load(abri_running_var_pointer + c_offsets, mask=c_mask,
                               other=1).to(ACC)
            abri_invstd = rsqrt(abri_var + tl.full((), eps, ACC), ACC)
            tl.store(mean_pointer + C + c_offsets, abri_mean, mask=write_stats)
            tl.store(invstd_pointer + C + c_offsets, abri_invstd, mask=write_stats)
        else:
            abri_mean = mean
            abri_invstd = invstd
    scale, shift = effective_affine(
        c_offsets, c_mask, mean, invstd, abri_mean, abri_invstd, weight_pointer, bias_pointer,
        abri_weight_pointer, abri_bias_pointer, alpha_pointer, HAS_WEIGHT, HAS_BIAS,
        HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ABRI, ALPHA_PER_CHANNEL, ACC)

    n_start, n_end, hw_start, hw_end = row_program_range(
        pid_rows, N, HW, samples_per_program, hw_splits, hw_chunk)
    # Element-wise counters, reduced across tile rows once per sample / per program.
    dead_elements = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.int32)
    dead_samples = tl.zeros([BLOCK_C], dtype=tl.int32)
    for n in range(n_start, n_end):
        alive = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.int32)
        for hw_tile in range(hw_start, hw_end, BLOCK_HW):
            hw = hw_tile + tl.arange(0, BLOCK_HW)
            mask = (hw < hw_end)[:, None] & c_mask[None, :]
            x = tl.load(tile_pointers(x_pointer, n, hw, c_offsets, W, x_stride_n, x_stride_c,
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
            store_rounded(tile_pointers(y_pointer, n, hw, c_offsets, W, y_stride_n, y_stride_c,
                                          y_stride_h, y_stride_w, SPLIT_HW), z, mask)
        if COUNT_DEAD:
            map_alive = tl.max(alive, axis=0)
            if MAP_SPLIT:
                # The map is shared by hw_splits programs. Each adds 1 to the map's slot, plus
                # 2**16 if it saw a positive output; the last to add knows whether any did,
                # counts the map, and sets the slot back to 0 for the next launch.
                slot = map_slots_pointer + n * C + c_offsets
                previous = tl.atomic_add(slot, 1 + map_alive * 65536, mask=c_mask,
                                         sem="relaxed")
                last = (previous & 0xFFFF) == hw_splits - 1
                dead_samples += (last & (previous < 65536) & (map_alive == 0)).to(tl.int32)
                tl.store(slot, 0, mask=c_mask & last)
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


@triton.jit(do_not_specialize=_BATCH_DEPENDENT)
def bwd_partial_sums_kernel(
    grad_y_pointer, x_pointer, grad_x_pointer, mean_pointer, invstd_pointer,
    weight_pointer, bias_pointer, abri_weight_pointer, abri_bias_pointer, alpha_pointer,
    partial_pointer, sums_pointer,
    grad_weight_pointer, grad_bias_pointer, grad_abri_weight_pointer, grad_abri_bias_pointer,
    grad_alpha_pointer, grad_alpha_total_pointer, counter_pointer,
    N, C, HW, W,
    grad_y_stride_n, grad_y_stride_c, grad_y_stride_h, grad_y_stride_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    grad_x_stride_n, grad_x_stride_c, grad_x_stride_h, grad_x_stride_w,
    samples_per_program, hw_splits, hw_chunk, row_programs, abri_row_offset,
    TWO_ROWS: tl.constexpr, COMPUTE_GRAD_X: tl.constexpr, RELU: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ABRI_WEIGHT: tl.constexpr,
    HAS_ABRI_BIAS: tl.constexpr, ABRI: tl.constexpr, ALPHA_PER_CHANNEL: tl.constexpr,
    SPLIT_HW: tl.constexpr, ACC: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_TOTAL: tl.constexpr,
):
    """Per-program partial sums of dy and dy * (x - mean_k); with running stats also grad_x. The
    last program of each channel block to finish reduces them (S1, S2, parameter gradients), and
    with a layer-wise alpha the last channel block sums d/d alpha over the channels.

    dy is the incoming gradient, zeroed where the fused ReLU was inactive (mask recomputed from
    x). Grid: (cdiv(C, BLOCK_C), row_programs).

    Args:
        grad_y_pointer: Pointer to dL/dy, shape [N, C, H, W], any strides (stride 0 allowed).
        x_pointer: Pointer to the forward input x, same shape, addressed through its strides.
        grad_x_pointer: Pointer to dL/dx, same shape; written only when COMPUTE_GRAD_X.
        mean_pointer, invstd_pointer: Pointers to the forward's [K, C] statistics (accumulation
            dtype); row abri_row_offset / C is the added ABRi BN's (row 0 when K = 1).
        weight_pointer ... alpha_pointer: As in fwd_normalize_kernel.
        partial_pointer: Pointer to the partials, contiguous [1 + K, row_programs, C]:
            sum(dy), then sum(dy * (x - mean_k)) for each statistics row k.
        sums_pointer ... grad_alpha_pointer: Outputs as in _finalize_sums.
        grad_alpha_total_pointer: Output [1] in alpha's dtype: d/d alpha summed over channels
            (written when ABRI and not ALPHA_PER_CHANNEL).
        counter_pointer: Pointer to int32 [>= cdiv(C, BLOCK_C) + 1] zeros: programs finished
            per channel block, then channel blocks finished; each is set back to 0 by its last.
        N, C, HW, W: Batch size, channels, H*W and W of x.
        *_stride_*: Strides; with SPLIT_HW false *_stride_w is the merged H*W stride.
        samples_per_program, hw_splits, hw_chunk: The work split (module docstring).
        row_programs: Size of grid axis 1.
        abri_row_offset: (K - 1) * C, offset of the last statistics row.
        TWO_ROWS: K = 2 (ABRi with running statistics).
        COMPUTE_GRAD_X: Running statistics are constants, so grad_x = dy * scale is written here.
        RELU, HAS_*, ABRI, ALPHA_PER_CHANNEL, SPLIT_HW, ACC, BLOCK_HW, BLOCK_C: As in
            fwd_normalize_kernel.
        BLOCK_R: Partial rows reduced per step; BLOCK_TOTAL: channels summed per step.
    """
    pid_c = tl.program_id(0)
    pid_rows = tl.program_id(1)
    c_offsets = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offsets < C
    mean, invstd, abri_mean, scale, shift = saved_affine(
        mean_pointer, invstd_pointer, abri_row_offset, c_offsets, c_mask, weight_pointer,
        bias_pointer, abri_weight_pointer, abri_bias_pointer, alpha_pointer, HAS_WEIGHT, HAS_BIAS,
        HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ABRI, ALPHA_PER_CHANNEL, ACC)

    n_start, n_end, hw_start, hw_end = row_program_range(
        pid_rows, N, HW, samples_per_program, hw_splits, hw_chunk)
    # Element-wise accumulators, reduced across the tile rows once at the end.
    sum_dy = tl.zeros([BLOCK_HW, BLOCK_C], dtype=ACC)
    sum_dy_centered = tl.zeros([BLOCK_HW, BLOCK_C], dtype=ACC)
    abri_sum_dy_centered = tl.zeros([BLOCK_HW, BLOCK_C], dtype=ACC)
    for n in range(n_start, n_end):
        for hw_tile in range(hw_start, hw_end, BLOCK_HW):
            hw = hw_tile + tl.arange(0, BLOCK_HW)
            mask = (hw < hw_end)[:, None] & c_mask[None, :]
            x = tl.load(tile_pointers(x_pointer, n, hw, c_offsets, W, x_stride_n, x_stride_c,
                                       x_stride_h, x_stride_w, SPLIT_HW),
                        mask=mask, other=0).to(ACC)
            dy = tl.load(tile_pointers(grad_y_pointer, n, hw, c_offsets, W, grad_y_stride_n,
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
                store_rounded(tile_pointers(grad_x_pointer, n, hw, c_offsets, W,
                                              grad_x_stride_n, grad_x_stride_c, grad_x_stride_h,
                                              grad_x_stride_w, SPLIT_HW), grad_x, mask)

    row_size = row_programs * C
    offsets = pid_rows * C + c_offsets
    tl.store(partial_pointer + offsets, tl.sum(sum_dy, axis=0), mask=c_mask)
    tl.store(partial_pointer + row_size + offsets, tl.sum(sum_dy_centered, axis=0), mask=c_mask)
    if TWO_ROWS:
        tl.store(partial_pointer + 2 * row_size + offsets, tl.sum(abri_sum_dy_centered, axis=0),
                 mask=c_mask)

    # Every thread's partials, then (barrier) one release; the last program acquires them all.
    tl.debug_barrier()
    finished = tl.atomic_add(counter_pointer + pid_c, 1, sem="acq_rel")
    if finished == row_programs - 1:
        _finalize_sums(
            partial_pointer, invstd_pointer, sums_pointer, weight_pointer, bias_pointer,
            abri_weight_pointer, abri_bias_pointer, alpha_pointer, grad_weight_pointer,
            grad_bias_pointer, grad_abri_weight_pointer, grad_abri_bias_pointer,
            grad_alpha_pointer, c_offsets, c_mask, C, row_programs, abri_row_offset, TWO_ROWS,
            HAS_WEIGHT, HAS_BIAS, HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ABRI, ALPHA_PER_CHANNEL, ACC,
            BLOCK_R, BLOCK_C)
        tl.store(counter_pointer + pid_c, 0)
        if ABRI:
            if not ALPHA_PER_CHANNEL:
                channel_blocks = tl.num_programs(0)
                tl.debug_barrier()  # every thread's grad_alpha stores before the release
                blocks_done = tl.atomic_add(counter_pointer + channel_blocks, 1, sem="acq_rel")
                if blocks_done == channel_blocks - 1:
                    _store_alpha_total(grad_alpha_pointer, grad_alpha_total_pointer, C, ACC,
                                       BLOCK_TOTAL)
                    tl.store(counter_pointer + channel_blocks, 0)


@triton.jit
def _store_alpha_total(grad_alpha_pointer, grad_alpha_total_pointer, C, ACC: tl.constexpr,
                       BLOCK_TOTAL: tl.constexpr):
    """grad_alpha_total = sum of the C per-channel d/d alpha, in a fixed order."""
    total = tl.zeros([BLOCK_TOTAL], dtype=ACC)
    for start in range(0, C, BLOCK_TOTAL):
        offsets = start + tl.arange(0, BLOCK_TOTAL)
        total += tl.load(grad_alpha_pointer + offsets, mask=offsets < C, other=0,
                         cache_modifier=".cg")
    offsets = tl.arange(0, 1)
    store_rounded(grad_alpha_total_pointer + offsets, tl.broadcast_to(tl.sum(total, axis=0), (1,)),
                  offsets < 1)


@triton.jit
def _sum_partial_rows(partial_pointer, row_programs, C, c_offsets, c_mask, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Fixed-order sum over the row_programs rows of one contiguous [row_programs, C] plane."""
    total = tl.zeros([BLOCK_C], dtype=ACC)
    for row_start in range(0, row_programs, BLOCK_R):
        rows = row_start + tl.arange(0, BLOCK_R)
        mask = (rows < row_programs)[:, None] & c_mask[None, :]
        # ".cg": other programs wrote these; read them from L2, not this SM's (incoherent) L1.
        block = tl.load(partial_pointer + rows[:, None] * C + c_offsets[None, :], mask=mask,
                        other=0, cache_modifier=".cg")
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
def _finalize_sums(
    partial_pointer, invstd_pointer, sums_pointer,
    weight_pointer, bias_pointer, abri_weight_pointer, abri_bias_pointer, alpha_pointer,
    grad_weight_pointer, grad_bias_pointer, grad_abri_weight_pointer, grad_abri_bias_pointer,
    grad_alpha_pointer, c_offsets, c_mask,
    C, row_programs, abri_row_offset,
    TWO_ROWS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ABRI_WEIGHT: tl.constexpr, HAS_ABRI_BIAS: tl.constexpr, ABRI: tl.constexpr,
    ALPHA_PER_CHANNEL: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """S1 = sum(dy), S2_k = sum(dy * xhat_k) of channels ``c_offsets`` in a fixed order, and the
    parameter gradients.

    Args:
        partial_pointer: Pointer to the [1 + K, row_programs, C] partials of
            bwd_partial_sums_kernel.
        invstd_pointer: Pointer to the forward's [K, C] invstd.
        sums_pointer: Pointer to the output [2, C] (accumulation dtype): S1 and S2 of row 0, read
            by bwd_grad_x_kernel.
        weight_pointer ... alpha_pointer: As in fwd_normalize_kernel.
        grad_weight_pointer, grad_bias_pointer: Outputs [C] in the parameters' dtypes:
            alpha * S2_0 and alpha * S1 (alpha = 1 without ABRi).
        grad_abri_weight_pointer, grad_abri_bias_pointer: Outputs [C]: (1 - alpha) * S2_last and
            (1 - alpha) * S1.
        grad_alpha_pointer: Output [C]: per-channel d/d alpha.
        c_offsets, c_mask: The channels.
        C, row_programs: Channels and partial rows.
        abri_row_offset: (K - 1) * C, offset of the last statistics row.
        TWO_ROWS, HAS_*, ABRI, ALPHA_PER_CHANNEL, ACC: As in bwd_partial_sums_kernel.
        BLOCK_R, BLOCK_C: Partial rows and channels loaded per step.
    """
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
        alpha = load_alpha(alpha_pointer, c_offsets, c_mask, ALPHA_PER_CHANNEL, ACC)
        if HAS_WEIGHT:
            store_rounded(grad_weight_pointer + c_offsets, alpha * sum_dy_xhat, c_mask)
        if HAS_BIAS:
            store_rounded(grad_bias_pointer + c_offsets, alpha * sum_dy, c_mask)
        if HAS_ABRI_WEIGHT:
            store_rounded(grad_abri_weight_pointer + c_offsets, (1 - alpha) * abri_sum_dy_xhat,
                           c_mask)
        if HAS_ABRI_BIAS:
            store_rounded(grad_abri_bias_pointer + c_offsets, (1 - alpha) * sum_dy, c_mask)
        grad_alpha = (
            _alpha_branch(weight_pointer, bias_pointer, c_offsets, c_mask, sum_dy, sum_dy_xhat,
                          HAS_WEIGHT, HAS_BIAS, ACC)
            - _alpha_branch(abri_weight_pointer, abri_bias_pointer, c_offsets, c_mask, sum_dy,
                            abri_sum_dy_xhat, HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ACC))
        store_rounded(grad_alpha_pointer + c_offsets, grad_alpha, c_mask)
    else:
        if HAS_WEIGHT:
            store_rounded(grad_weight_pointer + c_offsets, sum_dy_xhat, c_mask)
        if HAS_BIAS:
            store_rounded(grad_bias_pointer + c_offsets, sum_dy, c_mask)


@triton.jit(do_not_specialize=_BATCH_DEPENDENT)
def bwd_grad_x_kernel(
    grad_y_pointer, x_pointer, grad_x_pointer, mean_pointer, invstd_pointer, sums_pointer,
    weight_pointer, bias_pointer, abri_weight_pointer, abri_bias_pointer, alpha_pointer,
    N, C, HW, W,
    grad_y_stride_n, grad_y_stride_c, grad_y_stride_h, grad_y_stride_w,
    x_stride_n, x_stride_c, x_stride_h, x_stride_w,
    grad_x_stride_n, grad_x_stride_c, grad_x_stride_h, grad_x_stride_w,
    samples_per_program, hw_splits, hw_chunk, abri_row_offset, count,
    RELU: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ABRI_WEIGHT: tl.constexpr, HAS_ABRI_BIAS: tl.constexpr, ABRI: tl.constexpr,
    ALPHA_PER_CHANNEL: tl.constexpr, SPLIT_HW: tl.constexpr, ACC: tl.constexpr,
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Batch-statistics grad_x = scale * (dy - S1 / M - xhat * S2 / M), M = ``count``.

    Grid: (cdiv(C, BLOCK_C), row_programs).

    Args:
        grad_y_pointer, x_pointer, grad_x_pointer: As in bwd_partial_sums_kernel (grad_x is
            always written here).
        mean_pointer, invstd_pointer: Pointers to the forward's [K, C] statistics.
        sums_pointer: Pointer to [2, C]: S1 and S2 of statistics row 0 (_finalize_sums), or
            S1 / M and S2 / M of the global batch with count = 1 (``batch_norm_bwd_elemt``).
        weight_pointer ... alpha_pointer: As in fwd_normalize_kernel.
        N, C, HW, W, *_stride_*, samples_per_program, hw_splits, hw_chunk, abri_row_offset:
            As in bwd_partial_sums_kernel.
        count: M, the elements per channel that the sums divide by (N*H*W, or 1 when the
            sums are already means).
        RELU, HAS_*, ABRI, ALPHA_PER_CHANNEL, SPLIT_HW, ACC, BLOCK_HW, BLOCK_C: As in
            bwd_partial_sums_kernel.
    """
    pid_rows = tl.program_id(1)
    c_offsets = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offsets < C
    mean, invstd, abri_mean, scale, shift = saved_affine(
        mean_pointer, invstd_pointer, abri_row_offset, c_offsets, c_mask, weight_pointer,
        bias_pointer, abri_weight_pointer, abri_bias_pointer, alpha_pointer, HAS_WEIGHT, HAS_BIAS,
        HAS_ABRI_WEIGHT, HAS_ABRI_BIAS, ABRI, ALPHA_PER_CHANNEL, ACC)
    elements = tl.cast(count, tl.int64).to(ACC)
    mean_dy = tl.load(sums_pointer + c_offsets, mask=c_mask, other=0) / elements
    # xhat * S2 / M = (x - mean) * projection
    projection = tl.load(sums_pointer + C + c_offsets, mask=c_mask, other=0) / elements * invstd

    n_start, n_end, hw_start, hw_end = row_program_range(
        pid_rows, N, HW, samples_per_program, hw_splits, hw_chunk)
    for n in range(n_start, n_end):
        for hw_tile in range(hw_start, hw_end, BLOCK_HW):
            hw = hw_tile + tl.arange(0, BLOCK_HW)
            mask = (hw < hw_end)[:, None] & c_mask[None, :]
            x = tl.load(tile_pointers(x_pointer, n, hw, c_offsets, W, x_stride_n, x_stride_c,
                                       x_stride_h, x_stride_w, SPLIT_HW),
                        mask=mask, other=0).to(ACC)
            dy = tl.load(tile_pointers(grad_y_pointer, n, hw, c_offsets, W, grad_y_stride_n,
                                        grad_y_stride_c, grad_y_stride_h, grad_y_stride_w,
                                        SPLIT_HW),
                         mask=mask, other=0).to(ACC)
            if RELU:
                dy = tl.where(x * scale[None, :] + shift[None, :] > 0, dy, 0)
            grad_x = scale[None, :] * (dy - mean_dy[None, :]
                                       - (x - mean[None, :]) * projection[None, :])
            store_rounded(tile_pointers(grad_x_pointer, n, hw, c_offsets, W, grad_x_stride_n,
                                          grad_x_stride_c, grad_x_stride_h, grad_x_stride_w,
                                          SPLIT_HW), grad_x, mask)
