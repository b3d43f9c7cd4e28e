"""A FusT training step of the whole AVClassifier (ResNet-18 audio + visual, concat fusion), as
same-run ratios against the plain ``nn.BatchNorm2d`` model.

One step: the batch reaches the device (GPU: copied from pinned memory, as a training loop
does; CPU: used where it is), the variant's input masking, forward, cross-entropy on the joint
logits, backward, SGD (momentum 0.9, weight decay 1e-4, the official settings). Variants:

- ``bn``: ``nn.BatchNorm2d`` -> ``nn.ReLU`` (torchvision's block), no masking: the baseline;
- ``official``: the official approach: every BN doubled and blended
  (``test_bench_abri.official_abri``) and FusT input masking by the released loaders' numpy
  loops (``test_bench_masking.official_numpy_mask_``; on the CPU copy of the batch before it goes
  to the device, serially here, where the released code runs it in loader workers);
- ``avkernels``: ABRi on every BN (``abri.apply``) and FusT input masking with
  ``mask_patches(inplace=True)`` on the device, as ``avkernels.app.training`` does it, with the
  library's model defaults (fused ReLU, dead-channel statistics on); target <= 1.03x ``bn``;
- ``tracked``: ``TrackedBN`` with dead-channel statistics on, no ABRi, no masking.

Per-sample ratios: those of the masking benchmark (``sample_ratios``), one modality per sample.
Patches: the official grids (audio 32x16 over frames x mel, frames 22x22), i.e. 32x8 and 10x10
patches at the paper's sizes.

Checks: all four variants compute the same function of their inputs: the baseline's BNs hold
ABRi's blended training affine ``alpha*g + (1-alpha)``, ``alpha*b`` (alpha = 0.5, the added BN's
gamma 1 and beta 0), and so does ``tracked``'s. Each variant's first step (loss, gradients of
both stems, of the last convolution and of ``fc_out``) is compared with the eager baseline model
recomputed on the very inputs the variant fed its model, and a masking variant's inputs must be
the batch with exactly ``floor(P * ratio)`` whole patches zeroed per sample and frame
(``test_bench_masking.check_patches``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from avkernels import abri, mask_patches, revert
from avkernels.app.models import AVClassifier
from avkernels.app.training import TrainConfig, patch_size
from benchmarks.harness import Case, Comparison, Implementation, Result, Step, relative_error
from benchmarks.test_bench_abri import ALPHA, official_abri
from benchmarks.test_bench_masking import (
    PatchSetting,
    check_patches,
    official_numpy_mask_,
    sample_ratios,
)

CLASSES = 31  # Kinetics-Sounds
TARGET = 1.03  # avkernels ABRi + FusT / plain BN
GPU_CALLS_PER_ROUND = 3
SGD = {"lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}
# Gradient names compared with the reference: the stems, the deepest convolution, the head.
CHECKED_PARAMETERS = (
    "audio_net.conv1.weight",
    "visual_net.conv1.weight",
    "audio_net.layer4.1.conv2.weight",
    "visual_net.layer4.1.conv2.weight",
    "fusion_module.fc_out.weight",
    "fusion_module.fc_out.bias",
)
# Each variant's relative error against a float64 run of the plain model may be twice PyTorch's
# own (the plain model in the same precision) plus a floor: for the loss a few ulps of the dtype;
# for gradients more, because a ReLU or max-pool decision within rounding of a tie (masked
# patches make whole constant regions) flips between any two implementations and moves every
# gradient upstream of it. Measured here on the CPU case, float32: 2e-6 without a flip, up to
# 3e-2 (PyTorch's own visual stem gradient) or 5e-3 (avkernels') with one. A wrong formula (an
# unblended affine, a missing mask) is off by 5e-2 in the loss alone, O(1) in the gradients.
RELATIVE_FLOOR = {
    torch.float32: {"loss": 1e-6, "grad": 1e-2},
    torch.bfloat16: {"loss": 1e-2, "grad": 5e-2},
}


@dataclass(frozen=True)
class Setting:
    device: str
    batch: int
    audio_size: tuple[int, int]  # frames x mel
    frames: int
    frame_size: tuple[int, int]
    dtype: torch.dtype  # float32, or bfloat16 under torch.autocast
    channels_last: bool

    @property
    def audio_patch(self) -> tuple[int, int]:
        return patch_size(self.audio_size, TrainConfig.audio_patch_grid)

    @property
    def frame_patch(self) -> tuple[int, int]:
        return patch_size(self.frame_size, TrainConfig.visual_patch_grid)

    def patch_settings(self) -> tuple[PatchSetting, PatchSetting]:
        """Masking settings of the audio (B, 1, T, F) and of the frames (B*T, 3, H, W)."""
        return (
            PatchSetting("audio", (self.batch, 1, *self.audio_size), self.audio_patch, 1, "cpu"),
            PatchSetting(
                "frames",
                (self.batch * self.frames, 3, *self.frame_size),
                self.frame_patch,
                self.frames,
                "cpu",
            ),
        )

    def describe(self) -> tuple[str, str]:
        dtype = str(self.dtype).removeprefix("torch.")
        layout = "cl" if self.channels_last else "nchw"
        audio = "x".join(map(str, self.audio_size))
        frames = f"{self.frames}x" + "x".join(map(str, self.frame_size))
        return (
            f"B{self.batch}-a{audio}-v{frames}-{dtype}-{layout}-{self.device}",
            f"AVClassifier train step B={self.batch} audio {audio} frames {frames} "
            f"{dtype}{' (autocast)' if self.dtype != torch.float32 else ''} "
            f"{'channels_last' if self.channels_last else 'NCHW'} {self.device}",
        )


@dataclass
class Inputs:
    audio: Tensor  # (B, 1, T, F) on the CPU (pinned when the setting is on a GPU)
    visual: Tensor  # (B, 3, T, H, W)
    labels: Tensor  # on the device
    ratio_a: Tensor  # (B,) float64 on the device
    ratio_v: Tensor
    state: dict[str, Tensor]  # the pre-trained weights every model starts from


@functools.lru_cache(maxsize=1)  # a setting's tests run one after another: keep only its inputs
def _inputs(setting: Setting) -> Inputs:
    generator = torch.Generator().manual_seed(0)
    audio = torch.randn(setting.batch, 1, *setting.audio_size, generator=generator)
    visual = torch.randn(setting.batch, 3, setting.frames, *setting.frame_size, generator=generator)
    if setting.channels_last:  # the frames (B*T, 3, H, W) the encoder sees: channels_last views
        audio = audio.contiguous(memory_format=torch.channels_last)
        visual = visual.contiguous(memory_format=torch.channels_last_3d)
    if setting.device != "cpu":
        audio, visual = audio.pin_memory(), visual.pin_memory()
    ratio_a = sample_ratios(setting.batch, seed=1)
    # FusT masks one modality per sample: the visual ratio where the audio one is 0
    ratio_v = torch.where(ratio_a == 0, sample_ratios(setting.batch, seed=2).roll(1), 0.0)
    labels = torch.randint(0, CLASSES, (setting.batch,), generator=generator)
    return Inputs(
        audio,
        visual,
        labels.to(setting.device),
        ratio_a.to(setting.device),
        ratio_v.to(setting.device),
        _pretrained_state(),
    )


@functools.lru_cache(maxsize=1)
def _pretrained_state() -> dict[str, Tensor]:
    """Random weights with varied BN affines and running statistics (a fresh BN's 1 and 0 would
    make ABRi's blended affine equal the original one, and the checks blind to it)."""
    torch.manual_seed(0)
    model = AVClassifier(CLASSES)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.weight.copy_(1 + 0.5 * torch.randn(channels, generator=generator))
                module.bias.copy_(0.5 * torch.randn(channels, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(channels, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    return model.state_dict()


# --- the four models ----------------------------------------------------------------------------


def _plain_model(setting: Setting, blended: bool) -> AVClassifier:
    """torchvision's blocks with ``nn.BatchNorm2d``; ``blended``: ABRi's training affine."""
    model = revert(AVClassifier(CLASSES, fuse_relu=False, track_dead=False))
    model.load_state_dict(_inputs(setting).state)
    if blended:
        _blend(model)
    return model


@torch.no_grad()
def _blend(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.mul_(ALPHA).add_(1 - ALPHA)
            module.bias.mul_(ALPHA)


def _official_model(setting: Setting) -> AVClassifier:
    model = _plain_model(setting, blended=False)
    for encoder in (model.audio_net, model.visual_net):
        official_abri(encoder, "layer")
    return model


def _avkernels_model(setting: Setting, with_abri: bool) -> AVClassifier:
    """The library's defaults: fused ReLU, dead-channel statistics on."""
    model = AVClassifier(CLASSES)
    model.load_state_dict(_inputs(setting).state)
    if with_abri:
        abri.apply(model, ALPHA)
    else:
        _blend(model)
    return model


def _prepare(setting: Setting, model: nn.Module) -> nn.Module:
    model = model.to(setting.device).train()
    return model.to(memory_format=torch.channels_last) if setting.channels_last else model


# --- training steps -----------------------------------------------------------------------------


def _train_step(
    setting: Setting,
    model: nn.Module,
    audio: Tensor,
    visual: Tensor,
    optimizer: torch.optim.Optimizer | None,
    autocast: bool = True,
) -> Result:
    """Forward, loss, backward (and the SGD update): the loss and the checked gradients.
    ``autocast=False``: in the model's dtype even for a bfloat16 setting (the float64 check)."""
    inputs = _inputs(setting)
    device = torch.device(setting.device).type
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    low_precision = autocast and setting.dtype != torch.float32
    with torch.autocast(device, dtype=setting.dtype, enabled=low_precision):
        loss = F.cross_entropy(model(audio, visual).logits, inputs.labels)
    loss.backward()
    result = {"loss": loss.detach()}
    result.update((name, model.get_parameter(name).grad) for name in CHECKED_PARAMETERS)
    if optimizer is not None:
        optimizer.step()
    return result


def _step(setting: Setting, model: nn.Module, masking: str | None) -> Step:
    """The timed step of ``model``; ``masking``: None, "official" or "avkernels"."""
    inputs = _inputs(setting)
    model = _prepare(setting, model)
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    on_cpu = setting.device == "cpu"
    # Masking that zeroes the CPU batch in place works on its own copy, masked again every step
    # (a dense step takes the same time however many zeros it holds).
    audio, visual = inputs.audio, inputs.visual
    if masking == "official" or (masking is not None and on_cpu):
        audio, visual = audio.clone(), visual.clone()
        if not on_cpu:
            audio, visual = audio.pin_memory(), visual.pin_memory()
    ratios_a, ratios_v = inputs.ratio_a.tolist(), inputs.ratio_v.tolist()
    copied = None  # GPU: the previous step's copy, finished before the pinned batch changes

    def step() -> Result:
        nonlocal copied
        batch_audio, batch_visual = audio, visual
        if masking == "official":
            if copied is not None:
                copied.synchronize()
            official_numpy_mask_(batch_audio, ratios_a, *_grid_and_patch(setting, "audio"))
            for frame in range(setting.frames):
                official_numpy_mask_(
                    batch_visual[:, :, frame], ratios_v, *_grid_and_patch(setting, "frames")
                )
        if not on_cpu:
            batch_audio = batch_audio.to(setting.device, non_blocking=True)
            batch_visual = batch_visual.to(setting.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        if masking == "avkernels":
            mask_patches(batch_audio, inputs.ratio_a, setting.audio_patch, inplace=True)
            mask_patches(batch_visual, inputs.ratio_v, setting.frame_patch, inplace=True)
        result = _train_step(setting, model, batch_audio, batch_visual, optimizer)
        if masking is not None:  # what the model saw, for the check
            result.update(masked_audio=batch_audio, masked_visual=batch_visual)
        return result

    return step


def _grid_and_patch(setting: Setting, name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    patches = {s.name: s for s in setting.patch_settings()}[name]
    return patches.grid, patches.patch


# --- checking -----------------------------------------------------------------------------------


def _reference(setting: Setting) -> Step:
    """The source batch and the ratios (the check recomputes the step on what each variant
    fed its model)."""
    inputs = _inputs(setting)
    return lambda: {
        "audio": inputs.audio,
        "visual": inputs.visual,
        "ratio_a": inputs.ratio_a,
        "ratio_v": inputs.ratio_v,
    }


def check_step(setting: Setting, actual: Result, expected: Result) -> None:
    """Masking by property, then loss and gradients against the plain-BN model (blended affine,
    NCHW, eager) in float64 on the same inputs, within twice PyTorch's own error."""
    audio, visual = expected["audio"], expected["visual"]
    if "masked_audio" in actual:
        audio, visual = actual["masked_audio"].cpu(), actual["masked_visual"].cpu()
        audio_setting, frames_setting = setting.patch_settings()
        for patches, masked, source, ratios in (
            (audio_setting, audio, expected["audio"], expected["ratio_a"]),
            (
                frames_setting,
                _frames(visual),
                _frames(expected["visual"]),
                expected["ratio_v"].repeat_interleave(setting.frames),
            ),
        ):
            total = patches.grid[0] * patches.grid[1]
            counts = torch.tensor([int(total * r) for r in ratios.tolist()])
            check_patches(patches, {"y": masked}, {"x": source, "counts": counts})
    else:
        assert not ({"masked_audio", "masked_visual"} & set(actual)), "half a masked batch"
    audio, visual = audio.contiguous().to(setting.device), visual.contiguous().to(setting.device)
    # PyTorch's own error on this step (eager plain-BN model, same dtype, against float64) is the
    # yardstick: the stem gradients sum over every pixel through 17 BN backwards and come out
    # with large relative rounding errors in float32 (measured here: 3e-2 for PyTorch's visual
    # stem on the CPU case), so no fixed tolerance would be both safe and tight.
    precise = _plain_model(setting, blended=True).to(setting.device, torch.float64).train()
    want = _train_step(setting, precise, audio.double(), visual.double(), None, autocast=False)
    pytorch = _train_step(
        setting, _plain_model(setting, blended=True).to(setting.device).train(), audio, visual, None
    )
    for name, value in want.items():
        floor = RELATIVE_FLOOR[setting.dtype]["loss" if name == "loss" else "grad"]
        got = actual[name]
        assert got.shape == value.shape and got.isfinite().all(), f"{name}: bad shape or values"
        error, allowed = relative_error(got, value), 2 * relative_error(pytorch[name], value)
        assert error <= allowed + floor, (
            f"{name}: relative error {error:.2e} against float64, PyTorch's {allowed / 2:.2e}"
        )


def _frames(visual: Tensor) -> Tensor:
    """(B, 3, T, H, W) -> (B*T, 3, H, W), sample-major like the encoder's frames."""
    batch, channels, frames, height, width = visual.shape
    return visual.transpose(1, 2).reshape(batch * frames, channels, height, width)


# --- cases --------------------------------------------------------------------------------------


def _case(setting: Setting) -> Case:
    setting_id, title = setting.describe()
    implementations = {
        "bn": Implementation(
            "nn.BatchNorm2d -> ReLU (blended affine), no masking",
            lambda: _step(setting, _plain_model(setting, True), None),
        ),
        "official": Implementation(
            "official ABRi (2x nn.BatchNorm2d) + numpy input masking",
            lambda: _step(setting, _official_model(setting), "official"),
        ),
        "avkernels": Implementation(
            "avkernels ABRi + mask_patches",
            lambda: _step(setting, _avkernels_model(setting, True), "avkernels"),
        ),
        "tracked": Implementation(
            "TrackedBN (dead statistics), no ABRi, no masking",
            lambda: _step(setting, _avkernels_model(setting, False), None),
        ),
    }
    on_cpu = setting.device == "cpu"
    return Case(
        id=setting_id,
        title=title,
        device=torch.device(setting.device),
        implementations=implementations,
        reference=lambda: _reference(setting),
        comparisons=(
            Comparison("avkernels", "bn", TARGET),
            Comparison("official", "bn", interleave=True),
            Comparison("avkernels", "official", interleave=True),
            Comparison("tracked", "bn", interleave=True),
        ),
        check=functools.partial(check_step, setting),
        calls_per_round=1 if on_cpu else GPU_CALLS_PER_ROUND,
        warmup_calls=1 if on_cpu else 3,
    )


def cpu_cases(quick: bool) -> list[Case]:
    if quick:
        return [_case(Setting("cpu", 2, (64, 32), 1, (64, 64), torch.float32, False))]
    return [_case(Setting("cpu", 4, (128, 64), 2, (64, 64), torch.float32, False))]


def gpu_cases(quick: bool) -> list[Case]:
    if quick:
        return [_case(Setting("cuda", 4, (128, 64), 2, (64, 64), torch.float32, False))]
    return [
        _case(Setting("cuda", 64, (1024, 128), 3, (224, 224), dtype, channels_last))
        for dtype in (torch.float32, torch.bfloat16)
        for channels_last in (False, True)
    ]


@pytest.mark.bench_cases(factory=cpu_cases)
def test_e2e_cpu(compare, case, implementation):
    compare(case, implementation)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="GPU end-to-end benchmarks need CUDA (torch.cuda.is_available() is False)",
)
@pytest.mark.bench_cases(factory=gpu_cases)
def test_e2e_gpu(compare, case, implementation):
    compare(case, implementation)
