"""Visual front end: frames at 1 fps, ``frames_per_clip`` per clip, official sampling/transforms.

A clip's frame folder holds its frames as image files (``.jpg``/``.jpeg``/``.png``), ordered by
the number in their names (``frame_00009.jpg`` before ``frame_000010.jpg``, as the official
extraction names them). The folder is cut into ``frames_per_clip`` equal segments of
``seg = n // frames_per_clip`` frames; training takes a uniformly random frame of each segment,
evaluation the official middle one (1-based ``i * seg + seg // 2``, kept inside its segment).

The result is ``(C=3, T, H, W)``: colour first, time second, as the video encoder expects. The
official loader stacks ``(T, C, H, W)``; with ``T = C = 3`` a missing permute raises nothing and
silently mixes frames with colours, so this module builds the tensor in one place only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from avkernels.app.data.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NUMBER = re.compile(r"(\d+)")


@dataclass(frozen=True)
class VisualConfig:
    """How a frame folder becomes the (3, frames_per_clip, size, size) network input.

    Defaults are the official ones: 3 frames, RandomResizedCrop(224) (scale 0.08-1) and a
    horizontal flip in training, Resize((224, 224)) in evaluation, ImageNet normalisation.
    """

    frames_per_clip: int = 3
    size: int = 224
    crop_scale: tuple = (0.08, 1.0)
    flip: bool = True
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        if self.frames_per_clip < 1 or self.size < 1:
            raise ValueError(f"VisualConfig needs frames_per_clip >= 1 and size >= 1, got {self}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")

    def transform(self, train: bool):
        """The torchvision transform of one PIL frame to a normalised (3, size, size) tensor."""
        from torchvision import transforms

        if train:
            steps = [transforms.RandomResizedCrop(self.size, scale=tuple(self.crop_scale))]
            if self.flip:
                steps.append(transforms.RandomHorizontalFlip())
        else:
            steps = [transforms.Resize((self.size, self.size))]
        steps += [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        return transforms.Compose(steps)


def _frame_order(path: Path) -> tuple:
    numbers = _NUMBER.findall(path.stem)
    return (int(numbers[-1]) if numbers else -1, path.name)


def list_frames(folder: Path) -> list[Path]:
    """The frame files of ``folder`` in temporal order; :class:`DataError` if it has none."""
    if not folder.is_dir():
        raise DataError(folder, "frame folder not found")
    frames = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not frames:
        raise DataError(folder, f"frame folder holds no {'/'.join(IMAGE_SUFFIXES)} image")
    return sorted(frames, key=_frame_order)


def frame_indices(
    count: int, picks: int, train: bool, generator: torch.Generator | None = None
) -> list[int]:
    """0-based indices of the ``picks`` frames taken from ``count`` (one per segment)."""
    if count < picks:
        raise ValueError(f"{count} frame(s), fewer than the {picks} a clip needs")
    seg = count // picks
    if train:
        offsets = torch.randint(0, seg, (picks,), generator=generator).tolist()
    else:
        offsets = [max(seg // 2 - 1, 0)] * picks  # official 1-based i*seg + seg//2
    return [i * seg + offset for i, offset in zip(range(picks), offsets)]


def load_frames(
    folder: Path, config: VisualConfig, train: bool, generator: torch.Generator | None = None
) -> Tensor:
    """The (3, frames_per_clip, size, size) input of the clip whose frames are in ``folder``."""
    from PIL import Image

    frames = list_frames(folder)
    if len(frames) < config.frames_per_clip:
        raise DataError(
            folder, f"{len(frames)} frame(s), fewer than the {config.frames_per_clip} a clip needs"
        )
    transform = config.transform(train)
    images = []
    for index in frame_indices(len(frames), config.frames_per_clip, train, generator):
        try:
            with Image.open(frames[index]) as image:
                images.append(transform(image.convert("RGB")))
        except OSError as error:  # PIL's UnidentifiedImageError and truncated files
            raise DataError(frames[index], f"cannot decode image ({error})") from None
    return torch.stack(images, dim=1)  # (C, T, H, W)
