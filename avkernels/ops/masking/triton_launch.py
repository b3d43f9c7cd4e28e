"""Launchers of the Triton masking kernels: the CUDA kernels of ``zero_masked_patches``,
``masked_concat`` and ``masked_concat_backward`` (arguments as in
:mod:`avkernels.ops.masking.schema`), registered by :mod:`avkernels.ops.masking.registration`.
Each launcher first makes the checks of :mod:`avkernels.ops.checks`, as the C++ kernels do, and
launches through ``launch`` (``torch.library.wrap_triton`` when traced for Inductor; docs/DESIGN.md,
"PyTorch conventions")."""

from __future__ import annotations

import triton
from torch import Tensor

from avkernels.ops import checks
from avkernels.ops._library import launch_directly
from avkernels.ops.masking.reference import patch_grid
from avkernels.ops.masking.triton_kernels import masked_copy_pair_kernel, zero_masked_patches_kernel

_MAX_BLOCK_GROUPS = 1024  # keys counted per step of the binary search
_MAX_BLOCK_PIXELS = 2048  # plane positions per patch program
_MAX_BLOCK_FEATURES = 1024  # features per step of a fusion row


def zero_masked_patches(
    x: Tensor, ratio: Tensor, seeds: Tensor, patch_h: int, patch_w: int, *, launch=launch_directly
) -> None:
    checks.zero_masked_patches(x, ratio, seeds, patch_h, patch_w)
    batch, channels, frames, height, width = x.shape
    grid_h, grid_w = patch_grid(height, width, patch_h, patch_w)
    pixels, num_groups = height * width, grid_h * grid_w
    if x.numel() == 0 or num_groups == 0:
        return
    block_pixels = min(triton.next_power_of_2(pixels), _MAX_BLOCK_PIXELS)
    grid = (batch * frames, triton.cdiv(pixels, block_pixels))
    launch(zero_masked_patches_kernel)[grid](
        x,
        ratio.contiguous(),
        seeds.contiguous(),
        channels,
        frames,
        height,
        width,
        *x.stride(),
        patch_h,
        patch_w,
        grid_h,
        grid_w,
        BLOCK_PIXELS=block_pixels,
        BLOCK_GROUPS=_block_groups(num_groups),
    )


def _masked_copy_pair(
    src_a: Tensor,
    src_v: Tensor,
    dst_a: Tensor,
    dst_v: Tensor,
    ratio_a: Tensor | None,
    ratio_v: Tensor | None,
    seeds: Tensor,
    group_a: int,
    group_v: int,
    launch,
) -> None:
    """dst_m = mask_m * src_m for both modalities; every row must have unit feature stride."""
    batch, features_a = src_a.shape
    features_v = src_v.shape[1]
    if batch == 0:
        return
    seeds = seeds.contiguous()
    groups = max(features_a // group_a, features_v // group_v, 1)
    launch(masked_copy_pair_kernel)[(batch, 2)](
        src_a,
        src_v,
        dst_a,
        dst_v,
        src_a.stride(0),
        src_v.stride(0),
        dst_a.stride(0),
        dst_v.stride(0),
        _ratio_or(ratio_a, seeds),
        _ratio_or(ratio_v, seeds),
        seeds,
        features_a,
        features_v,
        group_a,
        group_v,
        HAS_RATIO_A=ratio_a is not None,
        HAS_RATIO_V=ratio_v is not None,
        BLOCK_FEATURES=min(
            triton.next_power_of_2(max(features_a, features_v, 1)), _MAX_BLOCK_FEATURES
        ),
        BLOCK_GROUPS=_block_groups(groups),
    )


def masked_concat(
    a: Tensor,
    v: Tensor,
    ratio_a: Tensor | None,
    ratio_v: Tensor | None,
    seeds: Tensor,
    group_a: int,
    group_v: int,
    *,
    launch=launch_directly,
) -> Tensor:
    checks.masked_concat(a, v, ratio_a, ratio_v, seeds, group_a, group_v)
    a, v = a.contiguous(), v.contiguous()
    features_a = a.shape[1]
    out = a.new_empty((a.shape[0], features_a + v.shape[1]))
    _masked_copy_pair(
        a,
        v,
        out[:, :features_a],
        out[:, features_a:],
        ratio_a,
        ratio_v,
        seeds,
        group_a,
        group_v,
        launch,
    )
    return out


def masked_concat_backward(
    grad: Tensor,
    ratio_a: Tensor | None,
    ratio_v: Tensor | None,
    seeds: Tensor,
    features_a: int,
    group_a: int,
    group_v: int,
    *,
    launch=launch_directly,
) -> tuple[Tensor, Tensor]:
    checks.masked_concat_backward(grad, ratio_a, ratio_v, seeds, features_a, group_a, group_v)
    grad = grad.contiguous()
    grad_a = grad.new_empty((grad.shape[0], features_a))
    grad_v = grad.new_empty((grad.shape[0], grad.shape[1] - features_a))
    _masked_copy_pair(
        grad[:, :features_a],
        grad[:, features_a:],
        grad_a,
        grad_v,
        ratio_a,
        ratio_v,
        seeds,
        group_a,
        group_v,
        launch,
    )
    return grad_a, grad_v


# --- helpers ------------------------------------------------------------------------------------


def _block_groups(num_groups: int) -> int:
    return min(triton.next_power_of_2(max(num_groups, 1)), _MAX_BLOCK_GROUPS)


def _ratio_or(ratio: Tensor | None, placeholder: Tensor) -> Tensor:
    """The ratio tensor, or any tensor as a pointer the kernel never reads."""
    return placeholder if ratio is None else ratio.contiguous()
