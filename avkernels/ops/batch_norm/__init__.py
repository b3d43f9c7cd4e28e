"""The tracked batch-norm op family: ``batch_norm_fwd``, ``batch_norm_bwd`` (and their
differentiable forms ``batch_norm_fwd_differentiable``, ``batch_norm_bwd_differentiable``) and
the differentiable ``tracked_batch_norm`` (one op for plain, ReLU-fused and ABRi BatchNorm), and
the parts synchronised BN runs around its collectives (``batch_norm_stats``,
``batch_norm_bwd_reduce``, ``batch_norm_bwd_elemt``).

Files: :mod:`.schema` (the contract: argument tables, conventions), :mod:`.definition` (the op
handles), :mod:`.reference` (plain PyTorch, the oracle), :mod:`.triton_kernels` and
:mod:`.triton_launch` (CUDA), :mod:`.autograd` (Python autograd without the extension),
:mod:`.registration` (registers the Python kernels), :mod:`.sync` (the synchronised variant).
The C++ kernels are in ``csrc/ops/``.
"""

from avkernels.ops.batch_norm import registration  # noqa: F401  (registers the kernels)
from avkernels.ops.batch_norm.definition import (
    batch_norm_bwd,
    batch_norm_bwd_differentiable,
    batch_norm_bwd_elemt,
    batch_norm_bwd_reduce,
    batch_norm_fwd,
    batch_norm_fwd_differentiable,
    batch_norm_stats,
    tracked_batch_norm,
)
from avkernels.ops.batch_norm.schema import (
    BackwardArgs,
    ForwardArgs,
    accumulation_dtype,
    output_memory_format,
)

__all__ = [
    "BackwardArgs",
    "ForwardArgs",
    "accumulation_dtype",
    "batch_norm_bwd",
    "batch_norm_bwd_differentiable",
    "batch_norm_bwd_elemt",
    "batch_norm_bwd_reduce",
    "batch_norm_fwd",
    "batch_norm_fwd_differentiable",
    "batch_norm_stats",
    "output_memory_format",
    "tracked_batch_norm",
]
