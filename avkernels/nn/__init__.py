"""Modules over the avkernels ops: :class:`TrackedBN` (a drop-in ``nn.BatchNorm2d`` with
dead-channel statistics, fused ReLU and ABRi) and :class:`MaskedConcatFusion` (FusT's fusion
layer)."""

from avkernels.nn.fusion import FusionOutput, MaskedConcatFusion
from avkernels.nn.tracked_bn import TrackedBN

__all__ = ["FusionOutput", "MaskedConcatFusion", "TrackedBN"]
