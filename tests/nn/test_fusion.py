"""``MaskedConcatFusion`` against concat + Linear (the official ``ConcatFusion``) and OGM-GE's
per-modality logits, unmasked (eval, no ratios, all-zero ratios) and masked (a reference built
from the same seeds: torch's generator state is replayed to draw them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import avkernels
from avkernels import MaskedConcatFusion
from avkernels.ops.masking import arguments
from avkernels.ops.masking import reference as masking

F32, F64 = torch.float32, torch.float64


class ConcatFusion(nn.Module):
    """The official stage-2 fusion layer: cat then ``fc_out``."""

    def __init__(self, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.fc_out = nn.Linear(input_dim, output_dim)

    def forward(self, a, v):
        return self.fc_out(torch.cat((a, v), dim=1))


def ogm_ge_logits(fusion: nn.Module, a, v, features_a: int):
    """Per-modality logits as OGM-GE computes them from the two halves of ``fc_out``."""
    weight, bias = fusion.fc_out.weight, fusion.fc_out.bias
    return (a @ weight[:, :features_a].T + bias / 2, v @ weight[:, features_a:].T + bias / 2)


def make(batch=6, features=(12, 10), classes=5, dtype=F64, group_size=1, seed=0):
    torch.manual_seed(seed)
    fusion = MaskedConcatFusion(features, classes, group_size=group_size, dtype=dtype)
    a = torch.randn(batch, features[0], dtype=dtype, requires_grad=True)
    v = torch.randn(batch, features[1], dtype=dtype, requires_grad=True)
    return fusion, a, v


def test_state_dict_matches_official_concat_fusion():
    fusion = MaskedConcatFusion((512, 512), num_classes=31)
    official = ConcatFusion(1024, 31)
    assert (
        set(fusion.state_dict()) == set(official.state_dict()) == {"fc_out.weight", "fc_out.bias"}
    )
    fusion.load_state_dict(official.state_dict(), strict=True)
    official.load_state_dict(fusion.state_dict(), strict=True)


@pytest.mark.parametrize("mode", ["eval", "no_ratios", "zero_ratios"])
def test_unmasked_equals_concat_linear(mode):
    fusion, a, v = make()
    official = ConcatFusion(22, 5).double()
    official.load_state_dict(fusion.state_dict())
    fusion.train(mode != "eval")
    ratios = (0.0, torch.zeros(6, dtype=F64)) if mode == "zero_ratios" else (None, None)
    if mode == "eval":  # ratios are ignored in eval
        ratios = (0.9, torch.full((6,), 0.9))
    logits, logits_a, logits_v = fusion(a, v, *ratios)
    expected = official(a, v)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)
    expected_a, expected_v = ogm_ge_logits(official, a, v, 12)
    torch.testing.assert_close(logits_a, expected_a, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits_v, expected_v, rtol=0, atol=1e-12)
    grad = torch.randn_like(logits)
    got = torch.autograd.grad(logits, (a, v, fusion.fc_out.weight, fusion.fc_out.bias), grad)
    want = torch.autograd.grad(expected, (a, v, official.fc_out.weight, official.fc_out.bias), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def masked_reference(fusion, a, v, ratio_a, ratio_v, seeds, group_size):
    """concat + Linear on features masked with the documented mask of ``seeds``."""
    batch = a.shape[0]
    masks = [
        masking.feature_mask(
            None if r is None else arguments.per_sample_ratio(r, batch, a.device),
            seeds[:, column],
            x.shape[1],
            group,
        )
        for r, column, x, group in ((ratio_a, 0, a, group_size[0]), (ratio_v, 1, v, group_size[1]))
    ]
    fused = torch.cat([a.masked_fill(masks[0], 0), v.masked_fill(masks[1], 0)], dim=1)
    logits = F.linear(fused, fusion.fc_out.weight, fusion.fc_out.bias)
    return logits, masks


@pytest.mark.parametrize(
    "group_size,ratio_a,ratio_v",
    [
        (
            1,
            torch.tensor([0.0, 0.1, 0.5, 0.9, 0.3, 0.6]),
            torch.tensor([0.5, 0.0, 0.0, 0.2, 0.9, 0.0]),
        ),
        ((5, 3), torch.tensor([0.5, 0.2, 0.99, 0.0, 0.7, 0.4]), None),
        (2, None, 0.4),
    ],
)
def test_masked_training_matches_reference_with_same_mask(group_size, ratio_a, ratio_v):
    fusion, a, v = make(group_size=group_size)
    groups = arguments.positive_pair(group_size, "group_size")
    torch.manual_seed(42)
    logits, logits_a, logits_v = fusion(a, v, ratio_a, ratio_v)
    torch.manual_seed(42)  # replay the generator: the layer draws its (B, 2) seeds first
    seeds = arguments.draw_seeds((6, 2), a.device)
    expected, masks = masked_reference(fusion, a, v, ratio_a, ratio_v, seeds, groups)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits_a + logits_v, logits, rtol=0, atol=1e-12)
    # exact counts per sample, whole groups, remainder never masked
    for mask, ratio, features, group in (
        (masks[0], ratio_a, 12, groups[0]),
        (masks[1], ratio_v, 10, groups[1]),
    ):
        num_groups = features // group
        counts = (
            torch.zeros(6, dtype=torch.long)
            if ratio is None
            else masking.masked_count(arguments.per_sample_ratio(ratio, 6, "cpu"), num_groups)
        )
        assert (mask.sum(1) == counts * group).all()
        assert not mask[:, num_groups * group :].any()
    grad = torch.randn_like(logits)
    params = (a, v, fusion.fc_out.weight, fusion.fc_out.bias)
    got = torch.autograd.grad(logits, params, grad)
    want = torch.autograd.grad(expected, params, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert (got[0][masks[0]] == 0).all() and (got[1][masks[1]] == 0).all()


def test_masks_redrawn_each_call_and_reproducible():
    fusion, a, v = make(batch=8, features=(64, 64))
    torch.manual_seed(1)
    first = fusion(a, v, 0.5, 0.5).logits
    second = fusion(a, v, 0.5, 0.5).logits
    torch.manual_seed(1)
    again = fusion(a, v, 0.5, 0.5).logits
    assert torch.equal(first, again) and not torch.equal(first, second)


def test_float32_and_bfloat16_inputs():
    for dtype in (F32, torch.bfloat16):
        fusion, a, v = make(dtype=dtype)
        logits, *_ = fusion(a, v, 0.5, 0.5)
        assert logits.dtype == dtype
        logits.float().sum().backward()
        assert a.grad.dtype == dtype and v.grad.dtype == dtype


def test_compiles_fullgraph():
    fusion, a, v = make()
    ratio = torch.linspace(0, 0.9, 6, dtype=F64)

    def step(a, v):
        out = fusion(a, v, ratio, ratio)
        return out.logits, out.logits_a

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    logits, logits_a = compiled(a, v)
    torch.manual_seed(3)
    expected, expected_a = step(a, v)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(logits_a, expected_a, rtol=0, atol=1e-12)
    (grad_a,) = torch.autograd.grad(logits.sum(), a)
    (want_a,) = torch.autograd.grad(expected.sum(), a)
    torch.testing.assert_close(grad_a, want_a, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda f: f(torch.randn(2, 12), torch.randn(2, 9)), ValueError, r"v \(B, 10\)"),
        (lambda f: f(torch.randn(2, 12), torch.randn(3, 10)), ValueError, "batch sizes"),
        (lambda f: f(torch.randn(2, 12), torch.randn(2, 10), torch.ones(3)), ValueError, "ratio_a"),
        (lambda f: f(torch.randn(2, 12, 1), torch.randn(2, 10)), ValueError, "flatten"),
    ],
)
def test_errors(call, error, message):
    fusion = MaskedConcatFusion((12, 10), 5).train()
    with pytest.raises(error, match=message):
        call(fusion)


def test_num_classes_required():
    with pytest.raises(TypeError, match="num_classes"):
        MaskedConcatFusion((512, 512))
    assert avkernels.MaskedConcatFusion(num_classes=3).fc_out.in_features == 1024


@pytest.mark.slow
def test_compiles_with_inductor():
    fusion, a, v = make(dtype=F32)
    ratio = torch.linspace(0, 0.9, 6, dtype=F64)
    compiled = torch.compile(lambda a, v: fusion(a, v, ratio, None).logits, fullgraph=True)
    logits = compiled(a, v)
    (grad_a,) = torch.autograd.grad(logits.sum(), a)
    kept = grad_a != 0  # inductor draws its own seeds: read the mask off the gradient
    assert ((~kept).sum(1) == masking.masked_count(ratio, 12)).all()
    expected = F.linear(torch.cat([a * kept, v], 1), fusion.fc_out.weight, fusion.fc_out.bias)
    torch.testing.assert_close(logits, expected)
