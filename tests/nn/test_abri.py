"""ABRi: TrackedBN's ABRi mode and ``avkernels.abri`` against an independent re-implementation
of the official layer (two ``nn.BatchNorm2d`` plus the blend) and of the official ResNet.

The layer tests run on every backend (``conftest.backend``: reference, C++, Triton in the
interpreter or on a GPU); the model-level tests on the registered CPU kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from avkernels import TrackedBN, abri, revert
from avkernels.app.models import ResNetEncoder
from tests.helpers.batch_norm import assert_close, assert_dead_counts, dead_tolerance
from tests.helpers.official import OfficialABRi, OfficialResNet18, randomise

F32, F64 = torch.float32, torch.float64


# --- the layer ------------------------------------------------------------------------------------

OFFICIAL_TO_TRACKED = {
    "bn.weight": "weight",
    "bn.bias": "bias",
    "bn.running_mean": "running_mean",
    "bn.running_var": "running_var",
    "bn.num_batches_tracked": "num_batches_tracked",
    "bn_addition.weight": "abri_weight",
    "bn_addition.bias": "abri_bias",
    "bn_addition.running_mean": "abri_running_mean",
    "bn_addition.running_var": "abri_running_var",
    "bn_addition.num_batches_tracked": "abri_num_batches_tracked",
    "fusion_weight": "abri_alpha",
}


def layer_pair(channels, granularity, activation=None, momentum=0.1, device="cpu", seed=0):
    """A TrackedBN in ABRi mode (float32) and the official layer (float64) in the same state."""
    official = randomise(OfficialABRi(channels, 0.5, granularity, momentum), seed).double()
    tracked = TrackedBN(channels, momentum=momentum, activation=activation, device=device)
    tracked.enable_abri(0.5, granularity)
    state = {
        OFFICIAL_TO_TRACKED[k]: v.reshape(tracked.get_parameter(OFFICIAL_TO_TRACKED[k]).shape)
        if k == "fusion_weight"
        else v
        for k, v in official.state_dict().items()
    }
    tracked.load_state_dict(state)
    return tracked, official.to(device)


def assert_layers_match(tracked: TrackedBN, official: OfficialABRi, name: str) -> None:
    for key, value in official.state_dict().items():
        ours = tracked.state_dict()[OFFICIAL_TO_TRACKED[key]]
        if value.is_floating_point():
            assert_close(ours, value.reshape(ours.shape), name=f"{name}: {key}")
        else:
            assert torch.equal(ours.cpu(), value.cpu()), f"{name}: {key} {ours} != {value}"


GRANULARITIES = ("layer", "channel")


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_layer_matches_official_two_batchnorms(backend, granularity, activation):
    """Outputs, every gradient (alpha included), both running-stat sets over several training
    steps, the dead counters on the blended output, and eval outputs after training."""
    device, shape, lr = backend.device, (3, 5, 4, 6), 0.2
    tracked, official = layer_pair(shape[1], granularity, activation, device=device)
    g = torch.Generator().manual_seed(1)
    pre_activations = []
    start = [t.clone() for t in (tracked.dead_count, tracked.dead_sample_count, tracked.seen)]
    with backend.active():
        for step in range(3):
            x = (torch.randn(shape, generator=g, dtype=F64) * 2 + 1).to(device)
            grad = torch.randn(shape, generator=g, dtype=F64).to(device)
            x32 = x.float().requires_grad_()
            x64 = x.clone().requires_grad_()
            y = tracked(x32)
            z = official(x64)
            pre_activations.append(z.detach())
            expected = F.relu(z) if activation else z
            assert_close(y, expected, name=f"step {step}: output")
            y.backward(grad.float())
            expected.backward(grad)
            assert_close(x32.grad, x64.grad, name=f"step {step}: grad x")
            for key, param in official.named_parameters():
                ours = tracked.get_parameter(OFFICIAL_TO_TRACKED[key])
                assert_close(
                    ours.grad, param.grad.reshape(ours.shape), name=f"step {step}: grad {key}"
                )
            with torch.no_grad():  # the same SGD step on both
                for param in list(tracked.parameters()) + list(official.parameters()):
                    param -= lr * param.grad
                    param.grad = None
        assert_layers_match(tracked, official, "after training")
        assert_dead_counts(
            (tracked.dead_count, tracked.dead_sample_count, tracked.seen),
            start,
            pre_activations,
            dead_tolerance(F32),
        )
        tracked.eval()
        official.eval()
        x = torch.randn(shape, generator=g, dtype=F64).to(device)
        z = official(x)
        assert_close(tracked(x.float()), F.relu(z) if activation else z, name="eval output")


def test_momentum_none_keeps_two_cumulative_averages(backend):
    """momentum=None: each running set is the average over its own BN's batch count, as two
    nn.BatchNorm2d would keep it (the added BN starts counting at ABRi time)."""
    tracked, official = layer_pair(4, "channel", momentum=None, device=backend.device)
    assert tracked.num_batches_tracked != tracked.abri_num_batches_tracked
    g = torch.Generator().manual_seed(2)
    with backend.active():
        for _ in range(3):
            x = torch.randn(2, 4, 3, 3, generator=g, dtype=F64).to(backend.device)
            assert_close(tracked(x.float()), official(x), name="output")
    assert_layers_match(tracked, official, "momentum=None")


def test_untracked_running_stats_use_batch_statistics_in_eval(backend):
    tracked, official = layer_pair(4, "layer", device=backend.device)
    for module in (tracked, official.bn, official.bn_addition):
        module.track_running_stats = False
        module.running_mean = module.running_var = None
    tracked.abri_running_mean = tracked.abri_running_var = None
    tracked.eval(), official.eval()
    x = torch.randn(2, 4, 3, 3, dtype=F64).to(backend.device)
    with backend.active():
        assert_close(tracked(x.float()), official(x), name="eval with batch statistics")


@pytest.mark.slow  # compiling takes about a minute on 2 busy cores
def test_torch_compile_fullgraph_matches_eager():
    tracked, _ = layer_pair(4, "channel", activation="relu")
    eager = copy.deepcopy(tracked)
    x = torch.randn(2, 4, 3, 5)
    grads = []
    for layer in (torch.compile(tracked, fullgraph=True), eager):
        leaf = x.clone().requires_grad_()
        layer(leaf).square().sum().backward()
        grads.append(leaf.grad)
    assert_close(grads[0], grads[1].double(), name="grad x")
    for name, param in eager.named_parameters():
        assert_close(tracked.get_parameter(name).grad, param.grad.double(), name=f"grad {name}")
    for name, value in eager.state_dict().items():
        assert torch.equal(tracked.state_dict()[name], value), name


def test_enable_abri_initial_state_and_errors():
    layer = TrackedBN(6)
    keys = set(layer.state_dict())
    assert layer.enable_abri(0.3, "channel") is layer
    assert torch.equal(layer.abri_weight, torch.ones(6))
    assert torch.equal(layer.abri_bias, torch.zeros(6))
    assert torch.equal(layer.abri_alpha, torch.full((6,), 0.3))
    assert torch.equal(layer.abri_running_mean, torch.zeros(6))
    assert torch.equal(layer.abri_running_var, torch.ones(6))
    assert layer.abri_num_batches_tracked.item() == 0
    assert all(p.requires_grad for p in (layer.abri_weight, layer.abri_bias, layer.abri_alpha))
    added = {
        "abri_weight",
        "abri_bias",
        "abri_alpha",
        "abri_running_mean",
        "abri_running_var",
        "abri_num_batches_tracked",
    }
    assert set(layer.state_dict()) == keys | added
    assert "abri='channel'" in repr(layer)
    assert TrackedBN(6).enable_abri().abri_alpha.shape == (1,)
    assert TrackedBN(6, bias=False).enable_abri().abri_bias is None
    with pytest.raises(ValueError, match="granularity"):
        TrackedBN(6).enable_abri(granularity="batch")
    with pytest.raises(ValueError, match="affine=False"):
        TrackedBN(6, affine=False).enable_abri()
    with pytest.raises(RuntimeError, match="already"):
        layer.enable_abri()
    with pytest.raises(ValueError, match="fold"):
        revert(nn.Sequential(layer))


def test_state_dict_loading():
    """A plain-BN checkpoint loads strictly into an ABRi layer and resets the added BN; an ABRi
    checkpoint round-trips; a partial ABRi state is reported missing."""
    plain = randomise(nn.BatchNorm2d(5), 3)
    layer = TrackedBN(5).enable_abri(0.25)
    randomise(layer, 4)
    layer.load_state_dict(plain.state_dict())
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(layer, name), getattr(plain, name))
    fresh = TrackedBN(5).enable_abri(0.25)
    for name in (
        "abri_weight",
        "abri_bias",
        "abri_alpha",
        "abri_running_mean",
        "abri_running_var",
        "abri_num_batches_tracked",
    ):
        assert torch.equal(getattr(layer, name), getattr(fresh, name)), name
    randomise(layer, 5)
    restored = TrackedBN(5).enable_abri()
    restored.load_state_dict(layer.state_dict())
    for name, value in layer.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    partial = {k: v for k, v in layer.state_dict().items() if k != "abri_running_var"}
    with pytest.raises(RuntimeError, match="abri_running_var"):
        restored.load_state_dict(partial)
    with pytest.raises(RuntimeError, match="abri_weight"):  # ABRi state into a plain layer
        TrackedBN(5).load_state_dict(layer.state_dict())


# --- whole models -------------------------------------------------------------------------------


def small_input(seed=0, batch=2, size=16, channels=3):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_apply_converts_every_batchnorm_and_keeps_outputs_at_alpha_one():
    model = randomise(torchvision.models.resnet18(num_classes=10), 6).eval()
    x = small_input()
    expected = model(x)
    converted = abri.apply(model, alpha=1.0)
    layers = dict(abri.abri_layers(converted))
    assert len(layers) == 20
    assert all(layer.abri_granularity == "layer" for layer in layers.values())
    # alpha = 1 selects the original BN: the pre-trained network's outputs are unchanged.
    torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-4)
    before = {name: layer.abri_alpha for name, layer in layers.items()}
    again = abri.apply(converted, alpha=0.2, granularity="channel")
    assert all(layer.abri_alpha is before[name] for name, layer in abri.abri_layers(again))


def test_apply_only_dead_layers():
    model = torchvision.models.resnet18()
    with torch.no_grad():
        model.layer2[1].bn1.weight[:4] = 0
        model.layer2[1].bn1.bias[:4] = 0
    converted = abri.apply(model, only_dead=True)
    assert [name for name, _ in abri.abri_layers(converted)] == ["layer2.1.bn1"]
    batchnorms = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(isinstance(m, TrackedBN) for m in batchnorms)


def trained_abri_resnet(granularity: str) -> nn.Module:
    """A ResNet-18 in ABRi mode after a few SGD steps: both BN sets and alpha have moved."""
    torch.manual_seed(0)
    model = abri.apply(torchvision.models.resnet18(num_classes=10), 0.6, granularity)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    labels = torch.arange(4) % 10
    for step in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(small_input(step, batch=4)), labels).backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_fold_gives_identical_eval_outputs(granularity):
    model = trained_abri_resnet(granularity)
    x = small_input(9)
    with torch.no_grad():
        expected = model(x)
        folded = abri.fold(model)
        assert not list(abri.abri_layers(folded))
        assert not any(isinstance(m, TrackedBN) and m.abri_enabled for m in folded.modules())
        plain = revert(folded)
        batchnorms = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(type(m) is nn.BatchNorm2d for m in batchnorms)
        torch.testing.assert_close(plain(x), expected, rtol=1e-5, atol=1e-5)


def test_fold_layer_matches_official_eval_output_exactly_in_float64():
    tracked, official = layer_pair(6, "channel")
    folded = abri.fold(tracked.double()).eval()
    official.eval()
    x = torch.randn(2, 6, 3, 3, dtype=F64)
    torch.testing.assert_close(folded(x), official(x), rtol=1e-12, atol=1e-12)


def test_fold_fused_relu_layer_into_batchnorm_and_relu():
    tracked, official = layer_pair(6, "channel", activation="relu")
    folded = abri.fold(tracked.double())
    assert [type(m) for m in folded] == [nn.BatchNorm2d, nn.ReLU]
    assert folded.training and folded[0].training
    folded.eval()
    official.eval()
    x = torch.randn(2, 6, 3, 3, dtype=F64)
    torch.testing.assert_close(folded(x), F.relu(official(x)), rtol=1e-12, atol=1e-12)


def test_fold_the_applications_encoder_with_fused_relus():
    torch.manual_seed(0)
    model = abri.apply(ResNetEncoder("resnet18", 3, width=8), 0.6, "channel")
    fused = [name for name, layer in abri.abri_layers(model) if layer.activation == "relu"]
    assert len(fused) == 9  # the stem and each block's bn1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(2):  # move both BN sets and alpha away from their initial values
        optimizer.zero_grad()
        model(small_input(step, batch=4, size=32)).square().mean().backward()
        optimizer.step()
    model.eval()
    x = small_input(9, size=32)
    with torch.no_grad():
        expected = model(x)
        folded = abri.fold(model)
        assert not list(abri.abri_layers(folded))
        for name in fused:
            assert [type(m) for m in folded.get_submodule(name)] == [nn.BatchNorm2d, nn.ReLU]
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_load_official_checkpoint_matches_official_model(granularity):
    official = randomise(OfficialResNet18(granularity), 8)
    model = torchvision.models.resnet18()
    model.fc = nn.Identity()
    model = abri.apply(model, granularity=granularity)
    abri.load_official_state_dict(model, official.state_dict())
    # 6 samples: layer4's batch statistics over 1x1 maps of fewer samples are ill-conditioned.
    x = small_input(10, batch=6)
    for training in (False, True):  # eval: running statistics; train: batch statistics + updates
        official.train(training), model.train(training)
        expected = F.adaptive_avg_pool2d(official(x), 1).flatten(1)
        scale = expected.abs().max().item()
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * scale)
    mapping = abri.official_key_map(model)
    ours = model.state_dict()
    for key, value in official.state_dict().items():
        torch.testing.assert_close(
            ours[mapping[key]],
            value.reshape(ours[mapping[key]].shape),
            rtol=1e-5,
            atol=1e-5,
            msg=lambda m: f"{key}: {m}",
        )


def test_load_official_checkpoint_errors_name_the_keys():
    official = OfficialResNet18("layer").state_dict()
    model = abri.apply(torchvision.models.resnet18())
    with pytest.raises(KeyError, match=r"missing official keys fc\.bias, fc\.weight.*nn\.Identity"):
        abri.load_official_state_dict(model, official)
    model.fc = nn.Identity()
    dropped = "layer3.0.downsample.bn_addition.weight"
    incomplete = {k: v for k, v in official.items() if k != dropped}
    with pytest.raises(KeyError, match=f"missing official keys {dropped}"):
        abri.load_official_state_dict(model, incomplete)
    with pytest.raises(KeyError, match="unexpected keys extra"):
        abri.load_official_state_dict(model, dict(official, extra=torch.zeros(1)))
    plain = torchvision.models.resnet18()
    plain.fc = nn.Identity()
    with pytest.raises(KeyError, match="abri.apply"):  # an official checkpoint, a plain model
        abri.load_official_state_dict(plain, official)
    channel = OfficialResNet18("channel").state_dict()
    with pytest.raises(ValueError, match="fusion_weight.*granularity='channel'"):
        abri.load_official_state_dict(model, channel)


def test_official_baselines():
    model = randomise(torchvision.models.resnet18(), 11)
    small = model.layer1[0].bn1.weight.abs() < 1e-6
    assert small.any()
    kept = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    abri.reset_small_gamma(model, threshold=1e-6)
    bn = model.layer1[0].bn1
    assert torch.equal(bn.weight, torch.where(small, 1.0, kept["layer1.0.bn1.weight"]))
    assert torch.equal(bn.bias, torch.where(small, 0.0, kept["layer1.0.bn1.bias"]))
    assert torch.equal(bn.running_var, kept["layer1.0.bn1.running_var"])
    abri.reset_batchnorm(model)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            assert torch.equal(layer.weight, torch.ones_like(layer.weight))
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
            assert torch.equal(layer.running_mean, torch.zeros_like(layer.running_mean))
            assert torch.equal(layer.running_var, torch.ones_like(layer.running_var))
    assert torch.equal(model.conv1.weight, kept["conv1.weight"])
