"""Argument checks of the avkernels ops, made by every Python entry point (the Triton launchers on
CUDA, the PyTorch reference when it serves as the CPU kernel) so that each op rejects the same
inputs with the same message as its C++ kernel (``csrc/ops/cpu/``)."""

from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(message: str) -> None:
    raise ValueError(message)


# --- batch norm -------------------------------------------------------------------------------
# Bad tensors raise RuntimeError, as the C++ kernels' TORCH_CHECK and nn.BatchNorm2d do; a
# batch too small to train on raises ValueError, as torch.nn.functional.batch_norm does.

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _reject(message: str) -> None:
    raise RuntimeError(message)


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """An input dtype the batch-norm kernels have no implementation for: a ``TypeError``, and
    the ``NotImplementedError`` (a ``RuntimeError``) nn.BatchNorm2d raises for it."""


def batch_norm_input(name: str, x: Tensor) -> None:
    """4-D, a supported floating dtype, one sample addressable with int32 offsets."""
    if x.dim() != 4:
        _reject(
            f"{name}: expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}; "
            "reshape 2-D/3-D input to 4-D first"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise UnsupportedDtypeError(
            f"{name}: dtype {x.dtype} is not supported; use float16, bfloat16, float32 or float64"
        )
    # Offsets inside one sample are int32 in the GPU kernels (the sample offset is int64).
    sample_extent = sum(
        (size - 1) * abs(stride) for size, stride in zip(x.shape[1:], x.stride()[1:]) if size > 0
    )
    if sample_extent >= 2**31:
        _reject(
            f"{name}: one sample spans {sample_extent} elements, more than the 2**31 the "
            "GPU kernels address; split the channels"
        )


def per_channel(
    name: str,
    t: Tensor | None,
    channels: int,
    device: torch.device,
    mutable: bool = False,
    allow_single: bool = False,
) -> None:
    """``t`` is None or a (C,) tensor on ``device`` (contiguous when updated in place)."""
    if t is None:
        return
    shape = t.shape
    if shape != (channels,) and not (allow_single and shape == (1,)):
        wanted = f"(1,) or ({channels},)" if allow_single else f"({channels},)"
        _reject(f"{name}: expected shape {wanted}, got {tuple(t.shape)}")
    if t.device != device:
        _reject(f"{name} is on {t.device} but x is on {device}; move it to x's device")
    if mutable and not t.is_contiguous():
        _reject(f"{name} is updated in place and must be contiguous")


# The forward's float tensors besides x: the parameters and the running statistics.
TENSOR_STATE = (
    "weight",
    "bias",
    "abri_weight",
    "abri_bias",
    "abri_alpha",
    "running_mean",
    "running_var",
    "abri_running_mean",
    "abri_running_var",
)


def parameter_dtypes(op: str, x: Tensor, tensors: list[Tensor | None]) -> None:
    """The dtype mixes nn.BatchNorm2d accepts on CPU: the parameters and running statistics share
    one dtype, ``x``'s, or float32 with float16/bfloat16 ``x``."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if len(dtypes) > 1:
        _reject(
            f"{op}: the parameters and running statistics must share one dtype, got "
            f"{sorted(map(str, dtypes))}; convert the layer with module.to(dtype)"
        )
    if (
        dtypes
        and dtypes != {x.dtype}
        and not (x.dtype in LOW_PRECISION and dtypes == {torch.float32})
    ):
        _reject(
            f"{op}: mixed dtypes: input {x.dtype} with parameters {dtypes.pop()}; use the "
            "input's dtype for the layer (module.to(x.dtype)), or float32 parameters with "
            "float16/bfloat16 input"
        )


def batch_norm_forward(a, input_checked: bool = False) -> None:
    """The checks of ``batch_norm_fwd`` on a :class:`~avkernels.ops.batch_norm.ForwardArgs`;
    ``input_checked``: ``x``'s shape, strides and dtype already passed them (a launcher that
    keys its launch plans by them checks them once per plan)."""
    op = "batch_norm_fwd"
    if not input_checked:
        batch_norm_input(f"{op}: x", a.x)
    channels, device = a.x.shape[1], a.x.device
    for name in ("weight", "bias", "abri_weight", "abri_bias"):
        per_channel(name, getattr(a, name), channels, device)
    per_channel("abri_alpha", a.abri_alpha, channels, device, allow_single=True)
    for name in (
        "running_mean",
        "running_var",
        "abri_running_mean",
        "abri_running_var",
        "dead_count",
        "dead_sample_count",
    ):
        per_channel(name, getattr(a, name), channels, device, mutable=True)
    parameter_dtypes(op, a.x, [getattr(a, name) for name in TENSOR_STATE])
    if (a.running_mean is None) != (a.running_var is None) or (
        (a.abri_running_mean is None) != (a.abri_running_var is None)
    ):
        _reject(f"{op}: a running mean and its running var come together")
    counting = a.dead_count is not None
    if counting != (a.dead_sample_count is not None) or counting != (a.seen is not None):
        _reject(f"{op}: dead_count, dead_sample_count and seen are all given or all None")
    if counting and (a.seen.shape != (2,) or not a.seen.is_contiguous() or a.seen.device != device):
        _reject(
            f"{op}: seen must be a contiguous (2,) tensor on x's device, got "
            f"{tuple(a.seen.shape)} on {a.seen.device}"
        )
    if not a.use_batch_stats and (
        a.running_mean is None or (a.abri_alpha is not None and a.abri_running_mean is None)
    ):
        _reject(f"{op}: use_batch_stats=False needs the running statistics (both sets with ABRi)")
    batch, _, height, width = a.x.shape
    updates_running = a.running_mean is not None or a.abri_running_mean is not None
    if a.use_batch_stats and updates_running and batch * height * width == 1:
        _fail(
            f"{op}: expected more than 1 value per channel when training (got input of "
            f"shape {tuple(a.x.shape)})"
        )


def batch_norm_backward(
    a, statistics_dtype: torch.dtype, inputs_checked: bool = False, op: str = "batch_norm_bwd"
) -> None:
    """The checks of ``batch_norm_bwd`` (or of its part ``op``, ``batch_norm_bwd_reduce`` /
    ``batch_norm_bwd_elemt``, which take batch statistics: K = 1) on a
    :class:`~avkernels.ops.batch_norm.BackwardArgs`. ``statistics_dtype``: the dtype ``mean``
    and ``invstd`` must have (x's accumulation dtype); ``inputs_checked``: as
    ``input_checked`` of :func:`batch_norm_forward`, for x and grad_y."""
    if not inputs_checked:
        batch_norm_input(f"{op}: x", a.x)
    channels, device = a.x.shape[1], a.x.device
    if a.grad_y.shape != a.x.shape:
        _reject(f"{op}: grad_y has shape {tuple(a.grad_y.shape)}, expected x's {tuple(a.x.shape)}")
    if not inputs_checked:
        batch_norm_input(f"{op}: grad_y", a.grad_y)
    for name in ("weight", "bias", "abri_weight", "abri_bias"):
        per_channel(name, getattr(a, name), channels, device)
    per_channel("abri_alpha", a.abri_alpha, channels, device, allow_single=True)
    mean, invstd = a.mean, a.invstd
    if (
        mean.dim() != 2
        or mean.shape[0] not in ((1,) if op != "batch_norm_bwd" else (1, 2))
        or mean.shape[1] != channels
        or invstd.shape != mean.shape
        or mean.dtype != statistics_dtype
        or invstd.dtype != mean.dtype
    ):
        _reject(
            f"{op}: mean and invstd must be the forward's (K, C) statistics in "
            f"{statistics_dtype} (the accumulation dtype of a {a.x.dtype} x), got "
            f"{tuple(mean.shape)} {mean.dtype} and {tuple(invstd.shape)} {invstd.dtype}"
        )
    for name, t in (("grad_y", a.grad_y), ("mean", mean), ("invstd", invstd)):
        if t.device != device:
            _reject(f"{op}: {name} is on {t.device} but x is on {device}")


def batch_norm_grad_means(a, grad_means: Tensor) -> None:
    """The check of ``batch_norm_bwd_elemt``'s ``grad_means`` (its other arguments: as
    :func:`batch_norm_backward`)."""
    expected = (2, a.x.shape[1])
    if (
        tuple(grad_means.shape) != expected
        or grad_means.dtype != a.mean.dtype
        or grad_means.device != a.x.device
    ):
        _reject(
            f"batch_norm_bwd_elemt: grad_means must be {expected} {a.mean.dtype} on "
            f"{a.x.device} ([S1 / M, S2 / M] per channel), got {tuple(grad_means.shape)} "
            f"{grad_means.dtype} on {grad_means.device}"
        )


# --- masking ----------------------------------------------------------------------------------


def masking_dtype(op: str, x: Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: unsupported dtype {x.dtype}; expected one of "
            f"{[str(d) for d in SUPPORTED_DTYPES]}"
        )


def ratios(op: str, name: str, ratio: Tensor | None, batch: int) -> None:
    """None or a float64 (B,) tensor: ``floor(P * ratio)`` is defined in float64."""
    if ratio is not None and (ratio.dtype != torch.float64 or tuple(ratio.shape) != (batch,)):
        raise TypeError(
            f"{op}: {name} must be float64 of shape (B,) = ({batch},), got "
            f"{ratio.dtype} {tuple(ratio.shape)}"
        )


def seeds(op: str, seeds: Tensor, shape: tuple[int, int], columns: str) -> None:
    if seeds.dtype != torch.int64 or tuple(seeds.shape) != shape:
        raise TypeError(
            f"{op}: seeds must be int64 of shape {columns} = {shape}, got "
            f"{seeds.dtype} {tuple(seeds.shape)}"
        )


def same_device(op: str, device: torch.device, **tensors: Tensor | None) -> None:
    """Every given tensor is on ``device``: a GPU kernel would read another device's pointer."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            _fail(f"{op}: {name} is on {t.device} but the input is on {device}; move it there")


def positive_sizes(op: str, what: str, *sizes: int) -> None:
    if not all(size > 0 for size in sizes):
        _fail(f"{op}: {what} must be positive, got {sizes}")


def zero_masked_patches(
    x: Tensor, ratio: Tensor, seed_values: Tensor, patch_h: int, patch_w: int
) -> None:
    op = "zero_masked_patches"
    if x.dim() != 5:
        _fail(f"{op}: x must be (B, C, T, H, W), got {tuple(x.shape)}")
    masking_dtype(op, x)
    positive_sizes(op, "patch sizes", patch_h, patch_w)
    ratios(op, "ratio", ratio, x.shape[0])
    seeds(op, seed_values, (x.shape[0], x.shape[2]), "(B, T)")
    same_device(op, x.device, ratio=ratio, seeds=seed_values)


def masked_concat(
    a: Tensor,
    v: Tensor,
    ratio_a: Tensor | None,
    ratio_v: Tensor | None,
    seed_values: Tensor,
    group_a: int,
    group_v: int,
) -> None:
    op = "masked_concat"
    if a.dim() != 2 or v.dim() != 2 or a.shape[0] != v.shape[0]:
        _fail(
            f"{op}: a and v must be (B, Fa) and (B, Fv), got {tuple(a.shape)} and {tuple(v.shape)}"
        )
    if a.dtype != v.dtype:
        _fail(f"{op}: a and v must share a dtype, got {a.dtype} and {v.dtype}")
    masking_dtype(op, a)
    positive_sizes(op, "group sizes", group_a, group_v)
    ratios(op, "ratio_a", ratio_a, a.shape[0])
    ratios(op, "ratio_v", ratio_v, a.shape[0])
    seeds(op, seed_values, (a.shape[0], 2), "(B, 2)")
    same_device(op, a.device, v=v, ratio_a=ratio_a, ratio_v=ratio_v, seeds=seed_values)


def masked_concat_backward(
    grad: Tensor,
    ratio_a: Tensor | None,
    ratio_v: Tensor | None,
    seed_values: Tensor,
    features_a: int,
    group_a: int,
    group_v: int,
) -> None:
    op = "masked_concat_backward"
    if grad.dim() != 2 or not 0 <= features_a <= grad.shape[1]:
        _fail(f"{op}: grad must be (B, Fa + Fv) with Fa = {features_a}, got {tuple(grad.shape)}")
    masking_dtype(op, grad)
    positive_sizes(op, "group sizes", group_a, group_v)
    ratios(op, "ratio_a", ratio_a, grad.shape[0])
    ratios(op, "ratio_v", ratio_v, grad.shape[0])
    seeds(op, seed_values, (grad.shape[0], 2), "(B, 2)")
    same_device(op, grad.device, ratio_a=ratio_a, ratio_v=ratio_v, seeds=seed_values)
