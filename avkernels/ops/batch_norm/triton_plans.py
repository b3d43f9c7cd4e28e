"""Launch plans of the Triton batch-norm kernels: the tile shape, work split, grid, integer
arguments and option dicts of each launch, computed from the input's geometry, dtypes and the
op's flags alone (docs/DESIGN.md, "Kernel designs and launch plans"). The launchers in
:mod:`avkernels.ops.batch_norm.triton_launch` keep one plan per key and reuse it; the work split
and the kernels are described in :mod:`avkernels.ops.batch_norm.triton_kernels`.
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from avkernels.ops.batch_norm.schema import accumulation_dtype, output_memory_format

TRITON_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}

# Heuristic constants (see split_work): elements per tile, tile extents, and how many programs
# per SM an element-wise launch aims for (enough loads in flight to saturate HBM). 1024-element
# tiles on 4 warps keep the kernels at <= 128 registers per thread on sm_90 for 16- and 32-bit input
# (float64 takes up to 168; no spills either way), as tests/ops/test_triton_compile.py checks.
TILE_ELEMENTS = 1024
MAX_BLOCK_HW = 256
MAX_BLOCK_C_CHANNELS_INNER = 64
PROGRAMS_PER_SM = 8
# The interpreter (CPU tensors, TRITON_INTERPRET=1) runs programs one after another: few of them.
INTERPRETER_PROGRAMS = 4


# --- launch planning -----------------------------------------------------------------------------


class WorkSplit(NamedTuple):
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
        return (self.channel_blocks, self.row_programs)


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * sm_count(
            device.index if device.index is not None else torch.cuda.current_device()
        )
    return INTERPRETER_PROGRAMS


def merged_hw_stride(t: Tensor) -> int | None:
    """The one stride that walks H*W positions of ``t`` in order, or None if there is none."""
    height, width = t.shape[2:]
    stride_h, stride_w = t.stride()[2:]
    if width == 1:
        return stride_h
    if height == 1 or stride_h == width * stride_w:
        return stride_w
    return None


def stride_args(tensors: tuple[Tensor, ...]) -> tuple[bool, list[int]]:
    """(SPLIT_HW, [stride_n, stride_c, stride_h, stride_w] per tensor) for one launch."""
    merged = [merged_hw_stride(t) for t in tensors]
    split_hw = any(stride is None for stride in merged)
    args: list[int] = []
    for t, merged_stride in zip(tensors, merged):
        stride_n, stride_c, stride_h, stride_w = t.stride()
        if split_hw:
            args += [stride_n, stride_c, stride_h, stride_w]
        else:
            args += [stride_n, stride_c, 0, merged_stride]
    return split_hw, args


def split_work(x: Tensor, split_hw: bool) -> WorkSplit:
    """Tile along the contiguous axis; split rows over samples, then over H*W, to fill the GPU."""
    batch, channels, height, width = x.shape
    spatial = height * width
    if x.stride(1) == 1:  # channels_last (or 1x1 maps): channels are contiguous
        block_c = min(triton.next_power_of_2(max(channels, 1)), MAX_BLOCK_C_CHANNELS_INNER)
        block_hw = min(TILE_ELEMENTS // block_c, triton.next_power_of_2(max(spatial, 1)))
    else:
        block_hw = min(triton.next_power_of_2(max(spatial, 1)), MAX_BLOCK_HW)
        block_c = min(TILE_ELEMENTS // block_hw, triton.next_power_of_2(max(channels, 1)))
    num_warps = max(1, min(4, block_hw * block_c // 256))
    channel_blocks = max(1, triton.cdiv(channels, block_c))
    hw_blocks = max(1, triton.cdiv(spatial, block_hw))
    rows_wanted = max(1, triton.cdiv(target_programs(x.device), channel_blocks))
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
    return WorkSplit(
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


# --- launch plans ------------------------------------------------------------------------------


def template(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """One element expanded to ``shape``: ``torch.empty_like`` of it allocates a contiguous
    ``shape`` tensor, the cheapest of torch's allocation calls (about 1 us against 2-4 us for
    ``new_empty(shape, dtype=...)``, measured by benchmarks/host_overhead.py)."""
    return torch.empty((), dtype=dtype, device=device).expand(shape)


def strides_like(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """A storage-less tensor with the strides an output in ``memory_format`` will have."""
    return torch.empty_like(x, memory_format=memory_format, device="meta")


def tile_options(plan: WorkSplit, acc: torch.dtype) -> dict:
    return dict(
        SPLIT_HW=plan.split_hw,
        ACC=TRITON_ACC[acc],
        BLOCK_HW=plan.block_hw,
        BLOCK_C=plan.block_c,
        num_warps=plan.num_warps,
    )


def affine_flags(a) -> dict:
    return dict(
        HAS_WEIGHT=a.weight is not None,
        HAS_BIAS=a.bias is not None,
        HAS_ABRI_WEIGHT=a.abri_weight is not None,
        HAS_ABRI_BIAS=a.abri_bias is not None,
        ABRI=a.abri_alpha is not None,
        ALPHA_PER_CHANNEL=a.abri_alpha is not None and a.abri_alpha.numel() > 1,
    )


class ForwardPlan(NamedTuple):
    y_format: torch.memory_format
    # Templates (see template) of the statistics and the partials.
    stats: Tensor
    partial: Tensor
    scratch_size: int  # zeroed int32 counters needed (see _scratch)
    count: int  # values per channel (N*H*W)
    grid: tuple[int, int]
    stats_ints: tuple[int, ...]
    stats_options: dict
    normalize_ints: tuple[int, ...]
    normalize_options: dict


def forward_plan(a, store_var: bool = False) -> ForwardPlan:
    x = a.x
    batch, channels, height, width = x.shape
    spatial = height * width
    acc = accumulation_dtype(x)
    y_format = output_memory_format(x)
    split_hw, strides = stride_args((x, strides_like(x, y_format)))
    plan = split_work(x, split_hw)
    geometry = (batch, channels, spatial, width)
    work_split = (plan.samples_per_program, plan.hw_splits, plan.hw_chunk)
    tile = tile_options(plan, acc)
    count_dead = a.dead_count is not None
    map_split = count_dead and plan.hw_splits > 1
    return ForwardPlan(
        y_format=y_format,
        stats=template(
            (2 if a.abri_alpha is not None and not a.use_batch_stats else 1, channels),
            acc,
            x.device,
        ),
        partial=template((3, plan.row_programs, channels), acc, x.device),
        # Per channel block (statistics), or per map (split maps): see the kernels.
        scratch_size=max(plan.channel_blocks, batch * channels if map_split else 0),
        count=batch * spatial,
        grid=plan.grid,
        stats_ints=(*geometry, *strides[:4], *work_split, plan.row_programs),
        stats_options=dict(
            # An empty batch leaves the running statistics as they are, as nn.BatchNorm2d does.
            UPDATE_RUNNING=a.running_mean is not None and batch * spatial > 0,
            UPDATE_ABRI_RUNNING=a.abri_running_mean is not None and batch * spatial > 0,
            STORE_VAR=store_var,
            BLOCK_R=TILE_ELEMENTS // plan.block_c,
            **tile,
        ),
        normalize_ints=(*geometry, *strides, *work_split),
        normalize_options=dict(
            USE_BATCH_STATS=a.use_batch_stats,
            RELU=a.relu,
            COUNT_DEAD=count_dead,
            MAP_SPLIT=map_split,
            **affine_flags(a),
            **tile,
        ),
    )


class BackwardPlan(NamedTuple):
    grad_x_format: torch.memory_format
    # Templates (see template): partials, the [2, C] sums, an empty gradient, and the
    # per-channel alpha gradient that a layer-wise alpha sums.
    partial: Tensor
    sums: Tensor
    no_grad: Tensor
    alpha_per_channel: Tensor
    alpha_total: Tensor  # template of a layer-wise alpha's gradient, (1,) in alpha's dtype
    scratch_size: int
    has_grads: tuple[bool, bool, bool, bool]  # weight, bias, abri_weight, abri_bias
    abri: bool
    per_channel_alpha: bool
    grid: tuple[int, int]
    partial_ints: tuple[int, ...]
    partial_options: dict
    grad_x_ints: tuple[int, ...]
    count: int  # values per channel (N*H*W)
    grad_x_options: dict


def backward_plan(a) -> BackwardPlan:
    x, mean = a.x, a.mean
    batch, channels, height, width = x.shape
    grad_x_format = output_memory_format(x)
    split_hw, strides = stride_args((a.grad_y, x, strides_like(x, grad_x_format)))
    plan = split_work(x, split_hw)
    geometry = (batch, channels, x.shape[2] * width, width)
    work_split = (plan.samples_per_program, plan.hw_splits, plan.hw_chunk)
    abri_row_offset = (mean.shape[0] - 1) * channels
    two_rows = mean.shape[0] == 2
    flags = affine_flags(a)
    tile = tile_options(plan, mean.dtype)
    abri = a.abri_alpha is not None
    return BackwardPlan(
        grad_x_format=grad_x_format,
        partial=template((1 + mean.shape[0], plan.row_programs, channels), mean.dtype, x.device),
        sums=template((2, channels), mean.dtype, x.device),
        no_grad=template((0,), mean.dtype, x.device),
        alpha_per_channel=template((channels if abri else 0,), mean.dtype, x.device),
        alpha_total=template((1,), a.abri_alpha.dtype if abri else mean.dtype, x.device),
        scratch_size=plan.channel_blocks + 1,
        # The added BN's parameters only take a gradient in ABRi mode, as in the reference.
        has_grads=(
            a.weight is not None,
            a.bias is not None,
            abri and a.abri_weight is not None,
            abri and a.abri_bias is not None,
        ),
        abri=abri,
        per_channel_alpha=flags["ALPHA_PER_CHANNEL"],
        grid=plan.grid,
        partial_ints=(*geometry, *strides, *work_split, plan.row_programs, abri_row_offset),
        partial_options=dict(
            TWO_ROWS=two_rows,
            COMPUTE_GRAD_X=not a.use_batch_stats,
            RELU=a.relu,
            **flags,
            **tile,
            BLOCK_R=TILE_ELEMENTS // plan.block_c,
            BLOCK_TOTAL=min(triton.next_power_of_2(channels), TILE_ELEMENTS),
        ),
        grad_x_ints=(*geometry, *strides, *work_split, abri_row_offset),
        count=batch * x.shape[2] * width,
        grad_x_options=dict(RELU=a.relu, **flags, **tile),
    )
