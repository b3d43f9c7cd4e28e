"""An independent re-implementation of the official ABRi code (two ``nn.BatchNorm2d`` plus the
blend, and the official ResNet-18 with its key layout), the oracle of the ABRi tests."""

from __future__ import annotations

import torch
from torch import nn


class OfficialABRi(nn.Module):
    """The official ABRi layer: the original BN, an added BN and a learnable blend weight."""

    def __init__(self, channels: int, alpha: float, granularity: str, momentum=0.1):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, momentum=momentum)
        self.bn_addition = nn.BatchNorm2d(channels, momentum=momentum)
        shape = (1,) if granularity == "layer" else (1, channels, 1, 1)
        self.fusion_weight = nn.Parameter(torch.full(shape, alpha))

    def forward(self, x):
        a = self.fusion_weight
        return a * self.bn(x) + (1 - a) * self.bn_addition(x)


class OfficialBlock(nn.Module):
    def __init__(self, inplanes, planes, stride, granularity):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1, self.bn1_addition = nn.BatchNorm2d(planes), nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2, self.bn2_addition = nn.BatchNorm2d(planes), nn.BatchNorm2d(planes)
        shape = (1,) if granularity == "layer" else (1, planes, 1, 1)
        self.fusion_weight1 = nn.Parameter(torch.full(shape, 0.5))
        self.fusion_weight2 = nn.Parameter(torch.full(shape, 0.5))
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = OfficialDownSample(inplanes, planes, stride, granularity)

    def forward(self, x):
        out = _blend(self.fusion_weight1, self.bn1, self.bn1_addition, self.conv1(x)).relu()
        out = _blend(self.fusion_weight2, self.bn2, self.bn2_addition, self.conv2(out))
        return (out + (x if self.downsample is None else self.downsample(x))).relu()


class OfficialDownSample(nn.Module):
    def __init__(self, inplanes, planes, stride, granularity):
        super().__init__()
        self.conv = nn.Conv2d(inplanes, planes, 1, stride, bias=False)
        self.bn, self.bn_addition = nn.BatchNorm2d(planes), nn.BatchNorm2d(planes)
        shape = (1,) if granularity == "layer" else (1, planes, 1, 1)
        self.fusion_weight = nn.Parameter(torch.full(shape, 0.5))

    def forward(self, x):
        return _blend(self.fusion_weight, self.bn, self.bn_addition, self.conv(x))


class OfficialResNet18(nn.Module):
    """The official ABRi ResNet-18 backbone layout (no classifier)."""

    def __init__(self, granularity: str, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1, self.bn1_addition = nn.BatchNorm2d(64), nn.BatchNorm2d(64)
        shape = (1,) if granularity == "layer" else (1, 64, 1, 1)
        self.fusion_weight = nn.Parameter(torch.full(shape, 0.5))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for index, planes in enumerate((64, 128, 256, 512)):
            stride = 1 if index == 0 else 2
            blocks = [
                OfficialBlock(inplanes, planes, stride, granularity),
                OfficialBlock(planes, planes, 1, granularity),
            ]
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
            inplanes = planes

    def forward(self, x):
        x = _blend(self.fusion_weight, self.bn1, self.bn1_addition, self.conv1(x)).relu()
        x = self.maxpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _blend(weight, bn, bn_addition, x):
    return weight * bn(x) + (1 - weight) * bn_addition(x)


@torch.no_grad()
def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every BN parameter, running statistic and blend weight set to random values (some
    channels dead), so that no two tensors of a layer coincide."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            tensor.fill_(int(torch.randint(1, 50, (), generator=g)))
        elif "running_var" in name:
            tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
        elif "fusion_weight" in name or "abri_alpha" in name:
            tensor.copy_(torch.rand(tensor.shape, generator=g) * 1.4 - 0.2)  # outside [0,1] too
        elif "running_mean" in name or name.endswith("bias"):
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
        elif name.endswith("weight") and tensor.dim() == 1:  # BN gamma
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.5 + 1)
            tensor[::7] = 0  # collapsed channels
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=g) * (2 / tensor[0].numel()) ** 0.5)
    return model
