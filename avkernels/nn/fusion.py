"""``MaskedConcatFusion``: the FusT stage-2 fusion layer (concat + Linear) with per-sample
masking."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from avkernels.ops.masking.arguments import draw_seeds, per_sample_ratio, positive_pair
from avkernels.ops.masking.autograd import MaskedConcatFunction


class FusionOutput(NamedTuple):
    """Joint logits and the per-modality logits (``logits == logits_a + logits_v``)."""

    logits: Tensor
    logits_a: Tensor
    logits_v: Tensor


Ratio = Union[None, float, Tensor]


class MaskedConcatFusion(nn.Module):
    """Concatenation fusion + ``fc_out`` Linear that masks each modality's features per sample.

    Loads the official ``ConcatFusion``'s checkpoints (same ``fc_out.weight``/``fc_out.bias``
    keys) and computes the same ``logits = fc_out(cat([a, v], 1))``. In training,
    ``ratio_a``/``ratio_v`` zero exactly
    ``floor(P * ratio[b])`` of the ``P`` feature groups of sample ``b`` (groups of
    ``group_size`` consecutive features; the same exact-count mechanism as
    :func:`avkernels.mask_patches`), re-drawn every call from torch's generator (so
    ``torch.manual_seed`` reproduces them). Masking and concatenation are one kernel that
    writes the fusion input once; backward regenerates the masks instead of storing them. In
    eval, or without ratios, nothing is masked.

    Args:
        in_features: feature sizes ``(Fa, Fv)`` of the two modalities (audio, visual).
        num_classes: outputs of ``fc_out``.
        group_size: features per masked group, one int or ``(group_a, group_v)``; a remainder
            of ``F % group`` features is never masked.
        bias: whether ``fc_out`` has a bias.

    Forward: ``a`` (B, Fa), ``v`` (B, Fv) and per-sample ratios (a float, a (B,) tensor, or
    ``None`` for no masking of that modality). Returns :class:`FusionOutput` ``(logits,
    logits_a, logits_v)``: the joint logits, and the per-modality logits from the two halves
    of ``fc_out`` with half the bias each, as OGM-GE computes them (for per-modality accuracy
    or auxiliary losses; computed from the masked features, so they add up to ``logits``).
    """

    def __init__(
        self,
        in_features: Sequence[int] = (512, 512),
        num_classes: int | None = None,
        *,
        group_size: int | Sequence[int] = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_classes is None:
            raise TypeError(
                "MaskedConcatFusion: num_classes is required, e.g. "
                "MaskedConcatFusion((512, 512), num_classes=31)"
            )
        self.in_features = positive_pair(in_features, "MaskedConcatFusion: in_features")
        self.group_size = positive_pair(group_size, "MaskedConcatFusion: group_size")
        self.num_classes = num_classes
        self.fc_out = nn.Linear(
            sum(self.in_features), num_classes, bias=bias, device=device, dtype=dtype
        )

    def extra_repr(self) -> str:
        """Feature sizes and group size."""
        return f"in_features={self.in_features}, group_size={self.group_size}"

    def forward(
        self, a: Tensor, v: Tensor, ratio_a: Ratio = None, ratio_v: Ratio = None
    ) -> FusionOutput:
        """Concatenate ``a`` (B, Fa) and ``v`` (B, Fv), in training masking feature groups of
        each by its per-sample ratio (None: none), and classify: fused and per-modality logits."""
        features_a, features_v = self.in_features
        if a.dim() != 2 or v.dim() != 2 or a.shape[1] != features_a or v.shape[1] != features_v:
            raise ValueError(
                f"MaskedConcatFusion: expected a (B, {features_a}) and v (B, {features_v}), got "
                f"{tuple(a.shape)} and {tuple(v.shape)} (flatten pooled features first)"
            )
        if a.shape[0] != v.shape[0]:
            raise ValueError(
                f"MaskedConcatFusion: a and v have different batch sizes "
                f"({a.shape[0]} and {v.shape[0]})"
            )
        if a.device != v.device:
            raise ValueError(
                f"MaskedConcatFusion: a and v must be on the same device, got "
                f"{a.device} and {v.device}"
            )
        # Mixed dtypes meet in the promoted one, as in torch.cat (the official ConcatFusion):
        # under CPU autocast the visual 3-D average pool runs in float32, the audio pool in bf16.
        a, v = (t.to(torch.promote_types(a.dtype, v.dtype)) for t in (a, v))
        batch = a.shape[0]
        if self.training and (ratio_a is not None or ratio_v is not None):
            ratios = [
                None if r is None else per_sample_ratio(r, batch, a.device, name)
                for r, name in ((ratio_a, "ratio_a"), (ratio_v, "ratio_v"))
            ]
            seeds = draw_seeds((batch, 2), a.device)
            fused = MaskedConcatFunction.apply(a, v, *ratios, seeds, *self.group_size)
        else:
            fused = torch.cat([a, v], dim=1)
        weight, bias = self.fc_out.weight, self.fc_out.bias
        half_bias = None if bias is None else bias / 2
        return FusionOutput(
            F.linear(fused, weight, bias),
            F.linear(fused[:, :features_a], weight[:, :features_a], half_bias),
            F.linear(fused[:, features_a:], weight[:, features_a:], half_bias),
        )
