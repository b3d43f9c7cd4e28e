"""Audio-visual models: TrackedBN ResNet encoders and the FusT classifier (docs/DESIGN.md,
"Audio-visual setup").

* :class:`ResNetEncoder`: torchvision's ResNet-18/34 layout (``conv1``, ``bn1``, ``layer1``..
  ``layer4``, ``downsample.0``/``downsample.1``; no ``avgpool``, no ``fc``) built from
  torchvision's ``BasicBlock`` with :class:`~avkernels.TrackedBN` as ``norm_layer``.
  Where a BN feeds a ReLU directly (the stem and the first BN of every block) the ReLU runs
  inside the BN kernel; the second BN of a block feeds the residual sum and stays plain.
  ``width`` scales the channels (64 = ResNet's; smaller for tests).
* :func:`load_encoder`: a torchvision-layout checkpoint (e.g. a user's ImageNet ``.pth``,
  whose ``fc`` is dropped), an official-layout one (the official backbone is torchvision's
  layout without ``fc``; its ABRi backbone has ``bn1_addition``/``fusion_weight``... keys), or
  an avkernels one, all loaded strictly; ``adapt_first_conv`` moves RGB stem weights to one
  channel (sum or mean over RGB).
* :class:`AVClassifier`: ``audio_net``, ``visual_net`` and ``fusion_module`` (a
  :class:`~avkernels.MaskedConcatFusion` whose ``fc_out`` takes the official
  ``ConcatFusion`` keys), plus the uni-modal heads ``audio_fc``/``visual_fc`` of FusT stage 1.

Input layouts (checked; the official code's (T, C) vs (C, T) confusion is caught whenever the
shape can tell):

* audio: (B, 1, frames, mel) log-mel spectrograms (official: 1024 frames x 128 mel bins);
* visual: (B, C, T, H, W), C = ``visual_channels`` (3): every frame goes through the encoder
  (B*T images), then a 3-D average pool over (T, h, w). A (B, T, C, H, W) tensor is rejected
  when its dim 1 is not C; with T == C it cannot be told apart: permute (T, C, H, W) samples
  to (C, T, H, W) in the dataset (``frames.permute(1, 0, 2, 3)``).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from avkernels import FusionOutput, MaskedConcatFusion, TrackedBN, checkpoints
from avkernels.checkpoints import BLOCKS, CheckpointError

logger = logging.getLogger(__name__)

ADAPT_MODES = ("sum", "mean")


def _basic_block_class():
    try:
        from torchvision.models.resnet import BasicBlock
    except ImportError as error:  # torchvision is an optional dependency ("av" extra)
        raise ImportError(
            f"avkernels.app.models needs torchvision ({error}); install it with "
            "`pip install 'avkernels[av]'`"
        ) from None
    return BasicBlock


def _fused_block_class():
    """torchvision's BasicBlock whose ``bn1`` applies the ReLU itself (no separate pass)."""
    BasicBlock = _basic_block_class()

    class FusedBasicBlock(BasicBlock):
        def forward(self, x: Tensor) -> Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
            return self.relu(out + identity)

    return FusedBasicBlock


class ResNetEncoder(nn.Module):
    """ResNet-18/34 feature extractor in torchvision's layout, with TrackedBN layers.

    Args:
        arch: ``"resnet18"`` or ``"resnet34"``.
        in_channels: 1 (spectrograms) or 3 (images).
        width: channels of the stem and ``layer1`` (64 in ResNet; the stages have
            width, 2*width, 4*width, 8*width).
        fuse_relu: run the ReLU inside the BNs that feed one directly (stem, each block's
            ``bn1``); the numbers are the same either way.
        track_dead: let every TrackedBN count dead outputs (see :class:`TrackedBN`).

    Forward: (N, in_channels, H, W) -> feature map (N, 8*width, H/32, W/32) (not pooled).
    """

    def __init__(
        self,
        arch: str = "resnet18",
        in_channels: int = 3,
        *,
        width: int = 64,
        fuse_relu: bool = True,
        track_dead: bool = True,
    ) -> None:
        super().__init__()
        if arch not in BLOCKS:
            raise ValueError(f"ResNetEncoder: arch must be one of {sorted(BLOCKS)}, got {arch!r}")
        if in_channels not in (1, 3):
            raise ValueError(
                f"ResNetEncoder: in_channels must be 1 (spectrograms) or 3 (images), "
                f"got {in_channels!r}"
            )
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"ResNetEncoder: width must be a positive int, got {width!r}")
        self.arch, self.in_channels, self.width = arch, in_channels, width
        self.out_features = 8 * width
        norm = partial(TrackedBN, track_dead=track_dead)
        stem_activation = "relu" if fuse_relu else None
        block = _fused_block_class() if fuse_relu else _basic_block_class()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(width, activation=stem_activation)
        self.relu = nn.Identity() if fuse_relu else nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        for stage, (blocks, factor) in enumerate(zip(BLOCKS[arch], (1, 2, 4, 8)), start=1):
            planes, stride = width * factor, 1 if stage == 1 else 2
            layers = []
            for index in range(blocks):
                downsample = None
                if index == 0 and (stride != 1 or inplanes != planes):
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False),
                        norm(planes),
                    )
                layer = block(
                    inplanes, planes, stride if index == 0 else 1, downsample, norm_layer=norm
                )
                if fuse_relu:
                    layer.bn1.activation = "relu"
                layers.append(layer)
                inplanes = planes
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, in_channels={self.in_channels}, width={self.width}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNetEncoder: expected (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# --- checkpoints --------------------------------------------------------------------------------


def adapt_first_conv(weight: Tensor, in_channels: int, mode: str = "sum") -> Tensor:
    """A stem weight (O, 3, k, k) moved to ``in_channels`` = 1 by summing or averaging RGB.

    ``"sum"`` keeps the response to a grey image (R = G = B) unchanged; ``"mean"`` keeps the
    weight scale. Weights that already have ``in_channels`` are returned as they are.
    """
    if mode not in ADAPT_MODES:
        raise ValueError(f"adapt_first_conv: mode must be one of {ADAPT_MODES}, got {mode!r}")
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] != 3 or in_channels != 1:
        raise ValueError(
            f"adapt_first_conv: can move 3-channel weights to 1 channel only, got "
            f"{weight.shape[1]} -> {in_channels}"
        )
    adapted = weight.sum(dim=1, keepdim=True) if mode == "sum" else weight.mean(dim=1, keepdim=True)
    logger.info("adapt_first_conv: %s of the RGB stem weights -> 1 input channel", mode)
    return adapted


def load_encoder(
    encoder: ResNetEncoder, source, *, prefix: str = "", adapt: str | None = None
) -> ResNetEncoder:
    """Load a checkpoint into ``encoder`` strictly; return ``encoder``.

    Args:
        source: a file or a state dict, in torchvision's layout (``fc.*`` keys, a classifier
            the encoder does not have, are dropped and logged), the official backbone's
            (the same without ``fc``), the official ABRi backbone's (``bn1_addition``...: ABRi
            is turned on in the encoder, see :func:`avkernels.abri.load_official_state_dict`),
            or avkernels' (``abri_*`` keys: ABRi turned on likewise). A plain checkpoint
            loaded into an ABRi encoder is its original BNs; the added ones start fresh.
        prefix: take the keys under this prefix (e.g. ``"audio_net."`` of a full model).
        adapt: ``"sum"``/``"mean"``: a 3-channel stem weight is moved to the encoder's one
            channel (:func:`adapt_first_conv`); without it a channel mismatch is an error.

    Every problem (unreadable file, missing, unexpected or mis-shaped keys) raises
    :class:`avkernels.checkpoints.CheckpointError` (a ``ValueError``) naming it.
    """
    state_dict = checkpoints.load_state_dict(source)
    if prefix:
        state_dict, _ = checkpoints.select_encoder(state_dict, prefix)
    dropped = sorted(key for key in state_dict if key.startswith("fc."))
    if dropped:
        logger.info("load_encoder: dropped the checkpoint's classifier %s", dropped)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    stem = state_dict.get("conv1.weight")
    if stem is not None and stem.dim() == 4 and stem.shape[1] != encoder.in_channels:
        if adapt is None:
            raise CheckpointError(
                f"load_encoder: the checkpoint's stem takes {stem.shape[1]} channels, the "
                f"encoder {encoder.in_channels}; pass adapt='sum' or 'mean' to move RGB weights "
                "to one channel"
            )
        state_dict["conv1.weight"] = adapt_first_conv(stem, encoder.in_channels, adapt)
    checkpoints.load_resnet(
        encoder,
        state_dict,
        encoder.arch,
        caller="load_encoder",
        description=f"{encoder.arch} of width {encoder.width}",
    )
    return encoder


# --- the audio-visual classifier ----------------------------------------------------------------

Encoder = Union[str, ResNetEncoder]


class AVClassifier(nn.Module):
    """Audio and visual ResNet encoders, concatenation fusion, and uni-modal heads.

    Args:
        num_classes: classes of every head.
        audio, visual: an arch name (``"resnet18"``/``"resnet34"``) or a built
            :class:`ResNetEncoder` (audio: 1 input channel).
        visual_channels: colour channels of the frames (3, or 1 for grey frames).
        width: encoder width when built from a name (64 = ResNet).
        fuse_relu, track_dead: passed to encoders built from a name.
        feature_group: features per masked group of the fusion layer's feature masking.

    State dict keys follow the official ``AVClassifier`` (``audio_net.*``, ``visual_net.*``,
    ``fusion_module.fc_out.*``) plus the stage-1 heads ``audio_fc.*``/``visual_fc.*`` (the
    official uni-modal classifiers' ``fc``).
    """

    def __init__(
        self,
        num_classes: int,
        audio: Encoder = "resnet18",
        visual: Encoder = "resnet18",
        *,
        visual_channels: int = 3,
        width: int = 64,
        fuse_relu: bool = True,
        track_dead: bool = True,
        feature_group: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"AVClassifier: num_classes must be an int >= 2, got {num_classes!r}")
        options = {"width": width, "fuse_relu": fuse_relu, "track_dead": track_dead}
        self.audio_net = (
            audio if isinstance(audio, nn.Module) else ResNetEncoder(audio, 1, **options)
        )
        self.visual_net = (
            visual
            if isinstance(visual, nn.Module)
            else ResNetEncoder(visual, visual_channels, **options)
        )
        if self.audio_net.in_channels != 1:
            raise ValueError("AVClassifier: the audio encoder must take 1 input channel")
        features = (self.audio_net.out_features, self.visual_net.out_features)
        self.num_classes = num_classes
        self.fusion_module = MaskedConcatFusion(features, num_classes, group_size=feature_group)
        self.audio_fc = nn.Linear(features[0], num_classes)
        self.visual_fc = nn.Linear(features[1], num_classes)

    def encode_audio(self, audio: Tensor) -> Tensor:
        """(B, 1, frames, mel) -> pooled features (B, Fa)."""
        if audio.dim() != 4 or audio.shape[1] != 1:
            raise ValueError(
                f"AVClassifier: audio must be (B, 1, frames, mel) spectrograms, got "
                f"{tuple(audio.shape)}"
            )
        return torch.flatten(F.adaptive_avg_pool2d(self.audio_net(audio), 1), 1)

    def encode_visual(self, visual: Tensor) -> Tensor:
        """(B, C, T, H, W) -> features (B, Fv): B*T frames through the encoder, 3-D avg pool."""
        channels = self.visual_net.in_channels
        if visual.dim() != 5 or visual.shape[1] != channels:
            hint = ""
            if visual.dim() == 5 and visual.shape[2] == channels:
                hint = (
                    "; it looks like (B, T, C, H, W): permute it with "
                    "visual.permute(0, 2, 1, 3, 4) (or each sample's (T, C, H, W) frames "
                    "with .permute(1, 0, 2, 3) in the dataset)"
                )
            raise ValueError(
                f"AVClassifier: visual must be (B, C={channels}, T, H, W), got "
                f"{tuple(visual.shape)}{hint}"
            )
        batch, _, frames, height, width = visual.shape
        images = visual.transpose(1, 2).reshape(batch * frames, channels, height, width)
        maps = self.visual_net(images)
        maps = maps.view(batch, frames, *maps.shape[1:]).transpose(1, 2)  # (B, C', T, h, w)
        return torch.flatten(F.adaptive_avg_pool3d(maps, 1), 1)

    def forward(self, audio: Tensor, visual: Tensor, ratio_a=None, ratio_v=None) -> FusionOutput:
        """Joint logits (and each modality's half); ``ratio_a``/``ratio_v`` mask the fused
        features per sample in training (see :class:`MaskedConcatFusion`)."""
        features_a, features_v = self.encode_audio(audio), self.encode_visual(visual)
        if features_a.shape[0] != features_v.shape[0]:
            raise ValueError(
                f"AVClassifier: {features_a.shape[0]} audio and "
                f"{features_v.shape[0]} visual samples in one batch"
            )
        return self.fusion_module(features_a, features_v, ratio_a, ratio_v)

    def forward_audio(self, audio: Tensor) -> Tensor:
        """Stage-1 audio logits: ``audio_fc`` on the audio features."""
        return self.audio_fc(self.encode_audio(audio))

    def forward_visual(self, visual: Tensor) -> Tensor:
        """Stage-1 visual logits: ``visual_fc`` on the visual features."""
        return self.visual_fc(self.encode_visual(visual))
