"""Values that used to be taken silently and give a wrong result: an ABRi blend weight outside
[0, 1], NaN mask ratios, NaN or infinite diagnosis thresholds and inputs, a NaN mask-ratio tau.
Each raises ValueError naming the argument."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from avkernels import TrackedBN, diagnose, mask_patches
from avkernels.fust import mask_ratios
from avkernels.ops.masking.arguments import per_sample_ratio


@pytest.mark.parametrize("alpha", [2.0, -0.1, math.nan])
def test_enable_abri_takes_a_blend_weight_in_0_1(alpha):
    with pytest.raises(ValueError, match="alpha"):
        TrackedBN(4).enable_abri(alpha)


def test_enable_abri_keeps_accepting_the_ends():
    for alpha in (0.0, 1.0):
        layer = TrackedBN(4).enable_abri(alpha)
        assert torch.equal(layer.abri_alpha, torch.full((1,), alpha))


@pytest.mark.parametrize(
    "ratio", [math.nan, torch.tensor([0.5, math.nan], dtype=torch.float64)], ids=["float", "tensor"]
)
def test_mask_patches_rejects_nan_ratios(ratio):
    with pytest.raises(ValueError, match="NaN"):
        mask_patches(torch.ones(2, 1, 4, 4), ratio, (2, 2))


def test_device_ratios_are_checked_by_an_async_assert_not_a_host_sync(monkeypatch):
    # On a GPU a host-side NaN check would synchronise every call; the device asserts instead.
    asserted = []
    monkeypatch.setattr(torch, "_assert_async", lambda ok, message: asserted.append(message))
    ratio = torch.tensor([0.5, math.nan], dtype=torch.float64, device="meta")
    per_sample_ratio(ratio, 2, torch.device("meta"))
    assert asserted == ["ratio holds NaN; ratios are numbers (<= 0 masks nothing)"]


def test_mask_patches_still_masks_with_finite_ratios():
    out = mask_patches(
        torch.ones(2, 1, 4, 4), torch.tensor([0.5, 0.0], dtype=torch.float64), (2, 2)
    )
    assert out[0].eq(0).sum() == 8 and out[1].eq(0).sum() == 0  # 2 of 4 patches of 4 values


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


@pytest.mark.parametrize("threshold", [math.nan, math.inf, -1.0])
def test_diagnose_rejects_a_non_finite_or_negative_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        diagnose(small_model(), threshold=threshold)


def test_diagnose_rejects_nan_inputs_rather_than_report_nothing_dead():
    data = [torch.full((2, 3, 8, 8), math.nan)]
    with pytest.raises(ValueError, match="NaN"):
        diagnose(small_model(), data)
    report = diagnose(small_model(), [torch.randn(2, 3, 8, 8)])  # finite data still works
    assert report.batches == 1


def test_mask_ratios_rejects_a_nan_tau():
    confidences = torch.tensor([0.9, 0.2], dtype=torch.float64)
    with pytest.raises(ValueError, match="threshold"):
        mask_ratios(confidences, confidences.flip(0), math.nan, 5, 0.5, verbose=False)
