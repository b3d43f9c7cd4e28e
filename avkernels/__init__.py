"""avkernels: fused kernels for audio-visual learning with pre-trained encoders (the library).

``TrackedBN`` is a drop-in ``nn.BatchNorm2d`` that counts dead channels inside its kernel;
``convert``/``revert`` swap it into and out of a model; :mod:`avkernels.functional` has the
kernels as functions; :mod:`avkernels.abri` repairs dead channels with ABRi (a mode of TrackedBN)
and :func:`diagnose` reports them; :mod:`avkernels.fust` (confidences, mask policy),
:func:`mask_patches` and :class:`MaskedConcatFusion` implement two-stage Fusion Tuning;
:mod:`avkernels.distributed` synchronises TrackedBN across processes and wraps models in DDP.

The research application built on this library (data, models, trainer, demo, CLI) lives in
:mod:`avkernels.app`, which ``import avkernels`` does not load.
"""

from avkernels import abri, distributed, functional, fust
from avkernels._extension import HAS_EXTENSION
from avkernels._version import __version__
from avkernels.convert import convert, revert
from avkernels.diagnosis import DiagnosisReport, diagnose
from avkernels.functional import mask_patches
from avkernels.model_stats import LayerDeadStats, dead_stats, reset_dead_stats
from avkernels.nn import FusionOutput, MaskedConcatFusion, TrackedBN

__all__ = [
    "HAS_EXTENSION",
    "DiagnosisReport",
    "FusionOutput",
    "LayerDeadStats",
    "MaskedConcatFusion",
    "TrackedBN",
    "__version__",
    "abri",
    "convert",
    "dead_stats",
    "diagnose",
    "distributed",
    "functional",
    "fust",
    "mask_patches",
    "reset_dead_stats",
    "revert",
]
