"""Builders of tiny on-disk clips (WAVs and frame folders) for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
from PIL import Image


def write_wav(
    path: Path, seconds: float = 0.5, rate: int = 16000, channels: int = 1, seed: int = 0
) -> np.ndarray:
    """A tone plus noise; returns the float32 samples (samples, channels) as written (PCM_16)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (300 + 50 * seed) * t)
    data = np.stack([tone + 0.05 * rng.standard_normal(len(t)) for _ in range(channels)], 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), data, rate, subtype="PCM_16")
    return soundfile.read(str(path), dtype="float32", always_2d=True)[0]


def frame_colour(index: int) -> tuple:
    """RGB of the solid frame number ``index`` (1-based): every channel and frame distinct."""
    return (10 * index, 100 + 5 * index, 250 - 7 * index)


def write_frames(
    folder: Path, count: int = 3, size: int = 8, name=lambda i: f"frame_0000{i}.jpg"
) -> list[Path]:
    """``count`` solid-colour frames named by ``name(i)`` (1-based, the official naming)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(1, count + 1):
        path = folder / name(i)
        Image.new("RGB", (size, size), frame_colour(i)).save(
            path, quality=100 if path.suffix == ".jpg" else None
        )
        paths.append(path)
    return paths


def write_clip(root: Path, audio: Path, frames: Path, seed: int = 0, frame_count: int = 3) -> None:
    write_wav(root / audio, seed=seed)
    write_frames(root / frames, frame_count)
