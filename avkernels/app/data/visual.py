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

import math
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
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range


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

    def transform(self, train: bool, generator: torch.Generator):
        """One PIL frame to a normalised (3, size, size) tensor; a training crop and flip are
        drawn from ``generator`` alone (never the global RNG, see :meth:`AVDataset.set_epoch`)."""
        from torchvision.transforms.v2 import functional

        def apply(image):
            if train:
                top, left, height, width = crop_box(
                    image.height, image.width, self.crop_scale, CROP_RATIO, generator
                )
                image = functional.resized_crop(
                    image, top, left, height, width, [self.size, self.size], antialias=True
                )
                if self.flip and torch.rand(1, generator=generator).item() < 0.5:
                    image = functional.horizontal_flip(image)
            else:
                image = functional.resize(image, [self.size, self.size], antialias=True)
            tensor = functional.to_dtype(functional.pil_to_tensor(image), torch.float32, scale=True)
            return functional.normalize(tensor, list(self.mean), list(self.std))

        return apply


def crop_box(
    height: int, width: int, scale: tuple, ratio: tuple, generator: torch.Generator
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random crop, torchvision's RandomResizedCrop rule
    drawn from ``generator``: area fraction uniform in ``scale``, aspect ratio log-uniform in
    ``ratio``, 10 tries, then the centre crop of the ratio nearest the image's."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(
            torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item()
        )
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = torch.randint(0, height - crop_height + 1, (1,), generator=generator).item()
            left = torch.randint(0, width - crop_width + 1, (1,), generator=generator).item()
            return top, left, crop_height, crop_width
    image_ratio = width / height
    if image_ratio < min(ratio):
        crop_width, crop_height = width, int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        crop_width, crop_height = int(round(height * max(ratio))), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


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
    """The (3, frames_per_clip, size, size) input of the clip whose frames are in ``folder``;
    in training, the frame choice, crops and flips are drawn from ``generator`` (default: a
    fresh one seeded from the global RNG)."""
    from PIL import Image

    frames = list_frames(folder)
    if len(frames) < config.frames_per_clip:
        raise DataError(
            folder, f"{len(frames)} frame(s), fewer than the {config.frames_per_clip} a clip needs"
        )
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))
    transform = config.transform(train, generator)
    images = []
    for index in frame_indices(len(frames), config.frames_per_clip, train, generator):
        try:
            with Image.open(frames[index]) as image:
                images.append(transform(image.convert("RGB")))
        except OSError as error:  # PIL's UnidentifiedImageError and truncated files
            raise DataError(frames[index], f"cannot decode image ({error})") from None
    return torch.stack(images, dim=1)  # (C, T, H, W)
