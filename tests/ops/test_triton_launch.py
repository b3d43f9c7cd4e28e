"""The Triton batch-norm launchers' host side: launch plans, argument checks on a cached plan,
the device guard, launch counts and host time (docs/DESIGN.md, "Kernel designs and launch
plans"). Most tests replace the launches by no-ops (``benchmarks/host_overhead.py``) and so need
no GPU and no interpreter; the launch-count test runs the kernels in the interpreter."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from avkernels.ops.batch_norm import triton_launch, triton_plans  # noqa: E402
from benchmarks import host_overhead  # noqa: E402
from tests.helpers.batch_norm import HAS_CUDA, INTERPRETER  # noqa: E402

SHAPE = (4, 8, 6, 5)


def _forward_args(x, *, train=True, relu=False, dead=False, weight=None):
    channels = x.shape[1]
    weight = torch.ones(channels) if weight is None else weight
    counters = (None, None, None)
    if dead:
        counters = (
            torch.zeros(channels, dtype=torch.int64),
            torch.zeros(channels, dtype=torch.int64),
            torch.zeros(2, dtype=torch.int64),
        )
    running = (torch.zeros(channels), torch.ones(channels), None, None)
    return (x, weight, torch.zeros(channels), None, None, None, *running, *counters, train, 0.1,
            1e-5, relu)  # fmt: skip


def _backward_args(x, mean, invstd, *, train=True, relu=False):
    channels = x.shape[1]
    return (torch.randn_like(x), x, torch.ones(channels), torch.zeros(channels), None, None, None,
            mean, invstd, train, relu)  # fmt: skip


@pytest.fixture
def launches():
    with host_overhead.stubbed_launches() as launched:
        yield launched


def test_launch_plans_are_made_once_per_geometry(launches, monkeypatch):
    made = []
    for name in ("forward_plan", "backward_plan"):
        build = getattr(triton_launch, name)
        monkeypatch.setattr(
            triton_launch,
            name,
            lambda *args, build=build, name=name, **kwargs: (
                made.append(name) or build(*args, **kwargs)
            ),
        )
    x = torch.randn(SHAPE)
    for _ in range(3):
        _, mean, invstd = triton_launch.forward(*_forward_args(x))
        triton_launch.backward(*_backward_args(x, mean, invstd))
    assert made == ["forward_plan", "backward_plan"]
    triton_launch.forward(*_forward_args(x.contiguous(memory_format=torch.channels_last)))
    triton_launch.forward(*_forward_args(x, relu=True))
    assert made.count("forward_plan") == 3
    # The synchronised parts: the statistics get a plan of their own, once; the backward's
    # parts share the whole backward's plan for the same geometry.
    for _ in range(2):
        triton_launch.stats(x)
        grad_y, x_, *params, _, _, _, relu = _backward_args(x, mean, invstd)
        sums, *_ = triton_launch.backward_reduce(grad_y, x_, *params, mean, invstd, relu)
        triton_launch.backward_elemt(grad_y, x_, *params, mean, invstd, sums, relu)
    assert made.count("forward_plan") == 4 and made.count("backward_plan") == 1


def test_checks_run_with_a_cached_plan(launches):
    x = torch.randn(SHAPE)
    _, mean, invstd = triton_launch.forward(*_forward_args(x))
    with pytest.raises(RuntimeError, match="weight: expected shape"):
        triton_launch.forward(*_forward_args(x, weight=torch.ones(3)))
    triton_launch.backward(*_backward_args(x, mean, invstd))
    with pytest.raises(RuntimeError, match="mean and invstd"):
        triton_launch.backward(*_backward_args(x, mean[:, :3], invstd))


def test_every_launch_runs_under_the_input_devices_guard(launches, monkeypatch):
    guarded, state = [], {"inside": False}

    @contextlib.contextmanager
    def guard():
        state["inside"] = True
        yield
        state["inside"] = False

    def device_guard(device):
        guarded.append(device)
        return guard()

    monkeypatch.setattr(triton_launch, "_device_guard", device_guard)
    launch = host_overhead._NoOpKernel._launch
    inside = []
    monkeypatch.setattr(
        host_overhead._NoOpKernel,
        "_launch",
        lambda self, *a, **k: inside.append(state["inside"]) or launch(self, *a, **k),
    )
    x = torch.randn(SHAPE)
    _, mean, invstd = triton_launch.forward(*_forward_args(x, dead=True, relu=True))
    triton_launch.backward(*_backward_args(x, mean, invstd))
    assert guarded == [x.device, x.device]
    assert inside and all(inside), inside


def test_device_guard_makes_the_inputs_device_current(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or "guard")
    assert triton_launch._device_guard(torch.device("cuda", 1)) == "guard"
    assert entered == [torch.device("cuda", 1)]
    for already_current in (torch.device("cuda", 0), torch.device("cpu")):
        assert isinstance(triton_launch._device_guard(already_current), contextlib.nullcontext)
    assert len(entered) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.skipif(INTERPRETER, reason="TRITON_INTERPRET=1 runs Triton on CPU tensors")
def test_second_gpu_matches_batchnorm2d_while_device_0_is_current():
    from avkernels import TrackedBN

    torch.cuda.set_device(0)
    x = torch.randn(8, 16, 10, 10, device="cuda:1", requires_grad=True)
    tracked, native = TrackedBN(16).to("cuda:1"), torch.nn.BatchNorm2d(16).to("cuda:1")
    y, expected = tracked(x), native(x)
    assert y.device == x.device
    torch.testing.assert_close(y, expected)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    torch.testing.assert_close(grad, expected_grad)
    torch.testing.assert_close(tracked.running_var, native.running_var)


class _CountingKernel:
    """Wraps a Triton kernel: records each launch, then launches it."""

    def __init__(self, name, kernel, launched):
        self.name, self.kernel, self.launched = name, kernel, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


# (mode, forward flags, forward launches, backward launches): issue 16's targets.
LAUNCH_COUNTS = (
    ("train", dict(train=True), 2, 2),
    ("train dead relu", dict(train=True, dead=True, relu=True), 2, 2),
    ("eval", dict(train=False), 1, 1),
    ("eval dead relu", dict(train=False, dead=True, relu=True), 1, 1),
)


@pytest.mark.skipif(not INTERPRETER, reason="counts launches of the interpreted kernels")
@pytest.mark.parametrize("mode, flags, forward_launches, backward_launches", LAUNCH_COUNTS)
def test_launch_counts(monkeypatch, mode, flags, forward_launches, backward_launches):
    launched = []
    for name, value in list(vars(triton_launch).items()):
        if name.endswith("_kernel"):
            monkeypatch.setattr(triton_launch, name, _CountingKernel(name, value, launched))
    x = torch.randn(2, 3, 4, 5)  # 2 samples: maps are split across programs
    _, mean, invstd = triton_launch.forward(*_forward_args(x, **flags))
    assert len(launched) == forward_launches, launched
    launched.clear()
    triton_launch.backward(*_backward_args(x, mean, invstd, train=flags["train"]))
    assert len(launched) == backward_launches, launched


def test_host_overhead_stays_small():
    """A generous bound (the target is 20 us on an idle machine): this one is shared."""
    results = host_overhead.measure(calls=20, repeats=5)
    assert set(results) == set(host_overhead._calls((1, 1, 1, 1)))
    worst = max(entry["us"] for entry in results.values())
    assert worst <= 3 * host_overhead.TARGET_US, results


def test_channel_blocks_go_on_the_unbounded_grid_axis():
    # NCHW with 16x16 maps tiles 4 channels per program: 300,000 channels are 75,000 channel
    # blocks, more than grid axes 1 and 2 allow (65,535). An expanded x needs no memory.
    x = torch.randn(1, 1, 16, 16).expand(2, 300_000, 16, 16)
    plan = triton_plans.split_work(x, split_hw=False)
    channel_blocks, rows = plan.grid
    assert channel_blocks * plan.block_c >= x.shape[1] > 65_535 * plan.block_c
    assert rows <= 65_535


@pytest.mark.skipif(not INTERPRETER, reason="runs the interpreted kernels on CPU tensors")
@pytest.mark.parametrize("train", [True, False])
def test_expanded_input_gives_the_contiguous_result(train):
    x = torch.randn(1, 3, 4, 5).expand(3, 3, 4, 5)
    expanded = triton_launch.forward(*_forward_args(x, train=train, dead=True, relu=True))
    contiguous = triton_launch.forward(
        *_forward_args(x.contiguous(), train=train, dead=True, relu=True)
    )
    for got, expected in zip(expanded, contiguous):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(not INTERPRETER, reason="runs the interpreted kernels on CPU tensors")
def test_empty_batch_gives_empty_outputs():
    x = torch.randn(0, 3, 4, 5)
    args = list(_forward_args(x, train=False, dead=True))
    y, mean, invstd = triton_launch.forward(*args)
    assert y.shape == x.shape and mean.shape == (1, 3)
    assert args[12].tolist() == [0, 0]  # seen: nothing counted
    grads = triton_launch.backward(*_backward_args(x, mean, invstd, train=False))
    assert grads[0].shape == x.shape


@pytest.mark.parametrize("op", ["zero_masked_patches", "masked_concat", "masked_concat_backward"])
def test_masking_launchers_reject_tensors_on_another_device(op):
    from avkernels.ops.masking import triton_launch as masking

    ratios = torch.full((2,), 0.5, dtype=torch.float64)
    seeds = torch.zeros(2, 2, dtype=torch.int64, device="meta")  # any device but the input's
    calls = {
        "zero_masked_patches": lambda: masking.zero_masked_patches(
            torch.randn(2, 1, 2, 4, 4), ratios, seeds, 2, 2
        ),
        "masked_concat": lambda: masking.masked_concat(
            torch.randn(2, 4), torch.randn(2, 4), ratios, None, seeds, 2, 2
        ),
        "masked_concat_backward": lambda: masking.masked_concat_backward(
            torch.randn(2, 8), ratios, None, seeds, 4, 2, 2
        ),
    }
    with pytest.raises(ValueError, match=f"{op}: seeds is on meta but the input is on cpu"):
        calls[op]()


@pytest.mark.skipif(not INTERPRETER, reason="runs the interpreted kernels on CPU tensors")
@pytest.mark.parametrize("train", [True, False])
def test_maps_split_across_programs_are_counted_once(train):
    # 32x32 maps of 2 samples: the interpreter's plan cuts each map into 2 chunks, one per
    # program. One map is alive only in its first chunk, one only in its last, the rest dead.
    x = torch.full((2, 2, 32, 32), -1.0)
    x[0, 0, 0, 0] = x[1, 1, -1, -1] = 1000.0
    plan = triton_plans.split_work(x, split_hw=False)
    assert plan.hw_splits == 2
    args = _forward_args(x, train=train, dead=True, relu=True)
    args[1].fill_(1.0)  # weight
    triton_launch.forward(*args)
    dead_count, dead_sample_count, seen = args[10:13]
    assert dead_sample_count.tolist() == [1, 1]
    assert dead_count.tolist() == [2 * 1024 - 1] * 2
    assert seen.tolist() == [2 * 1024, 2]
