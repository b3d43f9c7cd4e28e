"""What a run is built from: the model with its initial weights, the optimizer, the learning
rate schedule, stage 2's mask ratios, and the module of a stage's training forward."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from avkernels import abri, convert
from avkernels.app.models import AVClassifier, load_encoder
from avkernels.app.training.config import MODALITIES, TrainConfig
from avkernels.app.training.run_files import MODEL
from avkernels.checkpoints import load_state_dict
from avkernels.fust import MaskRatios, mask_ratios


def build_model(config: TrainConfig) -> AVClassifier:
    """The model of ``config`` with its initial weights (``*_init``, ``init_from``, ABRi) and
    synced BN layers with ``sync_bn``."""
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
        state_dict = load_state_dict(source)
        for modality in MODALITIES:
            load_encoder(getattr(model, f"{modality}_net"), state_dict, prefix=f"{modality}_net.")
    for modality in config.abri:
        encoder = getattr(model, f"{modality}_net")
        if not any(True for _ in abri.abri_layers(encoder)):
            abri.apply(encoder, granularity=config.abri_granularity)
    if config.sync_bn:
        convert(model, sync=True)
    return model


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``model``'s trainable parameters; BatchNorm layers' parameters (ABRi's
    included) decay by ``config.bn_weight_decay`` when it is set."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if config.bn_weight_decay is not None:
        in_bn = {
            id(p)
            for module in model.modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for p in module.parameters(recurse=False)
        }
        parameters = [
            {"params": [p for p in parameters if id(p) not in in_bn]},
            {
                "params": [p for p in parameters if id(p) in in_bn],
                "weight_decay": config.bn_weight_decay,
            },
        ]
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


def build_mask_ratios(config: TrainConfig) -> MaskRatios:
    """Stage 2's per-sample mask ratios from the stage-1 confidence files of ``config``
    (``*_confidence``, default: those of the ``init_from`` run directory)."""
    sources = []
    for modality in MODALITIES:
        path = getattr(config, f"{modality}_confidence")
        if path is None:
            if config.init_from is None or not Path(config.init_from).is_dir():
                raise ValueError(
                    f"stage 2 needs the stage-1 confidences: set "
                    f"TrainConfig.{modality}_confidence or TrainConfig.init_from (a stage-1 run "
                    "folder)"
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


class StageNet(nn.Module):
    """A stage's training forward as one module that holds exactly the parts the stage trains,
    which is what DDP wraps (each of its parameters gets a gradient at every step, so DDP needs
    no search for unused ones). Stage 1: ``forward(audio, visual)`` -> the logits of each
    trained modality's head, in ``modalities`` order; otherwise the model's
    :class:`~avkernels.FusionOutput`."""

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
