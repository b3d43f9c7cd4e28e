"""What defines a training run: :class:`TrainConfig`, its validation, and the names its fields
take (stages, modalities, optimizers, schedules, mask targets, precisions)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

STAGES = ("stage1", "stage2", "joint")
MODALITIES = ("audio", "visual")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
MASK_TARGETS = ("input", "features", "both")
# Allowed values of the TrainConfig fields that take one of a few names.
CHOICES = {
    "stage": STAGES,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "mask_target": MASK_TARGETS,
    "adapt_first_conv": ("sum", "mean"),
    "mask_rule": ("symmetric", "official"),
    "mask_mode": ("conf", "mean"),
    "audio_arch": ("resnet18", "resnet34"),
    "visual_arch": ("resnet18", "resnet34"),
    "precision": ("fp32", "bf16", "fp16"),
    "abri_granularity": ("layer", "channel"),
}
# torch.autocast dtype of each TrainConfig.precision (fp32: autocast off).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` and in every checkpoint.

    ``num_classes`` is the one required field; ``stage`` one of :data:`STAGES`; ``epochs``,
    ``batch_size``, ``seed`` (initialisation, data order, masks).

    Optimisation: ``optimizer`` (``"sgd"`` with ``momentum``, ``"adam"``, ``"adamw"``),
    ``lr``, ``weight_decay`` (``bn_weight_decay``: the BatchNorm layers' own, ``None`` = the
    same; the demo's source model uses a large one, see docs/DESIGN.md); ``schedule`` per
    epoch: ``"constant"``, ``"step"`` (times ``lr_gamma`` every ``lr_step`` epochs, the
    official OGM-GE setting) or ``"cosine"`` (to 0 over ``epochs``). Defaults follow the
    official code (SGD 1e-3, momentum 0.9, wd 1e-4, StepLR 70/0.1).

    Model: ``audio_arch``/``visual_arch`` (``resnet18``/``resnet34``), ``width`` (64 =
    ResNet), ``visual_channels``; initial encoder weights ``audio_init``/``visual_init`` (any
    checkpoint :func:`~avkernels.app.models.load_encoder` reads; RGB stems moved to the audio
    encoder's one channel by ``adapt_first_conv``, ``"sum"`` or ``"mean"``); ``init_from``: a
    run directory or checkpoint whose ``audio_net``/``visual_net`` replace those (stage 2 from
    stage 1); ``abri``: modalities whose encoder gets ABRi (after loading), with one blend
    weight alpha per layer or per channel (``abri_granularity``, ``"layer"`` or ``"channel"``).

    Stage 1: ``modalities`` trained (both by default).

    Stage 2: ``audio_confidence``/``visual_confidence`` (default: ``confidence_*.pt`` of the
    ``init_from`` run directory); ``mask_threshold`` (tau), ``mask_eta``/``mask_rho``
    ((audio, visual)), ``mask_rule``, ``mask_mode`` (see :func:`~avkernels.fust.mask_ratios`;
    tau/eta/rho are unpublished in the paper: the defaults 0.5/5/0.5 are ours, tune them);
    ``mask_target``: ``"input"`` (default, the official operator: whole input patches zeroed),
    ``"features"`` (groups of ``feature_group`` pooled features zeroed in the fusion layer) or
    ``"both"``. Input patches keep the official patch grid at any input size:
    ``patch = max(1, size // grid)`` with ``audio_patch_grid`` (32, 16) over (frames, mel)
    (32x8 patches on 1024x128) and ``visual_patch_grid`` (22, 22) over (H, W) (10x10 on 224).

    Bookkeeping: ``checkpoint_every`` steps (0: at epoch ends only); ``probe_epochs``: when
    > 0, linear probes of each encoder (frozen features, ``probe_lr``, Adam) at the end.

    Speed: ``precision`` ``"fp32"``, ``"bf16"`` (``torch.autocast``, CPU or GPU) or ``"fp16"``
    (autocast with a gradient scaler, GPU only) for the training steps (evaluation and probes
    stay float32); ``channels_last``: model and inputs in channels_last memory format (TrackedBN
    keeps it, no copies).

    Several processes: ``batch_size`` is the global batch, split over the ranks; ``sync_bn``:
    BN statistics of the whole global batch (``TrackedBN(sync=True)``), which makes N processes
    train as one does (no effect with one process).
    """

    num_classes: int
    stage: str = "joint"
    epochs: int = 10
    batch_size: int = 16
    seed: int = 0
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bn_weight_decay: float | None = None
    schedule: str = "step"
    lr_step: int = 70
    lr_gamma: float = 0.1
    audio_arch: str = "resnet18"
    visual_arch: str = "resnet18"
    width: int = 64
    visual_channels: int = 3
    audio_init: str | None = None
    visual_init: str | None = None
    adapt_first_conv: str = "sum"
    init_from: str | None = None
    abri: tuple = ()
    abri_granularity: str = "layer"
    modalities: tuple = MODALITIES
    audio_confidence: str | None = None
    visual_confidence: str | None = None
    mask_threshold: float = 0.5
    mask_eta: tuple = (5.0, 5.0)
    mask_rho: tuple = (0.5, 0.5)
    mask_rule: str = "symmetric"
    mask_mode: str = "conf"
    mask_target: str = "input"
    audio_patch_grid: tuple = (32, 16)
    visual_patch_grid: tuple = (22, 22)
    feature_group: int = 1
    checkpoint_every: int = 0
    probe_epochs: int = 0
    probe_lr: float = 1e-2
    sync_bn: bool = False
    precision: str = "fp32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        for name in (
            "abri",
            "modalities",
            "mask_eta",
            "mask_rho",
            "audio_patch_grid",
            "visual_patch_grid",
        ):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and its allowed values."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"TrainConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in ("abri", "modalities"):
            unknown = set(getattr(self, name)) - set(MODALITIES)
            if unknown:
                raise ValueError(
                    f"TrainConfig.{name} takes modalities {MODALITIES}, got {sorted(unknown)}"
                )
        if not self.modalities:
            raise ValueError("TrainConfig.modalities must name at least one modality")
        positive = ("num_classes", "epochs", "batch_size", "width", "lr_step", "feature_group")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"TrainConfig.{name} must be a positive int, got "
                    f"{getattr(self, name)!r}"
                    + (" (the number of classes of the dataset)" if name == "num_classes" else "")
                )
        if self.num_classes < 2:
            raise ValueError(f"TrainConfig.num_classes must be >= 2, got {self.num_classes}")
        for name in ("checkpoint_every", "probe_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0")
        for name in ("lr", "probe_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("mask_eta", "mask_rho", "audio_patch_grid", "visual_patch_grid"):
            if len(getattr(self, name)) != 2:
                raise ValueError(
                    f"TrainConfig.{name} must be an (audio, visual) pair"
                    if name.startswith("mask")
                    else f"TrainConfig.{name} must be a (rows, columns) pair"
                )
        for name in ("audio_patch_grid", "visual_patch_grid"):
            if not all(isinstance(cells, int) and cells >= 1 for cells in getattr(self, name)):
                raise ValueError(
                    f"TrainConfig.{name} must be two ints >= 1, got {getattr(self, name)}"
                )
        for name in ("mask_rho", "mask_threshold"):
            values = getattr(self, name)
            if not all(0 <= v <= 1 for v in (values if isinstance(values, tuple) else [values])):
                raise ValueError(f"TrainConfig.{name} must lie in [0, 1], got {values}")
        if not all(math.isfinite(v) and v >= 0 for v in self.mask_eta):
            raise ValueError(f"TrainConfig.mask_eta must be finite and >= 0, got {self.mask_eta}")
        for name in ("weight_decay", "bn_weight_decay"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"TrainConfig.{name} must be finite and >= 0, got {value}")
        if not (math.isfinite(self.lr_gamma) and self.lr_gamma > 0):
            raise ValueError(f"TrainConfig.lr_gamma must be finite and > 0, got {self.lr_gamma}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise ValueError(f"TrainConfig.seed must be an int in [0, 2**32), got {self.seed!r}")
        if self.visual_channels not in (1, 3):
            raise ValueError("TrainConfig.visual_channels must be 1 or 3")
        for name in ("sync_bn", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"TrainConfig.{name} must be True or False, got {getattr(self, name)!r}"
                )

    def to_dict(self) -> dict:
        return {
            name: list(value) if isinstance(value, tuple) else value
            for name, value in dataclasses.asdict(self).items()
        }

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}")
        return cls(**values)

    def differences(self, other: TrainConfig) -> list[str]:
        """``"field: this != other"`` for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


def patch_size(size: Sequence[int], grid: Sequence[int]) -> tuple[int, int]:
    """The patch of an input plane ``size`` for the official patch ``grid`` (see TrainConfig)."""
    return tuple(max(1, extent // cells) for extent, cells in zip(size, grid))
