"""Host time of the CUDA path's Python, without a GPU (docs/DESIGN.md, "Performance model").

Runs the real launchers of ``avkernels.ops.batch_norm.triton_launch`` (the CUDA kernels of
``batch_norm_fwd`` / ``batch_norm_bwd``) on CPU tensors, with every Triton launch replaced by a
no-op and the device query that sizes the grids by a constant (an H100's 132 SMs). What is left
is what a call costs the host before Triton's own per-launch dispatch: argument checks, launch
planning, allocations (on CPU, about as cheap as the caching allocator's) and argument packing.
A whole BN kernel at ResNet-18 shapes takes 1-26 us on an H100, so this must stay well under
that for the GPU path not to be host-bound.

    python benchmarks/host_overhead.py          # per-mode us; exit 1 above the target
    python benchmarks/host_overhead.py --cuda   # on a GPU: real launches, against BatchNorm2d

The last line reads ``worst host overhead X us per call (target <= 20)``. With ``--cuda`` the
launches are real: ``TrackedBN`` and ``nn.BatchNorm2d`` are timed on a map so small that the
GPU finishes each kernel before the host has launched the next, so the time per call is the
host's (dispatch and Triton's launch included), and the profiler counts kernels per call.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: import this checkout's avkernels
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avkernels.ops.batch_norm import triton_launch, triton_plans  # noqa: E402

TARGET_US = 20.0
H100_SMS = 132
# ResNet-18 BN shapes at batch 32: the largest map, and the deepest layer.
SHAPES = ((32, 64, 56, 56), (32, 512, 7, 7))


class _NoOpKernel:
    """Stands in for a ``@triton.jit`` function: ``kernel[grid](*args, **options)`` counts the
    launch and returns."""

    def __init__(self, name: str, launches: list[str]):
        self.name, self._launches = name, launches

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **options) -> None:
        self._launches.append(self.name)


@contextlib.contextmanager
def stubbed_launches() -> Iterator[list[str]]:
    """Replaces every kernel the batch-norm launchers use by a no-op, and the grid-sizing device
    query by an H100's figure; yields the list of kernel names launched meanwhile. The launch
    plans made meanwhile (H100 grids) are dropped on exit."""
    launches: list[str] = []
    saved = {name: value for name, value in vars(triton_launch).items() if name.endswith("_kernel")}
    target_programs = triton_plans.target_programs
    try:
        for name in saved:
            setattr(triton_launch, name, _NoOpKernel(name, launches))
        triton_plans.target_programs = lambda device: triton_plans.PROGRAMS_PER_SM * H100_SMS
        triton_launch.clear_plans()
        yield launches
    finally:
        for name, value in saved.items():
            setattr(triton_launch, name, value)
        triton_plans.target_programs = target_programs
        triton_launch.clear_plans()


def _calls(shape: tuple[int, ...]) -> dict[str, Callable[[], object]]:
    """One zero-argument call per mode: the forward or backward launcher on fixed inputs."""
    x = torch.randn(shape)
    channels = shape[1]

    def vector(value: float = 1.0, dtype=torch.float32):
        return torch.full((channels,), value, dtype=dtype)

    affine = (vector(), vector(0.0), None, None, None)
    abri_affine = (vector(), vector(0.0), vector(), vector(0.0), torch.full((1,), 0.5))
    running = (vector(0.0), vector(), None, None)
    abri_running = (vector(0.0), vector(), vector(0.0), vector())
    no_dead = (None, None, None)
    dead = (vector(0, torch.int64), vector(0, torch.int64), torch.zeros(2, dtype=torch.int64))

    def forward(params, stats, counters, train, relu):
        return lambda: triton_launch.forward(x, *params, *stats, *counters, train, 0.1, 1e-5, relu)

    def backward(params, train, relu, rows=1):
        grad_y = torch.randn(shape)
        mean, invstd = torch.zeros(rows, channels), torch.ones(rows, channels)
        return lambda: triton_launch.backward(grad_y, x, *params, mean, invstd, train, relu)

    return {
        "train fwd": forward(affine, running, no_dead, True, False),
        "train fwd dead+relu": forward(affine, running, dead, True, True),
        "train fwd abri dead+relu": forward(abri_affine, abri_running, dead, True, True),
        "eval fwd": forward(affine, running, no_dead, False, False),
        "eval fwd dead+relu": forward(affine, running, dead, False, True),
        "eval fwd abri": forward(abri_affine, abri_running, no_dead, False, False),
        "train bwd": backward(affine, True, False),
        "train bwd relu": backward(affine, True, True),
        "train bwd abri": backward(abri_affine, True, True),
        "eval bwd": backward(affine, False, False),
        "eval bwd abri": backward(abri_affine, False, False, rows=2),
    }


def _best_us(call: Callable[[], object], calls: int, repeats: int) -> float:
    """The fastest over ``repeats`` of the mean time of ``calls`` back-to-back calls, in us: on
    a shared machine other processes only ever add time, so the minimum estimates the cost."""
    call()  # warm-up: the launch plan
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        means.append((time.perf_counter() - start) / calls * 1e6)
    return min(means)


def measure(calls: int = 100, repeats: int = 15) -> dict[str, dict[str, float | int]]:
    """Per mode: the worst host time over :data:`SHAPES` (us per call) and launches per call."""
    results: dict[str, dict[str, float | int]] = {}
    with stubbed_launches() as launches:
        for shape in SHAPES:
            for mode, call in _calls(shape).items():
                launches.clear()
                call()
                launch_count = len(launches)
                us = _best_us(call, calls, repeats)
                entry = results.setdefault(mode, {"us": 0.0, "launches": launch_count})
                entry["us"] = max(entry["us"], us)
    return results


def _cuda_calls(module: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    def train_step():
        (grad,) = torch.autograd.grad(module(x).sum(), x)
        return grad

    def eval_forward():
        with torch.no_grad():
            return module.eval()(x)

    return {"train fwd": lambda: module.train()(x), "train fwd+bwd": train_step,
            "eval fwd": eval_forward}  # fmt: skip


def _kernels_per_call(call: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        call()
        torch.cuda.synchronize()
    return sum(1 for event in profiler.events() if event.device_type.name == "CUDA")


def measure_cuda(calls: int = 200, repeats: int = 5) -> dict[str, dict[str, float | int]]:
    """Per (module, mode): host us per call with real launches, and CUDA kernels per call."""
    from avkernels import TrackedBN

    x = torch.randn(2, 64, 4, 4, device="cuda", requires_grad=True)
    modules = {"TrackedBN": TrackedBN(64), "nn.BatchNorm2d": torch.nn.BatchNorm2d(64)}
    results = {}
    for label, module in modules.items():
        for mode, call in _cuda_calls(module.cuda(), x).items():

            def synchronised(call=call):
                call()
                torch.cuda.synchronize()

            kernels = _kernels_per_call(call)
            us = _best_us(call, calls, repeats)  # queued launches: host-bound
            results[f"{label} {mode}"] = {"us": us, "launches": kernels}
            results[f"{label} {mode}"]["synchronised_us"] = _best_us(synchronised, calls, repeats)
    return results


def main() -> int:
    torch.set_num_threads(1)
    if "--cuda" in sys.argv[1:]:
        for name, entry in measure_cuda().items():
            print(f"{name:<32} {entry['us']:7.1f} us host  {entry['synchronised_us']:7.1f} us "
                  f"with sync  {entry['launches']} CUDA kernels")  # fmt: skip
        return 0
    results = measure()
    for mode, entry in results.items():
        print(f"{mode:<26} {entry['us']:7.1f} us  {entry['launches']} launches")
    worst = max(entry["us"] for entry in results.values())
    print(f"worst host overhead {worst:.1f} us per call (target <= {TARGET_US:g})")
    return 0 if worst <= TARGET_US else 1


if __name__ == "__main__":
    sys.exit(main())
