"""One small training loop for FusT and its baseline (plain PyTorch), resumable bit for bit.

Stages (:attr:`TrainConfig.stage`):

``"stage1"``  FusT stage 1: each encoder fine-tuned alone with its own head (``audio_fc``,
              ``visual_fc``; the two branches share no parameter, so one loop trains both
              independently), recording every epoch each training sample's confidence with a
              :class:`~avkernels.fust.ConfidenceTracker` per modality; written as
              ``confidence_audio.pt`` / ``confidence_visual.pt`` in the run directory.
``"stage2"``  FusT stage 2: joint training from the stage-1 encoders (``init_from``), cross
              entropy on the joint logits, with the per-sample mask ratios of
              :func:`~avkernels.fust.mask_ratios` (joined by sample id) applied to the inputs
              (:func:`~avkernels.mask_patches`, the official operator), to the fused features
              (:class:`~avkernels.MaskedConcatFusion`), or both (``mask_target``).
``"joint"``   naive joint training (the baseline): the same without masking.

Batches are dicts: ``"audio"`` (B, 1, frames, mel) float, ``"visual"`` (B, C, T, H, W) float,
``"label"`` (B,) int64, ``"id"`` list of sample ids.

Run directory: ``config.json``; ``checkpoint.pt`` (everything needed to resume: model,
optimizer, scheduler, RNG states of torch/numpy/python (``rng``; ``rng_other_ranks``: those of
ranks 1.. under several processes), epoch and step, confidence trackers, running epoch totals,
metrics history; written atomically at every epoch end, every
``checkpoint_every`` steps and when a stop is requested, e.g. by Ctrl-C); ``metrics.jsonl`` and
``metrics.csv`` (one row per epoch and split, rewritten from the checkpointed history so a
resumed run never duplicates a row); ``model.pt`` (the final model state dict).

Reproducibility: the order of the data in epoch ``e`` is a function of ``(seed, e)`` only (no
generator state to carry), and the DataLoader gets a generator seeded the same way, so workers
are seeded identically. A run resumed from any checkpoint equals the uninterrupted run bit for
bit on CPU when the dataset's randomness, if any, comes from torch's global generator with
``num_workers=0`` (then it is in the checkpointed RNG state); with worker processes and random
augmentation, resuming at an epoch boundary is exact and resuming mid-epoch is not.

Several processes (``torchrun``, see :func:`torchrun_process_group`): a Trainer built while a
``torch.distributed`` process group is initialised trains with ``DistributedDataParallel``.
``batch_size`` stays the *global* batch: every rank walks the same epoch permutation and takes
its contiguous share of each batch (:class:`RankBatchSampler`), and the loss of a rank is its
samples' cross-entropy sum times ``world_size / global batch``, so that DDP's gradient average
is the one-process gradient of the whole batch. The per-step results (confidences, accuracy,
loss) are gathered from every rank in rank order, i.e. in the batch's order, into identical
trackers and totals on every rank, so nothing is lost or counted twice. With ``sync_bn=True``
the BN layers normalise with the statistics of the whole global batch, and N processes compute
what one process computes with the same config (up to floating-point rounding): same model,
same confidences per sample. With per-rank BN (the default, as in the official code) each rank
normalises its share alone. Rank 0 alone writes files and shows progress; checkpoints hold each
rank's RNG state and every rank loads them on resume (exact with the same number of processes).
Evaluation and the probes' features are computed on shards and summed/gathered, every rank
taking part. A short last batch with fewer samples than ranks gives the ranks without a share
one padding sample each, weighted 0 and not recorded (it still enters synced BN statistics).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from avkernels import mask_patches
from avkernels.app.models import AVClassifier, load_encoder, read_state_dict
from avkernels.app.progress import progress_enabled
from avkernels.distributed import Ranks, wrap_ddp
from avkernels.files import atomic_write, atomic_write_text
from avkernels.fust import ConfidenceTracker, MaskRatios, mask_ratios

STAGES = ("stage1", "stage2", "joint")
MODALITIES = ("audio", "visual")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")
MASK_TARGETS = ("input", "features", "both")
CHECKPOINT_FORMAT = "avkernels.app.train.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT, CONFIG, MODEL = "checkpoint.pt", "config.json", "model.pt"
METRICS_JSONL, METRICS_CSV = "metrics.jsonl", "metrics.csv"
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
}
# torch.autocast dtype of each TrainConfig.precision (fp32: autocast off).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as ``config.json`` and in every checkpoint.

    ``num_classes`` is the one required field; ``stage`` one of :data:`STAGES`; ``epochs``,
    ``batch_size``, ``seed`` (initialisation, data order, masks).

    Optimisation: ``optimizer`` (``"sgd"`` with ``momentum``, ``"adam"``, ``"adamw"``),
    ``lr``, ``weight_decay``; ``schedule`` per epoch: ``"constant"``, ``"step"`` (times
    ``lr_gamma`` every ``lr_step`` epochs, the official OGM-GE setting) or ``"cosine"`` (to 0
    over ``epochs``). Defaults follow the official code (SGD 1e-3, momentum 0.9, wd 1e-4,
    StepLR 70/0.1).

    Model: ``audio_arch``/``visual_arch`` (``resnet18``/``resnet34``), ``width`` (64 =
    ResNet), ``visual_channels``; initial encoder weights ``audio_init``/``visual_init`` (any
    checkpoint :func:`~avkernels.app.models.load_encoder` reads; RGB stems moved to the audio
    encoder's one channel by ``adapt_first_conv``, ``"sum"`` or ``"mean"``); ``init_from``: a
    run directory or checkpoint whose ``audio_net``/``visual_net`` replace those (stage 2 from
    stage 1); ``abri``: modalities whose encoder gets ABRi (after loading).

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
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("mask_eta", "mask_rho", "audio_patch_grid", "visual_patch_grid"):
            if len(getattr(self, name)) != 2:
                raise ValueError(
                    f"TrainConfig.{name} must be an (audio, visual) pair"
                    if name.startswith("mask")
                    else f"TrainConfig.{name} must be a (rows, columns) pair"
                )
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


class TrainingInterrupted(KeyboardInterrupt):
    """A stop was requested (Ctrl-C or :meth:`Trainer.request_stop`); the checkpoint holds
    everything done so far: resume with ``Trainer(..., resume=True)`` / ``--resume``."""


# --- data order ---------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that depends on ``(seed, epoch)`` only."""
    return _seed_of(np.random.SeedSequence([seed, epoch]))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own random stream (masks, augmentation, worker seeds): rank 0
    keeps ``seed`` (one process is unchanged), the others get independent streams."""
    return seed if rank == 0 else _seed_of(np.random.SeedSequence(seed, spawn_key=(rank,)))


def _seed_of(sequence: np.random.SeedSequence) -> int:
    return int(sequence.generate_state(2, np.uint64)[0] >> np.uint64(1))


class EpochSampler(Sampler[int]):
    """A random permutation of the dataset that is a function of (seed, epoch), starting at a
    given batch (to resume mid-epoch without replaying the skipped samples)."""

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.size, generator=generator)
        return iter(order[self.start_batch * self.batch_size :].tolist())

    def __len__(self) -> int:
        return max(0, self.size - self.start_batch * self.batch_size)


class RankBatchSampler(Sampler[list]):
    """This rank's share (:meth:`Ranks.shard`) of each batch of an :class:`EpochSampler`.

    Every rank walks the same batches, so in each step the shares of the ranks, in rank order,
    make up the batch one process would train on. A rank whose share of a short last batch is
    empty gets the batch's first sample as padding (it must still step with the others); the
    trainer weighs it 0 and does not record it (:meth:`Ranks.shard` tells which ranks pad).
    """

    def __init__(self, sampler: EpochSampler, ranks: Ranks) -> None:
        self.sampler, self.ranks = sampler, ranks

    def __iter__(self) -> Iterator[list]:
        order, size = list(self.sampler), self.sampler.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            yield [batch[i] for i in self.ranks.shard(len(batch))] or batch[:1]

    def __len__(self) -> int:
        return batches_per_epoch(len(self.sampler), self.sampler.batch_size)


def batches_per_epoch(size: int, batch_size: int) -> int:
    return math.ceil(size / batch_size)


# --- processes ----------------------------------------------------------------------------------


def training_device(device=None) -> torch.device:
    """``device`` (default: cuda if available, else cpu); a CUDA device without an index is
    this process's GPU: ``cuda:LOCAL_RANK`` under torchrun, else the current one."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        local_rank = os.environ.get("LOCAL_RANK")
        device = torch.device(
            "cuda", int(local_rank) if local_rank is not None else torch.cuda.current_device()
        )
    return device


@contextlib.contextmanager
def torchrun_process_group(device=None) -> Iterator[torch.device]:
    """Join the processes started by ``torchrun --nproc_per_node N`` for the block; yields this
    process's :func:`training_device`.

    With ``WORLD_SIZE`` > 1 in the environment and no process group yet, initialises the
    default group from torchrun's variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...):
    NCCL on CUDA, each process on ``cuda:LOCAL_RANK``, gloo on the CPU; it is destroyed at the
    end. One process, or a group the caller already initialised, is left as it is.
    """
    device = training_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


# --- RNG state ----------------------------------------------------------------------------------


def rng_state() -> dict:
    """Global RNG states of torch (CPU and CUDA), numpy and python, loadable with
    ``torch.load(weights_only=True)``."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --- model construction -------------------------------------------------------------------------


def build_model(config: TrainConfig) -> AVClassifier:
    """The model of ``config`` with its initial weights (``*_init``, ``init_from``, ABRi) and
    synced BN layers with ``sync_bn``."""
    from avkernels import abri
    from avkernels.convert import convert

    model = AVClassifier(
        config.num_classes,
        config.audio_arch,
        config.visual_arch,
        visual_channels=config.visual_channels,
        width=config.width,
        feature_group=config.feature_group,
    )
    for modality, path in (("audio", config.audio_init), ("visual", config.visual_init)):
        if path is not None:
            load_encoder(getattr(model, f"{modality}_net"), path, adapt=config.adapt_first_conv)
    if config.init_from is not None:
        source = Path(config.init_from)
        source = source / MODEL if source.is_dir() else source
        state_dict = read_state_dict(source)
        for modality in MODALITIES:
            load_encoder(getattr(model, f"{modality}_net"), state_dict, prefix=f"{modality}_net.")
    for modality in config.abri:
        encoder = getattr(model, f"{modality}_net")
        if not any(True for _ in abri.abri_layers(encoder)):
            abri.apply(encoder)
    if config.sync_bn:
        convert(model, sync=True)
    return model


def build_optimizer(config: TrainConfig, parameters) -> torch.optim.Optimizer:
    parameters = [p for p in parameters if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    optimizer = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return optimizer(parameters, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.lr_step, config.lr_gamma)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def patch_size(size: Sequence[int], grid: Sequence[int]) -> tuple[int, int]:
    """The patch of an input plane ``size`` for the official patch ``grid`` (see TrainConfig)."""
    return tuple(max(1, extent // cells) for extent, cells in zip(size, grid))


# --- the trainer --------------------------------------------------------------------------------


class _StageNet(nn.Module):
    """A stage's training forward as one module that holds exactly the parts the stage trains,
    which is what DDP wraps (each of its parameters gets a gradient at every step, so DDP needs
    no search for unused ones). Stage 1: ``forward(audio, visual)`` -> the logits of each
    trained modality's head, in ``modalities`` order; otherwise the model's
    :class:`~avkernels.nn.fusion.FusionOutput`."""

    def __init__(self, model: AVClassifier, stage: str, modalities: Sequence[str]) -> None:
        super().__init__()
        self.stage, self.modalities = stage, tuple(modalities)
        # The whole model stays out of the module tree: its untrained parts (the fusion layer in
        # stage 1, the uni-modal heads otherwise) would be parameters DDP waits for in vain.
        object.__setattr__(self, "model", model)
        parts = (
            [f"{m}_{part}" for m in self.modalities for part in ("net", "fc")]
            if stage == "stage1"
            else ["audio_net", "visual_net", "fusion_module"]
        )
        for name in parts:
            self.add_module(name, getattr(model, name))

    def forward(self, audio: Tensor | None, visual: Tensor | None, ratio_a=None, ratio_v=None):
        if self.stage == "stage1":
            return tuple(
                self.model.forward_audio(audio)
                if m == "audio"
                else self.model.forward_visual(visual)
                for m in self.modalities
            )
        return self.model(audio, visual, ratio_a, ratio_v)


class Trainer:
    """Train one run of ``config`` on ``train_data`` into ``run_dir``.

    Args:
        train_data / eval_data: datasets of dict samples (module docstring); ``eval_data``
            (optional) is evaluated after every epoch.
        resume: continue the run saved in ``run_dir`` (its config must equal ``config``);
            without it ``run_dir`` must not hold a run yet.
        device: where to train (default: cuda if available, see :func:`training_device`);
            not part of the config, so a run can be resumed elsewhere.
        num_workers: DataLoader workers (see the module docstring on exactness).
        progress: tqdm bars (rank 0 only); default: only when stderr is a terminal.
        on_step: called as ``on_step(trainer, global_step)`` after every optimizer step.

    :meth:`fit` runs (or finishes) the training and returns the metrics history. Built while a
    ``torch.distributed`` process group is initialised, every rank builds a Trainer with the
    same arguments and calls :meth:`fit` (module docstring, "Several processes").
    """

    def __init__(
        self,
        config: TrainConfig,
        train_data: Dataset,
        run_dir,
        *,
        eval_data: Dataset | None = None,
        resume: bool = False,
        device=None,
        num_workers: int = 0,
        progress: bool | None = None,
        on_step: Callable[[Trainer, int], None] | None = None,
    ) -> None:
        config.validate()
        self.config, self.train_data, self.eval_data = config, train_data, eval_data
        self.run_dir = Path(run_dir)
        self.ranks = Ranks.current()
        self.device = training_device(device)
        self.num_workers, self.progress, self.on_step = num_workers, progress, on_step
        self._stop = threading.Event()
        if len(train_data) == 0:
            raise ValueError("Trainer: the training set is empty")
        if config.batch_size < self.ranks.world_size:
            raise ValueError(
                f"Trainer: batch_size={config.batch_size} is the global batch, "
                f"split over the {self.ranks.world_size} processes: make it at "
                "least the number of processes"
            )
        checkpoint_path = self.run_dir / CHECKPOINT
        if resume and not checkpoint_path.is_file():
            raise FileNotFoundError(
                f"Trainer: nothing to resume: no {CHECKPOINT} in {self.run_dir}"
            )
        if not resume and checkpoint_path.exists():
            raise FileExistsError(
                f"Trainer: {self.run_dir} already holds a run; resume it "
                "(resume=True / --resume) or choose another directory"
            )
        if self.device.type == "cuda" and self.ranks.world_size > 1:
            torch.cuda.set_device(self.device)  # the device of the collectives
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError(
                "Trainer: precision='fp16' needs a CUDA device (float16 autocast "
                "with a gradient scaler); on the CPU use precision='bf16'"
            )
        seed_everything(config.seed)
        self.model = build_model(config).to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        # Every rank builds the same initial model; then each draws from its own stream.
        self._own_seed = rank_seed(config.seed, self.ranks.rank)
        if self.ranks.rank:
            seed_everything(self._own_seed)
        self.optimizer = build_optimizer(config, self.model.parameters())
        self.scheduler = build_scheduler(config, self.optimizer)
        self.trackers: dict[str, ConfidenceTracker] = {}
        if config.stage == "stage1":
            self.trackers = {m: ConfidenceTracker(len(train_data)) for m in config.modalities}
        self.ratios: MaskRatios | None = None
        if config.stage == "stage2":
            self.ratios = self._mask_ratios()
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.finished = False
        self.history: list[dict] = []
        self._totals = self._zero_totals()
        if resume:
            self._load_checkpoint(checkpoint_path)
        self._net = _StageNet(self.model, config.stage, self.modalities)
        if self.ranks.world_size > 1:
            self._net = wrap_ddp(
                self._net, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    # -- state ------------------------------------------------------------------------------

    def _mask_ratios(self) -> MaskRatios:
        config = self.config
        sources = []
        for modality in MODALITIES:
            path = getattr(config, f"{modality}_confidence")
            if path is None:
                if config.init_from is None or not Path(config.init_from).is_dir():
                    raise ValueError(
                        f"stage 2 needs the stage-1 confidences: set "
                        f"{modality}_confidence or init_from (a stage-1 run dir)"
                    )
                path = Path(config.init_from) / f"confidence_{modality}.pt"
            if not Path(path).is_file():
                raise FileNotFoundError(
                    f"stage 2: no {modality} confidence file at {path} "
                    "(stage 1 writes confidence_<modality>.pt when it ends)"
                )
            sources.append(path)
        return mask_ratios(
            *sources,
            config.mask_threshold,
            config.mask_eta,
            config.mask_rho,
            rule=config.mask_rule,
            mode=config.mask_mode,
            verbose=False,
        )

    def _zero_totals(self) -> dict:
        return {"loss": 0.0, "samples": 0, **{f"correct_{m}": 0 for m in ("joint",) + MODALITIES}}

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "rng_other_ranks": [],
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "finished": self.finished,
            "trackers": {m: t.state_dict() for m, t in self.trackers.items()},
            "totals": dict(self._totals),
            "history": list(self.history),
        }

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` atomically (and the metrics files from the history).

        With several processes every rank calls it: rank 0 writes, with every rank's RNG
        state, and all return once the files are in place."""
        rng_states = self.ranks.gather(rng_state())
        if self.ranks.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.config.to_dict(), indent=2) + "\n"
            atomic_write_text(self.run_dir / CONFIG, text)
            state = self.state_dict()
            state["rng_other_ranks"] = rng_states[1:]
            atomic_write(self.run_dir / CHECKPOINT, lambda file: torch.save(state, file))
            self._write_metrics()
        self.ranks.barrier()
        return self.run_dir / CHECKPOINT

    def _load_checkpoint(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a foreign or damaged file
            raise ValueError(f"Trainer: {path} is not a readable checkpoint ({error})") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"Trainer: {path} is not an avkernels training checkpoint")
        saved = TrainConfig.from_dict(state["config"])
        differences = saved.differences(self.config)
        if differences:
            raise ValueError(
                "Trainer: the config differs from the run being resumed ("
                + "; ".join(differences)
                + "); resume with the saved config "
                f"({self.run_dir / CONFIG})"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # absent in checkpoints written before precision existed
            self.scaler.load_state_dict(state["scaler"])
        if state["global_step"]:
            # The optimizer stepped before the interruption: tell the scheduler, which would
            # otherwise warn of a wrong call order when the resumed run closes an epoch at once.
            self.optimizer._opt_called = True
        self.trackers = {}
        for modality, tracker_state in state["trackers"].items():
            self.trackers[modality] = ConfidenceTracker(tracker_state["num_samples"])
            self.trackers[modality].load_state_dict(tracker_state)
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        self.global_step, self.finished = state["global_step"], state["finished"]
        self._totals, self.history = dict(state["totals"]), list(state["history"])
        # Each rank continues its own stream; ranks the saved run did not have (it ran on fewer
        # processes) keep the fresh stream of rank_seed.
        rng_states = [state["rng"], *state.get("rng_other_ranks", [])]
        if self.ranks.rank < len(rng_states):
            set_rng_state(rng_states[self.ranks.rank])

    def _write_metrics(self) -> None:
        lines = "".join(json.dumps(row) + "\n" for row in self.history)
        atomic_write_text(self.run_dir / METRICS_JSONL, lines)
        columns = list(dict.fromkeys(key for row in self.history for key in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(self.run_dir / METRICS_CSV, text.getvalue())

    # -- the loop ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the current step, checkpoint, and raise :class:`TrainingInterrupted`."""
        self._stop.set()

    def fit(self) -> list[dict]:
        """Train the remaining epochs (then the probes); returns the metrics history."""
        config = self.config
        if self.finished:
            return self.history
        sampler = EpochSampler(len(self.train_data), config.batch_size, config.seed)
        batches = RankBatchSampler(sampler, self.ranks)
        with _stop_on_sigint(self):
            while self.epoch < config.epochs:
                sampler.set_epoch(self.epoch, self.step_in_epoch)
                loader = DataLoader(
                    self.train_data,
                    batch_sampler=batches,
                    num_workers=self.num_workers,
                    generator=torch.Generator().manual_seed(epoch_seed(self._own_seed, self.epoch)),
                )
                self._train_epoch(loader)
                self._end_epoch()
            if config.probe_epochs:
                self.ranks.broadcast_float_buffers(self.model)
                for modality in self.modalities:
                    row = linear_probe(
                        self.model,
                        modality,
                        self.train_data,
                        self.eval_data,
                        epochs=config.probe_epochs,
                        lr=config.probe_lr,
                        batch_size=config.batch_size,
                        seed=config.seed,
                        device=self.device,
                        ranks=self.ranks,
                    )
                    self.history.append({"epoch": self.epoch, "split": f"probe_{modality}", **row})
            self.finished = True
            if self.ranks.is_main:
                weights = self.model.state_dict()
                atomic_write(self.run_dir / MODEL, lambda file: torch.save(weights, file))
            self.save_checkpoint()
        return self.history

    def _train_epoch(self, loader: DataLoader) -> None:
        from tqdm.auto import tqdm

        self.model.train()
        size, batch_size = len(self.train_data), self.config.batch_size
        bar = tqdm(
            loader,
            total=batches_per_epoch(size, batch_size),
            initial=self.step_in_epoch,
            leave=False,
            disable=not self._show_progress,
            desc=f"{self.config.stage} epoch {self.epoch + 1}/{self.config.epochs}",
        )
        for batch in bar:
            global_batch = min(batch_size, size - self.step_in_epoch * batch_size)
            loss = self._record(self.ranks.gather(self._train_step(batch, global_batch)))
            self.step_in_epoch += 1
            self.global_step += 1
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if self.on_step is not None:
                self.on_step(self, self.global_step)
            if self.ranks.any(self._stop.is_set()):
                self.save_checkpoint()
                raise TrainingInterrupted(
                    f"stopped at epoch {self.epoch + 1}, step {self.step_in_epoch}; the "
                    f"checkpoint in {self.run_dir} holds everything: resume it"
                )
            if (
                self.config.checkpoint_every
                and self.global_step % self.config.checkpoint_every == 0
            ):
                self.save_checkpoint()
        bar.close()

    def _inputs(self, batch: dict) -> tuple[Tensor | None, Tensor | None, Tensor, list]:
        """(audio, visual, labels, ids) on the device; an input the stage does not use is None."""
        missing = {"label", "id", *self.modalities} - set(batch)
        if missing:
            raise KeyError(
                f"Trainer: a batch lacks {sorted(missing)}; batches are dicts with "
                f"'label', 'id' and the inputs {list(self.modalities)}"
            )
        audio, visual = (
            batch[m].to(self.device, non_blocking=True) if m in self.modalities else None
            for m in MODALITIES
        )
        if self.config.channels_last:
            audio = None if audio is None else audio.contiguous(memory_format=torch.channels_last)
            visual = (
                None if visual is None else visual.contiguous(memory_format=torch.channels_last_3d)
            )
        ids = batch["id"]  # collated int ids are a tensor
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return audio, visual, batch["label"].to(self.device), ids

    @property
    def modalities(self) -> tuple:
        """The inputs this run uses: stage 1's ``modalities``, both otherwise."""
        return self.config.modalities if self.config.stage == "stage1" else MODALITIES

    @property
    def _show_progress(self) -> bool:
        return self.ranks.is_main and progress_enabled(self.progress)

    def _train_step(self, batch: dict, global_batch: int) -> dict:
        """One optimizer step on this rank's share of a batch of ``global_batch`` samples;
        returns this rank's results for :meth:`_record` (CPU tensors, ready to gather)."""
        config = self.config
        audio, visual, labels, ids = self._inputs(batch)
        padding = not self.ranks.shard(global_batch)  # see RankBatchSampler
        autocast_dtype = AUTOCAST_DTYPES[config.precision]
        autocast = torch.autocast(
            self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
        )
        if config.stage == "stage1":
            with autocast:
                heads = dict(zip(config.modalities, self._net(audio, visual)))
                loss = sum(
                    F.cross_entropy(logits, labels, reduction="sum") for logits in heads.values()
                )
        else:
            ratio_a = ratio_v = None
            if self.ratios is not None:
                ratio_a, ratio_v = self.ratios.gather(ids)
                if config.mask_target in ("input", "both"):
                    # In place is safe: the loader's default collate stacks the samples into
                    # fresh batch tensors, so the dataset's own data is never touched.
                    with torch.no_grad():
                        mask_patches(
                            audio,
                            ratio_a.to(self.device),
                            patch_size(audio.shape[-2:], config.audio_patch_grid),
                            inplace=True,
                        )
                        mask_patches(
                            visual,
                            ratio_v.to(self.device),
                            patch_size(visual.shape[-2:], config.visual_patch_grid),
                            inplace=True,
                        )
                if config.mask_target == "input":
                    ratio_a = ratio_v = None
            with autocast:
                output = self._net(audio, visual, ratio_a, ratio_v)
                loss = F.cross_entropy(output.logits, labels, reduction="sum")
            heads = dict(zip(("joint",) + MODALITIES, output))
        # DDP averages the ranks' gradients: this weight makes the average the gradient of the
        # mean loss over the whole batch, however it is split (padding weighs nothing).
        weight = 0.0 if padding else self.ranks.world_size / global_batch
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss * weight).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        kept = slice(0, 0) if padding else slice(None)
        labels = labels[kept].cpu()
        result = {
            "ids": ids[kept],
            "loss": 0.0 if padding else float(loss.detach()),
            "correct": {
                name: int((logits[kept].argmax(1).cpu() == labels).sum())
                for name, logits in heads.items()
            },
        }
        if self.trackers:
            result["labels"] = labels
            # Autocast logits are bf16/fp16: confidences are computed from float32 at least.
            result["logits"] = {
                m: heads[m][kept]
                .detach()
                .cpu()
                .to(torch.promote_types(heads[m].dtype, torch.float32))
                for m in self.trackers
            }
        return result

    def _record(self, results: list[dict]) -> float:
        """Add one step's results of every rank, in rank order (the batch's order), to the
        epoch totals and the confidence trackers; returns the step's mean loss."""
        totals = self._totals
        ids = [sample_id for result in results for sample_id in result["ids"]]
        for result in results:
            totals["loss"] += result["loss"]
            for name, correct in result["correct"].items():
                totals[f"correct_{name}"] += correct
        totals["samples"] += len(ids)
        if self.trackers:
            labels = torch.cat([result["labels"] for result in results])
            for modality, tracker in self.trackers.items():
                tracker.update(ids, torch.cat([r["logits"][modality] for r in results]), labels)
        return sum(result["loss"] for result in results) / len(ids)

    def _end_epoch(self) -> None:
        totals, stage = self._totals, self.config.stage
        names = self.config.modalities if stage == "stage1" else ("joint",) + MODALITIES
        row = {
            "epoch": self.epoch + 1,
            "split": "train",
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": totals["loss"] / totals["samples"],
        }
        row.update({_acc_name(n): totals[f"correct_{n}"] / totals["samples"] for n in names})
        self.history.append(row)
        for tracker in self.trackers.values():
            tracker.end_epoch()
        if self.eval_data is not None:
            self.ranks.broadcast_float_buffers(self.model)  # evaluate rank 0's model everywhere
            self.history.append(
                {
                    "epoch": self.epoch + 1,
                    "split": "eval",
                    **evaluate(
                        self.model,
                        self.eval_data,
                        stage,
                        self.config.batch_size,
                        self.device,
                        self.modalities,
                        ranks=self.ranks,
                    ),
                }
            )
        if self._show_progress:
            from tqdm.auto import tqdm

            rows = [r for r in self.history if r["epoch"] == self.epoch + 1]
            tqdm.write(
                f"{stage} epoch {self.epoch + 1}/{self.config.epochs}: "
                + "; ".join(
                    r["split"]
                    + " "
                    + ", ".join(
                        f"{k} {v:.4f}" for k, v in r.items() if k.startswith(("acc", "loss"))
                    )
                    for r in rows
                ),
                file=sys.stderr,
            )
        self.scheduler.step()
        self.epoch += 1
        self.step_in_epoch = 0
        self._totals = self._zero_totals()
        if self.epoch == self.config.epochs and self.ranks.is_main:
            for modality, tracker in self.trackers.items():
                tracker.save(self.run_dir / f"confidence_{modality}.pt")
        self.save_checkpoint()


def _acc_name(name: str) -> str:
    return "acc" if name == "joint" else f"acc_{name}"


@contextlib.contextmanager
def _stop_on_sigint(trainer: Trainer):
    """First Ctrl-C: finish the step, checkpoint, stop. A second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        trainer.request_stop()
        signal.signal(signal.SIGINT, previous)
        if trainer.ranks.is_main:
            print(
                "\navkernels: stopping after this step (Ctrl-C again to abort at once)",
                file=sys.stderr,
            )

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --- evaluation ---------------------------------------------------------------------------------


def _sequential(data: Dataset, batch_size: int, ranks: Ranks | None = None) -> DataLoader:
    """``data`` in order, or this rank's contiguous shard of it."""
    if ranks is not None and ranks.world_size > 1:
        data = Subset(data, ranks.shard(len(data)))
    return DataLoader(data, batch_size, shuffle=False, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def evaluate(
    model: AVClassifier,
    data: Dataset,
    stage: str,
    batch_size: int,
    device=None,
    modalities: Sequence[str] = MODALITIES,
    *,
    ranks: Ranks | None = None,
) -> dict:
    """Loss and accuracy on ``data`` in eval mode: per modality (``acc_audio``,
    ``acc_visual``) from the uni-modal heads of ``modalities`` for ``stage="stage1"``, else
    the joint ``acc`` and each modality's half of the fusion layer. Restores the model's
    training mode. With ``ranks`` of several processes (a collective), each rank evaluates its
    shard and every rank returns the totals of all."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    names = tuple(modalities) if stage == "stage1" else ("joint",) + MODALITIES
    loss, samples, correct = 0.0, 0, dict.fromkeys(names, 0)
    for batch in _sequential(data, batch_size, ranks):
        labels = batch["label"].to(device)
        if stage == "stage1":
            outputs = {m: getattr(model, f"forward_{m}")(batch[m].to(device)) for m in modalities}
            batch_loss = sum(F.cross_entropy(o, labels, reduction="sum") for o in outputs.values())
        else:
            output = model(batch["audio"].to(device), batch["visual"].to(device))
            outputs = dict(zip(names, output))
            batch_loss = F.cross_entropy(output.logits, labels, reduction="sum")
        loss += float(batch_loss)
        samples += labels.shape[0]
        for name, logits in outputs.items():
            correct[name] += int((logits.argmax(1) == labels).sum())
    model.train(was_training)
    if ranks is not None:
        totals = ranks.gather((loss, samples, correct))
        loss, samples = sum(t[0] for t in totals), sum(t[1] for t in totals)
        correct = {name: sum(t[2][name] for t in totals) for name in names}
    return {"loss": loss / samples, **{_acc_name(n): c / samples for n, c in correct.items()}}


@torch.no_grad()
def _features(
    model: AVClassifier,
    modality: str,
    data: Dataset,
    batch_size: int,
    device,
    ranks: Ranks | None = None,
) -> tuple[Tensor, Tensor]:
    """Pooled features and labels of ``data`` in order; with ``ranks``, each rank encodes its
    shard and every rank gets the whole set."""
    encode = model.encode_audio if modality == "audio" else model.encode_visual
    width = getattr(model, f"{modality}_net").out_features
    features = [torch.empty(0, width, device=device)]  # a shard may be empty
    labels = [torch.empty(0, dtype=torch.long, device=device)]
    for batch in _sequential(data, batch_size, ranks):
        features.append(encode(batch[modality].to(device)))
        labels.append(batch["label"].to(device))
    features, labels = torch.cat(features), torch.cat(labels)
    if ranks is not None and ranks.world_size > 1:
        shards = ranks.gather((features.cpu(), labels.cpu()))
        features = torch.cat([shard[0] for shard in shards]).to(device)
        labels = torch.cat([shard[1] for shard in shards]).to(device)
    return features, labels


def linear_probe(
    model: AVClassifier,
    modality: str,
    train_data: Dataset,
    eval_data: Dataset | None = None,
    *,
    epochs: int = 20,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    device=None,
    ranks: Ranks | None = None,
) -> dict:
    """Linear-probe accuracy of one frozen encoder: pooled eval-mode features of
    ``train_data``, a Linear layer trained with Adam for ``epochs``; accuracy on the train
    features and on ``eval_data`` (when given). The global RNG state is left untouched. With
    ``ranks`` of several processes (a collective), the features are computed on shards and
    every rank trains the same probe on all of them."""
    if modality not in MODALITIES:
        raise ValueError(f"linear_probe: modality must be one of {MODALITIES}, got {modality!r}")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    train_x, train_y = _features(model, modality, train_data, batch_size, device, ranks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(train_x.shape[1], model.num_classes).to(device)
        optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
        for epoch in range(epochs):
            generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            order = torch.randperm(train_x.shape[0], generator=generator).to(device)
            for rows in order.split(batch_size):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(probe(train_x[rows]), train_y[rows]).backward()
                optimizer.step()
    result = {"probe_train_acc": _accuracy(probe, train_x, train_y)}
    if eval_data is not None:
        eval_x, eval_y = _features(model, modality, eval_data, batch_size, device, ranks)
        result["probe_eval_acc"] = _accuracy(probe, eval_x, eval_y)
    model.train(was_training)
    return result


@torch.no_grad()
def _accuracy(probe: nn.Module, features: Tensor, labels: Tensor) -> float:
    return float((probe(features).argmax(1) == labels).double().mean())
