"""PyTorch's model tooling on torchvision models converted with ``avkernels.convert``: hooks,
torch.fx (``symbolic_trace``, ``create_feature_extractor``), torch.jit.script and ONNX export
(docs/DESIGN.md, "PyTorch conventions"). Each converted model is checked against the same
torchvision model with its ``nn.BatchNorm2d`` layers."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn

from avkernels import TrackedBN, convert, revert
from tests.helpers.batch_norm import randomize_batch_norm_state
from tests.helpers.onnx_graph import export_bytes, node_types

torchvision = pytest.importorskip("torchvision")
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

# (builder, input size): small inputs each architecture takes. Batches of 4, so that the last
# layers see at least 4 values per channel: well-conditioned batch statistics.
MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 32),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 32),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), 32),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), 32),
    "densenet121_memory_efficient": (
        lambda: torchvision.models.densenet121(num_classes=10, memory_efficient=True),
        32,
    ),
    "googlenet": (
        lambda: torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True),
        32,
    ),
    "inception_v3": (
        lambda: torchvision.models.inception_v3(
            num_classes=10, aux_logits=False, init_weights=True
        ),
        139,  # at 75x75 the last BNs see 4 values a channel, too few to compare train steps
    ),
}
FAST = ("resnet18", "mobilenet_v3_small")
MODEL_PARAMS = [
    pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in MODELS
]
# torchvision's memory-efficient DenseNet branches on requires_grad in Python: not traceable by
# torch.fx, with or without conversion.
FX_MODEL_PARAMS = [p for p in MODEL_PARAMS if p.values[0] != "densenet121_memory_efficient"]
RELATIVE_ERROR = 1e-4  # of each tensor's largest magnitude: fp32 through tens of BN layers


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The torchvision model with non-trivial BN state, and an input for it."""
    build, size = MODELS[name]
    torch.manual_seed(0)
    model = build()
    randomize_batch_norm_state(model)
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, x


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol = RELATIVE_ERROR * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def _assert_like_batchnorm(actual, plain: nn.Module, x: torch.Tensor, training: bool) -> None:
    """``actual`` is the output of ``plain``'s converted model: its error against ``plain`` run
    in float64 is at most twice ``plain``'s own float32 error (train steps of deep models on
    small batches amplify rounding). Runs ``plain`` once in float32, as the converted model ran.
    """
    float64_model = copy.deepcopy(plain).double()
    for module in float64_model.modules():
        module._forward_hooks.clear()  # the copied dead-count hooks must not count this run
    reference = _run(float64_model, x.double(), training)
    expected = _run(plain, x, training)
    if isinstance(expected, dict):
        for key in expected:
            _assert_error_within(actual[key], expected[key], reference[key])
    else:
        _assert_error_within(actual, expected, reference)


def _assert_error_within(actual, expected, reference) -> None:
    own_error = (expected.double() - reference).abs().max().item()
    error = (actual.double() - reference).abs().max().item()
    assert error <= 2 * own_error + RELATIVE_ERROR * reference.abs().max().item()


def _run(model: nn.Module, x: torch.Tensor, training: bool):
    """One forward with a fixed random stream (dropout, stochastic depth)."""
    model.train(training)
    torch.manual_seed(2)
    return model(x)


def _record_dead_counts(plain: nn.Module) -> dict[str, torch.Tensor]:
    """Forward hooks on ``plain``'s BatchNorm2d layers that count outputs <= 0 per channel, the
    independent reference for TrackedBN's ``dead_count``."""
    counts: dict[str, torch.Tensor] = {}
    for name, layer in plain.named_modules():
        if type(layer) is nn.BatchNorm2d:
            counts[name] = torch.zeros(layer.num_features, dtype=torch.long)

            def count(module, args, output, name=name):
                counts[name] += (output <= 0).sum(dim=(0, 2, 3))

            layer.register_forward_hook(count)
    return counts


# -- hooks -----------------------------------------------------------------------------------


def test_convert_and_revert_keep_hooks():
    model, x = _model("resnet18")
    plain = copy.deepcopy(model)
    calls = []
    # The downsample BN: a full backward hook forbids an in-place op on the output (the ReLU).
    target = model.layer2[0].downsample[1]
    target.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    target.register_forward_hook(lambda m, args, out: out * 2)
    target.register_full_backward_hook(lambda m, gin, gout: calls.append("backward"))
    handle = target.register_forward_hook(lambda m, args, out: calls.append("removed"))
    target.register_state_dict_post_hook(lambda m, sd, prefix, local: calls.append("state"))
    plain.layer2[0].downsample[1].register_forward_hook(lambda m, args, out: out * 2)

    converted = convert(model)
    layer = converted.layer2[0].downsample[1]
    assert isinstance(layer, TrackedBN)
    handle.remove()  # the handle of a hook registered before the conversion still works
    y = _run(converted, x, training=True)
    y.sum().backward()
    _assert_close(y, _run(plain, x, training=True))
    converted.state_dict()
    assert calls == ["pre", "backward", "state"]

    calls.clear()
    reverted = revert(converted).layer2[0].downsample[1]
    assert type(reverted) is nn.BatchNorm2d
    _assert_close(_run(revert(converted), x, training=False), _run(plain, x, training=False))
    assert calls == ["pre"]
    assert len(reverted._forward_hooks) == 1 and len(reverted._backward_hooks) == 1


# -- torch.fx --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FX_MODEL_PARAMS)
def test_fx_symbolic_trace_matches_batchnorm_and_counts_dead_channels(name):
    model, x = _model(name)
    plain = copy.deepcopy(model)
    reference_counts = _record_dead_counts(plain)
    converted = convert(model)
    for training in (True, False):
        converted.train(training)
        traced = torch.fx.symbolic_trace(converted)
        kernels = [n for n in traced.graph.nodes if "tracked_batch_norm" in str(n.target)]
        assert len(kernels) == len(reference_counts)
        _assert_like_batchnorm(_run(traced, x, training), plain, x, training)
    # The graph updates the converted model's own counters and running statistics.
    # Outputs within rounding of 0 may fall on either side: at most 2, or 1 in 10,000 of the
    # counted outputs, differ.
    for layer_name, layer in converted.named_modules():
        if isinstance(layer, TrackedBN):
            outputs = layer.seen[0].item() * layer.num_features
            flips = (layer.dead_count - reference_counts[layer_name]).abs().sum().item()
            assert flips <= max(2, 1e-4 * outputs), layer_name
    expected = plain.state_dict()
    for key, actual in converted.state_dict().items():
        _assert_close(actual.double(), expected[key].double())


def test_fx_refuses_to_trace_a_cumulative_average_in_training():
    layer = TrackedBN(3, momentum=None)
    with pytest.raises(RuntimeError, match="eval mode"):
        torch.fx.symbolic_trace(layer)
    traced = torch.fx.symbolic_trace(layer.eval())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(traced(x), nn.BatchNorm2d(3).eval()(x))


@pytest.mark.parametrize("name", FX_MODEL_PARAMS)
def test_create_feature_extractor_matches_batchnorm(name):
    model, x = _model(name)
    plain = copy.deepcopy(model)
    converted = convert(model)
    nodes = torchvision.models.feature_extraction.get_graph_node_names(plain)[1]
    return_nodes = [nodes[len(nodes) // 2], nodes[-1]]
    extractor = create_feature_extractor(converted, return_nodes)
    expected = create_feature_extractor(plain, return_nodes)
    layer = next(m for m in converted.modules() if isinstance(m, TrackedBN))
    for training in (True, False, True):  # the extractor switches graphs on .train()/.eval()
        actual = _run(extractor, x, training)
        assert actual.keys() == set(return_nodes)
        _assert_like_batchnorm(actual, expected, x, training)
    # Three forwards counted (samples), two of them training steps.
    assert layer.seen[1].item() == 3 * x.shape[0]
    assert layer.num_batches_tracked.item() == 2


# -- torch.jit.script ------------------------------------------------------------------------


def test_jit_script_refuses_with_revert_and_leaves_the_model_unchanged():
    model, x = _model("resnet18")
    converted = convert(model).eval()
    with pytest.raises(RuntimeError, match=r"avkernels\.revert\(model\)"):
        torch.jit.script(converted)
    assert isinstance(converted.bn1, TrackedBN)


def test_jit_script_after_revert_passes_torchvisions_scriptable_check(tmp_path):
    """torchvision's ``_check_jit_scriptable``: script, run, compare, save, load, run."""
    model, x = _model("resnet18")
    plain = copy.deepcopy(model).eval()
    reverted = revert(convert(model)).eval()
    scripted = torch.jit.script(reverted)
    _assert_close(scripted(x), plain(x))
    scripted.save(tmp_path / "model.pt")
    _assert_close(torch.jit.load(tmp_path / "model.pt")(x), plain(x))


# -- ONNX ------------------------------------------------------------------------------------


def _batch_norm_layers(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", MODEL_PARAMS)
def test_onnx_export_writes_the_graph_of_the_unconverted_model(name, monkeypatch):
    model, x = _model(name)
    plain = copy.deepcopy(model).eval()
    converted = convert(model).eval()
    for folding in (True, False):  # constant folding merges each BN into its conv
        expected = Counter(
            node_types(export_bytes(plain, x, monkeypatch, do_constant_folding=folding))
        )
        actual = Counter(
            node_types(export_bytes(converted, x, monkeypatch, do_constant_folding=folding))
        )
        assert actual == expected
    assert expected["BatchNormalization"] == _batch_norm_layers(plain)
    # The export ran nothing of avkernels: no counts.
    assert all(m.seen.sum() == 0 for m in converted.modules() if isinstance(m, TrackedBN))


def test_onnx_export_of_fused_relu_and_abri(monkeypatch):
    model, x = _model("resnet18")
    plain_types = Counter(
        node_types(
            export_bytes(copy.deepcopy(model).eval(), x, monkeypatch, do_constant_folding=False)
        )
    )
    converted = convert(model, activation="relu").eval()
    converted.layer1[0].bn1.enable_abri(alpha=0.3)
    types = Counter(node_types(export_bytes(converted, x, monkeypatch, do_constant_folding=False)))
    layers = _batch_norm_layers(converted)
    assert types["Relu"] == plain_types["Relu"] + layers
    assert types["BatchNormalization"] == layers + 1  # ABRi's added BN


def test_onnx_export_in_training_mode_raises(monkeypatch):
    model, x = _model("resnet18")
    converted = convert(model)
    with pytest.raises(RuntimeError, match="eval mode"):
        export_bytes(converted, x, monkeypatch, training=torch.onnx.TrainingMode.TRAINING)


def test_onnx_export_runs_like_the_model_in_onnxruntime(monkeypatch):
    onnxruntime = pytest.importorskip("onnxruntime")
    model, x = _model("resnet18")
    converted = convert(model, activation="relu").eval()
    session = onnxruntime.InferenceSession(export_bytes(converted, x, monkeypatch))
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    _assert_close(torch.from_numpy(output), converted(x).detach())
