"""Autograd of the masking ops: masks are regenerated in backward from (ratio, seed), never
stored.

Masking is linear, and each backward is a masking again: it runs through the autograd functions
here, not the bare ops, so that under ``create_graph=True`` the gradients are differentiable to
any order (docs/DESIGN.md, "Double backward")."""

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
        # forward's copy: grad_y may be expanded (stride 0) or shared with other nodes.
        grad_x = MaskPatchesFunction.apply(grad_y, ratio, seeds, *ctx.patch_size)
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
        grad_a, grad_v = MaskedConcatBackwardFunction.apply(
            grad, ratio_a, ratio_v, seeds, ctx.features_a, *ctx.groups
        )
        return grad_a, grad_v, None, None, None, None, None


class MaskedConcatBackwardFunction(torch.autograd.Function):
    """``masked_concat_backward``, differentiable: its backward is ``masked_concat`` of the two
    halves' gradients (the masks are their own adjoints)."""

    @staticmethod
    def forward(ctx, grad, ratio_a, ratio_v, seeds, features_a: int, group_a: int, group_v: int):
        ctx.save_for_backward(ratio_a, ratio_v, seeds)
        ctx.groups = (group_a, group_v)
        return masked_concat_backward(grad, ratio_a, ratio_v, seeds, features_a, group_a, group_v)

    @staticmethod
    def backward(ctx, grad_a, grad_v):
        ratio_a, ratio_v, seeds = ctx.saved_tensors
        grad = MaskedConcatFunction.apply(grad_a, grad_v, ratio_a, ratio_v, seeds, *ctx.groups)
        return grad, None, None, None, None, None, None
