"""The tracked batch-norm ops, defined once from their signatures in :mod:`.schema`; kernels are
registered on them by :mod:`.registration` (Python) and by the compiled extension (C++)."""

from avkernels.ops._library import define_op
from avkernels.ops.batch_norm.schema import (
    BACKWARD,
    BACKWARD_ELEMT,
    BACKWARD_REDUCE,
    DIFFERENTIABLE_BACKWARD,
    DIFFERENTIABLE_FORWARD,
    FORWARD,
    STATS,
    TRACKED,
)

batch_norm_fwd = define_op(FORWARD)
batch_norm_bwd = define_op(BACKWARD)
# The functional form of TrackedBN: batch_norm_fwd's arguments, its output y, differentiable.
tracked_batch_norm = define_op(TRACKED)
# batch_norm_bwd, differentiable again: the backward under create_graph=True.
batch_norm_bwd_differentiable = define_op(DIFFERENTIABLE_BACKWARD)
# batch_norm_fwd, differentiable: the forward under forward-mode AD.
batch_norm_fwd_differentiable = define_op(DIFFERENTIABLE_FORWARD)
# The parts of the batch-statistics ops that synchronised BN runs around its collectives.
batch_norm_stats = define_op(STATS)
batch_norm_bwd_reduce = define_op(BACKWARD_REDUCE)
batch_norm_bwd_elemt = define_op(BACKWARD_ELEMT)
