"""FusT masking against the official approach and straightforward PyTorch, as same-run ratios.

Patch masking of a batch (audio fbank (64, 1, 1024, 128) with 32x8 patches; frames
(64*3, 3, 224, 224) with 10x10 patches, a sample's ratio for each of its 3 frames), per-sample
ratios in [0, 0.6) with a quarter of the samples unmasked:

- in place, as a data pipeline does it: ``mask_patches(..., inplace=True)`` against the
  official per-sample numpy loops (``np.random.choice`` of the patch indices, one slice
  assignment per patch; target: at least 5x faster, i.e. ratio <= 0.2) and against PyTorch
  building the exact-count mask (random ranks) and multiplying in place (target <= 1.0);
- out of place (differentiable): ``mask_patches`` against PyTorch's mask-and-multiply
  (target <= 1.0).

Fusion layer, forward + backward (joint-logit gradient, per-modality logits returned too) at
B in {64, 256}, features 512 + 512, 31 classes: ``MaskedConcatFusion`` against PyTorch
building both masks, multiplying, concatenating and applying ``fc_out`` (target <= 1.0 on
CPU, <= 0.7 on GPU).

The implementations draw different random masks, so results are checked by property: every
patch (feature group) is either zeroed or untouched, each sample has exactly
``floor(P * ratio)`` zeroed, and the fusion outputs and gradients equal concat + Linear
recomputed from the mask the implementation used (read off its zeroed input gradient).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import avkernels
from avkernels import MaskedConcatFusion
from benchmarks.harness import Case, Comparison, Implementation, Result, Step

TARGET_VS_OFFICIAL = 0.2  # at least 5x faster than the numpy loops
TARGET_VS_TORCH_CPU = 1.0
TARGET_FUSION_GPU = 0.7
MAX_RATIO = 0.6
UNMASKED_EVERY = 4  # every 4th sample has ratio 0
GPU_CALLS_PER_ROUND = 10
FEATURES, CLASSES = (512, 512), 31


@dataclass(frozen=True)
class PatchSetting:
    name: str
    shape: tuple[int, int, int, int]  # (rows, C, H, W)
    patch: tuple[int, int]
    frames_per_sample: int  # rows of one sample (its ratio repeats)
    device: str

    @property
    def grid(self) -> tuple[int, int]:
        return self.shape[2] // self.patch[0], self.shape[3] // self.patch[1]


def sample_ratios(samples: int, seed: int = 0) -> Tensor:
    """Per-sample ratios in [0, MAX_RATIO), every UNMASKED_EVERY-th sample 0 (float64, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    ratios = torch.rand(samples, generator=generator, dtype=torch.float64) * MAX_RATIO
    ratios[::UNMASKED_EVERY] = 0.0
    return ratios


@functools.lru_cache(maxsize=1)
def _patch_inputs(setting: PatchSetting) -> tuple[Tensor, Tensor]:
    """(x, per-row ratios); x (randn) has no zero patch, so zeroed patches are recognisable."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(setting.shape, generator=generator).to(setting.device)
    rows = setting.shape[0]
    ratios = sample_ratios(rows // setting.frames_per_sample).repeat_interleave(
        setting.frames_per_sample
    )
    return x, ratios.to(setting.device)


# --- patch masking implementations ------------------------------------------------------------


def official_numpy_mask_(
    images: Tensor, ratios: list[float], grid: tuple[int, int], patch: tuple[int, int]
) -> Tensor:
    """The released loaders' masking, in place on ``images`` (rows, C, H, W): per row, numpy
    picks ``int(P * ratio)`` of the ``P`` grid patches, a loop zeroes them."""
    grid_h, grid_w = grid
    patch_h, patch_w = patch
    total = grid_h * grid_w
    for row, ratio in enumerate(ratios):
        if ratio > 0:
            image = images[row]
            for index in np.random.choice(total, int(total * ratio), replace=False):
                top, left = index // grid_w * patch_h, index % grid_w * patch_w
                image[:, top : top + patch_h, left : left + patch_w] = 0.0
    return images


def _official_loops(setting: PatchSetting) -> Step:
    x, ratios = _patch_inputs(setting)
    buffer = x.clone()
    ratio_list = ratios.tolist()
    return lambda: {"y": official_numpy_mask_(buffer, ratio_list, setting.grid, setting.patch)}


def _torch_keep_mask(setting: PatchSetting, ratios: Tensor) -> Tensor:
    """(rows, 1, H, W) float keep-mask: exact-count uniform patches via random ranks."""
    rows, _, height, width = setting.shape
    grid_h, grid_w = setting.grid
    patches = grid_h * grid_w
    counts = (ratios * patches).long()
    ranks = torch.rand(rows, patches, device=ratios.device).argsort(dim=1).argsort(dim=1)
    keep = (ranks >= counts[:, None]).view(rows, 1, grid_h, grid_w)
    keep = keep.repeat_interleave(setting.patch[0], 2).repeat_interleave(setting.patch[1], 3)
    keep = F.pad(keep, (0, width - keep.shape[3], 0, height - keep.shape[2]), value=True)
    return keep.to(torch.float32)


def _torch_mask_multiply(setting: PatchSetting, inplace: bool) -> Step:
    x, ratios = _patch_inputs(setting)
    buffer = x.clone() if inplace else x

    def step() -> Result:
        keep = _torch_keep_mask(setting, ratios)
        return {"y": buffer.mul_(keep) if inplace else buffer * keep}

    return step


def _avkernels_mask(setting: PatchSetting, inplace: bool) -> Step:
    x, ratios = _patch_inputs(setting)
    buffer = x.clone() if inplace else x

    def step() -> Result:
        return {"y": avkernels.mask_patches(buffer, ratios, setting.patch, inplace=inplace)}

    return step


def _patch_reference(setting: PatchSetting) -> Step:
    x, ratios = _patch_inputs(setting)
    patches = setting.grid[0] * setting.grid[1]
    counts = torch.tensor([int(patches * r) for r in ratios.tolist()])
    return lambda: {"x": x, "counts": counts}


def check_patches(setting: PatchSetting, actual: Result, expected: Result) -> None:
    """Whole patches zeroed or untouched, exact counts, remainder strips untouched."""
    y, x = actual["y"].cpu(), expected["x"].cpu()
    grid_h, grid_w = setting.grid
    patch_h, patch_w = setting.patch
    crop_h, crop_w = grid_h * patch_h, grid_w * patch_w
    assert torch.equal(y[..., crop_h:, :], x[..., crop_h:, :]), "remainder rows changed"
    assert torch.equal(y[..., :, crop_w:], x[..., :, crop_w:]), "remainder columns changed"

    def tiles(t: Tensor) -> Tensor:
        rows, channels = t.shape[:2]
        t = t[..., :crop_h, :crop_w].reshape(rows, channels, grid_h, patch_h, grid_w, patch_w)
        return t.permute(0, 2, 4, 1, 3, 5).reshape(rows, grid_h * grid_w, -1)

    zeroed = (tiles(y) == 0).all(dim=2)
    untouched = (tiles(y) == tiles(x)).all(dim=2)
    assert (zeroed ^ untouched).all(), "a patch is partly zeroed"
    counts = zeroed.sum(dim=1)
    assert torch.equal(counts, expected["counts"]), (
        f"zeroed patches per row {counts.tolist()[:8]}..., expected "
        f"{expected['counts'].tolist()[:8]}..."
    )


def _patch_cases(settings: list[PatchSetting]) -> list[Case]:
    cases = []
    for setting in settings:
        on_cpu = setting.device == "cpu"
        size = "x".join(map(str, setting.shape))
        implementations = {
            "torch_inplace": Implementation(
                "PyTorch mask, mul_ (in place)", lambda s=setting: _torch_mask_multiply(s, True)
            ),
            "avkernels_inplace": Implementation(
                "mask_patches(inplace=True)", lambda s=setting: _avkernels_mask(s, True)
            ),
            "torch": Implementation(
                "PyTorch mask, multiply", lambda s=setting: _torch_mask_multiply(s, False)
            ),
            "avkernels": Implementation(
                "mask_patches", lambda s=setting: _avkernels_mask(s, False)
            ),
        }
        comparisons = (
            Comparison(
                "avkernels_inplace", "torch_inplace", TARGET_VS_TORCH_CPU if on_cpu else None
            ),
            Comparison("avkernels", "torch", TARGET_VS_TORCH_CPU if on_cpu else None),
        )
        if on_cpu:  # the released code masks in CPU data-loader workers
            implementations["official"] = Implementation(
                "official numpy loops (in place)", lambda s=setting: _official_loops(s)
            )
            comparisons = (
                Comparison("avkernels_inplace", "official", TARGET_VS_OFFICIAL),
                Comparison("avkernels", "official"),
                *comparisons,
            )
        cases.append(
            Case(
                id=f"patches-{setting.name}-{size}-{setting.device}",
                title=f"mask_patches {setting.name} ({size}) {setting.patch[0]}x{setting.patch[1]} "
                f"patches {setting.device}",
                device=torch.device(setting.device),
                implementations=implementations,
                reference=lambda s=setting: _patch_reference(s),
                comparisons=comparisons,
                check=functools.partial(check_patches, setting),
                calls_per_round=1 if on_cpu else GPU_CALLS_PER_ROUND,
                warmup_calls=1 if on_cpu else 3,
            )
        )
    return cases


def _patch_settings(quick: bool, device: str) -> list[PatchSetting]:
    if quick:
        return [
            PatchSetting("audio", (4, 1, 64, 32), (8, 4), 1, device),
            PatchSetting("frames", (6, 3, 32, 32), (10, 10), 3, device),
        ]
    return [
        PatchSetting("audio", (64, 1, 1024, 128), (32, 8), 1, device),
        PatchSetting("frames", (64 * 3, 3, 224, 224), (10, 10), 3, device),
    ]


# --- fusion layer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusionSetting:
    batch: int
    dtype: torch.dtype
    device: str


@functools.lru_cache(maxsize=1)
def _fusion_inputs(setting: FusionSetting) -> dict:
    generator = torch.Generator().manual_seed(0)
    batch, (features_a, features_v) = setting.batch, FEATURES

    def randn(*size: int, scale: float = 1.0) -> Tensor:
        values = torch.randn(size, generator=generator) * scale
        return values.to(device=setting.device, dtype=setting.dtype)

    ratio_a = sample_ratios(batch, seed=1)
    # FusT masks one modality per sample: the visual ratio where the audio one is 0
    ratio_v = torch.where(ratio_a == 0, sample_ratios(batch, seed=2).roll(1), 0.0)
    return {
        "a": randn(batch, features_a).requires_grad_(),
        "v": randn(batch, features_v).requires_grad_(),
        "weight": randn(CLASSES, features_a + features_v, scale=0.03),
        "bias": randn(CLASSES, scale=0.1),
        "grad_logits": randn(batch, CLASSES),
        "ratio_a": ratio_a.to(setting.device),
        "ratio_v": ratio_v.to(setting.device),
    }


def _fusion_step(inputs: dict, forward, parameters) -> Step:
    a, v, grad_logits = inputs["a"], inputs["v"], inputs["grad_logits"]

    def step() -> Result:
        logits, logits_a, logits_v = forward(a, v)
        grad_a, grad_v, grad_weight, grad_bias = torch.autograd.grad(
            logits, (a, v, *parameters), grad_logits
        )
        return {
            "logits": logits,
            "logits_a": logits_a,
            "logits_v": logits_v,
            "grad_a": grad_a,
            "grad_v": grad_v,
            "grad_weight": grad_weight,
            "grad_bias": grad_bias,
        }

    return step


def _avkernels_fusion(setting: FusionSetting) -> Step:
    inputs = _fusion_inputs(setting)
    layer = MaskedConcatFusion(FEATURES, CLASSES, device=setting.device, dtype=setting.dtype)
    layer.load_state_dict({"fc_out.weight": inputs["weight"], "fc_out.bias": inputs["bias"]})
    layer.train()
    return _fusion_step(
        inputs,
        lambda a, v: layer(a, v, inputs["ratio_a"], inputs["ratio_v"]),
        (layer.fc_out.weight, layer.fc_out.bias),
    )


def _torch_keep(ratio: Tensor, features: int) -> Tensor:
    counts = (ratio * features).long()
    ranks = torch.rand(ratio.shape[0], features, device=ratio.device).argsort(1).argsort(1)
    return ranks >= counts[:, None]


def _torch_fusion(setting: FusionSetting) -> Step:
    """Straightforward PyTorch: build both masks, multiply, cat, Linear, OGM-GE halves."""
    inputs = _fusion_inputs(setting)
    weight = inputs["weight"].clone().requires_grad_()
    bias = inputs["bias"].clone().requires_grad_()
    features_a, features_v = FEATURES

    def forward(a: Tensor, v: Tensor):
        a = a * _torch_keep(inputs["ratio_a"], features_a).to(a.dtype)
        v = v * _torch_keep(inputs["ratio_v"], features_v).to(v.dtype)
        logits = F.linear(torch.cat([a, v], dim=1), weight, bias)
        return (
            logits,
            a @ weight[:, :features_a].T + bias / 2,
            v @ weight[:, features_a:].T + bias / 2,
        )

    return _fusion_step(inputs, forward, (weight, bias))


def _fusion_reference(setting: FusionSetting) -> Step:
    inputs = _fusion_inputs(setting)
    return lambda: inputs


def check_fusion(actual: Result, expected: Result) -> None:
    """Exact masked counts, then every output recomputed (float64) from the mask used."""
    features_a, features_v = FEATURES
    kept_a, kept_v = actual["grad_a"] != 0, actual["grad_v"] != 0
    for kept, ratio, features in (
        (kept_a, expected["ratio_a"], features_a),
        (kept_v, expected["ratio_v"], features_v),
    ):
        counts = torch.tensor([int(features * r) for r in ratio.tolist()], device=kept.device)
        assert torch.equal((~kept).sum(1), counts), (
            "masked features per sample differ from floor(P * ratio)"
        )
    a, v = (expected[name].detach().double() for name in ("a", "v"))
    weight, bias = expected["weight"].double(), expected["bias"].double()
    grad_logits = expected["grad_logits"].double()
    fused = torch.cat([a * kept_a, v * kept_v], dim=1)
    want = {
        "logits": F.linear(fused, weight, bias),
        "logits_a": fused[:, :features_a] @ weight[:, :features_a].T + bias / 2,
        "logits_v": fused[:, features_a:] @ weight[:, features_a:].T + bias / 2,
        "grad_a": (grad_logits @ weight[:, :features_a]) * kept_a,
        "grad_v": (grad_logits @ weight[:, features_a:]) * kept_v,
        "grad_weight": grad_logits.T @ fused,
        "grad_bias": grad_logits.sum(0),
    }
    tolerance = 1e-4 if expected["a"].dtype == torch.float32 else 3e-2
    for name, value in want.items():
        got = actual[name].double()
        scale = max(1.0, value.abs().max().item())
        torch.testing.assert_close(
            got, value, rtol=tolerance, atol=tolerance * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def _fusion_cases(quick: bool, device: str, dtypes) -> list[Case]:
    cases = []
    target = TARGET_VS_TORCH_CPU if device == "cpu" else TARGET_FUSION_GPU
    for batch in (8,) if quick else (64, 256):
        for dtype in dtypes:
            setting = FusionSetting(batch, dtype, device)
            name = str(dtype).removeprefix("torch.")
            cases.append(
                Case(
                    id=f"fusion-B{batch}-{name}-{device}",
                    title=f"MaskedConcatFusion fwd+bwd B={batch} {FEATURES[0]}+{FEATURES[1]}->"
                    f"{CLASSES} {name} {device}",
                    device=torch.device(device),
                    implementations={
                        "torch": Implementation(
                            "PyTorch mask, multiply, cat, Linear",
                            lambda s=setting: _torch_fusion(s),
                        ),
                        "avkernels": Implementation(
                            "MaskedConcatFusion", lambda s=setting: _avkernels_fusion(s)
                        ),
                    },
                    reference=lambda s=setting: _fusion_reference(s),
                    comparisons=(Comparison("avkernels", "torch", target),),
                    check=check_fusion,
                    calls_per_round=1 if device == "cpu" else GPU_CALLS_PER_ROUND,
                )
            )
    return cases


def cpu_cases(quick: bool) -> list[Case]:
    return _patch_cases(_patch_settings(quick, "cpu")) + _fusion_cases(
        quick, "cpu", (torch.float32,)
    )


def gpu_cases(quick: bool) -> list[Case]:
    return _patch_cases(_patch_settings(quick, "cuda")) + _fusion_cases(
        quick, "cuda", (torch.float32, torch.bfloat16)
    )


@pytest.mark.bench_cases(factory=cpu_cases)
def test_masking_cpu(compare, case, implementation):
    compare(case, implementation)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU masking benchmarks need CUDA (torch.cuda.is_available() is False)",
)
@pytest.mark.bench_cases(factory=gpu_cases)
def test_masking_gpu(compare, case, implementation):
    compare(case, implementation)
