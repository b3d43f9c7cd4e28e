"""Autograd of the masking ops: masks are regenerated in backward from (ratio, seed), never
stored."""

from __future__ import annotations

import torch

from avkernels.ops.masking.definition import (
    masked_concat,
    masked_concat_backward,
    zero_masked_patches,
)


class MaskPatchesFunction(torch.autograd.Function):
    """Out-of-place patch masking of a (B, C, T, H, W) tensor; backward masks the gradient.

    Saves only the ratios and seeds: backward regenerates the mask with the same op.
    """

    @staticmethod
    def forward(ctx, x, ratio, seeds, patch_h: int, patch_w: int):
        y = x.clone()
        zero_masked_patches(y, ratio, seeds, patch_h, patch_w)
        ctx.save_for_backward(ratio, seeds)
        ctx.patch_size = (patch_h, patch_w)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        ratio, seeds = ctx.saved_tensors
        # A fresh dense copy: grad_y may be expanded (stride 0) or shared with other nodes.
        grad_x = grad_y.clone(memory_format=torch.contiguous_format)
        zero_masked_patches(grad_x, ratio, seeds, *ctx.patch_size)
        return grad_x, None, None, None, None


class MaskedConcatFunction(torch.autograd.Function):
    """``cat([mask_a * a, mask_v * v], 1)`` in one kernel; backward regenerates the masks."""

    @staticmethod
    def forward(ctx, a, v, ratio_a, ratio_v, seeds, group_a: int, group_v: int):
        ctx.save_for_backward(ratio_a, ratio_v, seeds)
        ctx.features_a, ctx.groups = a.shape[1], (group_a, group_v)
        return masked_concat(a, v, ratio_a, ratio_v, seeds, group_a, group_v)

    @staticmethod
    def backward(ctx, grad):
        ratio_a, ratio_v, seeds = ctx.saved_tensors
        grad_a, grad_v = masked_concat_backward(
            grad, ratio_a, ratio_v, seeds, ctx.features_a, *ctx.groups
        )
        return grad_a, grad_v, None, None, None, None, None
