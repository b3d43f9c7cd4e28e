"""avkernels: fused kernels for audio-visual learning with pre-trained encoders.

``TrackedBN`` is a drop-in ``nn.BatchNorm2d`` that counts dead channels inside its kernel;
``convert``/``revert`` swap it into and out of a model; ``abri`` repairs dead channels with
ABRi (a mode of TrackedBN) and ``diagnose`` reports them; ``fust`` (confidences, mask policy),
``mask_patches`` and ``MaskedConcatFusion`` implement two-stage Fusion Tuning; ``models`` (the
audio-visual ResNet classifier, encoder loading) and ``train`` (the resumable FusT/baseline
training loop) put them together; ``distributed`` synchronises TrackedBN across processes and
wraps models in DDP (``wrap_ddp``).
"""

from avkernels._extension import HAS_EXTENSION
from avkernels.convert import convert, revert
from avkernels.modules import TrackedBN
from avkernels import abri, distributed
from avkernels.diagnosis import DiagnosisReport, diagnose
from avkernels import fust
from avkernels.fusion import FusionOutput, MaskedConcatFusion
from avkernels.ops.masking import mask_patches
from avkernels import models, train  # cheap: torchvision is imported only when a model needs it

__version__ = "0.1.0"

__all__ = [
    "HAS_EXTENSION",
    "DiagnosisReport",
    "FusionOutput",
    "MaskedConcatFusion",
    "TrackedBN",
    "abri",
    "convert",
    "diagnose",
    "distributed",
    "fust",
    "mask_patches",
    "models",
    "revert",
    "train",
    "__version__",
]
