"""The Triton kernels compile for the GPUs this project targets, checked on a machine without one.

CI runs the Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``), which executes them
with NumPy and accepts programs that Triton's compiler rejects (types it cannot unify, constexpr
misuse, shapes it cannot lay out) and says nothing of what the compiled code costs. Triton
compiles ahead of time for any target with its own compiler and the ``ptxas`` it ships, no GPU
needed. So this module, run as a script in a process without ``TRITON_INTERPRET`` (the
``@triton.jit`` decorator reads it at import), calls the real launchers over a grid of inputs and
flags (dtypes, memory formats, shapes, every mode of the batch-norm op pair, the masking ops)
with a stand-in driver that reports the target GPU, records each distinct kernel specialization
instead of launching it, and compiles it for ``sm_90`` (H100/H200; with ``-m slow`` also for
``sm_80`` (A100) and ``sm_89`` (L4, RTX 40xx)). The tests then check:

* every specialization compiles;
* every kernel the launchers can launch was compiled at least once;
* the compiled kernels use no local memory (register spills), at most the registers per thread
  the tile heuristics aim for (``avkernels.ops.batch_norm.triton_plans``: <= 128 on 4 warps)
  and at most an SM's
  shared memory per block;
* the element-wise batch-norm kernels move float32 data with 128-bit loads and stores where
  the layout allows it (needed for the memory roofline on a GPU).

The stand-in launches on CPU tensors: the launchers only allocate, compute launch parameters
and launch, so nothing else needs a GPU; the SM count of an H100 SXM (132) replaces the CUDA
query that sizes the grids.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.scripts import script_environment

# Compute capability: (SM count that sizes the grids, the most shared memory a block can have).
TARGETS = {
    90: (132, 227 * 1024),  # H100 SXM; H200
    80: (108, 163 * 1024),  # A100
    89: (58, 99 * 1024),
}  # L4
MAX_REGISTERS = 128  # what the batch-norm launcher's 1024-element tiles on 4 warps aim for
COMPILE_TIMEOUT_S = 900

# --- the script (runs in the subprocess) ---------------------------------------------------------


def _pretend_gpu(arch: int, hook):
    """Make Triton see an sm_<arch> GPU that is not there: a driver that reports it, ``hook``
    called instead of each launch (Triton's jit_cache_hook), and the launcher's grids sized for
    that GPU's SM count. Returns the compile target."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from avkernels.ops.batch_norm import triton_plans as batch_norm_plans

    target = GPUTarget("cuda", arch, 32)

    class CompileOnlyDriver:  # what JITFunction.run asks of the driver before compiling
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

    driver.set_active(CompileOnlyDriver())
    knobs.runtime.jit_cache_hook = hook
    batch_norm_plans.target_programs = lambda device: (
        batch_norm_plans.PROGRAMS_PER_SM * TARGETS[arch][0]
    )
    return target


def _record_launches(arch: int, shard: int, shards: int) -> dict:
    """Compiles every specialization that launches[shard::shards] ask for (see the docstring)."""
    import torch
    import triton
    from triton.runtime.jit import JITFunction

    from avkernels.ops.batch_norm import triton_kernels as batch_norm_kernels
    from avkernels.ops.batch_norm import triton_launch as batch_norm_launch
    from avkernels.ops.masking import triton_kernels as masking_kernels
    from avkernels.ops.masking import triton_launch as masking_launch

    tools = _nvidia_tools(triton)
    records: dict[str, dict] = {}
    launch = ""  # the launch being made, named in its records

    def compile_instead_of_launch(*, key, fn, compile, **_) -> bool:
        if str(key) not in records:
            records[str(key)] = _compile(fn.jit_function, compile)
        return True  # handled: JITFunction.run returns without launching

    def _compile(function: JITFunction, spec: dict) -> dict:
        record = {
            "kernel": function.__name__,
            "launch": launch,
            "constants": {
                function.arg_names[index]: str(value)
                for (index, *_), value in spec["constants"].items()
            },
            "x_type": next(iter(spec["signature"].values())),
        }
        try:
            source = triton.compiler.ASTSource(
                function, spec["signature"], spec["constants"], spec["configs"][0]
            )
            compiled = triton.compile(
                source,
                target=target,
                options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]},
            )
        except Exception as error:  # noqa: BLE001 - reported per specialization by the tests
            record["error"] = f"{type(error).__name__}: {error}"
            return record
        record.update(_resources(compiled.asm["cubin"], tools), error=None)
        return record

    target = _pretend_gpu(arch, compile_instead_of_launch)
    # `launch` is read by compile_instead_of_launch: it names the records each launch makes.
    launches = _launches(torch, batch_norm_launch, masking_launch)[shard::shards]
    for launch, make in launches:  # noqa: B007
        make()
    launchable = sorted(
        name
        for module in (batch_norm_kernels, masking_kernels)
        for name, value in vars(module).items()
        if isinstance(value, JITFunction) and name.endswith("_kernel")
    )
    return {"records": list(records.values()), "launchable": launchable}


def _nvidia_tools(triton) -> Path:
    """The folder of the ptxas and cuobjdump that Triton's wheel ships."""
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _resources(cubin: bytes, tools: Path) -> dict:
    """Registers, local memory and shared memory (cuobjdump) and the widest global loads and
    stores (SASS) of a compiled kernel."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = _run([tools / "cuobjdump", "-res-usage", file.name])
        sass = _run([tools / "cuobjdump", "-sass", file.name])
    fields = dict(re.findall(r"\b(REG|SHARED|LOCAL):(\d+)", usage))
    widths = {
        op: sorted(
            {
                int(bits or 32)
                for bits in re.findall(
                    rf"\b{op}\.E(?:\.[A-Z]+)*?(?:\.(64|128))?(?:\.[A-Z]+)*\s", sass
                )
            }
        )
        for op in ("LDG", "STG")
    }
    return {
        "registers": int(fields["REG"]),
        "local": int(fields["LOCAL"]),
        "shared": int(fields["SHARED"]),
        "load_bits": widths["LDG"],
        "store_bits": widths["STG"],
    }


def _run(command: list) -> str:
    return subprocess.run(
        [str(part) for part in command], check=True, capture_output=True, text=True
    ).stdout


# Batch-norm modes: which optional tensors are given, and the flags. Each is launched forward and
# backward (the backward with the forward's statistics and flags).
BN_MODES = {
    # parts: also the synchronised parts (batch_norm_stats, _bwd_reduce, _bwd_elemt).
    "train": dict(params=("weight", "bias"), running=True, dead=True, parts=True),
    "train-relu-no-running": dict(params=("weight", "bias"), relu=True, dead=True),
    "train-no-affine": dict(params=(), running=True),
    "train-weight-only-relu": dict(params=("weight",), running=True, relu=True, dead=True),
    "eval": dict(params=("weight", "bias"), running=True, eval=True),
    "eval-relu-dead": dict(
        params=("weight", "bias"), running=True, eval=True, relu=True, dead=True
    ),
    "abri-train": dict(
        params=("weight", "bias", "abri_weight", "abri_bias"),
        running=True,
        abri="scalar",
        dead=True,
        relu=True,
    ),
    "abri-eval-per-channel": dict(
        params=("weight", "bias", "abri_weight", "abri_bias"),
        running=True,
        abri="per_channel",
        eval=True,
        dead=True,
    ),
}
# (shape, memory format, dtype, modes): the GPU benchmark shapes in both formats, in float32
# with every mode and in a 16-bit dtype with the modes that set the most flags; too few samples
# to fill the GPU (maps split across programs); odd sizes; float64 (gradcheck); and views whose
# H and W do not merge into one stride.
ALL_MODES = tuple(BN_MODES)
MANY_FLAGS = ("train", "eval-relu-dead", "abri-train", "abri-eval-per-channel")
BN_GEOMETRIES = (
    ((64, 64, 56, 56), "nchw", "float32", ALL_MODES),
    ((64, 64, 56, 56), "channels_last", "float32", ALL_MODES),
    ((64, 512, 7, 7), "nchw", "float32", ALL_MODES),
    ((64, 512, 7, 7), "channels_last", "float32", ALL_MODES),
    ((64, 64, 56, 56), "nchw", "bfloat16", MANY_FLAGS),
    ((64, 64, 56, 56), "channels_last", "bfloat16", MANY_FLAGS),
    ((64, 512, 7, 7), "nchw", "float16", MANY_FLAGS),
    ((64, 512, 7, 7), "channels_last", "float16", MANY_FLAGS),
    ((2, 64, 56, 56), "nchw", "float32", ("train", "eval-relu-dead", "abri-train")),
    ((2, 64, 56, 56), "channels_last", "float32", ("train", "eval-relu-dead", "abri-train")),
    ((3, 5, 7, 11), "nchw", "float32", ("train", "abri-eval-per-channel")),
    ((3, 5, 7, 11), "nchw", "float64", ("train", "abri-eval-per-channel")),
    ((3, 5, 7, 11), "channels_last", "float64", ("train", "eval-relu-dead")),
    ((4, 16, 12, 24), "strided", "float32", ("train", "eval-relu-dead")),
    ((4, 16, 12, 24), "strided", "bfloat16", ("train",)),
)


def _launches(torch, batch_norm_kernels, masking_kernels) -> list:
    """(name, function) of every launch of the grid."""
    launches = []
    for shape, layout, dtype, modes in BN_GEOMETRIES:
        for mode in modes:
            launches.append(
                (
                    f"batch norm {mode} {shape} {layout} {dtype}",
                    functools.partial(
                        _launch_pair,
                        torch,
                        batch_norm_kernels,
                        shape,
                        layout,
                        getattr(torch, dtype),
                        **BN_MODES[mode],
                    ),
                )
            )
    for dtype in ("float32", "bfloat16", "float16", "float64"):
        launches.append(
            (
                f"masking {dtype}",
                functools.partial(_masking_launches, torch, masking_kernels, getattr(torch, dtype)),
            )
        )
    return launches


def _activation(torch, shape, layout, dtype):
    if layout == "strided":  # every other column of a wider tensor: H, W do not merge
        n, c, h, w = shape
        return torch.empty((n, c, h, 2 * w), dtype=dtype)[..., ::2]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return torch.empty(shape, dtype=dtype).contiguous(memory_format=memory_format)


def _launch_pair(
    torch,
    kernels,
    shape,
    layout,
    dtype,
    *,
    params,
    running=False,
    eval=False,
    relu=False,
    dead=False,
    abri=None,
    parts=False,
) -> None:
    x = _activation(torch, shape, layout, dtype)
    channels = x.shape[1]

    # Parameters in x's dtype, float32 for float16/bfloat16 x: nn.BatchNorm2d's dtype mixes.
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def vector(vector_dtype=state_dtype):
        return torch.ones(channels, dtype=vector_dtype)

    given = {name: vector() for name in params}
    if abri is not None:
        given["abri_alpha"] = (
            vector() if abri == "per_channel" else torch.ones(1, dtype=state_dtype)
        )
    stats = {}
    if running:
        stats = {"running_mean": vector(), "running_var": vector()}
        if abri is not None:
            stats.update(abri_running_mean=vector(), abri_running_var=vector())
    counters = {}
    if dead:
        counters = {
            "dead_count": vector(torch.int64),
            "dead_sample_count": vector(torch.int64),
            "seen": torch.zeros(2, dtype=torch.int64),
        }
    affine = [
        given.get(name) for name in ("weight", "bias", "abri_weight", "abri_bias", "abri_alpha")
    ]
    y, mean, invstd = kernels.forward(
        x,
        *affine,
        *(
            stats.get(name)
            for name in ("running_mean", "running_var", "abri_running_mean", "abri_running_var")
        ),
        *(counters.get(name) for name in ("dead_count", "dead_sample_count", "seen")),
        not eval,
        0.1,
        1e-5,
        relu,
    )
    kernels.backward(torch.empty_like(y), x, *affine, mean, invstd, not eval, relu)
    if parts:
        kernels.stats(x)
        sums, *_ = kernels.backward_reduce(torch.empty_like(y), x, *affine, mean, invstd, relu)
        kernels.backward_elemt(torch.empty_like(y), x, *affine, mean, invstd, sums, relu)


def _masking_launches(torch, kernels, dtype) -> None:
    seeds = torch.zeros(8, 2, dtype=torch.int64)
    ratios = torch.full((8,), 0.5, dtype=torch.float64)
    # (B, C, T, H, W) input patches: audio spectrograms (one frame) and video frames
    for shape, patch in (((8, 1, 1, 1024, 128), (32, 16)), ((8, 3, 3, 224, 224), (22, 22))):
        frame_seeds = torch.zeros(shape[0], shape[2], dtype=torch.int64)  # one per frame
        kernels.zero_masked_patches(torch.empty(shape, dtype=dtype), ratios, frame_seeds, *patch)
    a, v = torch.empty(8, 512, dtype=dtype), torch.empty(8, 512, dtype=dtype)
    for ratio_a, ratio_v in ((ratios, ratios), (ratios, None), (None, ratios)):
        out = kernels.masked_concat(a, v, ratio_a, ratio_v, seeds, 16, 16)
        kernels.masked_concat_backward(out, ratio_a, ratio_v, seeds, 512, 16, 16)


# The specialisation sweep: every batch size up to 64 at several map sizes, fixed C, dtype and
# flags, in both memory formats. Each kernel may compile at most VARIANTS_PER_MAP_SIZE
# variants per map size of the sweep, whatever N: N and the work split that follows from it are
# runtime arguments (do_not_specialize), and the finalize tiles do not depend on them. (Measured:
# 1 to 3 variants per kernel and memory format over the whole sweep; 6 to 12 before.)
SWEEP_BATCHES = range(1, 65)
SWEEP_MAPS = ((7, 7), (14, 14), (28, 28), (56, 56))
VARIANTS_PER_MAP_SIZE = 1


def _count_specializations() -> dict:
    """Distinct specialisations per (kernel, memory format) over the sweep, not compiled."""
    import torch

    from avkernels.ops.batch_norm import triton_launch as batch_norm_launch

    keys: dict[str, set] = {}
    layout = ""

    def record(*, key, fn, **_) -> bool:
        keys.setdefault(f"{fn.jit_function.__name__} {layout}", set()).add(str(key))
        return True  # nothing compiled or launched

    _pretend_gpu(90, record)
    for layout in ("nchw", "channels_last"):  # noqa: B007 - read by record
        for height, width in SWEEP_MAPS:
            for batch in SWEEP_BATCHES:
                _launch_pair(
                    torch,
                    batch_norm_launch,
                    (batch, 64, height, width),
                    layout,
                    torch.float32,
                    **BN_MODES["train-weight-only-relu"],
                )
    return {name: len(variants) for name, variants in keys.items()}


def main() -> None:
    if sys.argv[1] == "count":
        json.dump(_count_specializations(), sys.stdout)
        return
    arch, shard, shards = map(int, sys.argv[1:4])
    json.dump(_record_launches(arch, shard, shards), sys.stdout)


# --- the tests ----------------------------------------------------------------------------------


@pytest.fixture(
    scope="module",
    params=[90, pytest.param(80, marks=pytest.mark.slow), pytest.param(89, marks=pytest.mark.slow)],
    ids=lambda arch: f"sm_{arch}",
)
def compiled(request) -> dict:
    """The records of every shard's subprocess (compiling is single-threaded: one per core)."""
    tools = _nvidia_tools(pytest.importorskip("triton"))
    missing = [tool for tool in ("ptxas", "cuobjdump") if not (tools / tool).exists()]
    if missing:
        pytest.skip(f"this triton install has no {' or '.join(missing)} in {tools}")
    environment = script_environment(TRITON_INTERPRET=None)
    shards = max(1, min(4, os.cpu_count() or 1))
    arch = request.param
    runs = [
        subprocess.Popen(
            [sys.executable, __file__, str(arch), str(shard), str(shards)],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for shard in range(shards)
    ]
    results = [run.communicate(timeout=COMPILE_TIMEOUT_S) for run in runs]
    for run, (_, stderr) in zip(runs, results):
        assert run.returncode == 0, f"the compile script failed:\n{stderr[-4000:]}"
    outputs = [json.loads(stdout) for stdout, _ in results]
    return {
        "arch": arch,
        "records": [r for output in outputs for r in output["records"]],
        "launchable": outputs[0]["launchable"],
    }


def _describe(record: dict) -> str:
    constants = ", ".join(f"{k}={v}" for k, v in record["constants"].items())
    return f"{record['kernel']}({constants}) from {record['launch']}"


def test_every_specialization_compiles(compiled):
    failures = [f"{_describe(r)}: {r['error']}" for r in compiled["records"] if r["error"]]
    assert not failures, (
        f"{len(failures)} of {len(compiled['records'])} did not compile:\n"
        + "\n\n".join(failures[:5])
    )


def test_every_kernel_is_compiled(compiled):
    assert compiled["launchable"], "no Triton kernels found"
    compiled_names = {r["kernel"] for r in compiled["records"]}
    assert set(compiled["launchable"]) <= compiled_names, (
        f"never launched by the grid: {sorted(set(compiled['launchable']) - compiled_names)}"
    )


def test_no_spills_and_resources_fit(compiled):
    built = [r for r in compiled["records"] if not r["error"]]
    assert built
    spilling = [f"{_describe(r)}: {r['local']} bytes of local memory" for r in built if r["local"]]
    assert not spilling, "register spills:\n" + "\n".join(spilling[:5])
    # float64 (gradcheck, not a training dtype) takes twice the registers per value.
    heavy = [
        f"{_describe(r)}: {r['registers']} registers"
        for r in built
        if r["registers"] > MAX_REGISTERS and r["x_type"] != "*fp64"
    ]
    assert not heavy, f"more than {MAX_REGISTERS} registers per thread:\n" + "\n".join(heavy[:5])
    too_much = [_describe(r) for r in built if r["shared"] > TARGETS[compiled["arch"]][1]]
    assert not too_much, (
        f"more shared memory than an sm_{compiled['arch']} block can have:\n"
        + "\n".join(too_much[:5])
    )


# Launches whose tensors are 16-byte aligned along their contiguous axis (H*W = 3136 positions,
# or C = 64 and 512 channels), and the kernels that stream them: each must move whole 128-bit
# vectors (4 float32 or 8 bfloat16 values), as a roofline-bound kernel on a GPU has to.
VECTOR_LAUNCHES = (
    "(64, 64, 56, 56) nchw",
    "(64, 64, 56, 56) channels_last",
    "(64, 512, 7, 7) channels_last",
)
STREAMING_KERNELS = {  # kernel: whether it also writes an activation-sized output
    "fwd_partial_stats_kernel": False,
    "fwd_normalize_kernel": True,
    "bwd_partial_sums_kernel": False,
    "bwd_grad_x_kernel": True,
}


def test_aligned_activations_move_in_128_bit_vectors(compiled):
    checked = [
        r
        for r in compiled["records"]
        if not r["error"]
        and r["kernel"] in STREAMING_KERNELS
        and r["x_type"] in ("*fp32", "*bf16")
        and any(launch in r["launch"] for launch in VECTOR_LAUNCHES)
    ]
    assert {r["kernel"] for r in checked} == set(STREAMING_KERNELS)
    narrow = [
        f"{_describe(r)}: loads {r['load_bits']}, stores {r['store_bits']}"
        for r in checked
        if 128 not in r["load_bits"]
        or (STREAMING_KERNELS[r["kernel"]] and 128 not in r["store_bits"])
    ]
    assert not narrow, "no 128-bit global access:\n" + "\n".join(narrow[:5])


def test_batch_sizes_compile_a_bounded_number_of_variants():
    pytest.importorskip("triton")
    run = subprocess.run(
        [sys.executable, __file__, "count"],
        env=script_environment(TRITON_INTERPRET=None),
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT_S,
    )
    assert run.returncode == 0, f"the count script failed:\n{run.stderr[-4000:]}"
    counts = json.loads(run.stdout)
    assert len(counts) == 2 * 4, counts  # the mode's 4 kernels, in 2 memory formats
    bound = VARIANTS_PER_MAP_SIZE * len(SWEEP_MAPS)
    over = {name: count for name, count in counts.items() if count > bound}
    assert not over, (
        f"more than {bound} variants for {len(SWEEP_BATCHES)} batch sizes x {len(SWEEP_MAPS)} "
        f"map sizes: {over}"
    )


if __name__ == "__main__":
    main()
