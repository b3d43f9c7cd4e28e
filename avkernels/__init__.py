"""avkernels: fused kernels for audio-visual learning with pre-trained encoders.

``TrackedBN`` is a drop-in ``nn.BatchNorm2d`` that counts dead channels inside its kernel;
``convert``/``revert`` swap it into and out of a model.
"""

from avkernels._extension import HAS_EXTENSION
from avkernels.convert import convert, revert
from avkernels.modules import TrackedBN

__version__ = "0.1.0"

__all__ = ["HAS_EXTENSION", "TrackedBN", "convert", "revert", "__version__"]
