"""Signatures of the masking ops (docs/DESIGN.md, "Op contracts"); the mask they all apply is
defined in :mod:`avkernels.ops.masking.reference`.

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

from avkernels.ops._library import OpSignature

ZERO_MASKED_PATCHES = OpSignature(
    "zero_masked_patches",
    (
        ("x", "Tensor(a!)"),
        ("ratio", "Tensor"),
        ("seeds", "Tensor"),
        ("patch_h", "int"),
        ("patch_w", "int"),
    ),
    "()",
)
MASKED_CONCAT = OpSignature(
    "masked_concat",
    (
        ("a", "Tensor"),
        ("v", "Tensor"),
        ("ratio_a", "Tensor?"),
        ("ratio_v", "Tensor?"),
        ("seeds", "Tensor"),
        ("group_a", "int"),
        ("group_v", "int"),
    ),
    "Tensor",
)
MASKED_CONCAT_BACKWARD = OpSignature(
    "masked_concat_backward",
    (
        ("grad", "Tensor"),
        ("ratio_a", "Tensor?"),
        ("ratio_v", "Tensor?"),
        ("seeds", "Tensor"),
        ("features_a", "int"),
        ("group_a", "int"),
        ("group_v", "int"),
    ),
    "(Tensor, Tensor)",
)
