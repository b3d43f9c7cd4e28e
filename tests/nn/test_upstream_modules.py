"""PyTorch's module checks (``test/test_modules.py``, class ``TestModule``) re-expressed for
TrackedBN: the nn.BatchNorm2d samples of ``module_db`` (tests/helpers/upstream.py) drive
TrackedBN built from the same arguments, against nn.BatchNorm2d, on the C++ and the Triton
kernels (``kernel_path``). Each test names the upstream test it mirrors."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
from torch import nn
from torch._subclasses.meta_utils import assert_metadata_eq

from avkernels import TrackedBN
from tests.helpers.batch_norm import requires_cuda
from tests.helpers.upstream import (
    BATCH_NORM_2D,
    DTYPE,
    DTYPES,
    TRAINING,
    TRITON_SLOW,
    assert_same_state,
    build,
    build_pair,
    error_samples,
    forward_input,
    samples,
)


@pytest.fixture(autouse=True)
def seeded_rng():
    """Seed as PyTorch's TestCase does before every test (its inputs are random)."""
    torch.manual_seed(0)


DTYPE_METHODS = {torch.float32: "float", torch.float64: "double"}


def _assert_placed(module: nn.Module, device, dtype) -> None:
    """Parameters and buffers on ``device``; the floating ones in ``dtype``, the counters int64."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        assert tensor.device == torch.device(device), name
        expected = dtype if tensor.dtype.is_floating_point else torch.long
        assert tensor.dtype == expected, name


@TRAINING
@DTYPE
def test_forward(kernel_path, training, dtype):
    """test_forward: forward, then the .float()/.double() method and forward again; plus the
    output and the state against nn.BatchNorm2d."""
    device = kernel_path.device
    for sample in samples(device, dtype, training):
        reference, tracked = build_pair(sample, device, dtype, training)
        x = forward_input(sample)
        torch.testing.assert_close(tracked(x), reference(x))
        assert_same_state(tracked, reference)
        getattr(tracked, DTYPE_METHODS[dtype])()
        tracked(x)
        _assert_placed(tracked, device, dtype)


@TRAINING
@DTYPE
def test_factory_kwargs(training, dtype):
    """test_factory_kwargs: device and dtype passed to the constructor reach every parameter
    and floating buffer (the integer counters stay int64, as num_batches_tracked)."""
    for sample in samples("cpu", dtype, training):
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        tracked = TrackedBN(*args, **kwargs, device="cpu", dtype=dtype).train(training)
        _assert_placed(tracked, "cpu", dtype)


@TRAINING
@DTYPE
def test_repr(training, dtype):
    """test_repr: repr and str work; they start with nn.BatchNorm2d's arguments."""
    for sample in samples("cpu", dtype, training):
        reference, tracked = build_pair(sample, "cpu", dtype, training)
        assert repr(tracked).startswith(f"TrackedBN({reference.extra_repr()}")
        assert str(tracked) == repr(tracked)


@TRAINING
@DTYPE
def test_save_load(kernel_path, training, dtype):
    """test_save_load: a saved and loaded module gives the same output; the state_dict survives
    torch.save/torch.load, with weights_only too, and has nn.BatchNorm2d's keys."""
    device = kernel_path.device
    for sample in samples(device, dtype, training):
        reference, tracked = build_pair(sample, device, dtype, training)
        state = tracked.state_dict()
        assert list(state) == list(reference.state_dict())
        x = forward_input(sample)
        output = tracked(x)
        buffer = io.BytesIO()
        torch.save(tracked, buffer)
        buffer.seek(0)
        copy = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(copy(x), output)
        for weights_only in (False, True):
            buffer = io.BytesIO()
            torch.save(state, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=weights_only)
            assert list(loaded) == list(state)
            for name, value in state.items():
                assert torch.equal(loaded[name], value), name
        assert pickle.loads(pickle.dumps(tracked)).state_dict().keys() == state.keys()


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values with a stride-2 last dimension (upstream's repeat_interleave trick)."""
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    return out.requires_grad_(t.requires_grad)


def _forward_backward(module, x, grad):
    x = x.detach().requires_grad_()
    for p in module.parameters():
        p.grad = None
    out = module(x)
    out.backward(grad)
    return out, x.grad, [p.grad for p in module.parameters()]


@TRITON_SLOW
@TRAINING
@DTYPE
def test_non_contiguous_tensors(kernel_path, training, dtype):
    """test_non_contiguous_tensors: every mix of (non-)contiguous input and output gradient
    gives the contiguous results; and those are nn.BatchNorm2d's."""
    device = kernel_path.device
    for sample in samples(device, dtype, training, requires_grad=True):
        reference, tracked = build_pair(sample, device, dtype, training)
        x = forward_input(sample)
        grad = torch.randn_like(x)
        expected = _forward_backward(tracked, x, grad)
        torch.testing.assert_close(expected, _forward_backward(reference, x, grad))
        for x_variant in (x, _non_contiguous(x)):
            for grad_variant in (grad, _non_contiguous(grad)):
                out, grad_x, grad_params = _forward_backward(tracked, x_variant, grad_variant)
                torch.testing.assert_close(out, expected[0])
                torch.testing.assert_close(grad_x, expected[1], atol=1e-4, rtol=0)
                torch.testing.assert_close(grad_params, expected[2])


def _gradient_checks(kernel_path, training, check):
    """_test_gradients_helper: the total derivative (input and all parameters), then each
    parameter alone with the input."""
    device = kernel_path.device
    for sample in samples(device, torch.float64, training, requires_grad=True):
        module = build(TrackedBN, sample, device, torch.float64, training)
        x = forward_input(sample)
        params = tuple(module.parameters())

        def run(*inputs):
            return module(inputs[0])

        assert check(run, (x, *params), fast_mode=BATCH_NORM_2D.gradcheck_fast_mode or False)
        for p in params:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
            assert check(run, (x, *params), fast_mode=BATCH_NORM_2D.gradcheck_fast_mode or False)
            p.requires_grad_(False)


@TRITON_SLOW
@TRAINING
def test_grad(kernel_path, training):
    """test_grad: gradcheck in float64."""
    _gradient_checks(kernel_path, training, torch.autograd.gradcheck)


@TRITON_SLOW
@TRAINING
def test_gradgrad(kernel_path, training):
    """test_gradgrad: gradgradcheck in float64."""
    _gradient_checks(kernel_path, training, torch.autograd.gradgradcheck)


def _assert_format(t: torch.Tensor, channels_last: bool) -> None:
    if channels_last:
        assert t.numel() == 0 or t.is_contiguous(memory_format=torch.channels_last)
    else:
        assert t.is_contiguous()


@TRITON_SLOW
@TRAINING
@DTYPE
def test_memory_format(kernel_path, training, dtype):
    """test_memory_format: contiguous and channels_last input, with the module in each memory
    format, give the contiguous outputs and gradients; a channels_last input gives a
    channels_last output and input gradient."""
    device = kernel_path.device
    for sample in samples(device, dtype, training, requires_grad=True):
        module = build(TrackedBN, sample, device, dtype, training)
        x = forward_input(sample)
        params = tuple(module.parameters())
        expected = module(x)
        grad = torch.rand_like(expected)
        expected_grads = torch.autograd.grad(expected, (x, *params), grad) if training else None
        for input_format in (torch.contiguous_format, torch.channels_last):
            x_variant = x.detach().clone().to(memory_format=input_format).requires_grad_()
            channels_last = input_format == torch.channels_last
            for module_format in (
                torch.preserve_format,
                torch.contiguous_format,
                torch.channels_last,
            ):
                module.to(memory_format=module_format)
                out = module(x_variant)
                torch.testing.assert_close(out, expected)
                _assert_format(out, channels_last)
                if training:
                    grads = torch.autograd.grad(
                        out, (x_variant, *params), torch.empty_like(out).copy_(grad)
                    )
                    torch.testing.assert_close(grads, expected_grads)
                    _assert_format(grads[0], channels_last)


def test_if_train_and_eval_modes_differ(kernel_path):
    """test_if_train_and_eval_modes_differ: the forward reads ``training`` (train_and_eval_differ
    is True for nn.BatchNorm2d)."""
    for sample in samples(kernel_path.device, torch.float32, True):
        module = build(TrackedBN, sample, kernel_path.device, torch.float32, True)
        delattr(module, "training")
        with pytest.raises(AttributeError, match="'training'"):
            module(forward_input(sample))


@TRAINING
def test_errors(kernel_path, training):
    """test_errors: the module_error_inputs (eps <= 0) raise at forward."""
    for error_input in error_samples(kernel_path.device, torch.float32, training):
        sample = error_input.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        module = TrackedBN(*args, **kwargs, device=kernel_path.device)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            module(*sample.forward_input.args, **sample.forward_input.kwargs)


def _recreate(module: nn.Module, device, dtype, set_grad: bool) -> None:
    """test_to's ``_to``: every parameter and buffer recreated with ``.to(device, dtype)``,
    without ``module.to``; integer buffers become floating too."""
    for name, p in list(module.named_parameters(recurse=False)):
        new = nn.Parameter(p.detach().clone().to(device, dtype))
        setattr(module, name, new)
        if set_grad:
            new.grad = torch.randn_like(new)
    for name, b in list(module.named_buffers(recurse=False)):
        setattr(module, name, b.detach().clone().to(device, dtype))


@pytest.fixture(params=[True, False], ids=["swap", "no_swap"])
def swap(request):
    """torch.__future__'s swap_module_params_on_conversion for the test (restored after)."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(request.param)
    yield request.param
    torch.__future__.set_swap_module_params_on_conversion(before)


@TRITON_SLOW
@TRAINING
@pytest.mark.parametrize("set_grad", [True, False], ids=["grad", "no_grad"])
def test_to(kernel_path, training, swap, set_grad):
    """test_to: after the buffers were recreated in float32 (counters included), forward and
    backward work, and ``.to(device, dtype)`` keeps parameters (and gradients) as Parameters of
    the new dtype, swapped or updated in place as torch.__future__ says. Plus: the counts
    and the output stay nn.BatchNorm2d's."""
    device, dtype = kernel_path.device, torch.float32
    for sample in samples(device, dtype, training):
        reference, module = build_pair(sample, device, dtype, training)
        _recreate(module, device, dtype, set_grad)
        _recreate(reference, device, dtype, set_grad)
        x = forward_input(sample)
        has_params = len(list(module.parameters())) > 0
        if swap and not set_grad and has_params:
            out = module(x)
            torch.testing.assert_close(out, reference(x))
            out.sum().backward()
            assert module.seen.tolist() == [x.numel() // x.shape[1], x.shape[0]]
            module.to(dtype=torch.half)
            module.to(dtype=torch.float32)
        previous = (device, dtype)
        for device_ in {"cpu", device}:
            for dtype_ in DTYPES:
                unchanged = (device_, dtype_) == previous
                previous = (device_, dtype_)
                ids = [id(p) for p in module.parameters()]
                cdatas = [p._cdata for p in module.parameters()]
                grad_cdatas = [p.grad._cdata for p in module.parameters()] if set_grad else []
                module.to(device=device_, dtype=dtype_)
                params = list(module.parameters())
                assert all(isinstance(p, nn.Parameter) for p in params)
                assert all(p.device.type == device_ and p.dtype == dtype_ for p in params)
                assert [id(p) for p in params] == ids
                assert all((a != b) == swap for a, b in zip(cdatas, (p._cdata for p in params)))
                if set_grad:
                    assert all(p.grad.dtype == dtype_ for p in params)
                    after = [p.grad._cdata for p in params]
                    moved = swap and not unchanged
                    assert all((a != b) == moved for a, b in zip(grad_cdatas, after))


@TRAINING
def test_to_empty(kernel_path, training, swap):
    """test_to_empty: a module built on the meta device, moved with ``to_empty``, holds
    Parameters on the target device, swapped or replaced as torch.__future__ says."""
    device = torch.device(kernel_path.device)
    with torch.device("meta"):
        meta_samples = samples(None, torch.float32, training)
    for sample in meta_samples:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        with torch.device("meta"):
            module = TrackedBN(*args, **kwargs)
        ids = [id(p) for p in module.parameters()]
        cdatas = [p._cdata for p in module.parameters()]
        module.to_empty(device=device)
        params = list(module.parameters())
        assert all(isinstance(p, nn.Parameter) for p in params)
        assert all(p.device == device and p.dtype == torch.float32 for p in params)
        assert all(a != b for a, b in zip(cdatas, (p._cdata for p in params)))
        assert all((a == b) == swap for a, b in zip(ids, (id(p) for p in params)))


@TRAINING
@DTYPE
def test_device_ctx_init(training, dtype):
    """TestModuleCPUOnly.test_device_ctx_init: built under torch.device('meta'), every
    parameter and buffer has the metadata of the CPU-built module's."""
    cpu_samples = samples("cpu", dtype, training)
    with torch.device("meta"):
        meta_samples = samples(None, dtype, training)
    for cpu_sample, meta_sample in zip(cpu_samples, meta_samples):
        cpu_args = cpu_sample.constructor_input
        meta_args = meta_sample.constructor_input
        cpu_module = TrackedBN(*cpu_args.args, **cpu_args.kwargs)
        with torch.device("meta"):
            meta_module = TrackedBN(*meta_args.args, **meta_args.kwargs)
        pairs = [
            *zip(meta_module.parameters(), cpu_module.parameters()),
            *zip(meta_module.buffers(), cpu_module.buffers()),
        ]
        assert len(pairs) == len(list(cpu_module.parameters())) + len(list(cpu_module.buffers()))
        for meta, cpu in pairs:
            assert meta.is_meta
            assert_metadata_eq(lambda a, b, **_: a == b or pytest.fail(f"{a} != {b}"), meta, cpu)


@pytest.mark.gpu
@requires_cuda
@TRAINING
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_gpu_parity(training, dtype):
    """test_cpu_gpu_parity: the C++ (CPU) and Triton (GPU) kernels agree, forward and five
    backward passes (upstream's tolerances: 5e-2 for float32, 4e-4 for float64)."""
    tolerance = {torch.float32: 5e-2, torch.float64: 4e-4}[dtype]
    for sample in samples("cpu", dtype, training, requires_grad=True):
        cpu_module = build(TrackedBN, sample, "cpu", dtype, training)
        gpu_module = build(TrackedBN, sample, "cuda", dtype, training)
        x_cpu = forward_input(sample)
        x_gpu = x_cpu.detach().to("cuda").requires_grad_()
        out_cpu, out_gpu = cpu_module(x_cpu), gpu_module(x_gpu)
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, atol=tolerance, rtol=0)
        for _ in range(5):
            grad = torch.randn_like(out_cpu)
            out_cpu.backward(grad, retain_graph=True)
            out_gpu.backward(grad.to("cuda"), retain_graph=True)
            torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, atol=tolerance, rtol=0)
            for p_cpu, p_gpu in zip(cpu_module.parameters(), gpu_module.parameters()):
                torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, atol=tolerance, rtol=0)
