"""The C++ batch-norm kernels' instruction-set builds agree bit for bit.

``csrc/batch_norm.cpp`` compiles its kernels once per instruction set (AVX-512, AVX2, baseline)
and runs the widest that both the CPU and ATen's choice allow, so a machine tests only one of
them. The builds are written to give identical results (fixed lane counts and operation
order, see ``batch_norm_kernels.h``). This module checks that. It runs a grid of forward and
backward calls in subprocesses limited with ``ATEN_CPU_CAPABILITY=avx2`` and ``=default``, and
compares every output with this process's build bit for bit; ``test_batch_norm.py`` checks this
process's build against PyTorch. A build the CPU cannot run is skipped with the reason.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import avkernels
from tests.helpers.scripts import script_environment

# (N, C, H, W): channel counts below, at and between vector widths, a 1x1 map (rows layout
# either way), odd planes, and a sample split into several runs.
SHAPES = (
    (2, 3, 5, 7),
    (3, 16, 5, 7),
    (2, 67, 3, 3),
    (2, 512, 7, 7),
    (2, 33, 1, 1),
    (2, 24, 9, 11),
    (1, 8, 96, 100),
)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CAPABILITIES = ("avx2", "default")  # ATen's names; this process runs its widest
OUTPUTS = (
    "y",
    "mean",
    "invstd",
    "running_mean",
    "running_var",
    "dead_count",
    "dead_sample_count",
    "seen",
    "grad_x",
    "grad_weight",
    "grad_bias",
    "grad_abri_weight",
    "grad_abri_bias",
    "grad_abri_alpha",
    "abri_running_mean",
    "abri_running_var",
)


def _inputs() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    cases = []
    for shape, dtype, channels_last, relu, train, abri in itertools.product(
        SHAPES, DTYPES, (False, True), (False, True), (False, True), (False, True)
    ):
        if abri and (relu or dtype == torch.float16):  # ABRi: a sample of the grid is enough
            continue
        channels = shape[1]

        # Parameters in x's dtype, float32 for float16/bfloat16 x: nn.BatchNorm2d's dtype mixes.
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

        def randn(*size):
            return torch.randn(size, generator=generator, dtype=state_dtype)

        x = randn(*shape)
        x[0, 0] = 0.0  # an all-zero map: a dead sample in channel 0
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        x = x.to(dtype).contiguous(memory_format=memory_format)
        cases.append(
            {
                "x": x,
                "grad_y": randn(*shape).to(dtype).contiguous(memory_format=memory_format),
                "weight": randn(channels),
                "bias": randn(channels),
                "abri": (
                    randn(channels),
                    randn(channels),
                    torch.rand(channels, generator=generator, dtype=state_dtype),
                    randn(channels),
                    torch.rand(channels, generator=generator, dtype=state_dtype) + 0.5,
                )
                if abri
                else None,
                "running": (
                    randn(channels),
                    torch.rand(channels, generator=generator, dtype=state_dtype) + 0.5,
                ),
                "train": train,
                "relu": relu,
            }
        )
    return cases


def _outputs(cases: list[dict]) -> list[list[torch.Tensor]]:
    """Every output of batch_norm_fwd and batch_norm_bwd for each case (inputs left unchanged)."""
    ops = torch.ops.avkernels
    results = []
    for case in cases:
        channels = case["x"].shape[1]
        running_mean, running_var = (t.clone() for t in case["running"])
        abri_weight = abri_bias = abri_alpha = abri_mean = abri_var = None
        if case["abri"] is not None:
            abri_weight, abri_bias, abri_alpha, abri_mean, abri_var = (
                t.clone() for t in case["abri"]
            )
        counters = [torch.zeros(size, dtype=torch.long) for size in (channels, channels, 2)]
        y, mean, invstd = ops.batch_norm_fwd(
            case["x"],
            case["weight"],
            case["bias"],
            abri_weight,
            abri_bias,
            abri_alpha,
            running_mean,
            running_var,
            abri_mean,
            abri_var,
            *counters,
            case["train"],
            0.1,
            1e-5,
            case["relu"],
        )
        grads = ops.batch_norm_bwd(
            case["grad_y"],
            case["x"],
            case["weight"],
            case["bias"],
            abri_weight,
            abri_bias,
            abri_alpha,
            mean,
            invstd,
            case["train"],
            case["relu"],
        )
        results.append(
            [
                y,
                mean,
                invstd,
                running_mean,
                running_var,
                *counters,
                *grads,
                *(t for t in (abri_mean, abri_var) if t is not None),
            ]
        )
    return results


def main(inputs: str, outputs: str) -> None:
    torch.save(
        {
            "capability": torch.backends.cpu.get_cpu_capability(),
            "outputs": _outputs(torch.load(inputs)),
        },
        outputs,
    )


@pytest.fixture(scope="module")
def cases_and_expected(tmp_path_factory) -> tuple[Path, list[dict], list]:
    """The saved inputs' folder, the cases, and this process's outputs for them."""
    if not avkernels.HAS_EXTENSION:
        pytest.skip("avkernels._C is not built: there are no instruction-set builds to compare")
    folder = tmp_path_factory.mktemp("isa")
    cases = _inputs()
    torch.save(cases, folder / "inputs.pt")
    return folder, cases, _outputs(cases)


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_build_matches_this_process_bit_for_bit(cases_and_expected, capability):
    folder, cases, expected = cases_and_expected
    if capability == "avx2" and not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip(f"this CPU runs ATen's {torch.backends.cpu.get_cpu_capability()} build")
    outputs = folder / f"outputs_{capability}.pt"
    run = subprocess.run(
        [sys.executable, __file__, str(folder / "inputs.pt"), str(outputs)],
        env=script_environment(ATEN_CPU_CAPABILITY=capability),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = torch.load(outputs)
    assert result["capability"] == capability.upper(), (
        f"ATEN_CPU_CAPABILITY={capability} gave ATen's {result['capability']} build"
    )
    if result["capability"] == torch.backends.cpu.get_cpu_capability():
        pytest.skip(f"this process already runs the {capability} build")
    mismatches = [
        f"case {index} ({tuple(case['x'].shape)} {case['x'].dtype}, channels_last="
        f"{case['x'].is_contiguous(memory_format=torch.channels_last)}, train={case['train']}, "
        f"relu={case['relu']}, abri={case['abri'] is not None}): {name}"
        for index, (case, mine, theirs) in enumerate(zip(cases, expected, result["outputs"]))
        for name, a, b in zip(OUTPUTS, mine, theirs)
        if not (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
    ]
    assert not mismatches, f"{len(mismatches)} outputs differ:\n" + "\n".join(mismatches[:10])


if __name__ == "__main__":
    main(*sys.argv[1:3])
