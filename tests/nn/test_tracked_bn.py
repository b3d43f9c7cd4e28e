"""Module-level tests of ``TrackedBN`` against ``nn.BatchNorm2d`` (+ ``nn.ReLU``).

These run on the CPU kernels registered for the ops (the compiled extension; without it the
PyTorch reference, and ``test_batch_norm.py`` reports the missing extension). A few tiny cases
run through the Triton kernels (``triton_backend``), and torch.compile is checked on a small
model.
"""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avkernels import TrackedBN, functional
from avkernels.ops.batch_norm import output_memory_format
from tests.helpers.batch_norm import (
    LOW_PRECISION,
    LOW_PRECISION_SHAPE,
    BNCase,
    assert_close,
    assert_dead_counts,
    dead_tolerance,
    make_inputs,
    make_x_and_grad,
    requires_cuda,
)

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
SHAPE = (3, 5, 4, 6)
BN_FLAGS = ("eps", "momentum", "affine", "track_running_stats")


class LayerTrio:
    """A TrackedBN, a float64 nn.BatchNorm2d oracle and, for low-precision input, an
    nn.BatchNorm2d in the TrackedBN's own dtypes (PyTorch's error yardstick), all in one state.

    The affine parameters make some channels dead (see ``conftest.dead_prone_affine``).
    """

    def __init__(self, flags: dict, channels: int, param_dtype=F32, device="cpu", seed=0):
        self.relu = flags.get("activation") == "relu"
        self.tracked = TrackedBN(channels, **flags, device=device, dtype=param_dtype)
        bn_flags = {k: v for k, v in flags.items() if k in BN_FLAGS}
        self.oracle = nn.BatchNorm2d(channels, **bn_flags, device=device, dtype=F64)
        self.baseline = nn.BatchNorm2d(channels, **bn_flags, device=device, dtype=param_dtype)
        state = make_inputs(BNCase(shape=(2, channels, 1, 1)), device=device, seed=seed)
        with torch.no_grad():
            for layer in (self.tracked, self.oracle, self.baseline):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(layer, name, None) is not None:
                        getattr(layer, name).copy_(state[name])
        if flags.get("bias") is False and self.oracle.affine:  # nn.BatchNorm2d with bias fixed at 0
            for layer in (self.oracle, self.baseline):
                layer.bias.requires_grad_(False).zero_()
        self.pre_activations = []  # float64 outputs of the oracle before the activation

    def layers(self):
        return self.tracked, self.oracle, self.baseline

    def train(self, mode: bool = True):
        for layer in self.layers():
            layer.train(mode)

    def step(self, x: torch.Tensor, grad_y) -> dict:
        """Forward (and backward with ``grad_y``, or ``y.sum()`` when None) through all three."""
        outputs = {}
        for name, layer, dtype in (
            ("tracked", self.tracked, x.dtype),
            ("oracle", self.oracle, F64),
            ("baseline", self.baseline, x.dtype),
        ):
            leaf = x.detach().to(dtype).requires_grad_()  # same dtype: x itself, its strides
            z = layer(leaf)
            y = F.relu(z) if (self.relu and name != "tracked") else z
            if name == "oracle":
                self.pre_activations.append(z.detach())
            if grad_y is None:
                y.sum().backward()
            else:
                y.backward(grad_y.to(dtype))
            outputs[name] = (y.detach(), leaf.grad)
        return outputs

    def check(self, outputs: dict, low_precision: bool) -> None:
        """Outputs, input/parameter gradients and running statistics against the oracle."""

        def compare(actual, expected, baseline, name):
            assert_close(actual, expected, baseline if low_precision else None, name=name)

        for index, name in enumerate(("y", "grad_x")):
            compare(
                outputs["tracked"][index],
                outputs["oracle"][index],
                outputs["baseline"][index],
                name,
            )
        for name in ("weight", "bias", "running_mean", "running_var"):
            tracked = getattr(self.tracked, name)
            if tracked is None:
                continue
            oracle, baseline = getattr(self.oracle, name), getattr(self.baseline, name)
            if isinstance(tracked, nn.Parameter):
                tracked, oracle, baseline = tracked.grad, oracle.grad, baseline.grad
            compare(tracked, oracle, baseline, name)
        if self.tracked.num_batches_tracked is not None:
            assert torch.equal(self.tracked.num_batches_tracked, self.oracle.num_batches_tracked)


def _layer_cases():
    flag_sets = [
        {},
        {"momentum": None},
        {"momentum": 0.3, "eps": 1e-3},
        {"affine": False},
        {"track_running_stats": False},
        {"affine": False, "track_running_stats": False},
        {"bias": False},
        {"activation": "relu"},
        {"track_dead": False},
        {"activation": "relu", "bias": False, "momentum": None},
    ]
    cases = [(flags, "nchw", F32) for flags in flag_sets]
    cases += [
        ({}, "channels_last", F32),
        ({"activation": "relu"}, "channels_last", F32),
        ({}, "strided", F32),
        ({"activation": "relu"}, "nchw", F64),
        ({}, "nchw", BF16),
        ({"activation": "relu"}, "channels_last", BF16),
        ({"activation": "relu", "momentum": None}, "nchw", F16),
    ]
    return [
        pytest.param(
            flags,
            layout,
            dtype,
            id="-".join([f"{k}={v}" for k, v in flags.items()] or ["default"])
            + f"-{layout}-{str(dtype).removeprefix('torch.')}",
        )
        for flags, layout, dtype in cases
    ]


def _train_then_eval(trio: LayerTrio, shape, dtype, layout, device="cpu", steps=3):
    """``steps`` training steps, then one eval step; checks every step against the oracle."""
    low_precision = dtype in LOW_PRECISION
    for phase, count in (("train", steps), ("eval", 1)):
        trio.train(phase == "train")
        for layer in trio.layers():
            layer.zero_grad()
        for step in range(count):
            generator = torch.Generator().manual_seed(100 * (phase == "eval") + step)
            x, grad_y = make_x_and_grad(
                BNCase(shape=shape, dtype=dtype, layout=layout), device, generator
            )
            outputs = trio.step(x, grad_y)
            y, grad_x = outputs["tracked"]
            assert y.dtype == x.dtype and grad_x.dtype == x.dtype
            memory_format = output_memory_format(x)
            assert y.is_contiguous(memory_format=memory_format), f"y strides {y.stride()}"
            if layout == "channels_last":
                assert y.stride() == x.stride()
            trio.check(outputs, low_precision)


@pytest.mark.parametrize("flags, layout, dtype", _layer_cases())
def test_matches_batchnorm2d(flags, layout, dtype):
    """Outputs, all gradients, running stats and num_batches_tracked over 3 training steps and
    an eval step; dead-channel counters against a direct count of the oracle's outputs."""
    param_dtype = F64 if dtype == F64 else F32
    shape = LOW_PRECISION_SHAPE if dtype in LOW_PRECISION else SHAPE
    trio = LayerTrio(flags, shape[1], param_dtype)
    _train_then_eval(trio, shape, dtype, layout)
    tracked = trio.tracked
    counters = (tracked.dead_count, tracked.dead_sample_count, tracked.seen)
    zeros = [torch.zeros_like(t) for t in counters]
    if flags.get("track_dead", True):
        assert_dead_counts(counters, zeros, trio.pre_activations, dead_tolerance(dtype))
    else:
        assert all(torch.equal(t, z) for t, z in zip(counters, zeros))
    if not flags.get("track_running_stats", True):
        assert tracked.running_mean is None and tracked.num_batches_tracked is None


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_sum_backward_expanded_gradient(layout, activation):
    """``y.sum().backward()`` hands the layer a stride-0 gradient."""
    trio = LayerTrio({"activation": activation}, SHAPE[1])
    generator = torch.Generator().manual_seed(0)
    x, _ = make_x_and_grad(BNCase(shape=SHAPE, layout=layout), "cpu", generator)
    trio.check(trio.step(x, None), low_precision=False)


COPY_OPS = {"aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous"}


def _copies_of_full_tensors(profile, shape) -> list:
    """Copy ops on tensors of ``shape`` made by the layer itself; a cast inside a compute op
    (e.g. the int64 accumulation of a bool ``sum``) is no copy of the input."""
    copies = []
    for event in profile.events():
        if event.name == "aten::to" or event.name not in COPY_OPS:
            continue  # aten::to without a nested _to_copy copies nothing
        if not event.input_shapes or list(event.input_shapes[0]) != list(shape):
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name.startswith("aten::") and parent.name in COPY_OPS:
            parent = parent.cpu_parent
        if parent is None or not parent.name.startswith("aten::"):
            copies.append(event.name + " under " + (parent.name if parent else "the test"))
    return copies


def test_channels_last_input_is_not_copied():
    """channels_last in, channels_last out, and no copy of the input or of the gradient."""
    layer = TrackedBN(SHAPE[1], activation="relu")
    x, grad_y = make_x_and_grad(
        BNCase(shape=SHAPE, layout="channels_last"), "cpu", torch.Generator().manual_seed(0)
    )
    x.requires_grad_()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True, acc_events=True
    ) as profile:
        y = layer(x)
        y.backward(grad_y)
    assert not _copies_of_full_tensors(profile, SHAPE)
    assert y.stride() == x.stride() and x.grad.stride() == x.stride()


def test_single_value_per_channel_error_matches_batchnorm2d():
    x = torch.randn(1, 3, 1, 1)
    for kwargs, training in (({}, True), ({"track_running_stats": False}, False)):
        errors = []
        for layer in (nn.BatchNorm2d(3, **kwargs), TrackedBN(3, **kwargs)):
            layer.train(training)
            with pytest.raises(ValueError) as error:
                layer(x)
            errors.append(str(error.value))
        assert errors[0] == errors[1]
    # eval with running statistics accepts a single value per channel
    tracked, plain = TrackedBN(3).eval(), nn.BatchNorm2d(3).eval()
    torch.testing.assert_close(tracked(x), plain(x))


def test_functional_single_value_per_channel_error_matches_f_batch_norm():
    # Training without running statistics: F.batch_norm still refuses one value per channel.
    x = torch.randn(1, 3, 1, 1)
    errors = []
    for function in (F.batch_norm, functional.tracked_batch_norm):
        with pytest.raises(ValueError) as error:
            function(x, None, None, training=True, momentum=0.1, eps=1e-5)
        errors.append(str(error.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize(
    "make_input, error, message",
    [
        (lambda: torch.randn(2, 3, 4), ValueError, r"^expected 4D input \(got 3D input\)$"),
        (
            lambda: torch.randn(2, 4, 3, 3),
            RuntimeError,  # as nn.BatchNorm2d raises
            r"expected 3 channels .* shape \(2, 4, 3, 3\)",
        ),
        (
            lambda: torch.ones(2, 3, 3, 3, dtype=torch.int64),
            TypeError,
            r"floating-point input, got torch.int64",
        ),
        (
            lambda: torch.randn(2, 3, 3, 3, device="meta"),
            RuntimeError,
            r"input is on meta .* on cpu",
        ),
    ],
    ids=["3d", "channels", "integer", "device"],
)
def test_input_errors(make_input, error, message):
    with pytest.raises(error, match=message):
        TrackedBN(3)(make_input())


def test_three_d_input_error_matches_batchnorm2d():
    x = torch.randn(2, 3, 4)
    messages = []
    for layer in (nn.BatchNorm2d(3), TrackedBN(3)):
        with pytest.raises(ValueError) as error:
            layer(x)
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_bad_activation_error():
    with pytest.raises(ValueError, match=r"activation must be one of \(None, 'relu'\), got 'gelu'"):
        TrackedBN(3, activation="gelu")


def test_dead_fractions_and_reset():
    layer = TrackedBN(3)
    assert layer.dead_fraction().isnan().all() and layer.dead_sample_fraction().isnan().all()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.0, 1.0, 1.0]))
        layer.bias.copy_(torch.tensor([-1.0, 0.0, 100.0]))
    x = torch.randn(4, 3, 2, 5)
    layer(x)
    layer.eval()(x)  # counted in eval too
    assert layer.seen.tolist() == [2 * 4 * 2 * 5, 2 * 4]
    fraction, samples = layer.dead_fraction(), layer.dead_sample_fraction()
    assert fraction.dtype == samples.dtype == torch.float64
    torch.testing.assert_close(fraction, layer.dead_count.double() / 80)
    torch.testing.assert_close(samples, layer.dead_sample_count.double() / 8)
    assert fraction[0] == 1 and samples[0] == 1  # g = 0, b < 0: closed channel
    assert fraction[2] == 0 and samples[2] == 0
    assert 0 < fraction[1] < 1
    layer.reset_dead_stats()
    for counter in (layer.dead_count, layer.dead_sample_count, layer.seen):
        assert not counter.any()
    assert layer.dead_fraction().isnan().all()


def test_counters_are_non_persistent_int64_buffers():
    layer = TrackedBN(4)
    buffers = dict(layer.named_buffers())
    for name, shape in (("dead_count", (4,)), ("dead_sample_count", (4,)), ("seen", (2,))):
        assert buffers[name].dtype == torch.int64 and buffers[name].shape == shape
    assert list(layer.state_dict()) == list(nn.BatchNorm2d(4).state_dict())
    assert "bias" not in TrackedBN(4, bias=False).state_dict()
    assert TrackedBN(4, bias=False).bias is None
    assert [n for n, _ in TrackedBN(4, bias=False).named_parameters()] == ["weight"]


def _trained(layer: nn.Module) -> nn.Module:
    """``layer`` after one training step on random data: running stats and params non-trivial."""
    layer(torch.randn(4, layer.num_features, 3, 3)).square().sum().backward()
    with torch.no_grad():
        for p in layer.parameters():
            p -= p.grad
    return layer


def test_strict_state_dict_loads_both_ways():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3)
    plain = _trained(nn.BatchNorm2d(4)).eval()
    tracked = TrackedBN(4).eval()
    tracked.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(tracked(x), plain(x))
    back = nn.BatchNorm2d(4).eval()
    back.load_state_dict(_trained(TrackedBN(4)).eval().state_dict(), strict=True)
    assert back.num_batches_tracked.item() == 1


def test_version_1_checkpoint_without_num_batches_tracked():
    state = _trained(nn.BatchNorm2d(4)).state_dict()
    del state["num_batches_tracked"]
    state._metadata[""]["version"] = 1
    tracked = TrackedBN(4)
    tracked.load_state_dict(state, strict=True)
    assert tracked.num_batches_tracked.item() == 0
    torch.testing.assert_close(tracked.running_mean, state["running_mean"])


@pytest.mark.parametrize(
    "duplicate",
    [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
    ids=["deepcopy", "pickle"],
)
def test_copies_keep_state_and_behaviour(duplicate):
    layer = _trained(TrackedBN(4, activation="relu", momentum=None))
    twin = duplicate(layer)
    assert twin.activation == "relu" and twin.momentum is None and twin.track_dead
    for name, tensor in list(layer.named_buffers()) + list(layer.named_parameters()):
        assert torch.equal(tensor, getattr(twin, name)), name
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(layer(x), twin(x))
    assert torch.equal(layer.dead_count, twin.dead_count)


def test_to_dtype_keeps_int64_counters():
    layer = _trained(TrackedBN(4)).double()
    assert layer.weight.dtype == layer.running_var.dtype == torch.float64
    for name in ("dead_count", "dead_sample_count", "seen", "num_batches_tracked"):
        assert getattr(layer, name).dtype == torch.int64, name
    plain = nn.BatchNorm2d(4).double()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(x), plain(x), rtol=1e-12, atol=1e-12)
    assert TrackedBN(4).to(torch.bfloat16).weight.dtype == torch.bfloat16


def test_drop_in_construction():
    assert isinstance(TrackedBN(3), nn.BatchNorm2d)
    plain_args = list(inspect.signature(nn.BatchNorm2d.__init__).parameters)
    tracked_args = list(inspect.signature(TrackedBN.__init__).parameters)
    assert tracked_args[: len(plain_args)] == plain_args  # positional calls of nn.BatchNorm2d work
    layer = TrackedBN(
        3,
        1e-3,
        0.2,
        True,
        False,
        "cpu",
        torch.float64,
        bias=False,
        activation="relu",
        track_dead=False,
    )
    flags = (layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
    assert flags == (1e-3, 0.2, True, False)
    assert layer.weight.dtype == torch.float64 and layer.bias is None
    assert (layer.activation, layer.track_dead) == ("relu", False)
    meta = TrackedBN(3, device="meta")
    assert all(t.device.type == "meta" for t in list(meta.buffers()) + list(meta.parameters()))
    assert meta.dead_count.dtype == torch.int64
    assert "activation='relu'" in repr(layer) and "bias=False" in repr(layer)


def _small_model(momentum):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        TrackedBN(4, activation="relu", momentum=momentum),
        nn.Conv2d(4, 5, 3, bias=False),
        TrackedBN(5, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(5, 4, 1, bias=False).to(memory_format=torch.channels_last),
        TrackedBN(4, activation="relu", bias=False, momentum=momentum),
    )


def _compare_models(eager: nn.Module, other: nn.Module, x: torch.Tensor, rtol=1e-5, atol=1e-5):
    """Train step (fwd, bwd), then eval forward: outputs, grads, buffers must agree."""
    for model in (eager, other):
        model.train()
    outputs = []
    for model in (eager, other):
        y = model(x)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        outputs.append(y)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=rtol, atol=atol)
    for (name, p), q in zip(eager.named_parameters(), other.parameters()):
        torch.testing.assert_close(
            q.grad, p.grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}"
        )
    for (name, b), c in zip(eager.named_buffers(), other.buffers()):
        torch.testing.assert_close(c, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), eager.eval()(x), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "compiler, momentum",
    [
        ("aot_eager", 0.1),  # dynamo capture, fake kernels, AOT autograd: seconds
        ("aot_eager", None),
        pytest.param("inductor", 0.1, marks=pytest.mark.slow),  # ~1 min of C++ codegen on CPU
    ],
)
def test_torch_compile_fullgraph_matches_eager(compiler, momentum):
    eager = _small_model(momentum)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=compiler, fullgraph=True)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    _compare_models(eager, compiled, x)
    assert compiled_model[1].seen.tolist() == [2 * 2 * 6 * 6, 2 * 2]  # train + eval counted


def test_triton_path_matches_batchnorm2d(triton_backend):
    """One tiny train/eval run through the Triton kernels (interpreter on CPU)."""
    trio = LayerTrio({"activation": "relu", "momentum": None}, 3, device=triton_backend.device)
    _train_then_eval(
        trio, (2, 3, 3, 4), F32, "channels_last", device=triton_backend.device, steps=2
    )
    tracked = trio.tracked
    counters = (tracked.dead_count, tracked.dead_sample_count, tracked.seen)
    assert_dead_counts(
        counters, [torch.zeros_like(t) for t in counters], trio.pre_activations, dead_tolerance(F32)
    )


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gpu_matches_batchnorm2d(dtype):
    trio = LayerTrio({"activation": "relu"}, 64, device="cuda")
    _train_then_eval(trio, (8, 64, 14, 14), dtype, "channels_last", device="cuda")
