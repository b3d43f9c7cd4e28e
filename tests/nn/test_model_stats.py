"""avkernels.dead_stats / reset_dead_stats: the model's TrackedBN counters, per layer, against
dead fractions computed from nn.BatchNorm2d's own outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import avkernels
from avkernels.model_stats import counting_layers


def make_models() -> tuple[nn.Module, nn.Module]:
    """The same small network with nn.BatchNorm2d and with TrackedBN (varied affines)."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5)
    )
    with torch.no_grad():
        for bn in (plain[1], plain[4]):
            bn.weight.uniform_(-1, 1)
            bn.bias.uniform_(-1.5, 0.5)
    return plain, avkernels.convert(copy.deepcopy(plain))


def reference_fractions(plain: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple]:
    """(dead fraction, dead-sample fraction) per BN, from the outputs nn.BatchNorm2d produced."""
    outputs: dict[str, list[torch.Tensor]] = {"1": [], "4": []}
    hooks = [
        plain[int(name)].register_forward_hook(lambda m, i, o, name=name: outputs[name].append(o))
        for name in outputs
    ]
    for x in batches:
        plain(x)
    for hook in hooks:
        hook.remove()
    result = {}
    for name, ys in outputs.items():
        y = torch.cat(ys).detach()
        result[name] = (
            (y <= 0).double().mean(dim=(0, 2, 3)),
            (y.amax(dim=(2, 3)) <= 0).double().mean(dim=0),
            y.shape[0] * y.shape[2] * y.shape[3],
            y.shape[0],
        )
    return result


def test_dead_stats_match_the_outputs_of_nn_batchnorm2d():
    plain, tracked = make_models()
    batches = [torch.randn(4, 3, 9, 9) for _ in range(3)]
    expected = reference_fractions(plain.train(), batches)
    tracked.train()
    for x in batches:
        tracked(x)
    stats = avkernels.dead_stats(tracked)
    assert sorted(stats) == ["1", "4"]
    for name, (dead, dead_samples, elements, samples) in expected.items():
        got = stats[name]
        torch.testing.assert_close(got.dead_fraction, dead)
        torch.testing.assert_close(got.dead_sample_fraction, dead_samples)
        assert (got.elements, got.samples) == (elements, samples)
    assert (stats["1"].dead_fraction > 0).any()  # the affines make some channels dead


def test_reset_dead_stats_zeroes_every_layer():
    _, tracked = make_models()
    tracked(torch.randn(2, 3, 9, 9))
    avkernels.reset_dead_stats(tracked)
    for stats in avkernels.dead_stats(tracked).values():
        assert (stats.elements, stats.samples) == (0, 0)
        assert stats.dead_fraction.isnan().all()  # nothing counted yet


def test_a_model_without_counting_layers_is_refused():
    with pytest.raises(ValueError, match=r"avkernels\.convert\(model\)"):
        avkernels.dead_stats(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    untracked = avkernels.convert(nn.Sequential(nn.BatchNorm2d(4)), track_dead=False)
    with pytest.raises(ValueError, match="no TrackedBN that counts"):
        avkernels.reset_dead_stats(untracked)


def test_counting_layers_names_the_layers_that_count_and_may_be_empty():
    inner = nn.Sequential(avkernels.TrackedBN(4), avkernels.TrackedBN(4, track_dead=False))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), inner)
    assert list(counting_layers(model)) == ["1.0"]
    assert counting_layers(model)["1.0"] is model[1][0]
    assert counting_layers(nn.Sequential(nn.Conv2d(3, 4, 3))) == {}
