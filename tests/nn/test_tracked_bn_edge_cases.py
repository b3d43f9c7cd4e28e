"""TrackedBN against nn.BatchNorm2d where the two are easiest to tell apart: the cumulative
average in float64, empty batches, non-positive eps, the exception classes of bad arguments and
dtype mixes, and dead counters recreated in another dtype. Every case runs on each backend
(``backend`` fixture: the reference, the C++ kernels, the Triton kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avkernels import TrackedBN
from avkernels.functional import tracked_batch_norm

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = (F16, BF16, F32, F64)


def _pair(backend, **kwargs) -> tuple[nn.BatchNorm2d, TrackedBN]:
    """An nn.BatchNorm2d and a TrackedBN with the same arguments and the same random affine."""
    plain = nn.BatchNorm2d(3, device=backend.device, **kwargs)
    tracked = TrackedBN(3, device=backend.device, **kwargs)
    if plain.affine:
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5)
            plain.bias.uniform_(-0.5, 0.5)
        tracked.load_state_dict(plain.state_dict())
    return plain, tracked


def test_cumulative_average_in_float64_matches_batchnorm2d(backend):
    """momentum=None: the 1/num_batches_tracked weight must not be rounded to float32."""
    plain, tracked = (layer.double() for layer in _pair(backend, momentum=None))
    generator = torch.Generator().manual_seed(0)
    with backend.active():
        for _ in range(5):
            x = torch.randn(4, 3, 5, 5, generator=generator, dtype=F64) * 3 + 1
            x = x.to(backend.device)
            plain(x)
            tracked(x)
    assert tracked.num_batches_tracked == plain.num_batches_tracked == 5
    # A float32 weight is off by ~1e-9 relative here; float64 rounding by ~1e-16.
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(
            getattr(tracked, name), getattr(plain, name), rtol=1e-14, atol=1e-14
        )


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)], ids=["N=0", "H=0"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_matches_batchnorm2d(backend, shape, momentum, training):
    plain, tracked = _pair(backend, momentum=momentum)
    with backend.active():
        for layer in (plain, tracked):
            layer.train(training)
            x = torch.randn(shape, device=backend.device, requires_grad=True)
            y = layer(x)
            assert y.shape == shape
            y.sum().backward()
            assert x.grad.shape == shape
    for name in ("weight", "bias"):
        grad = getattr(tracked, name).grad
        assert torch.equal(grad, getattr(plain, name).grad) and not grad.any()
    for name, value in plain.state_dict().items():
        assert torch.equal(tracked.state_dict()[name], value), name
    if shape[0] == 0:  # no sample: nothing counted
        assert tracked.seen.tolist() == [0, 0]
        assert not tracked.dead_count.any() and not tracked.dead_sample_count.any()


def test_empty_batch_abri_gradients_are_zero(backend):
    tracked = TrackedBN(3, device=backend.device, activation="relu").enable_abri()
    running = {name: value.clone() for name, value in tracked.state_dict().items()}
    with backend.active():
        tracked(torch.randn(0, 3, 4, 4, device=backend.device, requires_grad=True)).sum().backward()
    for name, parameter in tracked.named_parameters():
        assert torch.equal(parameter.grad, torch.zeros_like(parameter)), name
    for name, value in tracked.state_dict().items():
        expected = running[name] + 1 if name.endswith("num_batches_tracked") else running[name]
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_non_positive_eps_raises_like_batchnorm2d(backend, eps):
    x = torch.randn(2, 3, 4, 4, device=backend.device)
    messages = []
    with backend.active():
        for layer in _pair(backend, eps=eps):
            with pytest.raises(ValueError) as error:
                layer(x)
            messages.append(str(error.value))
        with pytest.raises(ValueError) as error:
            tracked_batch_norm(x, None, None, training=True, eps=eps)
        messages.append(str(error.value))
        with pytest.raises(ValueError) as error:
            F.batch_norm(x, None, None, training=True, eps=eps)
        messages.append(str(error.value))
    assert len(set(messages)) == 1 and messages[0].startswith("batch_norm eps must be positive")


def test_nan_eps_raises(backend):
    """nn.BatchNorm2d returns all NaN for eps=NaN; TrackedBN says why instead."""
    with pytest.raises(ValueError, match="batch_norm eps must be positive, but got nan"):
        _pair(backend, eps=float("nan"))[1](torch.randn(2, 3, 4, 4, device=backend.device))


def _resize(size: int):
    def change(layer):
        layer.running_mean = torch.zeros(size, device=layer.running_mean.device)
        layer.running_var = torch.ones(size, device=layer.running_var.device)

    return change


def _weight_of_size(size: int):
    def change(layer):
        layer.weight = nn.Parameter(torch.ones(size, device=layer.weight.device))

    return change


@pytest.mark.parametrize(
    "change, channels, kwargs",
    [
        (_resize(4), 3, {}),
        (_weight_of_size(4), 3, {"track_running_stats": False}),
        (None, 4, {}),
        (None, 4, {"track_running_stats": False}),
    ],
    ids=["running_stats_size", "weight_size", "input_channels", "input_channels_untracked"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_size_mismatches_raise_runtime_error_like_batchnorm2d(
    backend, change, channels, kwargs, training
):
    x = torch.randn(2, channels, 4, 4, device=backend.device)
    with backend.active():
        for layer in _pair(backend, **kwargs):
            if change is not None:
                change(layer)
            layer.train(training)
            with pytest.raises(RuntimeError):
                layer(x)


@pytest.mark.parametrize("param_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("input_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_dtype_mixes_are_those_of_batchnorm2d(backend, input_dtype, param_dtype, training):
    """Accepted exactly where nn.BatchNorm2d accepts them on CPU (the same dtype, or float32
    parameters with float16/bfloat16 input); elsewhere a RuntimeError, as BN raises."""
    x = torch.randn(2, 3, 4, 4, device=backend.device).to(input_dtype)
    outcomes = []
    with backend.active():
        for layer in _pair(backend):
            layer.to(param_dtype).train(training)
            try:
                outcomes.append(layer(x).dtype)
            except RuntimeError as error:
                outcomes.append(type(error))
    if backend.device == "cpu":
        assert outcomes[1] == outcomes[0]
    else:  # on CUDA nn.BatchNorm2d accepts more; TrackedBN keeps the CPU rule
        accepted = param_dtype == input_dtype or (param_dtype == F32 and input_dtype in (F16, BF16))
        assert outcomes[1] == (input_dtype if accepted else RuntimeError)


@pytest.mark.parametrize("buffer_dtype", [F32, F64], ids=str)
def test_counters_recreated_as_float_keep_exact_counts(backend, buffer_dtype):
    """PyTorch's test_to helper recreates every buffer with ``.to(dtype)``, int64 ones too."""
    factory = {"device": backend.device, "dtype": buffer_dtype}
    recreated, kept = TrackedBN(3, **factory), TrackedBN(3, **factory)
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, 5, 5, generator=generator).to(**factory) for _ in range(3)]
    with backend.active():
        for layer in (recreated, kept):
            layer(xs[0])
        for name, buffer in list(recreated.named_buffers()):
            setattr(recreated, name, buffer.detach().clone().to(buffer_dtype))
        for x in xs[1:]:
            for layer in (recreated, kept):
                layer(x)
    for name in ("dead_count", "dead_sample_count", "seen"):
        counter = getattr(recreated, name)
        assert counter.dtype == torch.long and torch.equal(counter, getattr(kept, name)), name
    assert recreated.seen.tolist() == [3 * 2 * 25, 3 * 2]


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool], ids=str)
def test_integer_input_raises_like_batchnorm2d(backend, dtype):
    """nn.BatchNorm2d raises NotImplementedError (a RuntimeError); TrackedBN's error is that
    class and a TypeError."""
    x = torch.ones(2, 3, 4, 4, dtype=dtype, device=backend.device)
    with backend.active():
        for layer in _pair(backend):
            with pytest.raises(NotImplementedError):
                layer(x)
    with pytest.raises(TypeError, match="floating-point input"):
        TrackedBN(3, device=backend.device)(x)
