"""Per-sample exact-count masking of patches and feature groups (FusT stage 2, SPEC section 3).

One mechanism serves every caller: a row (a sample, or one frame of a sample) with mask ratio
``r`` over ``P`` groups (whole patches of an image plane, or runs of features) has exactly
``k = floor(P * r)`` groups zeroed, chosen uniformly without replacement by a counter-based
generator keyed by the row's int64 seed. Nothing is stored: every pass (forward, backward, any
implementation) regenerates the same mask from ``(seed, ratio)``.

The mask, bit for bit the same in every implementation (C++ ``csrc/masking.cpp``, Triton
``masking_triton.py``, the PyTorch reference here):

* ``mix32`` is the ``lowbias32`` integer hash (C. Wellons' hash-prospector), a bijection of
  32-bit integers; all arithmetic is modulo 2**32.
* Round keys of a seed: ``lo, hi`` = low and high 32 bits of the seed (two's complement),
  ``k0 = mix32(lo ^ mix32(hi ^ 0x9E3779B9))``, ``k1 = mix32(k0 ^ 0x85EBCA6B)``.
* Key of group ``g``: ``mix32(mix32(g ^ k0) ^ k1)``. Being a bijection of ``g``, it never
  ties within a row, so "the ``k`` groups with the smallest keys" is one well-defined set that
  any selection algorithm finds (a sort here, ``nth_element`` in C++, a bitwise binary search
  for the ``k``-th smallest key in Triton).
* ``k = floor(min(max(r, 0) * P, P))`` in float64 (NaN counts as 0): the official
  ``int(P * ratio)``; a ratio <= 0 masks nothing, a ratio >= 1 masks every group.

Patch geometry (the official loaders'): patches of ``patch_h x patch_w`` tile the last two
dims from the origin, ``P = (H // patch_h) * (W // patch_w)`` numbered row-major; a remainder
strip is never masked; leading channel dims share the patches. Feature groups are the same
with ``H = 1``: ``features // group`` runs of ``group`` features, a remainder never masked.

Ops, namespace ``avkernels``:

``zero_masked_patches``
    Zeroes the masked patches of ``x`` (B, C, T, H, W) in place (any strides); frame ``t`` of
    sample ``b`` uses ``ratio[b]`` (float64) and ``seeds[b, t]`` (int64). Masking is its own
    adjoint, so the same op masks the gradient in backward.
``masked_concat``
    ``cat([mask_a * a, mask_v * v], 1)`` written in one pass, no mask tensor: ``a`` (B, Fa),
    ``v`` (B, Fv), ``ratio_a``/``ratio_v`` (B,) float64 or None (no masking), ``seeds`` (B, 2)
    (column 0 for ``a``, 1 for ``v``), groups of ``group_a``/``group_v`` features.
``masked_concat_backward``
    The two masked halves of a (B, Fa + Fv) gradient.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

ZERO_MASKED_PATCHES_SCHEMA = (
    "zero_masked_patches(Tensor(a!) x, Tensor ratio, Tensor seeds, int patch_h, int patch_w) -> ()"
)
MASKED_CONCAT_SCHEMA = (
    "masked_concat(Tensor a, Tensor v, Tensor? ratio_a, Tensor? ratio_v, Tensor seeds, "
    "int group_a, int group_v) -> Tensor"
)
MASKED_CONCAT_BACKWARD_SCHEMA = (
    "masked_concat_backward(Tensor grad, Tensor? ratio_a, Tensor? ratio_v, Tensor seeds, "
    "int features_a, int group_a, int group_v) -> (Tensor, Tensor)"
)

UINT32_MASK = 0xFFFFFFFF
MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)  # lowbias32
SEED_MIX = 0x9E3779B9  # 2**32 / golden ratio: keeps mix32(hi ^ SEED_MIX) away from mix32(0) = 0
ROUND_MIX = 0x85EBCA6B  # makes k1 differ from mix32(k0), which would give group 0 the key 0
SEED_HIGH = 2**63 - 1  # per-row seeds are drawn uniformly from [0, SEED_HIGH)


# --- the mask, in PyTorch (the reference every implementation must equal bit for bit) ----------


def _mul32(x: Tensor, multiplier: int) -> Tensor:
    """``x * multiplier mod 2**32`` for int64 tensors of uint32 values, without int64 overflow."""
    low = (x & 0xFFFF) * multiplier
    high = (((x >> 16) * multiplier) & 0xFFFF) << 16
    return (low + high) & UINT32_MASK


def mix32(x: Tensor) -> Tensor:
    """lowbias32 hash of an int64 tensor holding uint32 values (a bijection of [0, 2**32))."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_MULTIPLIERS[1])
    return x ^ (x >> 16)


def round_keys(seeds: Tensor) -> tuple[Tensor, Tensor]:
    """The two 32-bit round keys ``(k0, k1)`` of each int64 seed."""
    low, high = seeds & UINT32_MASK, (seeds >> 32) & UINT32_MASK
    k0 = mix32(low ^ mix32(high ^ SEED_MIX))
    return k0, mix32(k0 ^ ROUND_MIX)


def group_keys(seeds: Tensor, num_groups: int) -> Tensor:
    """Keys (*seeds.shape, num_groups), int64 holding uint32, distinct within each row."""
    k0, k1 = round_keys(seeds.long())
    groups = torch.arange(num_groups, device=seeds.device)
    return mix32(mix32(groups ^ k0[..., None]) ^ k1[..., None])


def masked_count(ratio: Tensor, num_groups: int) -> Tensor:
    """``floor(min(max(r, 0) * P, P))`` per ratio, as int64; NaN counts as 0."""
    ratio = ratio.double()
    ratio = torch.where(ratio > 0, ratio, 0.0)
    return torch.clamp_max(ratio * num_groups, num_groups).long()


def group_mask(ratio: Tensor, seeds: Tensor, num_groups: int) -> Tensor:
    """Bool (*seeds.shape, num_groups): the masked groups of every row.

    ``ratio`` broadcasts against ``seeds`` (e.g. (B, 1) ratios for (B, T) frame seeds).
    """
    keys = group_keys(seeds, num_groups)
    count = masked_count(ratio, num_groups).expand(seeds.shape)[..., None]
    kth_smallest = keys.sort(dim=-1).values.gather(-1, (count - 1).clamp_min(0))
    return (keys <= kth_smallest) & (count > 0)


def patch_grid(height: int, width: int, patch_h: int, patch_w: int) -> tuple[int, int]:
    """Whole patches along H and W (the remainder strip is never masked)."""
    return height // patch_h, width // patch_w


def _expand_groups(mask: Tensor, size: int, group: int, dim: int) -> Tensor:
    """Per-group mask -> per-element mask along ``dim`` of length ``size`` (remainder False)."""
    elements = mask.repeat_interleave(group, dim=dim)
    remainder = size - elements.shape[dim]
    if remainder:
        pad_shape = list(elements.shape)
        pad_shape[dim] = remainder
        elements = torch.cat([elements, elements.new_zeros(pad_shape)], dim=dim)
    return elements


def patch_mask(ratio: Tensor, seeds: Tensor, height: int, width: int, patch_h: int,
               patch_w: int) -> Tensor:
    """Bool (B, T, H, W): the masked pixels of every frame (shared by all channels)."""
    grid_h, grid_w = patch_grid(height, width, patch_h, patch_w)
    mask = group_mask(ratio[:, None], seeds, grid_h * grid_w).view(*seeds.shape, grid_h, grid_w)
    return _expand_groups(_expand_groups(mask, height, patch_h, 2), width, patch_w, 3)


def feature_mask(ratio: Optional[Tensor], seeds: Tensor, features: int, group: int) -> Tensor:
    """Bool (B, features): the masked features of every sample (none when ``ratio`` is None)."""
    if ratio is None:
        return torch.zeros(seeds.shape[0], features, dtype=torch.bool, device=seeds.device)
    return _expand_groups(group_mask(ratio, seeds, features // group), features, group, 1)


def zero_masked_patches_reference(x: Tensor, ratio: Tensor, seeds: Tensor, patch_h: int,
                                  patch_w: int) -> None:
    height, width = x.shape[-2:]
    x.masked_fill_(patch_mask(ratio, seeds, height, width, patch_h, patch_w)[:, None], 0)


def masked_concat_reference(a: Tensor, v: Tensor, ratio_a: Optional[Tensor],
                            ratio_v: Optional[Tensor], seeds: Tensor, group_a: int,
                            group_v: int) -> Tensor:
    mask_a = feature_mask(ratio_a, seeds[:, 0], a.shape[1], group_a)
    mask_v = feature_mask(ratio_v, seeds[:, 1], v.shape[1], group_v)
    return torch.cat([a.masked_fill(mask_a, 0), v.masked_fill(mask_v, 0)], dim=1)


def masked_concat_backward_reference(grad: Tensor, ratio_a: Optional[Tensor],
                                     ratio_v: Optional[Tensor], seeds: Tensor, features_a: int,
                                     group_a: int, group_v: int) -> tuple[Tensor, Tensor]:
    grad_a, grad_v = grad[:, :features_a], grad[:, features_a:]
    mask_a = feature_mask(ratio_a, seeds[:, 0], features_a, group_a)
    mask_v = feature_mask(ratio_v, seeds[:, 1], grad_v.shape[1], group_v)
    return (grad_a.masked_fill(mask_a, 0).contiguous(),
            grad_v.masked_fill(mask_v, 0).contiguous())


# --- op registration ---------------------------------------------------------------------------

from avkernels.ops._library import define_op  # noqa: E402

zero_masked_patches = define_op(ZERO_MASKED_PATCHES_SCHEMA, {"CPU": zero_masked_patches_reference})
masked_concat = define_op(MASKED_CONCAT_SCHEMA, {"CPU": masked_concat_reference})
masked_concat_backward = define_op(
    MASKED_CONCAT_BACKWARD_SCHEMA, {"CPU": masked_concat_backward_reference}
)


@torch.library.register_fake("avkernels::zero_masked_patches")
def _zero_masked_patches_fake(x, ratio, seeds, patch_h, patch_w):
    return None


@torch.library.register_fake("avkernels::masked_concat")
def _masked_concat_fake(a, v, ratio_a, ratio_v, seeds, group_a, group_v):
    return a.new_empty((a.shape[0], a.shape[1] + v.shape[1]))


@torch.library.register_fake("avkernels::masked_concat_backward")
def _masked_concat_backward_fake(grad, ratio_a, ratio_v, seeds, features_a, group_a, group_v):
    batch, features = grad.shape
    return grad.new_empty((batch, features_a)), grad.new_empty((batch, features - features_a))


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
        grad_a, grad_v = masked_concat_backward(grad, ratio_a, ratio_v, seeds, ctx.features_a,
                                                *ctx.groups)
        return grad_a, grad_v, None, None, None, None, None


# --- user-facing helpers -----------------------------------------------------------------------


def draw_seeds(shape: Sequence[int], device: torch.device, seed: Optional[int] = None) -> Tensor:
    """Per-row int64 seeds: from torch's default generator of ``device`` (so
    ``torch.manual_seed`` reproduces them), or from a generator seeded with ``seed``."""
    if seed is None:
        return torch.randint(0, SEED_HIGH, tuple(shape), device=device)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, SEED_HIGH, tuple(shape), generator=generator).to(device)


def per_sample_ratio(ratio: Union[float, Tensor], batch: int, device: torch.device,
                     name: str = "ratio") -> Tensor:
    """``ratio`` as a (batch,) float64 tensor on ``device``; a float applies to every sample."""
    if isinstance(ratio, Tensor):
        if ratio.dim() == 0:
            ratio = ratio.expand(batch)
        if ratio.shape != (batch,):
            raise ValueError(
                f"{name} must be a float or a tensor of shape ({batch},) (one ratio per sample), "
                f"got shape {tuple(ratio.shape)}")
        if not ratio.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {ratio.dtype}")
        return ratio.to(device=device, dtype=torch.float64)
    return torch.full((batch,), float(ratio), dtype=torch.float64, device=device)


def positive_pair(value: Union[int, Sequence[int]], name: str) -> tuple[int, int]:
    """``value`` as a pair of positive ints (one int stands for both)."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


def mask_patches(
    x: Tensor,
    ratio: Union[float, Tensor],
    patch_size: Union[int, Sequence[int]],
    seed: Union[None, int, Tensor] = None,
    *,
    inplace: bool = False,
) -> Tensor:
    """Zero exactly ``floor(P * ratio[b])`` of the ``P`` whole patches of every sample ``b``.

    The official FusT input masking (SPEC section 3), as one kernel over the batch.

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
            f"(B, C, T, H, W), got {_describe(x)}")
    patch_h, patch_w = positive_pair(patch_size, "mask_patches: patch_size")
    height, width = x.shape[-2:]
    if patch_h > height or patch_w > width:
        raise ValueError(
            f"mask_patches: patch_size {(patch_h, patch_w)} is larger than the masked plane "
            f"{(height, width)} (the last two dims of x)")
    # Canonical (B, C, T, H, W) view: no copy for any layout.
    frames = x if x.dim() == 5 else x.unsqueeze(-3)
    frames = frames if frames.dim() == 5 else frames.unsqueeze(1)
    batch, num_frames = frames.shape[0], frames.shape[2]
    ratio = per_sample_ratio(ratio, batch, x.device)
    seeds = _frame_seeds(seed, batch, num_frames, x.device)
    if inplace:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "mask_patches(inplace=True) cannot mask a tensor that requires grad; use "
                "inplace=False (differentiable) or mask under torch.no_grad()")
        zero_masked_patches(frames, ratio, seeds, patch_h, patch_w)
        return x
    return MaskPatchesFunction.apply(frames, ratio, seeds, patch_h, patch_w).view(x.shape)


def _frame_seeds(seed: Union[None, int, Tensor], batch: int, num_frames: int,
                 device: torch.device) -> Tensor:
    if not isinstance(seed, Tensor):
        return draw_seeds((batch, num_frames), device, seed)
    if seed.dtype != torch.int64 or seed.shape not in ((batch,), (batch, num_frames)):
        raise ValueError(
            f"mask_patches: a seed tensor must be int64 of shape ({batch},) or ({batch}, "
            f"{num_frames}) (one seed per sample or per frame), got {_describe(seed)}")
    if seed.dim() == 1:
        if num_frames != 1:
            raise ValueError(
                f"mask_patches: x has {num_frames} frames per sample, so seed must have shape "
                f"({batch}, {num_frames}): one seed per frame")
        seed = seed[:, None]
    return seed.to(device).contiguous()


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _register_triton() -> None:
    try:
        from avkernels.ops import masking_triton
    except ImportError:  # no triton: CUDA tensors cannot use avkernels kernels
        return
    for name in ("zero_masked_patches", "masked_concat", "masked_concat_backward"):
        torch.library.register_kernel(f"avkernels::{name}", "cuda", getattr(masking_triton, name))


_register_triton()
