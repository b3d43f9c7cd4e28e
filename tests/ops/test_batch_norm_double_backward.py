"""Double backward through ``tracked_batch_norm`` (docs/DESIGN.md, "Double backward").

``gradgradcheck`` in float64 against finite differences of the first-order gradients, over the
modes, statistics sources and affine settings, on every backend (the forward kernels differ; the
backward under ``create_graph=True`` is ``batch_norm_bwd_differentiable``), through the C++
autograd kernel and the Python one used without the extension. A WGAN-GP gradient penalty
through a conv + TrackedBN net must match the same net with ``nn.BatchNorm2d``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad as fwAD

from avkernels import TrackedBN
from avkernels import functional as F
from avkernels.functional import AbriState, DeadStats
from avkernels.ops.batch_norm import autograd as python_autograd
from avkernels.ops.batch_norm import (
    batch_norm_bwd_differentiable,
    registration,
    tracked_batch_norm,
)
from avkernels.ops.batch_norm.schema import ForwardArgs
from avkernels.ops.batch_norm.sync import sync_tracked_batch_norm
from tests.helpers.batch_norm import (
    INTERPRETER,
    PARAMS,
    BNCase,
    bwd_args,
    clone_inputs,
    fwd_args,
    make_inputs,
    run_op_pair,
)

F64 = torch.float64
SHAPE = (3, 2, 3, 3)


def _cases() -> list[BNCase]:
    cases = []
    for mode in ("plain", "relu", "abri", "abri_relu"):
        for stats in ("train", "train_untracked", "eval"):
            for affine in ("full", "none"):
                per_channel = mode == "abri_relu"
                cases.append(
                    BNCase(
                        SHAPE,
                        F64,
                        mode=mode,
                        alpha_per_channel=per_channel,
                        stats=stats,
                        affine=affine,
                    )
                )
    cases += [
        BNCase(SHAPE, F64, mode="relu", affine="no_bias", layout="channels_last"),
        BNCase(SHAPE, F64, mode="abri", dead=False, layout="strided"),
    ]
    return cases


CASES = _cases()
# The Triton interpreter runs each launch slowly: two cases, gradgradcheck's fast mode.
INTERPRETER_CASES = [
    BNCase(SHAPE, F64, mode="abri_relu", alpha_per_channel=True),
    BNCase(SHAPE, F64, mode="relu", stats="eval", affine="no_bias"),
]


def _params():
    for name in ("reference", "cpp", "triton", "cuda"):
        for case in CASES:
            # the other interpreted cases: about a minute in all
            heavy = name == "triton" and INTERPRETER and case not in INTERPRETER_CASES
            marks = [pytest.mark.slow] if heavy else []
            yield pytest.param(name, case, id=f"{name}-{case}", marks=marks)


def _differentiable_inputs(inputs: dict) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
    names = tuple(n for n in ("x",) + PARAMS if inputs[n] is not None)
    return names, tuple(inputs[n].detach().clone().requires_grad_() for n in names)


def _as_function(tracked, inputs: dict, names: tuple[str, ...]):
    def function(*tensors):
        fresh = clone_inputs(inputs)  # the forward mutates running stats and counters
        fresh.update(zip(names, tensors))
        return tracked(*fwd_args(fresh))

    return function


@pytest.mark.parametrize("backend, case", list(_params()), indirect=["backend"])
def test_gradgradcheck(backend, case):
    inputs = make_inputs(case, device=backend.device)
    names, leaves = _differentiable_inputs(inputs)
    grad_y = inputs["grad_y"].detach().requires_grad_()
    with backend.active():
        assert torch.autograd.gradgradcheck(
            _as_function(tracked_batch_norm, inputs, names),
            leaves,
            (grad_y,),
            fast_mode=backend.name == "triton",
        )


@pytest.mark.parametrize("case", CASES[::3], ids=str)
def test_gradgradcheck_python_autograd(case):
    """The Python autograd used without the extension (TrackedBNFunction) as well."""
    inputs = make_inputs(case)
    names, leaves = _differentiable_inputs(inputs)
    grad_y = inputs["grad_y"].detach().requires_grad_()
    function = _as_function(python_autograd.tracked_batch_norm_python_autograd, inputs, names)
    assert torch.autograd.gradgradcheck(function, leaves, (grad_y,))


@pytest.mark.parametrize("autograd", ["op", "python"])
def test_first_order_backward_stays_on_the_fused_op(autograd):
    """Without create_graph the backward is batch_norm_bwd (the fused kernels), not the
    differentiable decomposition."""
    tracked = {
        "op": tracked_batch_norm,
        "python": python_autograd.tracked_batch_norm_python_autograd,
    }[autograd]
    calls = []

    def counting(*args):
        calls.append(1)
        return registration.reference_differentiable_backward(*args)

    library = torch.library.Library("avkernels", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
            library.impl(
                "batch_norm_bwd_differentiable",
                counting,
                "CompositeImplicitAutograd",
                allow_override=True,
            )
        inputs = make_inputs(BNCase(SHAPE, F64, mode="relu"))
        x = inputs["x"].requires_grad_()
        y = tracked(*fwd_args(inputs))
        torch.autograd.grad(y, x, inputs["grad_y"])
        assert calls == []
        y = tracked(*fwd_args(inputs))
        torch.autograd.grad(y, x, inputs["grad_y"], create_graph=True)
        assert calls == [1]
    finally:
        library._destroy()


@pytest.mark.parametrize("case", [CASES[0], CASES[-4]], ids=str)
def test_opcheck_differentiable_backward(case):
    inputs = make_inputs(case)
    _, mean, invstd = torch.ops.avkernels.batch_norm_fwd(*fwd_args(clone_inputs(inputs)))
    for name in ("grad_y", "x") + PARAMS:
        if inputs[name] is not None:
            inputs[name].requires_grad_()
    torch.library.opcheck(batch_norm_bwd_differentiable, bwd_args(inputs, mean, invstd))


@pytest.mark.parametrize("backend", ["reference", "cpp"], indirect=True)
def test_differentiable_backward_matches_the_fused_op(backend):
    """The same first-order gradients as batch_norm_bwd (float64 rounding apart)."""
    for case in CASES:
        inputs = make_inputs(case)
        with backend.active():
            expected = run_op_pair(backend.forward, backend.backward, clone_inputs(inputs))
            got = run_op_pair(backend.forward, batch_norm_bwd_differentiable, clone_inputs(inputs))
        for name in ("grad_x",) + PARAMS:
            torch.testing.assert_close(got[name], expected[name], msg=lambda m, n=name: f"{n}: {m}")


def _critic(bn: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        bn,
        nn.ReLU(),
        nn.Conv2d(4, 2, 3),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 1),
    ).double()


def _gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor):
    """WGAN-GP: (|d critic / d x| - 1)^2 on interpolates, differentiated w.r.t. the weights."""
    eps = torch.linspace(0, 1, real.shape[0], dtype=real.dtype).reshape(-1, 1, 1, 1)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_()
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
    penalty.backward()
    return penalty.detach(), [p.grad for p in critic.parameters()]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["", "fused_relu"])
def test_gradient_penalty_matches_batchnorm2d(training, relu):
    real = torch.randn(5, 3, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    fake = torch.randn(5, 3, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    expected_net = _critic(nn.BatchNorm2d(4))
    tracked_bn = TrackedBN(4, activation="relu" if relu else None)
    net = _critic(tracked_bn)
    if relu:  # the fused ReLU replaces the separate one
        net[2] = nn.Identity()
    net.load_state_dict(expected_net.state_dict(), strict=False)
    with torch.no_grad():  # away from the defaults: eval must use these running statistics
        for bn in (expected_net[1], net[1]):
            bn.running_mean.copy_(torch.linspace(-0.2, 0.3, 4))
            bn.running_var.copy_(torch.linspace(0.5, 1.5, 4))
            bn.weight.copy_(torch.linspace(0.5, 1.5, 4))
    expected_net.train(training), net.train(training)
    expected = _gradient_penalty(expected_net, real, fake)
    got = _gradient_penalty(net, real, fake)
    torch.testing.assert_close(got[0], expected[0])
    assert got[0] > 0
    for name, g, e in zip(dict(net.named_parameters()), got[1], expected[1]):
        torch.testing.assert_close(g, e, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(net[1].running_mean, expected_net[1].running_mean)
    torch.testing.assert_close(net[1].running_var, expected_net[1].running_var)
    assert int(tracked_bn.dead_count.sum()) > 0


def test_hessian_vector_product_matches_batchnorm2d():
    """torch.autograd.functional.hvp w.r.t. the input (create_graph inside)."""
    x = torch.randn(3, 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    v = torch.randn_like(x)
    results = []
    for bn in (nn.BatchNorm2d(2), TrackedBN(2)):
        bn.double()

        def loss(t, bn=bn):
            return (bn(t) ** 3).sum()

        results.append(torch.autograd.functional.hvp(loss, x, v)[1])
    torch.testing.assert_close(results[1], results[0])
    assert results[0].abs().max() > 0


def test_synchronised_double_backward_raises():
    """The synchronised variant cannot be differentiated twice: a clear error, not zeros."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        inputs = make_inputs(BNCase(SHAPE, F64, mode="relu"))
        x = inputs["x"].requires_grad_()
        y = sync_tracked_batch_norm(ForwardArgs(*fwd_args(inputs)))
        (grad,) = torch.autograd.grad(y, x, inputs["grad_y"])  # first order works
        assert grad.abs().max() > 0
        y = sync_tracked_batch_norm(ForwardArgs(*fwd_args(inputs)))
        with pytest.raises(RuntimeError, match="cannot be differentiated twice.*sync=False"):
            torch.autograd.grad(y, x, inputs["grad_y"], create_graph=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("autograd", ["op", "python"])
@pytest.mark.parametrize("case", [CASES[1], CASES[9], CASES[16], CASES[23]], ids=str)
def test_forward_mode_ad_gradcheck(case, autograd):
    """Forward-mode AD (batch_norm_fwd_differentiable) against finite differences; backward and
    double backward through the same graph as well."""
    tracked = {
        "op": tracked_batch_norm,
        "python": python_autograd.tracked_batch_norm_python_autograd,
    }[autograd]
    inputs = make_inputs(case)
    names, leaves = _differentiable_inputs(inputs)
    assert torch.autograd.gradcheck(
        _as_function(tracked, inputs, names), leaves, check_forward_ad=True, check_backward_ad=True
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu", [False, True], ids=["", "fused_relu"])
def test_forward_mode_ad_matches_batchnorm2d(training, relu):
    """The tangent of TrackedBN's output, its running statistics (no tangent) and its dead
    counts under forward_ad, against nn.BatchNorm2d (+ ReLU) and an ordinary forward."""
    x = torch.randn(3, 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    tangent = torch.randn_like(x)
    expected_bn, bn, plain_bn = (
        nn.BatchNorm2d(2),
        TrackedBN(2, activation="relu" if relu else None),
        TrackedBN(2, activation="relu" if relu else None),
    )
    for module in (expected_bn, bn, plain_bn):
        module.double().train(training)
        with torch.no_grad():
            module.bias.copy_(torch.tensor([0.3, -0.4]))
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        expected = expected_bn(dual)
        expected = expected.relu() if relu else expected
        got = bn(dual)
        got_primal, got_tangent = fwAD.unpack_dual(got)
        expected_primal, expected_tangent = fwAD.unpack_dual(expected)
        for name in ("running_mean", "running_var"):
            assert fwAD.unpack_dual(getattr(bn, name)).tangent is None, name
    torch.testing.assert_close(got_tangent, expected_tangent)
    torch.testing.assert_close(got_primal, expected_primal)
    assert got_tangent.abs().max() > 0
    plain_bn(x)
    for name in ("running_mean", "running_var", "dead_count", "dead_sample_count", "seen"):
        torch.testing.assert_close(getattr(bn, name), getattr(plain_bn, name), msg=name)
    torch.testing.assert_close(bn.running_mean, expected_bn.running_mean)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_api_gradgradcheck_with_abri(training):
    """avkernels.functional.tracked_batch_norm with ABRi, fused ReLU and dead counting."""
    g = torch.Generator().manual_seed(5)
    x, weight, bias, abri_weight, abri_bias, alpha = (
        torch.randn(shape, dtype=F64, generator=g).requires_grad_()
        for shape in (SHAPE, 2, 2, 2, 2, 1)
    )
    running = [torch.rand(2, dtype=F64, generator=g) + 0.5 for _ in range(4)]

    def function(x, weight, bias, abri_weight, abri_bias, alpha):
        mean, var, abri_mean, abri_var = (r.clone() for r in running)
        counters = DeadStats(
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
            torch.zeros(2, dtype=torch.long),
        )
        abri = AbriState(abri_weight, abri_bias, alpha, abri_mean, abri_var)
        return F.tracked_batch_norm(
            x,
            mean,
            var,
            weight,
            bias,
            training=training,
            activation="relu",
            dead_stats=counters,
            abri=abri,
        )

    leaves = (x, weight, bias, abri_weight, abri_bias, alpha)
    assert torch.autograd.gradgradcheck(function, leaves)


def test_forward_mode_ad_checks_the_arguments():
    inputs = make_inputs(BNCase(SHAPE, F64))
    inputs["weight"] = torch.ones(3, dtype=F64)  # 2 channels
    with fwAD.dual_level():
        inputs["x"] = fwAD.make_dual(inputs["x"], torch.ones_like(inputs["x"]))
        with pytest.raises((RuntimeError, ValueError), match="weight"):
            tracked_batch_norm(*fwd_args(inputs))
