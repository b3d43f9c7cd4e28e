"""Test machinery of the tracked-BN ops: backends, input builders, tolerances (the fixtures that
use them are in tests/conftest.py).

Backends (``backend`` fixture, one test per backend):

``reference``  the PyTorch reference of ``avkernels/ops/batch_norm/reference.py`` (CPU).
``cpp``        the registered ops on CPU tensors, i.e. the compiled extension. Without it these
               tests FAIL (CI must never skip the C++ path silently) unless
               ``AVKERNELS_ALLOW_NO_EXTENSION=1`` is set, then they skip.
``triton``     ``avkernels.ops.batch_norm.triton_launch.forward/backward`` called directly: on CPU
               tensors in the Triton interpreter (``TRITON_INTERPRET=1`` set before python
               starts), else on a CUDA GPU, else skipped.
``cuda``       the registered ops on CUDA tensors (the Triton kernels); skipped without a GPU.

``Backend.active()`` makes ``tracked_batch_norm`` (and so ``TrackedBN``) run a backend whose
kernels are not the ones registered for its device, by registering them for CPU while active.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable

import pytest
import torch

import avkernels
from avkernels.ops.batch_norm import registration
from avkernels.ops.batch_norm.schema import (
    BACKWARD,
    FORWARD,
    output_memory_format,
)

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
LOW_PRECISION = (torch.bfloat16, torch.float16)
LOW_PRECISION_SHAPE = (4, 3, 8, 8)  # enough values that PyTorch's max error is a stable yardstick

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


# --- backends -----------------------------------------------------------------------------------


@contextlib.contextmanager
def cpu_kernels(forward: Callable, backward: Callable):
    """Register ``forward``/``backward`` as the CPU kernels of the two ops while inside."""
    library = torch.library.Library("avkernels", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
            library.impl("batch_norm_fwd", forward, "CPU", allow_override=True)
            library.impl("batch_norm_bwd", backward, "CPU", allow_override=True)
        yield
    finally:
        library._destroy()  # the previously registered CPU kernels take over again


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    device: str
    forward: Callable
    backward: Callable
    reroute_cpu: bool  # the registered CPU kernels are not this backend's

    @contextlib.contextmanager
    def active(self):
        """Within, TrackedBN/tracked_batch_norm on ``self.device`` tensors run this backend."""
        if self.reroute_cpu:
            with cpu_kernels(self.forward, self.backward):
                yield
        else:
            yield


def require_extension() -> None:
    """Fail without the compiled extension, or skip when AVKERNELS_ALLOW_NO_EXTENSION=1."""
    if avkernels.HAS_EXTENSION:
        return
    if os.environ.get("AVKERNELS_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("avkernels._C is not built and AVKERNELS_ALLOW_NO_EXTENSION=1")
    pytest.fail(
        "avkernels._C (the C++ CPU kernels) is not built, so the C++ path is untested: build it "
        "with `pip install --no-build-isolation -e .`, or set AVKERNELS_ALLOW_NO_EXTENSION=1 to "
        "skip these tests on purpose"
    )


def get_backend(name: str) -> Backend:
    """The backend ``name``, or skip/fail (see the module docstring) where it cannot run."""
    registered = (
        torch.ops.avkernels.batch_norm_fwd.default,
        torch.ops.avkernels.batch_norm_bwd.default,
    )
    if name == "reference":
        return Backend(
            name,
            "cpu",
            registration.reference_forward,
            registration.reference_backward,
            reroute_cpu=True,
        )
    if name == "cpp":
        require_extension()
        return Backend(name, "cpu", *registered, reroute_cpu=False)
    if name == "triton":
        if not (INTERPRETER or HAS_CUDA):
            pytest.skip("Triton needs a CUDA GPU or TRITON_INTERPRET=1 set before python starts")
        pytest.importorskip("triton")
        kernels = importlib.import_module("avkernels.ops.batch_norm.triton_launch")
        device = "cpu" if INTERPRETER else "cuda"
        return Backend(name, device, kernels.forward, kernels.backward, reroute_cpu=device == "cpu")
    if name == "cuda":
        if not HAS_CUDA:
            pytest.skip("needs a CUDA GPU")
        if INTERPRETER:
            pytest.skip("TRITON_INTERPRET=1 runs Triton on CPU tensors; unset it for the GPU path")
        return Backend(name, "cuda", *registered, reroute_cpu=False)
    raise ValueError(f"unknown backend {name!r}")


# --- op inputs ----------------------------------------------------------------------------------

FWD_ARGS = FORWARD.argument_names
BWD_ARGS = BACKWARD.argument_names
PARAMS = ("weight", "bias", "abri_weight", "abri_bias", "abri_alpha")
RUNNING = ("running_mean", "running_var", "abri_running_mean", "abri_running_var")
COUNTERS = ("dead_count", "dead_sample_count", "seen")


@dataclasses.dataclass(frozen=True)
class BNCase:
    """One configuration of the op pair; ``make_inputs`` builds its tensors."""

    shape: tuple = (2, 3, 5, 7)
    dtype: torch.dtype = torch.float32
    param_dtype: torch.dtype | None = None  # None: same as dtype
    mode: str = "plain"  # plain | relu | abri | abri_relu
    alpha_per_channel: bool = False  # ABRi alpha of shape (C,) instead of (1,)
    affine: str = "full"  # full | no_bias | none
    stats: str = "train"  # train | train_untracked (no running stats) | eval (running stats)
    layout: str = "nchw"  # nchw | channels_last | strided (non-contiguous)
    grad_layout: str = "dense"  # dense (y's layout) | expanded (stride 0 along H)
    momentum: float = 0.1
    eps: float = 1e-5
    dead: bool = True  # pass the dead counters

    @property
    def abri(self) -> bool:
        return self.mode.startswith("abri")

    @property
    def relu(self) -> bool:
        return self.mode.endswith("relu")

    @property
    def params(self) -> torch.dtype:
        return self.param_dtype or self.dtype

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        if self.param_dtype is not None and self.param_dtype != self.dtype:
            dtype += "+" + str(self.param_dtype).removeprefix("torch.") + "_params"
        parts = [
            "x".join(map(str, self.shape)),
            dtype,
            self.mode + ("_perC" if self.alpha_per_channel else ""),
            self.stats,
        ]
        defaults = BNCase()
        for field in ("affine", "layout", "grad_layout", "momentum", "eps", "dead"):
            if getattr(self, field) != getattr(defaults, field):
                parts.append(f"{field}={getattr(self, field)}")
        return "-".join(parts)


def _random(shape, generator, dtype, device, scale=1.0, offset=0.0):
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + offset
    return values.to(dtype=dtype, device=device)


def _variance(channels, generator, dtype, device, low: float):
    values = torch.rand(channels, generator=generator, dtype=torch.float64) + low
    return values.to(dtype=dtype, device=device)


def dead_prone_affine(channels: int, generator: torch.Generator) -> tuple:
    """float64 (weight, bias): channel 0 all zero (outputs exactly 0, the ``<= 0`` boundary) and
    the last channel a strongly negative bias (mostly dead, whole dead maps on small inputs)."""
    weight = torch.randn(channels, generator=generator, dtype=torch.float64) * 0.5 + 1.0
    bias = torch.randn(channels, generator=generator, dtype=torch.float64) * 0.5
    if channels >= 3:
        weight[0], bias[0] = 0.0, 0.0
        bias[-1] = -1.5 * weight[-1].abs()
    return weight, bias


def make_x_and_grad(case: BNCase, device, generator: torch.Generator) -> tuple:
    """An input in ``case.layout`` and a gradient for the output in ``case.grad_layout``."""
    n, c, h, w = case.shape
    if case.layout == "strided":
        x = _random((n, c, h, 2 * w), generator, case.dtype, device, 2.0, 1.0)[..., ::2]
    else:
        x = _random(case.shape, generator, case.dtype, device, 2.0, 1.0)
        if case.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    if case.grad_layout == "expanded":
        grad_y = _random((n, c, 1, w), generator, case.dtype, device).expand(n, c, h, w)
    else:
        grad_y = _random(case.shape, generator, case.dtype, device)
        grad_y = grad_y.contiguous(memory_format=output_memory_format(x))
    return x, grad_y


def make_inputs(case: BNCase, device="cpu", seed: int = 0) -> dict:
    """Fresh tensors for every argument of ``batch_norm_fwd`` plus ``grad_y``, deterministic;
    weight/bias from :func:`dead_prone_affine`."""
    g = torch.Generator().manual_seed(seed)
    c, pdt = case.shape[1], case.params
    x, grad_y = make_x_and_grad(case, device, g)
    inputs = dict.fromkeys(FWD_ARGS)
    inputs["x"] = x
    with_bias = case.affine == "full"
    if case.affine != "none":
        weight, bias = dead_prone_affine(c, g)
        inputs["weight"] = weight.to(dtype=pdt, device=device)
        inputs["bias"] = bias.to(dtype=pdt, device=device) if with_bias else None
        if case.abri:
            inputs["abri_weight"] = _random(c, g, pdt, device, 0.3, 1.0)
            inputs["abri_bias"] = _random(c, g, pdt, device, 0.3) if with_bias else None
    if case.abri:
        inputs["abri_alpha"] = _random(c if case.alpha_per_channel else 1, g, pdt, device, 0.4, 0.5)
    if case.stats != "train_untracked":
        inputs["running_mean"] = _random(c, g, pdt, device, 0.1)
        inputs["running_var"] = _variance(c, g, pdt, device, 0.5)
        if case.abri:
            inputs["abri_running_mean"] = _random(c, g, pdt, device, 0.1, 0.5)
            inputs["abri_running_var"] = _variance(c, g, pdt, device, 1.0)
    if case.dead:  # non-zero start values: the kernels must add to them
        inputs["dead_count"] = torch.randint(0, 50, (c,), generator=g).to(device)
        inputs["dead_sample_count"] = torch.randint(0, 5, (c,), generator=g).to(device)
        inputs["seen"] = torch.tensor([100, 7], device=device)
    inputs["use_batch_stats"] = case.stats != "eval"
    inputs["momentum"], inputs["eps"], inputs["relu"] = case.momentum, case.eps, case.relu
    inputs["grad_y"] = grad_y
    return inputs


def copy_strided(value: torch.Tensor, dtype=None, device=None) -> torch.Tensor:
    """A copy with ``value``'s exact strides (``Tensor.to``/``clone`` make non-dense tensors
    contiguous); stride-0 (expanded) dimensions stay expanded."""
    compact = value
    for dim, stride in enumerate(value.stride()):
        if stride == 0:
            compact = compact.narrow(dim, 0, 1)
    copy = torch.empty_strided(
        compact.shape, compact.stride(), dtype=dtype or value.dtype, device=device or value.device
    )
    copy.copy_(compact)
    return copy.expand(value.shape) if compact is not value else copy


def clone_inputs(inputs: dict, dtype: torch.dtype | None = None, device=None) -> dict:
    """Independent copies (the ops mutate running stats and counters), strides kept; floating
    tensors cast to ``dtype`` when given."""
    return {
        name: copy_strided(value, dtype if value.is_floating_point() else None, device)
        if isinstance(value, torch.Tensor)
        else value
        for name, value in inputs.items()
    }


def fwd_args(inputs: dict) -> list:
    return [inputs[name] for name in FWD_ARGS]


def bwd_args(inputs: dict, mean, invstd) -> list:
    values = dict(inputs, mean=mean, invstd=invstd)
    return [values[name] for name in BWD_ARGS]


def run_op_pair(forward: Callable, backward: Callable, inputs: dict) -> dict:
    """Runs forward then backward on ``inputs`` (mutated); returns every result by name."""
    y, mean, invstd = forward(*fwd_args(inputs))
    grads = backward(*bwd_args(inputs, mean, invstd))
    result = dict(zip(("grad_x",) + PARAMS, grads), y=y, mean=mean, invstd=invstd)
    result.update({name: inputs[name] for name in RUNNING + COUNTERS})
    return result


def assert_dead_counts(counters, start, pre_activations, tol: float) -> None:
    """Checks dead counters against a direct count on float64 pre-activation outputs.

    ``counters`` and ``start``: (dead_count, dead_sample_count, seen) after and before the
    passes whose pre-activations are listed. Values within ``tol`` of zero (but not exactly
    zero) may fall on either side in a kernel's precision, so they widen the expected range.
    """
    dead_count, dead_sample_count, seen = (t.cpu() for t in counters)
    low_count, high_count = start[0].cpu().clone(), start[0].cpu().clone()
    low_samples, high_samples = start[1].cpu().clone(), start[1].cpu().clone()
    expected_seen = start[2].cpu().clone()
    for z in pre_activations:
        z = z.detach().double().cpu()
        surely, maybe = (z <= -tol) | (z == 0), z <= tol
        low_count += surely.sum(dim=(0, 2, 3))
        high_count += maybe.sum(dim=(0, 2, 3))
        low_samples += surely.flatten(2).all(dim=2).sum(dim=0)
        high_samples += maybe.flatten(2).all(dim=2).sum(dim=0)
        expected_seen += torch.tensor([z.shape[0] * z.shape[2] * z.shape[3], z.shape[0]])
    for name, value in (
        ("dead_count", dead_count),
        ("dead_sample_count", dead_sample_count),
        ("seen", seen),
    ):
        assert value.dtype == torch.int64, f"{name} must stay int64, is {value.dtype}"
    assert torch.equal(seen, expected_seen), f"seen {seen.tolist()} != {expected_seen.tolist()}"
    assert ((low_count <= dead_count) & (dead_count <= high_count)).all(), (
        f"dead_count {dead_count.tolist()} outside [{low_count.tolist()}, {high_count.tolist()}]"
    )
    assert ((low_samples <= dead_sample_count) & (dead_sample_count <= high_samples)).all(), (
        f"dead_sample_count {dead_sample_count.tolist()} outside "
        f"[{low_samples.tolist()}, {high_samples.tolist()}]"
    )


def dead_tolerance(dtype: torch.dtype) -> float:
    """How far from zero a pre-activation output must be for all precisions to agree on its sign."""
    return 1e-9 if dtype == torch.float64 else 1e-4


# --- tolerances ---------------------------------------------------------------------------------

# (rtol, atol relative to max(1, |expected|)) where results of one precision are compared with a
# float64 oracle without a PyTorch baseline.
TOLERANCE = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}
LOW_PRECISION_ATOL = 1e-4  # the "small atol" of the 2x-PyTorch rule, relative to max(1, |expected|)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, baseline=None, name: str = ""):
    """Compares ``actual`` with a float64 ``expected``.

    With ``baseline`` (PyTorch's own result for the same low-precision inputs) the error must be
    within twice PyTorch's error plus a small atol; otherwise a fixed tolerance of
    ``actual``'s dtype applies.
    """
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if actual.numel() == 0:
        return
    rtol, atol = TOLERANCE[actual.dtype]
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(1.0, expected.abs().max().item())
    if baseline is None:
        torch.testing.assert_close(
            actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}"
        )
        return
    error = (actual - expected).abs().max().item()
    pytorch_error = (baseline.detach().double().cpu() - expected).abs().max().item()
    bound = 2 * pytorch_error + LOW_PRECISION_ATOL * scale
    assert error <= bound, (
        f"{name}: max error {error:.3g} exceeds 2 x PyTorch's {pytorch_error:.3g} + atol "
        f"({bound:.3g})"
    )


def randomize_batch_norm_state(model: torch.nn.Module) -> None:
    """Non-trivial parameters and running statistics in every nn.BatchNorm2d of ``model`` (from
    the global RNG), so that a lost parameter or statistic shows in the outputs."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.normal_(0, 0.2)
                layer.running_mean.normal_(0, 0.2)
                layer.running_var.uniform_(0.5, 1.5)
