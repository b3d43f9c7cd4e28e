"""Launchers of the Triton batch-norm kernels: the CUDA kernels of ``avkernels::batch_norm_fwd``
and ``batch_norm_bwd``, registered by :mod:`avkernels.ops.batch_norm.registration`.

:func:`forward` and :func:`backward` take the ops' arguments (see
:mod:`avkernels.ops.batch_norm.schema`) and reproduce :mod:`avkernels.ops.batch_norm.reference`;
they are pure launchers (no synchronisation, no data-dependent Python control flow). The work
split and the kernels are described in :mod:`avkernels.ops.batch_norm.triton_kernels`.

Host cost (docs/DESIGN.md, "Kernel designs and launch plans"): everything that depends only on
the input's geometry and the op's flags (grids, tile shapes, integer kernel arguments, option
dicts: :mod:`avkernels.ops.batch_norm.triton_plans`) is computed once per launch plan key and
kept in a dict; a call checks its arguments,
looks its plan up, allocates its outputs and launches. Every launch runs under a guard for the
input's device, so its current stream is the one Triton launches on.
"""

import contextlib
import functools
import operator

import torch
from torch import Tensor

from avkernels.ops import checks
from avkernels.ops._library import launch_directly
from avkernels.ops.batch_norm.schema import (
    BackwardArgs,
    BackwardElemtArgs,
    ForwardArgs,
    accumulation_dtype,
    batch_stats_backward_args,
)
from avkernels.ops.batch_norm.triton_kernels import (
    bwd_grad_x_kernel,
    bwd_partial_sums_kernel,
    fwd_normalize_kernel,
    fwd_partial_stats_kernel,
)
from avkernels.ops.batch_norm.triton_plans import (
    BackwardPlan,
    ForwardPlan,
    backward_plan,
    forward_plan,
)

# --- plan caches and scratch ---------------------------------------------------------------------

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
    plan = _FORWARD_PLANS.get(key)
    checks.batch_norm_forward(a, input_checked=plan is not None)
    if plan is None:
        plan = _keep_plan(_FORWARD_PLANS, key, forward_plan(a))
    with _device_guard(x.device):
        return _launch_forward(a, plan, _scratch(x.device, plan.scratch_size), launch_directly)


def stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """``avkernels::batch_norm_stats`` on CUDA: the training forward's statistics kernel, storing
    ``(mean, biased var)`` of shape (C,)."""
    a = ForwardArgs(x, *(None,) * 12, True, 0.0, 0.0, False)
    key = (x.shape, x.stride(), x.dtype, x.device, "stats")
    plan = _FORWARD_PLANS.get(key)
    if plan is None:  # x is all there is to check
        checks.batch_norm_input("batch_norm_stats: x", x)
        plan = _keep_plan(_FORWARD_PLANS, key, forward_plan(a, store_var=True))
    if x.numel() == 0:  # no values: NaN statistics, as the other kernels give
        nan = torch.full_like(plan.stats[0], float("nan"))
        return nan, nan.clone()
    with _device_guard(x.device):
        mean, var = _launch_statistics(
            a, plan, _scratch(x.device, plan.scratch_size), launch_directly
        )
    return mean.view(-1), var.view(-1)


def _backward_plan_for(a, op: str = "batch_norm_bwd") -> BackwardPlan:
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
    checks.batch_norm_backward(a, accumulation_dtype(a.x), inputs_checked=plan is not None, op=op)
    if plan is None:
        plan = _keep_plan(_BACKWARD_PLANS, key, backward_plan(a))
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
    a = batch_stats_backward_args(*args)
    plan = _backward_plan_for(a, "batch_norm_bwd_reduce")
    with _device_guard(a.x.device):
        scratch = _scratch(a.x.device, plan.scratch_size)
        sums, grads = _launch_sums(a, plan, _affine_arguments(a), scratch, launch_directly)
    return sums, *grads


def backward_elemt(*args) -> Tensor:
    """``avkernels::batch_norm_bwd_elemt`` on CUDA: the batch-statistics backward's grad_x
    kernel, fed ``grad_means`` (already divided by the global element count)."""
    e = BackwardElemtArgs(*args)
    a = batch_stats_backward_args(*args[:-2], e.relu)
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
    plan = forward_plan(a)
    scratch = torch.zeros(plan.scratch_size, dtype=torch.int32, device=a.x.device)
    return _launch_forward(a, plan, scratch, torch.library.wrap_triton)


def traced_backward(*args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``batch_norm_bwd`` on CUDA as Inductor traces it (see :func:`traced_forward`)."""
    a = BackwardArgs(*args)
    checks.batch_norm_backward(a, accumulation_dtype(a.x))
    plan = backward_plan(a)
    scratch = torch.zeros(plan.scratch_size, dtype=torch.int32, device=a.x.device)
    return _launch_backward(a, plan, scratch, torch.library.wrap_triton)


def _launch_forward(a, plan: ForwardPlan, scratch: Tensor, launch) -> tuple[Tensor, Tensor, Tensor]:
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


def _launch_statistics(a, plan: ForwardPlan, scratch: Tensor, launch) -> tuple[Tensor, Tensor]:
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


def _launch_backward(a, plan: BackwardPlan, scratch: Tensor, launch):
    """The backward's allocations and launches, as :func:`_launch_forward`."""
    affine = _affine_arguments(a)
    grad_x = torch.empty_like(a.x, memory_format=plan.grad_x_format)
    sums, grads = _launch_sums(a, plan, affine, scratch, launch, grad_x)
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


def _launch_sums(a, plan: BackwardPlan, affine: tuple, scratch: Tensor, launch, grad_x=None):
    """The sums kernel: ``(sums, parameter gradients)``; with running statistics it also writes
    ``grad_x`` (else the kernel never touches it: None, as for ``batch_norm_bwd_reduce``).
    ``affine``: :func:`_affine_arguments`."""
    mean, invstd, params = affine
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
        a.x if grad_x is None else grad_x,  # any pointer when not written
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
    return sums, (*grads, grad_alpha_total)


def _launch_grad_x(
    a, plan: BackwardPlan, affine: tuple, grad_x: Tensor, sums: Tensor, count: int, launch
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
