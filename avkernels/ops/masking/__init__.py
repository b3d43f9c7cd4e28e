"""The masking op family of FusT stage 2: ``zero_masked_patches`` (input patches, in place),
``masked_concat`` and ``masked_concat_backward`` (the fusion layer's features).

Files: :mod:`.schema` (signatures), :mod:`.definition` (op handles), :mod:`.reference` (the
mask's definition and plain-PyTorch kernels), :mod:`.triton_kernels` and :mod:`.triton_launch`
(CUDA), :mod:`.autograd`, :mod:`.arguments` (user-facing argument handling),
:mod:`.registration`. The C++ kernels are in ``csrc/ops/``.
"""

from avkernels.ops.masking import registration  # noqa: F401  (registers the kernels)
from avkernels.ops.masking.definition import (
    masked_concat,
    masked_concat_backward,
    zero_masked_patches,
)

__all__ = ["masked_concat", "masked_concat_backward", "zero_masked_patches"]
