"""The masking ops, defined once from their signatures in :mod:`.schema`."""

from avkernels.ops._library import define_op
from avkernels.ops.masking.schema import MASKED_CONCAT, MASKED_CONCAT_BACKWARD, ZERO_MASKED_PATCHES

zero_masked_patches = define_op(ZERO_MASKED_PATCHES)
masked_concat = define_op(MASKED_CONCAT)
masked_concat_backward = define_op(MASKED_CONCAT_BACKWARD)
