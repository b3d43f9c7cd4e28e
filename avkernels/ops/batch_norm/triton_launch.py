"""Launchers of the Triton batch-norm kernels: the CUDA kernels of ``avkernels::batch_norm_fwd``
and ``batch_norm_bwd``, registered by :mod:`avkernels.ops.batch_norm.registration`.

:func:`forward` and :func:`backward` take the ops' arguments (see
:mod:`avkernels.ops.batch_norm.schema`) and reproduce :mod:`avkernels.ops.batch_norm.reference`;
they are pure launchers (no synchronisation, no data-dependent Python control flow). The work
split and the kernels are described in :mod:`avkernels.ops.batch_norm.triton_kernels`.
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from avkernels.ops import checks
from avkernels.ops.batch_norm.schema import (
    BackwardArgs,
    ForwardArgs,
    accumulation_dtype,
    output_memory_format,
)
from avkernels.ops.batch_norm.triton_kernels import (
    bwd_finalize_kernel,
    bwd_grad_x_kernel,
    bwd_partial_sums_kernel,
    fwd_finalize_kernel,
    fwd_normalize_kernel,
    fwd_partial_stats_kernel,
)

_TRITON_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}

# Heuristic constants (see _plan): elements per tile, tile extents, and how many programs per SM
# an element-wise launch aims for (enough loads in flight to saturate HBM). 1024-element tiles on
# 4 warps keep the kernels at <= 128 registers per thread on sm_90 for 16- and 32-bit input
# (float64 takes up to 168; no spills either way), as tests/ops/test_triton_compile.py checks.
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


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * _sm_count(
            device.index if device.index is not None else torch.cuda.current_device()
        )
    return _INTERPRETER_PROGRAMS


def _merged_hw_stride(t: Tensor) -> int | None:
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
        blocks_per_split = triton.cdiv(
            hw_blocks, min(hw_blocks, triton.cdiv(rows_wanted, max(batch, 1)))
        )
        hw_splits = triton.cdiv(hw_blocks, blocks_per_split)
    row_programs = max(1, triton.cdiv(batch, samples_per_program) * hw_splits)
    return _Plan(
        block_hw,
        block_c,
        num_warps,
        channel_blocks,
        samples_per_program,
        hw_splits,
        blocks_per_split * block_hw,
        row_programs,
        split_hw,
    )


def _finalize_launch(channels: int, row_programs: int) -> tuple[tuple[int], dict]:
    """Grid and block/warp options of the finalize kernels."""
    block_c = min(triton.next_power_of_2(max(channels, 1)), _FINALIZE_BLOCK_C)
    block_r = min(triton.next_power_of_2(row_programs), _FINALIZE_TILE_ELEMENTS // block_c)
    num_warps = max(1, min(8, block_r * block_c // 256))
    grid = (max(1, triton.cdiv(channels, block_c)),)
    return grid, dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)


# --- launch arguments -------------------------------------------------------------------------


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _affine_flags(weight, bias, abri_weight, abri_bias, abri_alpha) -> dict:
    return dict(
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_ABRI_WEIGHT=abri_weight is not None,
        HAS_ABRI_BIAS=abri_bias is not None,
        ABRI=abri_alpha is not None,
        ALPHA_PER_CHANNEL=abri_alpha is not None and abri_alpha.numel() > 1,
    )


# --- launchers -----------------------------------------------------------------------------------


def forward(*args) -> tuple[Tensor, Tensor, Tensor]:
    """``avkernels::batch_norm_fwd`` on CUDA: returns ``(y, mean, invstd)``."""
    a = ForwardArgs(*args)
    checks.batch_norm_forward(a)
    x, use_batch_stats, momentum, eps, relu = a.x, a.use_batch_stats, a.momentum, a.eps, a.relu
    running_mean, running_var = a.running_mean, a.running_var
    abri_running_mean, abri_running_var = a.abri_running_mean, a.abri_running_var
    dead_count, dead_sample_count, seen = a.dead_count, a.dead_sample_count, a.seen
    batch, channels, height, width = x.shape
    abri = a.abri_alpha is not None
    count_dead = dead_count is not None
    spatial = height * width
    count = batch * spatial
    # An empty batch leaves the running statistics as they are, as nn.BatchNorm2d does.
    update_running = use_batch_stats and count > 0 and running_mean is not None
    update_abri_running = use_batch_stats and count > 0 and abri_running_mean is not None

    acc = accumulation_dtype(x)
    weight, bias, abri_weight, abri_bias, abri_alpha = map(
        _contiguous, (a.weight, a.bias, a.abri_weight, a.abri_bias, a.abri_alpha)
    )
    stats_rows = 2 if abri and not use_batch_stats else 1
    y = torch.empty_like(x, memory_format=output_memory_format(x))
    mean = x.new_empty((stats_rows, channels), dtype=acc)
    invstd = torch.empty_like(mean)
    split_hw, strides = _stride_args((x, y))
    plan = _plan(x, split_hw)
    common = dict(
        SPLIT_HW=split_hw,
        ACC=_TRITON_ACC[acc],
        BLOCK_HW=plan.block_hw,
        BLOCK_C=plan.block_c,
        num_warps=plan.num_warps,
    )
    work_split = (plan.samples_per_program, plan.hw_splits, plan.hw_chunk)

    if use_batch_stats:
        partial = x.new_empty((3, plan.row_programs, channels), dtype=acc)
        fwd_partial_stats_kernel[plan.grid](
            x,
            partial,
            batch,
            channels,
            spatial,
            width,
            *strides[:4],
            *work_split,
            plan.row_programs,
            **common,
        )
        finalize_grid, finalize_options = _finalize_launch(channels, plan.row_programs)
        unbiased_momentum = momentum * count / (count - 1) if count > 1 else 0.0
        fwd_finalize_kernel[finalize_grid](
            partial,
            mean,
            invstd,
            running_mean if update_running else mean,
            running_var if update_running else mean,
            abri_running_mean if update_abri_running else mean,
            abri_running_var if update_abri_running else mean,
            channels,
            plan.row_programs,
            float(eps),
            float(momentum),
            1.0 - momentum,
            float(unbiased_momentum),
            UPDATE_RUNNING=update_running,
            UPDATE_ABRI_RUNNING=update_abri_running,
            ACC=_TRITON_ACC[acc],
            **finalize_options,
        )

    map_split = count_dead and plan.hw_splits > 1
    map_alive = (
        torch.zeros((batch, channels), dtype=torch.int32, device=x.device) if map_split else mean
    )
    # Absent optional tensors are never read (their HAS_* / mode flag is off); any pointer does.
    unused = mean
    fwd_normalize_kernel[plan.grid](
        x,
        y,
        mean,
        invstd,
        *(
            unused if t is None else t
            for t in (
                running_mean,
                running_var,
                abri_running_mean,
                abri_running_var,
                weight,
                bias,
                abri_weight,
                abri_bias,
                abri_alpha,
                dead_count,
                dead_sample_count,
                seen,
            )
        ),
        map_alive,
        batch,
        channels,
        spatial,
        width,
        *strides,
        *work_split,
        float(eps),
        USE_BATCH_STATS=use_batch_stats,
        RELU=relu,
        COUNT_DEAD=count_dead,
        MAP_SPLIT=map_split,
        **_affine_flags(weight, bias, abri_weight, abri_bias, abri_alpha),
        **common,
    )
    return y, mean, invstd


def backward(*args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``avkernels::batch_norm_bwd`` on CUDA: ``(grad_x, grad_weight, grad_bias,
    grad_abri_weight, grad_abri_bias, grad_abri_alpha)``."""
    a = BackwardArgs(*args)
    checks.batch_norm_backward(a)
    grad_y, x, mean, invstd = a.grad_y, a.x, a.mean, a.invstd
    use_batch_stats, relu = a.use_batch_stats, a.relu
    batch, channels, height, width = x.shape
    acc = mean.dtype
    mean, invstd = mean.contiguous(), invstd.contiguous()
    if x.numel() == 0:
        # An empty batch sums nothing: its (NaN) batch invstd must not turn the zero sums into
        # NaN parameter gradients (nn.BatchNorm2d gives zeros).
        invstd = torch.zeros_like(invstd)
    weight, bias, abri_weight, abri_bias, abri_alpha = map(
        _contiguous, (a.weight, a.bias, a.abri_weight, a.abri_bias, a.abri_alpha)
    )
    abri = abri_alpha is not None
    flags = _affine_flags(weight, bias, abri_weight, abri_bias, abri_alpha)
    two_rows = mean.shape[0] == 2
    abri_row_offset = (mean.shape[0] - 1) * channels
    spatial = height * width

    grad_x = torch.empty_like(x, memory_format=output_memory_format(x))
    split_hw, strides = _stride_args((grad_y, x, grad_x))
    plan = _plan(x, split_hw)
    common = dict(
        SPLIT_HW=split_hw,
        ACC=_TRITON_ACC[acc],
        BLOCK_HW=plan.block_hw,
        BLOCK_C=plan.block_c,
        num_warps=plan.num_warps,
    )
    work_split = (plan.samples_per_program, plan.hw_splits, plan.hw_chunk)
    unused = mean
    params = tuple(
        unused if p is None else p for p in (weight, bias, abri_weight, abri_bias, abri_alpha)
    )

    partial = x.new_empty((1 + mean.shape[0], plan.row_programs, channels), dtype=acc)
    bwd_partial_sums_kernel[plan.grid](
        grad_y,
        x,
        grad_x,
        mean,
        invstd,
        *params,
        partial,
        batch,
        channels,
        spatial,
        width,
        *strides,
        *work_split,
        plan.row_programs,
        abri_row_offset,
        TWO_ROWS=two_rows,
        COMPUTE_GRAD_X=not use_batch_stats,
        RELU=relu,
        **flags,
        **common,
    )

    def param_grad(param: Tensor | None, is_abri_param: bool) -> Tensor:
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
    bwd_finalize_kernel[finalize_grid](
        partial,
        invstd,
        sums,
        *params,
        *(
            unused if g.numel() == 0 else g
            for g in (
                grad_weight,
                grad_bias,
                grad_abri_weight,
                grad_abri_bias,
                grad_alpha_per_channel,
            )
        ),
        channels,
        plan.row_programs,
        abri_row_offset,
        TWO_ROWS=two_rows,
        **flags,
        ACC=_TRITON_ACC[acc],
        **finalize_options,
    )

    if use_batch_stats:
        bwd_grad_x_kernel[plan.grid](
            grad_y,
            x,
            grad_x,
            mean,
            invstd,
            sums,
            *params,
            batch,
            channels,
            spatial,
            width,
            *strides,
            *work_split,
            abri_row_offset,
            RELU=relu,
            **flags,
            **common,
        )

    if not abri:
        grad_alpha = mean.new_empty(0)
    elif per_channel_alpha:
        grad_alpha = grad_alpha_per_channel
    else:
        grad_alpha = grad_alpha_per_channel.sum().reshape(1).to(abri_alpha.dtype)
    return grad_x, grad_weight, grad_bias, grad_abri_weight, grad_abri_bias, grad_alpha
