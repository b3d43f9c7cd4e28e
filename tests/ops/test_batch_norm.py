"""Op-level tests of ``avkernels::batch_norm_fwd`` / ``batch_norm_bwd`` on every backend.

The PyTorch reference is checked against an independent computation (``F.batch_norm``, two of
them blended for ABRi, autograd for the gradients); every backend is checked against the
reference run in float64 on the same inputs. Low-precision runs must stay within twice
PyTorch's own low-precision error (the same computation with ``F.batch_norm`` in that dtype).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from avkernels import TrackedBN
from avkernels.ops.batch_norm import autograd as python_autograd
from avkernels.ops.batch_norm import registration, schema, tracked_batch_norm
from tests.helpers.batch_norm import (
    COUNTERS,
    INTERPRETER,
    LOW_PRECISION,
    LOW_PRECISION_SHAPE,
    PARAMS,
    RUNNING,
    BNCase,
    assert_close,
    assert_dead_counts,
    bwd_args,
    clone_inputs,
    dead_tolerance,
    fwd_args,
    make_inputs,
    require_extension,
    run_op_pair,
)

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def _cases() -> list[BNCase]:
    cases = []
    # every mode under every statistics source (eval ABRi: K = 2 running-stat rows)
    for mode, per_channel in (
        ("plain", False),
        ("relu", False),
        ("abri", False),
        ("abri", True),
        ("abri_relu", True),
    ):
        for stats in ("train", "train_untracked", "eval"):
            cases.append(BNCase(mode=mode, alpha_per_channel=per_channel, stats=stats))
    # missing affine parameters
    cases += [
        BNCase(affine="none"),
        BNCase(affine="none", mode="relu", stats="eval"),
        BNCase(affine="no_bias"),
        BNCase(affine="no_bias", mode="abri_relu", alpha_per_channel=True),
        BNCase(affine="no_bias", mode="abri", stats="eval"),
        BNCase(dead=False, mode="relu"),
        BNCase(momentum=1.0, eps=1e-3, mode="abri"),
    ]
    # tiny and odd shapes
    for shape in (
        (2, 1, 1, 1),
        (2, 1, 4, 4),
        (5, 3, 1, 1),
        (2, 3, 1, 1),
        (3, 7, 5, 11),
        (7, 2, 13, 1),
        (1, 3, 1, 1),
    ):
        stats = "eval" if shape[0] * shape[2] * shape[3] == 1 else "train"
        cases.append(BNCase(shape=shape, mode="relu", stats=stats))
    cases.append(BNCase(shape=(3, 5, 1, 7), mode="abri", alpha_per_channel=True))
    # memory layouts and stride-0 gradients
    cases += [
        BNCase(layout="channels_last"),
        BNCase(layout="channels_last", mode="relu"),
        BNCase(layout="channels_last", mode="abri", stats="eval"),
        BNCase(layout="channels_last", shape=(2, 1, 3, 3)),
        BNCase(layout="strided"),
        BNCase(layout="strided", mode="abri_relu"),
        BNCase(grad_layout="expanded"),
        BNCase(grad_layout="expanded", mode="abri"),
        BNCase(grad_layout="expanded", layout="channels_last", mode="relu", stats="eval"),
    ]
    # dtypes: float64, low-precision input with float32 parameters, and all low precision
    cases += [
        BNCase(dtype=F64),
        BNCase(dtype=F64, mode="abri_relu", alpha_per_channel=True),
        BNCase(dtype=F64, mode="abri", stats="eval"),
    ]
    low = dict(shape=LOW_PRECISION_SHAPE)
    for dtype in LOW_PRECISION:
        mixed = dict(low, dtype=dtype, param_dtype=F32)
        cases += [
            BNCase(**mixed),
            BNCase(**mixed, mode="relu", stats="eval"),
            BNCase(**mixed, mode="abri_relu", alpha_per_channel=True),
            BNCase(**mixed, mode="abri", stats="eval"),
            BNCase(**mixed, layout="channels_last", mode="relu"),
            BNCase(**low, dtype=dtype),
            BNCase(**low, dtype=dtype, mode="abri_relu", stats="eval"),
        ]
    return cases


CASES = _cases()


def pytorch_batch_norm(inputs: dict) -> dict:
    """The op pair written with ``F.batch_norm`` (ABRi: two BNs blended) and autograd.

    Works in the inputs' own dtypes, so in low precision it measures PyTorch's own error.
    Returns the results under ``run_op_pair``'s names, plus ``z`` (pre-activation output).
    """
    inputs = clone_inputs(inputs)
    for name in ("x",) + PARAMS:
        if inputs[name] is not None:
            inputs[name].requires_grad_()
    x, alpha = inputs["x"], inputs["abri_alpha"]

    def batch_norm(prefix: str) -> torch.Tensor:
        return F.batch_norm(
            x,
            inputs[prefix + "running_mean"],
            inputs[prefix + "running_var"],
            inputs[prefix + "weight"],
            inputs[prefix + "bias"],
            training=inputs["use_batch_stats"],
            momentum=inputs["momentum"],
            eps=inputs["eps"],
        )

    z = batch_norm("")
    if alpha is not None:
        blend = alpha.to(x.dtype).reshape(-1, 1, 1)
        z = blend * z + (1 - blend) * batch_norm("abri_")
    y = F.relu(z) if inputs["relu"] else z
    y.backward(inputs["grad_y"])
    result = {
        name: inputs[name].grad if inputs[name] is not None else x.new_empty(0) for name in PARAMS
    }
    result.update({name: inputs[name] for name in RUNNING})
    result.update(y=y.detach(), z=z.detach(), grad_x=x.grad)
    if inputs["use_batch_stats"]:
        var, mean = torch.var_mean(x.detach().double(), dim=(0, 2, 3), correction=0)
        result["mean"], result["invstd"] = mean[None], (var + inputs["eps"]).rsqrt()[None]
    else:
        prefixes = ("", "abri_") if alpha is not None else ("",)
        # the running statistics before this call: eval leaves them unchanged
        result["mean"] = torch.stack([inputs[p + "running_mean"].double() for p in prefixes])
        result["invstd"] = torch.stack(
            [(inputs[p + "running_var"].double() + inputs["eps"]).rsqrt() for p in prefixes]
        )
    return result


def check_result_layout(result: dict, inputs: dict) -> None:
    """dtypes, shapes, devices and memory formats every implementation must produce."""
    x = inputs["x"]
    memory_format = schema.output_memory_format(x)
    for name in ("y", "grad_x"):
        out = result[name]
        assert (out.shape, out.dtype, out.device) == (x.shape, x.dtype, x.device), name
        assert out.is_contiguous(memory_format=memory_format), f"{name} strides {out.stride()}"
    rows = 2 if inputs["abri_alpha"] is not None and not inputs["use_batch_stats"] else 1
    for name in ("mean", "invstd"):
        out = result[name]
        assert out.shape == (rows, x.shape[1]), f"{name} shape {tuple(out.shape)}"
        assert out.dtype == schema.accumulation_dtype(x), f"{name} dtype {out.dtype}"
    for name in PARAMS:
        param, grad = inputs[name], result[name]
        expected = (0,) if param is None else param.shape
        assert grad.shape == expected, f"grad of {name}: shape {tuple(grad.shape)} != {expected}"
        if param is not None:
            assert grad.dtype == param.dtype, f"grad of {name}: dtype {grad.dtype}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_pytorch(case):
    inputs = clone_inputs(make_inputs(case), torch.float64)
    expected = pytorch_batch_norm(inputs)
    start = [inputs[n].clone() for n in COUNTERS] if case.dead else []
    result = run_op_pair(registration.reference_forward, registration.reference_backward, inputs)
    for name in ("y", "mean", "invstd", "grad_x") + PARAMS + RUNNING:
        if expected[name] is not None:
            assert_close(result[name], expected[name], name=name)
    if case.dead:
        counters = [result[n] for n in COUNTERS]
        assert_dead_counts(counters, start, [expected["z"]], dead_tolerance(torch.float64))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_op_pair_matches_reference(backend, case):
    inputs = make_inputs(case, device=backend.device)
    start = [inputs[n].clone() for n in COUNTERS] if case.dead else []
    result = run_op_pair(backend.forward, backend.backward, clone_inputs(inputs))
    check_result_layout(result, inputs)
    inputs64 = clone_inputs(inputs, torch.float64, "cpu")
    oracle = run_op_pair(
        registration.reference_forward, registration.reference_backward, clone_inputs(inputs64)
    )
    baseline = pytorch_batch_norm(inputs) if case.dtype in LOW_PRECISION else {}
    for name in ("y", "grad_x") + PARAMS + RUNNING:
        if result[name] is not None:
            assert_close(result[name], oracle[name], baseline.get(name), name=name)
    for name in ("mean", "invstd"):  # accumulation precision, so no low-precision yardstick
        assert_close(result[name], oracle[name], name=name)
    if case.dead:
        counters = [result[n] for n in COUNTERS]
        z = pytorch_batch_norm(inputs64)["z"]
        assert_dead_counts(counters, start, [z], dead_tolerance(case.dtype))
    else:
        assert all(result[n] is None for n in COUNTERS)


def _repeatability_shape(backend) -> tuple:
    if backend.device == "cuda":
        return (32, 16, 28, 28)  # many programs per channel: split reductions
    return (3, 2, 7, 5) if backend.name == "triton" else (8, 4, 33, 17)


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"], indirect=True)
@pytest.mark.parametrize("mode", ["relu", "abri_relu"])
def test_bitwise_repeatable(backend, mode):
    case = BNCase(shape=_repeatability_shape(backend), mode=mode, alpha_per_channel=True)
    inputs = make_inputs(case, device=backend.device)
    first = run_op_pair(backend.forward, backend.backward, clone_inputs(inputs))
    second = run_op_pair(backend.forward, backend.backward, clone_inputs(inputs))
    for name, value in first.items():
        if value is not None:
            assert torch.equal(value, second[name]), f"{name} differs between two identical runs"


GRADCHECK_CASES = [
    BNCase(shape=(2, 2, 2, 3), dtype=F64, mode="relu"),
    BNCase(shape=(2, 2, 2, 3), dtype=F64, mode="abri_relu", alpha_per_channel=True),
    BNCase(shape=(2, 2, 2, 3), dtype=F64, mode="abri", stats="eval"),
    BNCase(
        shape=(3, 2, 1, 2),
        dtype=F64,
        affine="no_bias",
        stats="train_untracked",
        layout="channels_last",
    ),
]
INTERPRETER_GRADCHECK_CASES = [GRADCHECK_CASES[1]]  # ~100 interpreted launches each


def _gradcheck_params():
    for name in ("reference", "cpp", "triton", "cuda"):
        interpreted = name == "triton" and INTERPRETER
        cases = INTERPRETER_GRADCHECK_CASES if interpreted else GRADCHECK_CASES
        yield from (pytest.param(name, case, id=f"{name}-{case}") for case in cases)


@pytest.mark.parametrize("backend, case", list(_gradcheck_params()), indirect=["backend"])
def test_gradcheck(backend, case):
    """float64 gradients of tracked_batch_norm (its autograd: the forward and backward op) vs
    finite differences."""
    inputs = make_inputs(case, device=backend.device)
    differentiable = ("x",) + PARAMS
    leaves = tuple(
        None if inputs[n] is None else inputs[n].detach().requires_grad_() for n in differentiable
    )

    def tracked_bn(*tensors):
        fresh = clone_inputs(inputs)  # the forward op mutates running stats and counters
        fresh.update(zip(differentiable, tensors))
        return tracked_batch_norm(*fwd_args(fresh))

    with backend.active():
        assert torch.autograd.gradcheck(tracked_bn, leaves, fast_mode=backend.name == "triton")


AUTOGRAD_CASES = [
    BNCase(mode="abri_relu", alpha_per_channel=True),
    BNCase(affine="none", mode="relu", stats="eval"),
    BNCase(affine="no_bias", mode="abri", stats="eval", layout="channels_last"),
    BNCase(shape=LOW_PRECISION_SHAPE, dtype=BF16, param_dtype=F32, grad_layout="expanded"),
]


@pytest.mark.parametrize("autograd", ["op", "python"])
@pytest.mark.parametrize("frozen_input", [False, True], ids=["", "frozen_input"])
@pytest.mark.parametrize("case", AUTOGRAD_CASES, ids=str)
def test_autograd_runs_the_op_pair(backend, case, frozen_input, autograd):
    """tracked_batch_norm's autograd (C++ with the extension; "python": TrackedBNFunction, its
    autograd without the extension) gives exactly the op pair's outputs, gradients, running
    statistics and counts, and no gradient to absent parameters; also when only the
    parameters take gradients (the first layer)."""
    tracked = {
        "op": tracked_batch_norm,
        "python": python_autograd.tracked_batch_norm_python_autograd,
    }[autograd]
    inputs = make_inputs(case, device=backend.device)
    with backend.active():
        expected = run_op_pair(backend.forward, backend.backward, clone_inputs(inputs))
        fresh = clone_inputs(inputs)
        leaves = [n for n in ("x",) * (not frozen_input) + PARAMS if fresh[n] is not None]
        for name in leaves:
            fresh[name].requires_grad_()
        y = tracked(*fwd_args(fresh))
        if leaves:
            y.backward(fresh["grad_y"])
    assert y.requires_grad == bool(leaves)
    assert torch.equal(y.detach(), expected["y"])
    assert y.stride() == expected["y"].stride()
    for name in leaves:
        grad, want = fresh[name].grad, expected["grad_x" if name == "x" else name]
        assert grad is not None and torch.equal(grad, want), f"gradient of {name}"
    for name in RUNNING + COUNTERS:
        if fresh[name] is not None:
            assert torch.equal(fresh[name], expected[name]), name


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"], indirect=True)
@pytest.mark.parametrize("no_autograd", [torch.no_grad, torch.inference_mode])
def test_forward_without_autograd(backend, no_autograd):
    """Under no_grad and inference_mode tracked_batch_norm is the forward op alone: the same
    output, running statistics and counts, and no graph."""
    case = BNCase(mode="abri_relu", alpha_per_channel=True, layout="channels_last")
    inputs = make_inputs(case, device=backend.device)
    with backend.active():
        expected = run_op_pair(backend.forward, backend.backward, clone_inputs(inputs))
        fresh = clone_inputs(inputs)
        fresh["weight"].requires_grad_()
        with no_autograd():
            y = tracked_batch_norm(*fwd_args(fresh))
    assert not y.requires_grad and y.grad_fn is None
    assert torch.equal(y, expected["y"])
    for name in RUNNING + COUNTERS:
        assert torch.equal(fresh[name], expected[name]), name


OPCHECK_CASES = [
    BNCase(shape=(2, 3, 3, 4), mode="relu"),
    BNCase(
        shape=(2, 3, 3, 4),
        mode="abri_relu",
        alpha_per_channel=True,
        stats="eval",
        layout="channels_last",
    ),
    BNCase(shape=(2, 3, 3, 4), mode="abri", affine="no_bias", stats="train_untracked", dead=False),
]


@pytest.mark.parametrize("backend", ["cpp", "triton", "cuda"], indirect=True)
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck(backend, case):
    inputs = make_inputs(case, device=backend.device)
    with backend.active():
        torch.library.opcheck(torch.ops.avkernels.batch_norm_fwd.default, fwd_args(inputs))
        _, mean, invstd = torch.ops.avkernels.batch_norm_fwd(*fwd_args(clone_inputs(inputs)))
        torch.library.opcheck(
            torch.ops.avkernels.batch_norm_bwd.default, bwd_args(inputs, mean, invstd)
        )
        differentiable = clone_inputs(inputs)
        for name in ("x",) + PARAMS:
            if differentiable[name] is not None:
                differentiable[name].requires_grad_()
        torch.library.opcheck(tracked_batch_norm, fwd_args(differentiable))


def test_cpp_argument_structs_follow_the_schemas():
    """csrc/ops/batch_norm.h names each op's arguments (ForwardArgs, BackwardArgs) in the order of
    the one schema (the dispatcher checks the C++ types; this checks the names)."""
    header = (Path(__file__).resolve().parents[2] / "csrc" / "ops" / "batch_norm.h").read_text()
    for struct, signature in (("ForwardArgs", schema.FORWARD), ("BackwardArgs", schema.BACKWARD)):
        body = re.search(rf"struct {struct} \{{(.*?)\}};", header, re.S).group(1)
        names = tuple(re.findall(r"(\w+);", body))
        assert names == signature.argument_names, struct


def test_kernels_are_the_compiled_ones():
    """With the extension loaded, the CPU kernels and tracked_batch_norm's autograd must be
    registered from C++, not Python."""
    require_extension()
    for name, key in (
        ("batch_norm_fwd", "CPU"),
        ("batch_norm_bwd", "CPU"),
        ("tracked_batch_norm", r"Autograd\[alias\]"),
    ):
        dump = torch._C._dispatch_dump(f"avkernels::{name}")
        where = re.search(rf"^{key}: registered at (\S+)", dump, re.MULTILINE)
        assert where and ".cpp" in where.group(1), f"{key} kernel of {name}: {dump}"


# Run in a fresh interpreter: once the extension is loaded, its ops stay registered.
WITHOUT_EXTENSION = textwrap.dedent("""
    import sys, warnings
    sys.modules["avkernels._C"] = None  # as if the extension had not been built
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch, avkernels
    notes = [str(w.message) for w in caught if "reference path" in str(w.message)]
    assert len(notes) == 1 and "pip install --no-build-isolation" in notes[0], caught
    assert not avkernels.HAS_EXTENSION
    dump = torch._C._dispatch_dump("avkernels::tracked_batch_norm")
    assert "Autograd[alias]: registered at " in dump and ".cpp" not in dump, dump

    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    reference, tracked = torch.nn.BatchNorm2d(6), avkernels.TrackedBN(6, activation="relu")
    compiled = torch.compile(tracked, fullgraph=True, backend="aot_eager")
    results = []
    for module, forward in ((reference, lambda x: reference(x).relu()), (tracked, compiled)):
        y = forward(x)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        results.append([y, x.grad, module.weight.grad, module.bias.grad, module.running_mean,
                        module.running_var])
        x.grad = None
    for expected, got in zip(*results):
        torch.testing.assert_close(got, expected)
    z = torch.nn.functional.batch_norm(x, None, None, training=True)
    assert torch.equal(tracked.dead_count, (z <= 0).sum(dim=(0, 2, 3)))
    print("fallback ok")
""")


def test_python_fallback_without_extension():
    """Without the compiled extension avkernels still imports, warns once, and TrackedBN (the
    reference kernels, TrackedBNFunction's autograd) trains like nn.BatchNorm2d + ReLU, also
    under torch.compile(fullgraph=True)."""
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTENSION], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "fallback ok" in run.stdout, run.stdout + run.stderr


# Non-temporal output stores (stream_output in csrc/batch_norm.cpp): chosen for outputs that do
# not fit in the last-level cache with their input, or forced by AVKERNELS_NONTEMPORAL_STORES.
# They apply to float32/float64 outputs whose runs are whole 64-byte vectors (H*W, or C in
# channels_last, a multiple of 16 float32 / 8 float64 values); other outputs ignore the setting.
STREAM_CASES = [
    BNCase(shape=(3, 5, 4, 8), mode="relu"),  # planes of 2 vectors
    BNCase(shape=(2, 3, 96, 96), mode="abri", stats="eval"),  # planes cut into 2 runs
    BNCase(shape=(3, 16, 5, 7), mode="abri_relu", layout="channels_last"),  # rows of 1 vector
    BNCase(shape=(2, 8, 4, 4), dtype=F64, layout="channels_last"),
    BNCase(shape=(3, 5, 7, 7), mode="relu"),  # not whole vectors: never streamed
    BNCase(shape=(3, 5, 4, 8), dtype=BF16, param_dtype=F32, mode="relu"),  # converted: never
]
STREAM_VARIABLE = "AVKERNELS_NONTEMPORAL_STORES"


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)
@pytest.mark.parametrize("case", STREAM_CASES, ids=str)
def test_nontemporal_stores_change_no_result(backend, case, monkeypatch):
    """Forced on, forced off and automatic: the same outputs, gradients and counts, bit for bit."""
    inputs = make_inputs(case)
    results = {}
    for setting in ("0", "1", ""):
        monkeypatch.setenv(STREAM_VARIABLE, setting)
        results[setting] = run_op_pair(backend.forward, backend.backward, clone_inputs(inputs))
    for setting in ("1", ""):
        for name, value in results["0"].items():
            if value is not None:
                assert torch.equal(results[setting][name], value), (
                    f"{name} differs with {STREAM_VARIABLE}={setting!r}"
                )


def test_nontemporal_stores_setting_is_checked(monkeypatch):
    require_extension()
    monkeypatch.setenv(STREAM_VARIABLE, "yes")
    with pytest.raises(RuntimeError, match=f"{STREAM_VARIABLE} must be 0 .*got 'yes'"):
        TrackedBN(4)(torch.randn(2, 4, 4, 4))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
def test_gpu_resnet_sized_batch_matches_reference(backend):
    """The compiled Triton kernels on a ResNet-18 layer1-sized bf16 batch (split reductions)."""
    case = BNCase(
        shape=(16, 64, 56, 56),
        dtype=BF16,
        param_dtype=F32,
        mode="abri_relu",
        alpha_per_channel=True,
        layout="channels_last",
    )
    inputs = make_inputs(case, device="cuda")
    result = run_op_pair(backend.forward, backend.backward, clone_inputs(inputs))
    check_result_layout(result, inputs)
    oracle = run_op_pair(
        registration.reference_forward,
        registration.reference_backward,
        clone_inputs(inputs, torch.float64),
    )
    baseline = pytorch_batch_norm(inputs)
    for name in ("y", "grad_x") + PARAMS + RUNNING:
        assert_close(result[name], oracle[name], baseline.get(name), name=name)
