"""Models with known dead channels and report look-ups, shared by the diagnosis tests of the
library (tests/nn/test_diagnose.py) and of the command (tests/app/test_cli_diagnose.py)."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from avkernels import DiagnosisReport

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def resnet_with_dead_channels() -> nn.Module:
    """ResNet-18 whose layer1.0.bn1 has, by channel: 0 closed (g = b = 0), 1 constant
    (tiny positive b), 2 collapsed gamma but a real bias (not abnormal), 3 just above tau."""
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        bn = model.layer1[0].bn1
        bn.weight[:4] = torch.tensor([0.0, 1e-12, -1e-12, 2e-10])
        bn.bias[:4] = torch.tensor([0.0, 1e-12, -0.5, 0.0])
    return model


def layer(report: DiagnosisReport, name: str):
    return next(item for item in report.layers if item.name == name)
