"""FusT (two-stage Fusion Tuning): stage-1 confidences and the stage-2 mask policy.

Stage 1: :class:`ConfidenceTracker` records each training sample's confidence per epoch while
one encoder is fine-tuned alone. Stage 2: :func:`mask_ratios` turns the audio and visual
confidences into per-sample mask ratios, applied by :func:`avkernels.mask_patches` (inputs) or
:class:`avkernels.MaskedConcatFusion` (fused features).
"""

from avkernels.fust.confidence import Confidences, ConfidenceTracker
from avkernels.fust.policy import MaskRatios, mask_ratios

__all__ = ["ConfidenceTracker", "Confidences", "MaskRatios", "mask_ratios"]
