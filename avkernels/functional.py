"""The functional API: the kernels of avkernels as functions, in the style of
``torch.nn.functional`` (docs/api.md). ``TrackedBN`` and ``MaskedConcatFusion`` are thin modules
over these.

* :func:`tracked_batch_norm`: batch normalisation with in-kernel dead-channel counts, an optional
  fused ReLU and ABRi's blend of two BatchNorms, like ``torch.nn.functional.batch_norm``.
* :func:`mask_patches`: FusT's per-sample exact-count patch masking of inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from avkernels.ops.batch_norm import ForwardArgs
from avkernels.ops.batch_norm import tracked_batch_norm as _tracked_batch_norm_op
from avkernels.ops.batch_norm.sync import sync_tracked_batch_norm
from avkernels.ops.masking import zero_masked_patches
from avkernels.ops.masking.arguments import (
    describe,
    frame_seeds,
    per_sample_ratio,
    positive_pair,
)
from avkernels.ops.masking.autograd import MaskPatchesFunction

__all__ = ["ACTIVATIONS", "AbriState", "DeadStats", "mask_patches", "tracked_batch_norm"]

ACTIVATIONS = (None, "relu")


class DeadStats(NamedTuple):
    """The dead-channel counters a tracked batch norm adds to (int64, updated in place).

    ``dead_count`` (C,): outputs ``<= 0`` before the activation; ``dead_sample_count`` (C,):
    samples whose whole HxW map is ``<= 0``; ``seen`` (2,): elements per channel and samples
    counted so far.
    """

    dead_count: Tensor
    dead_sample_count: Tensor
    seen: Tensor


class AbriState(NamedTuple):
    """ABRi's added BatchNorm and blend weight: ``y = a * BN(x) + (1 - a) * BN_added(x)``.

    ``weight``/``bias`` (C,) of the added BN (``bias`` may be None), ``alpha`` (1,) or (C,),
    its running statistics ``running_mean``/``running_var`` (C,) (None without tracking).
    """

    weight: Tensor
    bias: Tensor | None
    alpha: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None


def tracked_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = None,
    dead_stats: DeadStats | None = None,
    abri: AbriState | None = None,
    process_group: torch.distributed.ProcessGroup | None = None,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` of a (N, C, H, W) ``input``, plus dead-channel counts,
    a fused ReLU and ABRi.

    Args:
        input: (N, C, H, W), float16/bfloat16/float32/float64, any memory format (the output
            keeps channels_last).
        running_mean, running_var: (C,) running statistics, or None. With ``training=True``
            they are updated in place with ``momentum`` (unbiased variance); with
            ``training=False`` they normalise (both must then be given).
        weight, bias: (C,) affine parameters, or None (1 and 0).
        training: normalise with the batch statistics (and update the running ones).
        momentum: weight of the batch statistic in the running-statistics update.
        eps: added to the variance; must be positive (``ValueError`` otherwise, as in
            ``torch.nn.functional.batch_norm``).
        activation: ``None`` or ``"relu"``, applied in the same kernel (forward and backward).
        dead_stats: counters to add this batch's dead-channel counts to (:class:`DeadStats`).
        abri: ABRi's added BN (:class:`AbriState`): the output blends the two BNs.
        process_group: with ``training=True``, normalise with the statistics of the whole batch
            spread over this ``torch.distributed`` group (every rank must call); ``None`` for
            no synchronisation.

    Returns:
        The normalised (and activated) tensor, differentiable with respect to ``input``,
        ``weight``, ``bias`` and the ABRi parameters.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"tracked_batch_norm: activation must be one of {ACTIVATIONS}, got {activation!r}"
        )
    if not eps > 0:  # NaN too: it would normalise every value to NaN
        raise ValueError(f"batch_norm eps must be positive, but got {eps}")
    no_abri = (None,) * 5
    abri_weight, abri_bias, abri_alpha, abri_mean, abri_var = no_abri if abri is None else abri
    counters = (None,) * 3 if dead_stats is None else dead_stats
    args = ForwardArgs(
        input,
        weight,
        bias,
        abri_weight,
        abri_bias,
        abri_alpha,
        running_mean,
        running_var,
        abri_mean,
        abri_var,
        *counters,
        training,
        momentum,
        eps,
        activation == "relu",
    )
    if process_group is not None and training:
        return sync_tracked_batch_norm(args, process_group)
    # Batch statistics of one value per channel, as torch.nn.functional.batch_norm refuses them
    # (a synced batch is checked as a whole, above). Not while torch.fx traces: it has no values.
    size = input.shape
    if training and not is_fx_symbolic_tracing() and input.dim() == 4:
        if size[0] * size[2] * size[3] == 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {size}"
            )
    return _tracked_batch_norm_op(*args)


def mask_patches(
    x: Tensor,
    ratio: float | Tensor,
    patch_size: int | Sequence[int],
    seed: None | int | Tensor = None,
    *,
    inplace: bool = False,
) -> Tensor:
    """Zero exactly ``floor(P * ratio[b])`` of the ``P`` whole patches of every sample ``b``.

    The official FusT input masking (docs/DESIGN.md, "Fusion Tuning (FusT)"), as one kernel
    over the batch.

    Args:
        x: (B, H, W), (B, C, H, W) or (B, C, T, H, W) (video: each frame ``t`` independently);
            the patches tile the last two dims from the origin, the remainder strip is never
            masked, and all channels share the patches. E.g. audio fbank (B, 1, 1024, 128)
            with 32x8 patches, frames (B*T, 3, 224, 224) with 10x10 patches.
        ratio: per-sample ratio, a float or a (B,) tensor; ``<= 0`` masks nothing (that row is
            left untouched without drawing a mask), ``>= 1`` masks every patch.
        patch_size: ``(patch_h, patch_w)`` or one int for square patches.
        seed: ``None`` draws one seed per (sample, frame) from torch's default generator of
            ``x``'s device (``torch.manual_seed`` reproduces the mask); an int draws them from
            a generator seeded with it (same mask on every device); an int64 tensor of shape
            (B,) or (B, T) gives them directly.
        inplace: zero the patches of ``x`` itself and return it (for the data pipeline:
            touches only the masked patches). Not differentiable.

    Returns:
        The masked tensor (``x`` itself when ``inplace``). Out of place the op is
        differentiable: the gradient is zeroed exactly where the input was.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() not in (3, 4, 5):
        raise ValueError(
            "mask_patches: x must be a floating tensor of shape (B, H, W), (B, C, H, W) or "
            f"(B, C, T, H, W), got {describe(x)}"
        )
    patch_h, patch_w = positive_pair(patch_size, "mask_patches: patch_size")
    height, width = x.shape[-2:]
    if patch_h > height or patch_w > width:
        raise ValueError(
            f"mask_patches: patch_size {(patch_h, patch_w)} is larger than the masked plane "
            f"{(height, width)} (the last two dims of x)"
        )
    # Canonical (B, C, T, H, W) view: no copy for any layout.
    frames = x if x.dim() == 5 else x.unsqueeze(-3)
    frames = frames if frames.dim() == 5 else frames.unsqueeze(1)
    batch, num_frames = frames.shape[0], frames.shape[2]
    ratio = per_sample_ratio(ratio, batch, x.device)
    seeds = frame_seeds(seed, batch, num_frames, x.device)
    if inplace:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "mask_patches(inplace=True) cannot mask a tensor that requires grad; use "
                "inplace=False (differentiable) or mask under torch.no_grad()"
            )
        zero_masked_patches(frames, ratio, seeds, patch_h, patch_w)
        return x
    return MaskPatchesFunction.apply(frames, ratio, seeds, patch_h, patch_w).view(x.shape)
