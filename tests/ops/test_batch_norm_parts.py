"""The parts of the batch-statistics ops that synchronised BN runs around its collectives:
``batch_norm_stats``, ``batch_norm_bwd_reduce`` and ``batch_norm_bwd_elemt``, on every backend.

Each part is checked against a float64 computation from its definition (the statistics and the
sums written out with PyTorch ops) and against the whole op it splits: with the local sums divided
by the local element count, ``batch_norm_bwd_elemt`` must give ``batch_norm_bwd``'s ``grad_x``, and
``batch_norm_bwd_reduce`` its parameter gradients.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from avkernels.ops.batch_norm import reference, registration
from avkernels.ops.batch_norm.schema import BackwardArgs, ForwardArgs, output_memory_format
from tests.helpers.batch_norm import (
    HAS_CUDA,
    INTERPRETER,
    PARAMS,
    BNCase,
    assert_close,
    bwd_args,
    clone_inputs,
    fwd_args,
    make_inputs,
    require_extension,
)

CASES = [
    BNCase(),
    BNCase(mode="relu", dtype=torch.float64),
    BNCase(mode="abri_relu", alpha_per_channel=True, layout="channels_last"),
    BNCase(mode="abri", affine="no_bias", layout="strided", grad_layout="expanded"),
    BNCase(mode="relu", affine="none", shape=(3, 4, 1, 1)),
    BNCase(mode="abri_relu", dtype=torch.bfloat16, param_dtype=torch.float32),
    BNCase(mode="relu", shape=(0, 3, 4, 4)),
]


class Parts:
    """The three ops of one backend: (stats, backward_reduce, backward_elemt) and its device."""

    def __init__(self, name: str):
        if name == "reference":
            self.device = "cpu"
            self.stats = registration.reference_stats
            self.reduce = registration.reference_backward_reduce
            self.elemt = registration.reference_backward_elemt
        elif name == "cpp":
            require_extension()
            self.device = "cpu"
            ops = torch.ops.avkernels
            self.stats = ops.batch_norm_stats
            self.reduce = ops.batch_norm_bwd_reduce
            self.elemt = ops.batch_norm_bwd_elemt
        else:  # triton: in the interpreter on CPU tensors, or on a GPU
            if not (INTERPRETER or HAS_CUDA):
                pytest.skip(
                    "Triton needs a CUDA GPU or TRITON_INTERPRET=1 set before python starts"
                )
            launch = importlib.import_module("avkernels.ops.batch_norm.triton_launch")
            self.device = "cpu" if INTERPRETER else "cuda"
            self.stats = launch.stats
            self.reduce = launch.backward_reduce
            self.elemt = launch.backward_elemt


@pytest.fixture(params=["reference", "cpp", "triton"])
def parts(request) -> Parts:
    return Parts(request.param)


def _saved_statistics(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's float64 (1, C) mean and invstd, from their definition."""
    x = inputs["x"].double()
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + inputs["eps"])
    acc = torch.float64 if inputs["x"].dtype == torch.float64 else torch.float32
    return mean[None].to(acc), invstd[None].to(acc)


def _expected_sums(inputs: dict, mean, invstd) -> torch.Tensor:
    """``[S1, S2]`` in float64: dy masked by the fused ReLU, xhat from ``mean``/``invstd``."""
    args = ForwardArgs(*fwd_args(clone_inputs(inputs, torch.float64)))
    scale, shift = reference.effective_affine(
        *reference.parameters(args), mean.double(), invstd.double()
    )
    x, dy = args.x, inputs["grad_y"].double()
    if args.relu:
        dy = torch.where(x * scale[:, None, None] + shift[:, None, None] > 0, dy, 0)
    xhat = (x - mean.double()[0, :, None, None]) * invstd.double()[0, :, None, None]
    return torch.stack([dy.sum(dim=(0, 2, 3)), (dy * xhat).sum(dim=(0, 2, 3))])


def _reduce_args(inputs: dict, mean, invstd) -> list:
    args = bwd_args(inputs, mean, invstd)
    return [v for name, v in zip(BackwardArgs._fields, args) if name != "use_batch_stats"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_stats_are_the_batch_mean_and_biased_variance(parts, case):
    x = make_inputs(case, device=parts.device)["x"]
    mean, var = parts.stats(x)
    expected_var, expected_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert mean.shape == var.shape == (x.shape[1],) and mean.dtype == var.dtype == acc
    if x.numel() == 0:
        assert mean.isnan().all() and var.isnan().all()
        return
    assert_close(mean, expected_mean, name="mean")
    assert_close(var, expected_var, name="var")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reduce_gives_the_sums_and_the_whole_backward_parameter_grads(parts, case):
    inputs = make_inputs(case, device=parts.device)
    mean, invstd = _saved_statistics(inputs)
    sums, *grads = parts.reduce(*_reduce_args(inputs, mean, invstd))
    assert sums.shape == (2, case.shape[1]) and sums.dtype == mean.dtype
    assert_close(sums, _expected_sums(inputs, mean, invstd), name="sums")
    # The whole backward in float64 (the reference is checked against autograd elsewhere).
    whole = reference.backward(
        BackwardArgs(*bwd_args(clone_inputs(inputs, torch.float64), mean.double(), invstd.double()))
    )
    for name, grad, expected in zip(PARAMS, grads, whole[1:]):
        assert_close(grad, expected, name=name)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_elemt_with_local_means_is_the_whole_backward_grad_x(parts, case):
    inputs = make_inputs(case, device=parts.device)
    mean, invstd = _saved_statistics(inputs)
    count = max(1, case.shape[0] * case.shape[2] * case.shape[3])
    grad_means = (_expected_sums(inputs, mean, invstd) / count).to(mean.dtype)
    *tensors, relu = _reduce_args(inputs, mean, invstd)
    grad_x = parts.elemt(*tensors, grad_means.to(parts.device), relu)
    whole = reference.backward(
        BackwardArgs(*bwd_args(clone_inputs(inputs, torch.float64), mean.double(), invstd.double()))
    )
    assert grad_x.dtype == inputs["x"].dtype
    assert grad_x.is_contiguous(memory_format=output_memory_format(inputs["x"]))
    assert_close(grad_x, whole[0], name="grad_x")


def test_elemt_with_global_means_differs_from_the_local_backward(parts):
    """The means it is fed, not the local batch, set grad_x: twice the sums over twice the
    elements (a global batch of two copies) gives the local result; other means do not."""
    inputs = make_inputs(BNCase(mode="relu", dtype=torch.float64), device=parts.device)
    mean, invstd = _saved_statistics(inputs)
    sums = _expected_sums(inputs, mean, invstd)
    *tensors, relu = _reduce_args(inputs, mean, invstd)
    count = inputs["x"].numel() // inputs["x"].shape[1]
    local = parts.elemt(*tensors, sums / count, relu)
    doubled = parts.elemt(*tensors, (2 * sums) / (2 * count), relu)
    other = parts.elemt(*tensors, sums / (3 * count), relu)
    torch.testing.assert_close(doubled, local)
    assert (other - local).abs().max() > 1e-3


@pytest.mark.parametrize(
    "what, change, message",
    [
        ("grad_means shape", lambda a: dict(grad_means=a["grad_means"][:1]), "grad_means"),
        ("grad_means dtype", lambda a: dict(grad_means=a["grad_means"].double()), "grad_means"),
        (
            "statistics dtype",
            lambda a: dict(mean=a["mean"].double(), invstd=a["invstd"].double()),
            "accumulation dtype",
        ),
        (
            "two statistics rows",
            lambda a: dict(mean=a["mean"].repeat(2, 1), invstd=a["invstd"].repeat(2, 1)),
            "(K, C)",
        ),
    ],
)
def test_elemt_refuses_bad_arguments(parts, what, change, message):
    inputs = make_inputs(BNCase(), device=parts.device)
    mean, invstd = _saved_statistics(inputs)
    values = dict(mean=mean, invstd=invstd, grad_means=torch.zeros(2, 3))
    values.update(change(values))
    *tensors, relu = _reduce_args(inputs, values["mean"], values["invstd"])
    with pytest.raises(
        (ValueError, RuntimeError), match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        parts.elemt(*tensors, values["grad_means"], relu)


def test_parts_pass_opcheck():
    require_extension()
    inputs = make_inputs(BNCase(mode="abri_relu", alpha_per_channel=True, shape=(2, 3, 3, 4)))
    mean, invstd = _saved_statistics(inputs)
    ops = torch.ops.avkernels
    torch.library.opcheck(ops.batch_norm_stats.default, (inputs["x"],))
    args = _reduce_args(inputs, mean, invstd)
    torch.library.opcheck(ops.batch_norm_bwd_reduce.default, args)
    grad_means = torch.randn(2, 3)
    torch.library.opcheck(ops.batch_norm_bwd_elemt.default, (*args[:-1], grad_means, args[-1]))


def test_stats_refuses_a_non_4d_input_under_its_own_name(parts):
    with pytest.raises((ValueError, RuntimeError), match="batch_norm_stats"):
        parts.stats(torch.randn(2, 3, 4, device=parts.device))
