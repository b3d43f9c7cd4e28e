"""``avkernels.convert`` / ``revert`` on torchvision's ResNet-18 and on small module trees."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from avkernels import TrackedBN, convert, revert
from tests.helpers.batch_norm import randomize_batch_norm_state

torchvision = pytest.importorskip("torchvision")

INPUT_SHAPE = (4, 3, 32, 32)  # layer4 sees 4 values per channel: well-conditioned batch stats
RELATIVE_ERROR = 1e-4  # of each tensor's largest magnitude: fp32 through 20 BN layers


def assert_close_deep(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """fp32 results of two implementations after a deep network, compared at the tensor's scale."""
    atol = RELATIVE_ERROR * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    randomize_batch_norm_state(model)
    return model


def _input() -> torch.Tensor:
    return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(1))


def _train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train()
    model.zero_grad()
    y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
    return y.detach()


def _state(model: nn.Module) -> dict:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _bn_layers(model: nn.Module, kind) -> list:
    return [m for m in model.modules() if type(m) is kind]


def test_convert_keeps_outputs_gradients_and_statistics():
    original = _resnet18()
    converted = convert(copy.deepcopy(original))
    assert len(_bn_layers(converted, TrackedBN)) == 20 and not _bn_layers(converted, nn.BatchNorm2d)
    x = _input()
    assert_close_deep(_train_step(converted, x), _train_step(original, x), "train output")
    for (name, p), q in zip(original.named_parameters(), converted.parameters()):
        assert_close_deep(q.grad, p.grad, f"grad of {name}")
    converted_state = _state(converted)
    for name, value in _state(original).items():
        if value.is_floating_point():
            assert_close_deep(converted_state[name], value, name)
        else:
            assert torch.equal(converted_state[name], value), name
    with torch.no_grad():
        assert_close_deep(converted.eval()(x), original.eval()(x), "eval output")


def test_convert_reuses_parameter_and_buffer_objects():
    model = _resnet18()
    parameters = {n: id(p) for n, p in model.named_parameters()}
    buffers = {n: id(b) for n, b in model.named_buffers()}
    keys = list(model.state_dict())
    root = convert(model)
    assert root is model
    assert {n: id(p) for n, p in root.named_parameters()} == parameters
    assert {n: id(b) for n, b in root.named_buffers() if n in buffers} == buffers
    assert list(root.state_dict()) == keys  # the dead counters are not persistent


def test_optimizer_built_before_conversion_updates_converted_layers():
    model = _resnet18()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model = convert(model)
    before = model.bn1.weight.detach().clone()
    _train_step(model, _input())
    optimizer.step()
    assert isinstance(model.bn1, TrackedBN)
    assert not torch.equal(model.bn1.weight, before)
    assert any(model.bn1.weight is p for p in optimizer.param_groups[0]["params"])


def test_revert_restores_identical_outputs():
    original = _resnet18()
    reverted = revert(convert(copy.deepcopy(original)))
    assert len(_bn_layers(reverted, nn.BatchNorm2d)) == 20 and not _bn_layers(reverted, TrackedBN)
    x = _input()
    assert torch.equal(_train_step(reverted, x), _train_step(original, x))
    reverted_state = _state(reverted)
    assert all(torch.equal(reverted_state[name], t) for name, t in _state(original).items())
    with torch.no_grad():
        assert torch.equal(reverted.eval()(x), original.eval()(x))


def test_revert_reuses_objects_and_keeps_configuration():
    layer = TrackedBN(4, eps=1e-3, momentum=None, affine=True, track_running_stats=True).eval()
    objects = [
        id(t)
        for t in (
            layer.weight,
            layer.bias,
            layer.running_mean,
            layer.running_var,
            layer.num_batches_tracked,
        )
    ]
    plain = revert(layer)
    assert type(plain) is nn.BatchNorm2d and not plain.training
    flags = (plain.eps, plain.momentum, plain.affine, plain.track_running_stats)
    assert flags == (1e-3, None, True, True)
    assert objects == [
        id(t)
        for t in (
            plain.weight,
            plain.bias,
            plain.running_mean,
            plain.running_var,
            plain.num_batches_tracked,
        )
    ]


def test_revert_keeps_synchronisation():
    group = object()  # revert passes the group through untouched, as SyncBatchNorm stores it
    model = nn.Sequential(TrackedBN(4, eps=1e-3, momentum=None), TrackedBN(4, sync=True))
    model[1].process_group = group  # set directly: TrackedBN checks it is a real group
    objects = [id(t) for t in (model[1].weight, model[1].running_mean)]
    reverted = revert(model)
    assert type(reverted[0]) is nn.BatchNorm2d
    synced = reverted[1]
    assert type(synced) is nn.SyncBatchNorm and synced.process_group is group
    assert (synced.eps, synced.momentum, synced.affine, synced.track_running_stats) == (
        1e-5,
        0.1,
        True,
        True,
    )
    assert objects == [id(t) for t in (synced.weight, synced.running_mean)]
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    expected = nn.BatchNorm2d(4)
    expected.load_state_dict(synced.state_dict())
    # Not distributed: SyncBatchNorm normalises locally, as BatchNorm2d does.
    assert torch.equal(synced(x), expected(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"activation": "relu"}, r"cannot revert a TrackedBN with activation='relu'"),
        ({"bias": False}, r"cannot revert a TrackedBN built with bias=False"),
    ],
)
def test_revert_refuses_what_batchnorm2d_cannot_represent(kwargs, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), TrackedBN(4, **kwargs))
    with pytest.raises(ValueError, match=message):
        revert(model)


def test_convert_root_nested_and_untouched_layers():
    root = nn.BatchNorm2d(4, eps=1e-3, momentum=0.2, affine=False, track_running_stats=False).eval()
    converted = convert(root)
    assert isinstance(converted, TrackedBN) and converted is not root and not converted.training
    assert (converted.eps, converted.momentum, converted.affine, converted.track_running_stats) == (
        1e-3,
        0.2,
        False,
        False,
    )
    already = TrackedBN(3)
    inner = nn.BatchNorm2d(5)
    tree = nn.Sequential(nn.Sequential(nn.Conv2d(3, 5, 1), inner), nn.BatchNorm1d(5), already)
    assert convert(tree) is tree
    assert isinstance(tree[0][1], TrackedBN) and tree[0][1].weight is inner.weight
    assert type(tree[1]) is nn.BatchNorm1d
    assert tree[2] is already


def test_convert_forwards_keyword_arguments():
    model = convert(_resnet18(), activation="relu", track_dead=False)
    layers = _bn_layers(model, TrackedBN)
    assert layers and all(m.activation == "relu" and not m.track_dead for m in layers)
    model(_input())
    assert all(not m.seen.any() for m in layers)


@pytest.mark.parametrize("option", ["bias", "eps", "affine"])
def test_convert_refuses_options_that_belong_to_each_layer(option):
    with pytest.raises(TypeError, match=rf"unexpected options \['{option}'\]"):
        convert(nn.Sequential(nn.BatchNorm2d(3)), **{option: False})
