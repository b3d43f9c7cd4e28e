"""TrackedBN against PyTorch batch norm on ResNet-18 BN shapes, as ratios from the same run.

Per input setting (shape, dtype, memory format, device; training forward+backward or eval
forward) two cases:

- BN: ``TrackedBN`` (dead-channel statistics on) against ``nn.BatchNorm2d`` (target on CPU:
  at most 1.0x, i.e. the statistics come free) and against ``nn.BatchNorm2d`` followed by a
  separate PyTorch computation of the same statistics.
- BN+ReLU: ``TrackedBN(activation="relu")`` against ``nn.BatchNorm2d`` followed by an in-place
  ReLU, as torchvision's ResNet does (target on CPU: at most 0.85x), and against
  ``torch.compile`` of the same BN -> ReLU.

Every implementation is first checked against an eager PyTorch reference (BN, dead counts
computed from its output, ReLU): output, gradients of input/weight/bias, running statistics and
the dead counts, whichever the implementation produces. Training steps backpropagate a real,
materialised gradient (``randn`` in the output's memory format), never ``y.sum()``
(docs/DESIGN.md, "Performance model").
GPU cases also report each time as a fraction of the memory roofline (3-pass forward, 5-pass
backward, 2-pass eval) at the GPU's measured copy bandwidth.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from avkernels import TrackedBN
from benchmarks.harness import Case, Comparison, Implementation, Result, Step, assert_results_close

CPU_SHAPES = ((32, 64, 56, 56), (32, 128, 28, 28), (32, 512, 7, 7))
GPU_SHAPES = ((64, 64, 56, 56), (64, 128, 28, 28), (64, 256, 14, 14), (64, 512, 7, 7))
QUICK_SHAPES = ((4, 32, 12, 12),)
MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# Issue targets, measured on the CPU only: candidate time / baseline time at most this.
CPU_TARGET_TRACKED = 1.0  # TrackedBN with statistics vs nn.BatchNorm2d without them
CPU_TARGET_RELU = 0.85  # TrackedBN(activation="relu") vs nn.BatchNorm2d -> ReLU
GPU_CALLS_PER_ROUND = 10
# Memory passes over the activation (docs/DESIGN.md, "Performance model"): forward 3
# (statistics, then read + write), backward 5 (reduce dy and x, then read both and write dx);
# eval 2. ReLU adds none.
TRAIN_PASSES, EVAL_PASSES = 3 + 5, 2
# Inputs keep every pre-activation value at least this far from 0, so that the ReLU mask and the
# dead counts have one right answer: within float32 rounding of 0 a correct kernel may land on
# either side (measured: 2 of 6.4M gradients of a (32,64,56,56) step, each flipping a parameter
# gradient by ~4). Rounding at the threshold is the unit tests' business, not the benchmarks'.
RELU_MARGIN = 1e-3
RELU_NUDGE = 0.1  # how far such an input value is moved (well above a bfloat16 step at |x| < 4)
EPS = 1e-5  # nn.BatchNorm2d's default
CLOSED_CHANNEL_STRIDE = 8  # every 8th channel gets gamma = 0, beta < 0: dead for every sample


@dataclass(frozen=True)
class Setting:
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    memory_format: str  # a key of MEMORY_FORMATS
    device: str
    training: bool

    def describe(self) -> tuple[str, str]:
        """(test-id part, title part)."""
        mode = "train" if self.training else "eval"
        dtype = str(self.dtype).removeprefix("torch.")
        size = "x".join(map(str, self.shape))
        return (
            f"{mode}-{size}-{dtype}-{self.memory_format}-{self.device}",
            f"{'train fwd+bwd' if self.training else 'eval fwd'} ({size}) {dtype} "
            f"{self.memory_format} {self.device}",
        )


@dataclass(frozen=True)
class Inputs:
    x: Tensor
    grad_y: Tensor  # the materialised output gradient, in y's memory format
    state: dict[str, Tensor]  # weight, bias and running statistics every layer starts from


@functools.lru_cache(maxsize=1)  # a setting's tests run one after another: keep only its inputs
def _inputs(setting: Setting) -> Inputs:
    generator = torch.Generator().manual_seed(0)
    channels = setting.shape[1]

    def randn(*size: int) -> Tensor:
        return torch.randn(size, generator=generator)

    weight, bias = 1 + 0.5 * randn(channels), 0.5 * randn(channels)
    weight[::CLOSED_CHANNEL_STRIDE], bias[::CLOSED_CHANNEL_STRIDE] = 0.0, -1.0
    state = {
        "weight": weight,
        "bias": bias,
        "running_mean": 0.1 * randn(channels),
        "running_var": 0.5 + torch.rand(channels, generator=generator),
        "num_batches_tracked": torch.tensor(0),
    }

    def activation(values: Tensor) -> Tensor:
        return values.to(setting.device, setting.dtype).contiguous(
            memory_format=MEMORY_FORMATS[setting.memory_format]
        )

    x = _off_relu_boundary(randn(*setting.shape), state, setting)
    grad_y = activation(randn(*setting.shape))
    return Inputs(
        activation(x).requires_grad_(setting.training),
        grad_y,
        {k: v.to(setting.device) for k, v in state.items()},
    )


def _off_relu_boundary(x: Tensor, state: dict[str, Tensor], setting: Setting) -> Tensor:
    """``x`` (in the setting's dtype) with each value whose pre-activation is within
    RELU_MARGIN of 0 moved RELU_NUDGE away from it (a few in 10^3; the statistics barely move)."""
    for _ in range(5):  # a move shifts the batch statistics slightly: check again
        x = x.to(setting.dtype)  # the values the implementations will see
        x64 = x.double()
        if setting.training:
            var, mean = torch.var_mean(x64, dim=(0, 2, 3), correction=0)
        else:
            mean, var = state["running_mean"].double(), state["running_var"].double()
        scale = state["weight"].double() * torch.rsqrt(var + EPS)
        shift = state["bias"].double() - mean * scale
        z = x64 * scale[:, None, None] + shift[:, None, None]
        near = z.abs() < RELU_MARGIN
        if not near.any():
            return x
        away = torch.where(z >= 0, 1.0, -1.0) * torch.sign(scale)[:, None, None]
        x = torch.where(near, x64 + RELU_NUDGE * away, x64)
    raise RuntimeError(f"could not keep the inputs of {setting} off the ReLU threshold")


def _layer(setting: Setting, layer_type: type, **kwargs) -> nn.Module:
    layer = layer_type(setting.shape[1], device=setting.device, **kwargs)
    layer.load_state_dict(_inputs(setting).state)
    return layer.train(setting.training)


def _step(
    setting: Setting,
    forward: Callable[[Tensor], Tensor],
    layer: nn.Module,
    counters: dict[str, Tensor],
) -> Step:
    """One call: training forward + backward of a real gradient, or an eval forward.

    The result holds the output, the gradients, the running statistics and ``counters`` (the
    dead-count buffers, by reference: they are read right after the first call).
    """
    inputs = _inputs(setting)
    x, grad_y = inputs.x, inputs.grad_y
    if not setting.training:

        def step() -> Result:
            with torch.no_grad():
                return {"y": forward(x), **counters}

        return step

    wrt = (x, layer.weight, layer.bias)

    def step() -> Result:
        y = forward(x)
        grad_x, grad_weight, grad_bias = torch.autograd.grad(y, wrt, grad_y)
        return {
            "y": y,
            "grad_x": grad_x,
            "grad_weight": grad_weight,
            "grad_bias": grad_bias,
            "running_mean": layer.running_mean,
            "running_var": layer.running_var,
            **counters,
        }

    return step


def _tracked_bn(setting: Setting, relu: bool) -> Step:
    layer = _layer(setting, TrackedBN, activation="relu" if relu else None, track_dead=True)
    counters = {
        "dead_count": layer.dead_count,
        "dead_sample_count": layer.dead_sample_count,
        "seen": layer.seen,
    }
    return _step(setting, layer, layer, counters)


def _torch_bn(
    setting: Setting, relu: bool, dead_counts: bool = False, compiled: bool = False
) -> Step:
    """nn.BatchNorm2d, optionally followed by PyTorch dead counts and an in-place ReLU."""
    layer = _layer(setting, nn.BatchNorm2d)
    n, channels, h, w = setting.shape
    counters = {}
    if dead_counts:
        counters = {
            name: torch.zeros(size, dtype=torch.long, device=setting.device)
            for name, size in (
                ("dead_count", channels),
                ("dead_sample_count", channels),
                ("seen", 2),
            )
        }
        seen_per_call = torch.tensor([n * h * w, n], device=setting.device)

    def forward(x: Tensor) -> Tensor:
        y = layer(x)
        if dead_counts:
            pre_activation = y.detach()
            counters["dead_count"] += (pre_activation <= 0).sum(dim=(0, 2, 3))
            counters["dead_sample_count"] += (pre_activation.amax(dim=(2, 3)) <= 0).sum(dim=0)
            counters["seen"] += seen_per_call
        return torch.relu_(y) if relu else y  # in place, as torchvision's ResNet

    if compiled:
        forward = torch.compile(forward, fullgraph=True, dynamic=False)
    return _step(setting, forward, layer, counters)


def _case(setting: Setting, relu: bool) -> Case:
    setting_id, setting_title = setting.describe()
    on_cpu = setting.device == "cpu"
    if relu:
        implementations = {
            "bn_relu": Implementation("nn.BatchNorm2d -> ReLU", lambda: _torch_bn(setting, True)),
            "compiled_bn_relu": Implementation(
                "torch.compile(BN -> ReLU)", lambda: _torch_bn(setting, True, compiled=True)
            ),
            "tracked_relu": Implementation(
                'TrackedBN(activation="relu")', lambda: _tracked_bn(setting, True)
            ),
        }
        comparisons = (
            Comparison("tracked_relu", "bn_relu", CPU_TARGET_RELU if on_cpu else None),
            Comparison("tracked_relu", "compiled_bn_relu"),
        )
    else:
        implementations = {
            "bn": Implementation("nn.BatchNorm2d", lambda: _torch_bn(setting, False)),
            "bn_dead": Implementation(
                "nn.BatchNorm2d + PyTorch dead counts",
                lambda: _torch_bn(setting, False, dead_counts=True),
            ),
            "tracked": Implementation("TrackedBN", lambda: _tracked_bn(setting, False)),
        }
        comparisons = (
            Comparison("tracked", "bn", CPU_TARGET_TRACKED if on_cpu else None),
            Comparison("tracked", "bn_dead"),
        )
    n, _, h, w = setting.shape
    passes = TRAIN_PASSES if setting.training else EVAL_PASSES
    return Case(
        id=f"{'relu' if relu else 'bn'}-{setting_id}",
        title=f"{'BN+ReLU' if relu else 'BN'} {setting_title}",
        device=torch.device(setting.device),
        implementations=implementations,
        reference=lambda: _torch_bn(setting, relu, dead_counts=True),
        comparisons=comparisons,
        check=functools.partial(assert_results_close, atol=_sum_tolerance(n * h * w)),
        roofline_bytes=passes * setting.dtype.itemsize * setting.shape[1] * n * h * w,
        calls_per_round=1 if on_cpu else GPU_CALLS_PER_ROUND,
    )


def _sum_tolerance(per_channel: int) -> dict[str, float]:
    """Absolute tolerance of the parameter gradients, sums over ``per_channel`` = N*H*W values.

    The reference's own float32 sums are off by up to ~n * eps: PyTorch's CPU channels_last BN
    backward adds sequentially (measured: 1.5e-3 off the float64 value for 25,088 values, 20x
    TrackedBN's error). A wrong formula is off by O(1) or more.
    """
    return {"grad_weight": 1e-6 * per_channel, "grad_bias": 1e-6 * per_channel}


def _cases(shapes, dtypes, device: str) -> list[Case]:
    return [
        _case(Setting(shape, dtype, memory_format, device, training), relu)
        for shape in shapes
        for dtype in dtypes
        for memory_format in MEMORY_FORMATS
        for training in (True, False)
        for relu in (False, True)
    ]


def cpu_cases(quick: bool) -> list[Case]:
    return _cases(QUICK_SHAPES if quick else CPU_SHAPES, (torch.float32,), "cpu")


def gpu_cases(quick: bool) -> list[Case]:
    return _cases(QUICK_SHAPES if quick else GPU_SHAPES, (torch.float32, torch.bfloat16), "cuda")


@pytest.mark.bench_cases(factory=cpu_cases)
def test_batch_norm_cpu(compare, case, implementation):
    compare(case, implementation)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU batch-norm benchmarks need CUDA (torch.cuda.is_available() is False)",
)
@pytest.mark.bench_cases(factory=gpu_cases)
def test_batch_norm_gpu(compare, case, implementation):
    compare(case, implementation)
