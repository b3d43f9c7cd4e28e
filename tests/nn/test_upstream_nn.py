"""PyTorch's BatchNorm tests of ``test/test_nn.py`` that apply to 2-D batch norm, re-expressed
for TrackedBN on the C++ and the Triton kernels (``kernel_path``). Upstream's 1-D inputs
(N, C) become (N, C, 1, 1) here. Every test runs the same procedure on nn.BatchNorm2d too
(``layer_cls``), so a port that nn.BatchNorm2d itself fails is caught. Each test names the
upstream test it mirrors."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avkernels import TrackedBN
from avkernels.functional import tracked_batch_norm
from tests.helpers.upstream import TRITON_SLOW

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
LAYER = pytest.mark.parametrize("layer_cls", [nn.BatchNorm2d, TrackedBN], ids=["bn", "tracked"])
# The functional form of each layer class, for the functional upstream tests.
BATCH_NORM = pytest.mark.parametrize(
    "batch_norm", [F.batch_norm, tracked_batch_norm], ids=["F.batch_norm", "tracked"]
)


@pytest.fixture(autouse=True)
def seeded_rng():
    """Seed as PyTorch's TestCase does before every test (its inputs are random)."""
    torch.manual_seed(0)


def _rand(*shape, device, dtype=F32, **kwargs):
    return torch.rand(*shape, device=device, **kwargs).to(dtype)


@LAYER
@pytest.mark.parametrize(
    "dtype, module_dtype", [(F32, F32), (F64, F64), (BF16, F32), (F16, F32)], ids=str
)
def test_batchnorm_simple_average(kernel_path, layer_cls, dtype, module_dtype):
    """test_batchnorm_simple_average(_mixed): momentum=None keeps the cumulative average, and
    reset_running_stats restarts it."""
    device = kernel_path.device
    module = layer_cls(3, momentum=None).to(device=device, dtype=module_dtype)
    zeros, ones = torch.zeros(3, dtype=module_dtype), torch.ones(3, dtype=module_dtype)
    assert torch.equal(module.running_mean.cpu(), zeros)
    assert torch.equal(module.running_var.cpu(), ones)
    data1, data2 = (_rand(4, 3, 1, 1, device=device, dtype=dtype) for _ in range(2))
    results = []
    for data in (data1, data2):
        results.append((module(data), module.running_mean.clone(), module.running_var.clone()))
        assert not torch.equal(module.running_mean.cpu(), zeros)
        assert not torch.equal(module.running_var.cpu(), ones)
        module.reset_running_stats()
        assert torch.equal(module.running_mean.cpu(), zeros)
    torch.testing.assert_close(module(data1), results[0][0])
    torch.testing.assert_close(module(data2), results[1][0])
    torch.testing.assert_close(module.running_mean, (results[0][1] + results[1][1]) / 2)
    torch.testing.assert_close(module.running_var, (results[0][2] + results[1][2]) / 2)


@LAYER
def test_batchnorm_update_stats(kernel_path, layer_cls):
    """test_batchnorm_update_stats: training updates the running statistics and counts the
    batch; eval changes neither."""
    module = layer_cls(3).to(kernel_path.device)
    data = _rand(4, 3, 1, 1, device=kernel_path.device)
    for training in (True, False):
        module.train(training)
        before = [t.clone() for t in (module.running_mean, module.running_var)]
        batches = module.num_batches_tracked.clone()
        module(data)
        after = (module.running_mean, module.running_var)
        assert all(torch.equal(a, b) != training for a, b in zip(before, after))
        assert module.num_batches_tracked == batches + training


def _two_passes(module, data, grad, switch_to_eval=False):
    """Forward and backward twice (optionally switching to eval between): both results."""
    results = []
    for step in range(2):
        if switch_to_eval and step == 1:
            module.eval()
        data.grad = None
        out = module(data)
        out.backward(grad)
        results.append((out, data.grad.clone()))
    return results


@TRITON_SLOW
@LAYER
@pytest.mark.parametrize(
    "dtype, module_dtype", [(F32, F32), (F64, F64), (BF16, F32), (F16, F32)], ids=str
)
def test_batchnorm_eval(kernel_path, layer_cls, dtype, module_dtype):
    """test_batchnorm_eval(_mixed): eval is deterministic, forward and backward; without
    running statistics eval gives the training results."""
    device = kernel_path.device
    module = layer_cls(3).to(device, module_dtype).eval()
    data = _rand(3, 3, 3, 3, device=device, dtype=dtype).requires_grad_()
    grad = _rand(3, 3, 3, 3, device=device, dtype=dtype)
    first, second = _two_passes(module, data, grad)
    torch.testing.assert_close(first, second)
    module = layer_cls(3, track_running_stats=False).to(device, module_dtype)
    data = _rand(4, 3, 1, 1, device=device, dtype=dtype).requires_grad_()
    grad = _rand(4, 3, 1, 1, device=device, dtype=dtype)
    first, second = _two_passes(module, data, grad, switch_to_eval=True)
    torch.testing.assert_close(first, second)


@LAYER
def test_batchnorm_buffer_update_when_stats_are_not_tracked(kernel_path, layer_cls):
    """test_batchnorm_buffer_update_when_stats_are_not_tracked: with track_running_stats turned
    off after construction, a training forward updates no buffer."""
    module = layer_cls(4, track_running_stats=True).to(kernel_path.device)
    module.track_running_stats = False
    before = {name: value.clone() for name, value in module.state_dict().items()}
    module(_rand(32, 4, 1, 1, device=kernel_path.device))
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


@BATCH_NORM
@pytest.mark.parametrize("wrong", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("size", [9, 11])
def test_batchnorm_raises_error_if_not_same_size_as_input(kernel_path, batch_norm, wrong, size):
    """test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_size_as_
    input: the functional form raises RuntimeError."""
    device = kernel_path.device
    tensors = {name: _rand(10, device=device) for name in ("running_mean", "running_var")}
    tensors[wrong] = _rand(size, device=device)
    with pytest.raises(RuntimeError):
        batch_norm(
            _rand(2, 10, 1, 1, device=device),
            tensors["running_mean"],
            tensors["running_var"],
            weight=tensors.get("weight"),
            bias=tensors.get("bias"),
            training=True,
        )


@LAYER
def test_batchnorm_raises_error_if_less_than_one_value_per_channel(kernel_path, layer_cls):
    """test_batchnorm_raises_error_if_less_than_one_value_per_channel: ValueError."""
    with pytest.raises(ValueError):
        layer_cls(10).to(kernel_path.device)(_rand(1, 10, 1, 1, device=kernel_path.device))


@LAYER
def test_batchnorm_load_state_dict(layer_cls):
    """test_batchnorm_load_state_dict: num_batches_tracked is state; a state_dict without it
    keeps the count, and a meta module loading one with assign=True gets a 0 count."""
    module = layer_cls(3)
    assert torch.equal(module.state_dict()["num_batches_tracked"], torch.tensor(0))
    module.num_batches_tracked = torch.tensor(10)
    assert torch.equal(module.state_dict()["num_batches_tracked"], torch.tensor(10))
    module.load_state_dict(OrderedDict(), strict=False)
    assert torch.equal(module.state_dict()["num_batches_tracked"], torch.tensor(10))
    with torch.device("meta"):
        meta_module = layer_cls(3)
    assert meta_module.num_batches_tracked.device == torch.device("meta")
    meta_module.load_state_dict(OrderedDict(), assign=True, strict=False)
    assert torch.equal(meta_module.state_dict()["num_batches_tracked"], torch.tensor(0))


@LAYER
def test_BatchNorm_empty(kernel_path, layer_cls):
    """test_BatchNorm_empty (with _test_module_empty_input): an empty batch gives an empty
    output, zero gradients, and leaves the running statistics at their initial values."""
    device = kernel_path.device
    module = layer_cls(3).to(device)
    x = torch.randn(0, 3, 2, 2, device=device, requires_grad=True)
    out = module(x)
    out.backward(torch.rand_like(out))
    assert out.size() == x.size()
    for p in module.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p.grad))
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(module.running_mean.cpu(), torch.zeros(3))
    assert torch.equal(module.running_var.cpu(), torch.ones(3))


@TRITON_SLOW
@LAYER
@pytest.mark.parametrize("shape", [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)], ids=str)
@pytest.mark.parametrize(
    "dtype, mixed", [(F32, False), (BF16, False), (BF16, True), (F16, False), (F16, True)], ids=str
)
def test_batchnorm_nhwc_cpu(kernel_path, layer_cls, shape, dtype, mixed):
    """test_batchnorm_nhwc_cpu: channels_last input and gradient give a channels_last output
    equal to the contiguous run's, and the same gradients; NC11 and N1HW shapes, and
    float16/bfloat16 input with float32 parameters (mixed)."""
    device = kernel_path.device
    channels = shape[1]
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    module = layer_cls(channels).to(device, dtype)
    module.weight.data.uniform_()
    module.bias.data.uniform_()
    reference = layer_cls(channels).to(device, dtype)
    reference.load_state_dict(module.state_dict())
    if mixed:
        module.float()
        reference.float()
    ref_x = x.detach().clone().contiguous().requires_grad_()
    out = module(x)
    out.backward(grad)
    ref_out = reference(ref_x)
    ref_out.backward(grad.contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last) and ref_out.is_contiguous()
    torch.testing.assert_close(out, ref_out)
    # Upstream compares weight gradients with a loose tolerance for reduced precision.
    precision = 1e-1 if dtype in (BF16, F16) else None
    torch.testing.assert_close(
        module.weight.grad, reference.weight.grad, atol=precision, rtol=precision
    )
    torch.testing.assert_close(
        module.bias.grad, reference.bias.grad, atol=precision, rtol=precision
    )
    torch.testing.assert_close(x.grad, ref_x.grad)


@LAYER
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_batchnorm_non_contig_cpu(kernel_path, layer_cls, dtype):
    """test_batchnorm_non_contig_cpu: a permuted (channels_last-strided) input in eval gives a
    channels_last output equal to the contiguous one's; and float16/bfloat16 permuted input
    with float32 parameters matches the float32 result."""
    device = kernel_path.device
    x = torch.arange(6, dtype=F32, device=device).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    module = layer_cls(2).to(device).eval()
    module.weight.data.uniform_()
    module.bias.data.uniform_()
    reference = layer_cls(2).to(device).eval()
    reference.load_state_dict(module.state_dict())
    out = module(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference(x.contiguous()))
    low = torch.arange(24, dtype=dtype, device=device).reshape(1, 3, 2, 4).permute(0, 2, 1, 3)
    mixed = layer_cls(2).to(device).eval()
    float_reference = copy.deepcopy(mixed)
    torch.testing.assert_close(
        mixed(low).float(), float_reference(low.float()), atol=0.05, rtol=0.05
    )


def _grad_inputs(device):
    """_test_batchnorm_grad's tensors (4, 5, 6) as (4, 5, 6, 1), float64."""
    options = {"device": device, "dtype": F64}
    x = torch.arange(4 * 5 * 6, **options).view(4, 5, 6, 1).requires_grad_()
    weight = torch.arange(1, 6, **options).requires_grad_()
    bias = torch.arange(5, **options).requires_grad_()
    running_mean = 1 - torch.arange(5, **options)
    running_var = 2 * torch.arange(5, **options)
    return x, running_mean, running_var, weight, bias


@TRITON_SLOW
@BATCH_NORM
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batchnorm_grad(kernel_path, batch_norm, training):
    """test_batchnorm_grad (the gradcheck half): the functional form in float64."""
    x, running_mean, running_var, weight, bias = _grad_inputs(kernel_path.device)

    def run(x, weight, bias):
        stats = (running_mean.clone(), running_var.clone())
        return batch_norm(
            x, *stats, weight=weight, bias=bias, training=training, momentum=0.1, eps=1e-4
        )

    assert torch.autograd.gradcheck(run, (x, weight, bias))


@TRITON_SLOW
@pytest.mark.parametrize(
    "batch_norm",
    [
        F.batch_norm,
        # Until double backward through TrackedBN lands (issue 15, item 1).
        tracked_batch_norm,
    ],
    ids=["F.batch_norm", "tracked"],
)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batchnorm_gradgrad(kernel_path, batch_norm, training):
    """test_batchnorm_grad (the gradgradcheck half)."""
    x, running_mean, running_var, weight, bias = _grad_inputs(kernel_path.device)

    def run(x, weight, bias):
        stats = (running_mean.clone(), running_var.clone())
        return batch_norm(
            x, *stats, weight=weight, bias=bias, training=training, momentum=0.1, eps=1e-4
        )

    assert torch.autograd.gradgradcheck(run, (x, weight, bias))
