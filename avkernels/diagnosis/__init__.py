"""Dead-channel diagnosis of a model's BatchNorm layers: :func:`diagnose` (in :mod:`.collect`)
builds a :class:`DiagnosisReport` (in :mod:`.report`); :mod:`.plots` draws it (matplotlib,
imported only when a plot is asked for)."""

from avkernels.diagnosis.collect import diagnose
from avkernels.diagnosis.report import (
    ABSOLUTE_THRESHOLD,
    ACTIVATION_THRESHOLD,
    RELATIVE_THRESHOLD,
    DiagnosisReport,
    LayerDiagnosis,
    ReportComparison,
    compare,
)

__all__ = [
    "ABSOLUTE_THRESHOLD",
    "ACTIVATION_THRESHOLD",
    "RELATIVE_THRESHOLD",
    "DiagnosisReport",
    "LayerDiagnosis",
    "ReportComparison",
    "compare",
    "diagnose",
]
