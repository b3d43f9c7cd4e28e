"""Builders of tiny on-disk clips (WAVs, frame folders, a manifest of them) for the data, CLI and
training tests, and the command-line options of a tiny training run on such clips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from avkernels.app.data import ClipRecord, write_manifest

# `avkernels train`/`fust` with a tiny front end and model: 64 fbank frames x 32 mel bins
# normalised with the official statistics, 2 frames of 32x32, width 4, one epoch of Adam.
TINY_TRAINING_OPTIONS = (
    "--fbank-stats",
    "kinetics-sounds",
    "--mel-bins",
    "32",
    "--target-length",
    "64",
    "--image-size",
    "32",
    "--frames",
    "2",
    "--width",
    "4",
    "--batch-size",
    "4",
    "--epochs",
    "1",
    "--optimizer",
    "adam",
    "--lr",
    "0.01",
    "--no-progress",
)


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


def write_noise_frames(folder: Path, count: int = 3, size: int = 16, seed: int = 0) -> None:
    """``count`` lossless frames of random pixels: every crop and flip of them differs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(1, count + 1):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"frame_0000{i}.png")


def write_clip(
    root: Path,
    audio: Path,
    frames: Path,
    seed: int = 0,
    frame_count: int = 3,
    textured: bool = False,
) -> None:
    write_wav(root / audio, seed=seed)
    if textured:
        write_noise_frames(root / frames, frame_count, seed=seed)
    else:
        write_frames(root / frames, frame_count)


def write_clips_manifest(root: Path, textured: bool = False, frame_count: int = 2) -> Path:
    """8 clips of ``frame_count`` frames under ``root`` (6 train, 2 test, 2 classes) and their
    manifest; ``textured``: frames of random pixels (:func:`write_noise_frames`), else solid
    colours."""
    records = []
    for index in range(8):
        audio, frames = f"audio/{index}.wav", f"frames/{index}"
        write_clip(root, audio, frames, seed=index, frame_count=frame_count, textured=textured)
        split = "train" if index < 6 else "test"
        records.append(ClipRecord(f"clip{index}", split, index % 2, root / audio, root / frames))
    return write_manifest(root / "manifest.csv", records)
