"""Launchers of the Triton batch-norm kernels: the CUDA kernels of ``avkernels::batch_norm_fwd``
and ``batch_norm_bwd``, registered by :mod:`avkernels.ops.batch_norm.registration`.

:func:`forward` and :func:`backward` take the ops' arguments (see
:mod:`avkernels.ops.batch_norm.schema`) and reproduce :mod:`avkernels.ops.batch_norm.reference`;
they are pure launchers (no synchronisation, no data-dependent Python control flow). The work
split and the kernels are described in :mod:`avkernels.ops.batch_norm.triton_kernels`.

Host cost (docs/DESIGN.md, "Kernel designs and launch plans"): everything that depends only on
the input's geometry and the op's flags (grids, tile shapes, integer kernel arguments, option
dicts) is computed once per launch plan key and kept in a dict; a call checks its arguments,
looks its plan up, allocates its outputs and launches. Every launch runs under a guard for the
input's device, so its current stream is the one Triton launches on.
"""

import contextlib
import functools
import operator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from avkernels.ops import checks
from avkernels.ops._library import launch_directly
from avkernels.ops.batch_norm.schema import (
    BackwardArgs,
    BackwardElemtArgs,
    ForwardArgs,
    accumulation_dtype,
    batch_stats_backward,
    output_memory_format,
)
from avkernels.ops.batch_norm.triton_kernels import (
    bwd_grad_x_kernel,
    bwd_partial_sums_kernel,
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
        return (self.channel_blocks, self.row_programs)


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


# --- launch plans --------------------------------------------------------------------------------

# A launch plan depends only on its key (geometry, dtypes, device, flags), so a dict keeps one per
# key; it is emptied when it grows past this (a workload whose shapes never repeat).
_MAX_PLANS = 1024
_FORWARD_PLANS: dict = {}
_BACKWARD_PLANS: dict = {}
_IS_NONE = functools.partial(operator.is_, None)
_NO_GUARD = contextlib.nullcontext()


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` the current CUDA device while launching: Triton launches on the current
    device's current stream, which must be the input's (a no-op when it already is)."""
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return _NO_GUARD
    return torch.cuda.device(device)


def clear_plans() -> None:
    """Forgets every launch plan (after changing what plans depend on, e.g. in a benchmark)."""
    _FORWARD_PLANS.clear()
    _BACKWARD_PLANS.clear()


# Zeroed int32 counters, per (device, stream), that every kernel using them leaves zeroed: the
# last-program-done counters and the split-map slots need zeros without a zero-fill launch per
# call. Launches on one stream run one after another, so they never use a buffer at once.
_SCRATCH: dict = {}


def _scratch(device: torch.device, size: int) -> Tensor:
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    buffer = _SCRATCH.get((device, stream))
    if buffer is None or buffer.numel() < size:
        grown = max(size, 2 * (0 if buffer is None else buffer.numel()))
        buffer = _SCRATCH[device, stream] = torch.zeros(grown, dtype=torch.int32, device=device)
    return buffer


def _keep_plan(plans: dict, key: tuple, plan):
    if len(plans) >= _MAX_PLANS:
        plans.clear()
    plans[key] = plan
    return plan


def _template(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """One element expanded to ``shape``: ``torch.empty_like`` of it allocates a contiguous
    ``shape`` tensor, the cheapest of torch's allocation calls (about 1 us against 2-4 us for
    ``new_empty(shape, dtype=...)``, measured by benchmarks/host_overhead.py)."""
    return torch.empty((), dtype=dtype, device=device).expand(shape)


def _like(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """A storage-less tensor with the strides an output in ``memory_format`` will have."""
    return torch.empty_like(x, memory_format=memory_format, device="meta")


def _tile_options(plan: _Plan, acc: torch.dtype) -> dict:
    return dict(
        SPLIT_HW=plan.split_hw,
        ACC=_TRITON_ACC[acc],
        BLOCK_HW=plan.block_hw,
        BLOCK_C=plan.block_c,
        num_warps=plan.num_warps,
    )


def _affine_flags(a) -> dict:
    return dict(
        HAS_WEIGHT=a.weight is not None,
        HAS_BIAS=a.bias is not None,
        HAS_ABRI_WEIGHT=a.abri_weight is not None,
        HAS_ABRI_BIAS=a.abri_bias is not None,
        ABRI=a.abri_alpha is not None,
        ALPHA_PER_CHANNEL=a.abri_alpha is not None and a.abri_alpha.numel() > 1,
    )


class _ForwardPlan(NamedTuple):
    y_format: torch.memory_format
    # Templates (see _template) of the statistics and the partials.
    stats: Tensor
    partial: Tensor
    scratch_size: int  # zeroed int32 counters needed (see _scratch)
    count: int  # values per channel (N*H*W)
    grid: tuple[int, int]
    stats_ints: tuple[int, ...]
    stats_options: dict
    normalize_ints: tuple[int, ...]
    normalize_options: dict


def _forward_plan(a, store_var: bool = False) -> _ForwardPlan:
    x = a.x
    batch, channels, height, width = x.shape
    spatial = height * width
    acc = accumulation_dtype(x)
    y_format = output_memory_format(x)
    split_hw, strides = _stride_args((x, _like(x, y_format)))
    plan = _plan(x, split_hw)
    geometry = (batch, channels, spatial, width)
    work_split = (plan.samples_per_program, plan.hw_splits, plan.hw_chunk)
    tile = _tile_options(plan, acc)
    count_dead = a.dead_count is not None
    map_split = count_dead and plan.hw_splits > 1
    return _ForwardPlan(
        y_format=y_format,
        stats=_template(
            (2 if a.abri_alpha is not None and not a.use_batch_stats else 1, channels),
            acc,
            x.device,
        ),
        partial=_template((3, plan.row_programs, channels), acc, x.device),
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
            BLOCK_R=_TILE_ELEMENTS // plan.block_c,
            **tile,
        ),
        normalize_ints=(*geometry, *strides, *work_split),
        normalize_options=dict(
            USE_BATCH_STATS=a.use_batch_stats,
            RELU=a.relu,
            COUNT_DEAD=count_dead,
            MAP_SPLIT=map_split,
            **_affine_flags(a),
            **tile,
        ),
    )


class _BackwardPlan(NamedTuple):
    grad_x_format: torch.memory_format
    # Templates (see _template): partials, the [2, C] sums, an empty gradient, and the
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


def _backward_plan(a) -> _BackwardPlan:
    x, mean = a.x, a.mean
    batch, channels, height, width = x.shape
    grad_x_format = output_memory_format(x)
    split_hw, strides = _stride_args((a.grad_y, x, _like(x, grad_x_format)))
    plan = _plan(x, split_hw)
    geometry = (batch, channels, x.shape[2] * width, width)
    work_split = (plan.samples_per_program, plan.hw_splits, plan.hw_chunk)
    abri_row_offset = (mean.shape[0] - 1) * channels
    two_rows = mean.shape[0] == 2
    flags = _affine_flags(a)
    tile = _tile_options(plan, mean.dtype)
    abri = a.abri_alpha is not None
    return _BackwardPlan(
        grad_x_format=grad_x_format,
        partial=_template((1 + mean.shape[0], plan.row_programs, channels), mean.dtype, x.device),
        sums=_template((2, channels), mean.dtype, x.device),
        no_grad=_template((0,), mean.dtype, x.device),
        alpha_per_channel=_template((channels if abri else 0,), mean.dtype, x.device),
        alpha_total=_template((1,), a.abri_alpha.dtype if abri else mean.dtype, x.device),
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
            BLOCK_R=_TILE_ELEMENTS // plan.block_c,
            BLOCK_TOTAL=min(triton.next_power_of_2(channels), _TILE_ELEMENTS),
        ),
        grad_x_ints=(*geometry, *strides, *work_split, abri_row_offset),
        count=batch * x.shape[2] * width,
        grad_x_options=dict(RELU=a.relu, **flags, **tile),
    )


# --- launchers -----------------------------------------------------------------------------------


def _forward_plan_for(a, key: tuple, store_var: bool = False) -> _ForwardPlan:
    """The cached forward plan of ``key``, after the forward's argument checks."""
    plan = _FORWARD_PLANS.get(key)
    checks.batch_norm_forward(a, input_checked=plan is not None)
    if plan is None:
        plan = _keep_plan(_FORWARD_PLANS, key, _forward_plan(a, store_var))
    return plan


def forward(*args) -> tuple[Tensor, Tensor, Tensor]:
    """``avkernels::batch_norm_fwd`` on CUDA: returns ``(y, mean, invstd)``."""
    a = ForwardArgs(*args)
    x, alpha = a.x, a.abri_alpha
    key = (
        x.shape,
        x.stride(),
        x.dtype,
        x.device,
        a.use_batch_stats,
        a.relu,
        tuple(map(_IS_NONE, args[1:13])),
        alpha is not None and alpha.numel() > 1,
    )
    plan = _forward_plan_for(a, key)
    with _device_guard(x.device):
        return _launch_forward(a, plan, _scratch(x.device, plan.scratch_size), launch_directly)


def stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """``avkernels::batch_norm_stats`` on CUDA: the training forward's statistics kernel, storing
    ``(mean, biased var)`` of shape (C,)."""
    a = ForwardArgs(x, *(None,) * 12, True, 0.0, 0.0, False)
    plan = _forward_plan_for(a, (x.shape, x.stride(), x.dtype, x.device, "stats"), store_var=True)
    if x.numel() == 0:  # no values: NaN statistics, as the other kernels give
        nan = torch.full_like(plan.stats[0], float("nan"))
        return nan, nan.clone()
    with _device_guard(x.device):
        mean, var = _launch_statistics(
            a, plan, _scratch(x.device, plan.scratch_size), launch_directly
        )
    return mean.view(-1), var.view(-1)


def _backward_plan_for(a, op: str = "batch_norm_bwd") -> _BackwardPlan:
    """The cached backward plan of ``a`` after the argument checks of ``op``."""
    grad_y, x, alpha = a.grad_y, a.x, a.abri_alpha
    key = (
        x.shape,
        x.stride(),
        grad_y.stride(),
        x.dtype,
        grad_y.dtype,
        x.device,
        a.mean.shape,
        a.mean.dtype,
        a.use_batch_stats,
        a.relu,
        tuple(map(_IS_NONE, a[2:7])),
        alpha is not None and alpha.numel() > 1,
    )
    plan = _BACKWARD_PLANS.get(key)
    checks.batch_norm_backward(a, inputs_checked=plan is not None, op=op)
    if plan is None:
        plan = _keep_plan(_BACKWARD_PLANS, key, _backward_plan(a))
    return plan


def backward(*args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``avkernels::batch_norm_bwd`` on CUDA: ``(grad_x, grad_weight, grad_bias,
    grad_abri_weight, grad_abri_bias, grad_abri_alpha)``."""
    a = BackwardArgs(*args)
    plan = _backward_plan_for(a)
    with _device_guard(a.x.device):
        return _launch_backward(a, plan, _scratch(a.x.device, plan.scratch_size), launch_directly)


def backward_reduce(*args) -> tuple[Tensor, ...]:
    """``avkernels::batch_norm_bwd_reduce`` on CUDA: the batch-statistics backward's sums kernel,
    returning ``(sums, *parameter gradients)``."""
    a = batch_stats_backward(*args)
    plan = _backward_plan_for(a, "batch_norm_bwd_reduce")
    with _device_guard(a.x.device):
        scratch = _scratch(a.x.device, plan.scratch_size)
        _, sums, grads = _launch_sums(a, plan, _affine_arguments(a), scratch, launch_directly)
    return sums, *grads


def backward_elemt(*args) -> Tensor:
    """``avkernels::batch_norm_bwd_elemt`` on CUDA: the batch-statistics backward's grad_x
    kernel, fed ``grad_means`` (already divided by the global element count)."""
    e = BackwardElemtArgs(*args)
    a = batch_stats_backward(*args[:-2], e.relu)
    plan = _backward_plan_for(a, "batch_norm_bwd_elemt")
    checks.batch_norm_grad_means(a, e.grad_means)
    grad_x = torch.empty_like(a.x, memory_format=plan.grad_x_format)
    with _device_guard(a.x.device):
        affine = _affine_arguments(a)
        _launch_grad_x(a, plan, affine, grad_x, e.grad_means.contiguous(), 1, launch_directly)
    return grad_x


def traced_forward(*args) -> tuple[Tensor, Tensor, Tensor]:
    """``batch_norm_fwd`` on CUDA as Inductor traces it: the kernels through ``wrap_triton``, so
    they appear in the graph as user-defined Triton kernels; no plan or scratch buffer is kept
    (tracing runs once per compile, on fake tensors), and the zeroed counters are allocated in
    the graph, so a CUDA graph owns them (docs/DESIGN.md, "PyTorch conventions")."""
    a = ForwardArgs(*args)
    checks.batch_norm_forward(a)
    plan = _forward_plan(a)
    scratch = torch.zeros(plan.scratch_size, dtype=torch.int32, device=a.x.device)
    return _launch_forward(a, plan, scratch, torch.library.wrap_triton)


def traced_backward(*args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``batch_norm_bwd`` on CUDA as Inductor traces it (see :func:`traced_forward`)."""
    a = BackwardArgs(*args)
    checks.batch_norm_backward(a)
    plan = _backward_plan(a)
    scratch = torch.zeros(plan.scratch_size, dtype=torch.int32, device=a.x.device)
    return _launch_backward(a, plan, scratch, torch.library.wrap_triton)


def _launch_forward(
    a, plan: _ForwardPlan, scratch: Tensor, launch
) -> tuple[Tensor, Tensor, Tensor]:
    """Allocates the forward's outputs and launches its kernels, each through ``launch`` (the
    kernel itself eagerly, :func:`torch.library.wrap_triton` when traced for Inductor)."""
    x, args = a.x, tuple(a)
    y = torch.empty_like(x, memory_format=plan.y_format)
    if a.use_batch_stats:
        mean, invstd = _launch_statistics(a, plan, scratch, launch)
    else:
        mean, invstd = torch.empty_like(plan.stats), torch.empty_like(plan.stats)
    # Absent optional tensors are never read (their HAS_* / mode flag is off): any pointer.
    given = [mean if t is None else t for t in args[6:13]]
    launch(fwd_normalize_kernel)[plan.grid](
        x,
        y,
        mean,
        invstd,
        *given[:4],
        *(mean if t is None else t.contiguous() for t in args[1:6]),
        *given[4:],
        scratch,
        *plan.normalize_ints,
        a.eps,
        **plan.normalize_options,
    )
    return y, mean, invstd


def _launch_statistics(a, plan: _ForwardPlan, scratch: Tensor, launch) -> tuple[Tensor, Tensor]:
    """The statistics kernel: ``(mean, invstd)`` as (1, C), or ``(mean, var)`` for a plan made
    with ``store_var``; updates the running statistics given in ``a``."""
    mean = torch.empty_like(plan.stats)
    second = torch.empty_like(plan.stats)
    momentum, count = a.momentum, plan.count
    launch(fwd_partial_stats_kernel)[plan.grid](
        a.x,
        torch.empty_like(plan.partial),
        mean,
        second,
        *(mean if t is None else t for t in tuple(a)[6:10]),
        scratch,
        *plan.stats_ints,
        a.eps,
        momentum,
        1.0 - momentum,
        momentum * count / (count - 1) if count > 1 else 0.0,
        **plan.stats_options,
    )
    return mean, second


def _launch_backward(a, plan: _BackwardPlan, scratch: Tensor, launch):
    """The backward's allocations and launches, as :func:`_launch_forward`."""
    affine = _affine_arguments(a)
    grad_x, sums, grads = _launch_sums(a, plan, affine, scratch, launch)
    if a.use_batch_stats:
        _launch_grad_x(a, plan, affine, grad_x, sums, plan.count, launch)
    return grad_x, *grads


def _affine_arguments(a) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``(mean, invstd, [weight, bias, abri_weight, abri_bias, abri_alpha])`` as the backward
    kernels read them; an absent parameter is any pointer (never read)."""
    mean, invstd = a.mean.contiguous(), a.invstd.contiguous()
    if a.x.numel() == 0:
        # An empty batch sums nothing: its (NaN) batch invstd must not turn the zero sums into
        # NaN parameter gradients (nn.BatchNorm2d gives zeros).
        invstd = torch.zeros_like(invstd)
    return mean, invstd, [mean if p is None else p.contiguous() for p in tuple(a)[2:7]]


def _launch_sums(a, plan: _BackwardPlan, affine: tuple, scratch: Tensor, launch):
    """The sums kernel: ``(grad_x, sums, parameter gradients)``; grad_x is written here only
    with running statistics (else it is allocated for :func:`_launch_grad_x`). ``affine``:
    :func:`_affine_arguments`."""
    mean, invstd, params = affine
    grad_x = torch.empty_like(a.x, memory_format=plan.grad_x_format)
    grads = [
        torch.empty_like(p) if has else torch.empty_like(plan.no_grad)
        for p, has in zip(params, plan.has_grads)
    ]
    per_channel = plan.per_channel_alpha
    grad_alpha = torch.empty_like(params[4] if per_channel else plan.alpha_per_channel)
    # A layer-wise alpha's (1,) gradient sums the per-channel ones, in the kernel.
    layer_wise = plan.abri and not per_channel
    grad_alpha_total = torch.empty_like(plan.alpha_total) if layer_wise else grad_alpha
    sums = torch.empty_like(plan.sums)
    launch(bwd_partial_sums_kernel)[plan.grid](
        a.grad_y,
        a.x,
        grad_x,
        mean,
        invstd,
        *params,
        torch.empty_like(plan.partial),
        sums,
        *(grad if has else mean for grad, has in zip(grads, plan.has_grads)),
        grad_alpha if plan.abri else mean,
        grad_alpha_total,
        scratch,
        *plan.partial_ints,
        **plan.partial_options,
    )
    return grad_x, sums, (*grads, grad_alpha_total)


def _launch_grad_x(
    a, plan: _BackwardPlan, affine: tuple, grad_x: Tensor, sums: Tensor, count: int, launch
):
    """The batch-statistics grad_x kernel, from ``sums`` (2, C) divided by ``count``."""
    mean, invstd, params = affine
    launch(bwd_grad_x_kernel)[plan.grid](
        a.grad_y,
        a.x,
        grad_x,
        mean,
        invstd,
        sums,
        *params,
        *plan.grad_x_ints,
        count,
        **plan.grad_x_options,
    )
