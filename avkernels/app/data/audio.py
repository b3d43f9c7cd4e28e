"""Audio front end: WAV reading, resampling and the official Kaldi fbank (docs/DESIGN.md,
"Audio-visual setup").

``waveform - mean -> kaldi.fbank(htk_compat, no energy, hanning, dither 0, 10 ms shift)
-> pad with zeros / cut to ``target_length`` frames -> (fbank - mean) / (2 * std)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from avkernels.app.data.errors import DataError
from avkernels.app.progress import progress_enabled
from avkernels.files import atomic_write_text

# Kinetics-Sounds statistics of the official loader (unnormalised 128-bin fbank, 1024 frames).
KINETICS_SOUNDS_MEAN = -4.503877
KINETICS_SOUNDS_STD = 5.141276


@dataclass(frozen=True)
class AudioConfig:
    """How a clip becomes the (1, target_length, num_mel_bins) network input.

    Defaults are the official Kinetics-Sounds settings. ``mean``/``std`` are the dataset's fbank
    statistics (``avkernels data-stats``); the input is ``(fbank - mean) / (2 * std)``.
    """

    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_length: int = 1024
    mean: float = KINETICS_SOUNDS_MEAN
    std: float = KINETICS_SOUNDS_STD

    def __post_init__(self):
        if self.sample_rate <= 0 or self.num_mel_bins <= 0 or self.target_length <= 0:
            raise ValueError(
                f"AudioConfig needs positive sample_rate, num_mel_bins and "
                f"target_length, got {self}"
            )
        if not (math.isfinite(self.std) and self.std > 0 and math.isfinite(self.mean)):
            raise ValueError(
                f"AudioConfig needs a finite mean and a std > 0, got mean="
                f"{self.mean}, std={self.std}"
            )

    def with_stats(self, stats: FbankStats) -> AudioConfig:
        """This configuration with ``stats``' mean/std, after checking they match its fbank."""
        own = (self.sample_rate, self.num_mel_bins, self.target_length)
        theirs = (stats.sample_rate, stats.num_mel_bins, stats.target_length)
        if own != theirs:
            raise ValueError(
                f"fbank statistics were computed for (sample_rate, mel bins, frames) = {theirs}, "
                f"not {own}: recompute them with `avkernels data-stats` for this configuration"
            )
        return AudioConfig(*own, mean=stats.mean, std=stats.std)


def read_wav(path: str | Path) -> tuple[Tensor, int]:
    """(waveform (channels, samples) float32, sample rate) read with soundfile.

    Raises :class:`DataError` naming the file and the reason when it is missing, unreadable or
    empty (torchaudio.load would need torchcodec; soundfile reads WAV/FLAC/OGG and, with
    libsndfile >= 1.1, MP3).
    """
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "audio file not found")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # noqa: BLE001 - libsndfile reports corrupt files in many ways
        raise DataError(
            path, f"cannot decode audio ({str(error).strip() or type(error).__name__})"
        ) from None
    if data.shape[0] == 0:
        raise DataError(path, "audio file holds no samples")
    if not np.isfinite(data).all():
        raise DataError(path, "audio holds NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(rate)


def load_waveform(path: str | Path, sample_rate: int) -> Tensor:
    """Mono (1, samples) float32 waveform at ``sample_rate`` (channels averaged, resampled with
    torchaudio when the file's rate differs)."""
    import torchaudio.functional

    waveform, rate = read_wav(path)
    waveform = waveform.mean(dim=0, keepdim=True)
    if rate != sample_rate:
        waveform = torchaudio.functional.resample(waveform, rate, sample_rate)
    return waveform


def kaldi_fbank(waveform: Tensor, sample_rate: int, num_mel_bins: int) -> Tensor:
    """(frames, num_mel_bins) log-mel fbank of a (1, samples) waveform, official arguments
    (the waveform's mean is removed first, as the official loader does)."""
    import torchaudio.compliance.kaldi

    if waveform.dim() != 2 or waveform.shape[0] != 1:
        raise ValueError(f"expected a mono waveform (1, samples), got {tuple(waveform.shape)}")
    return torchaudio.compliance.kaldi.fbank(
        waveform - waveform.mean(),
        htk_compat=True,
        sample_frequency=sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_shift=10,
    )


def pad_or_cut(fbank: Tensor, target_length: int) -> Tensor:
    """``fbank`` (frames, bins) zero-padded at the end or cut to ``target_length`` frames."""
    missing = target_length - fbank.shape[0]
    if missing > 0:
        return torch.nn.functional.pad(fbank, (0, 0, 0, missing))
    return fbank[:target_length]


def raw_fbank(path: str | Path, config: AudioConfig) -> Tensor:
    """Unnormalised (target_length, num_mel_bins) fbank of the file at ``path``."""
    waveform = load_waveform(path, config.sample_rate)
    window = int(config.sample_rate * 0.025)  # kaldi's default 25 ms frame
    if waveform.shape[1] < window:
        raise DataError(
            path,
            f"audio shorter than one 25 ms fbank window "
            f"({waveform.shape[1]} samples at {config.sample_rate} Hz)",
        )
    return pad_or_cut(
        kaldi_fbank(waveform, config.sample_rate, config.num_mel_bins), config.target_length
    )


def audio_input(path: str | Path, config: AudioConfig) -> Tensor:
    """The network input (1, target_length, num_mel_bins): normalised fbank of ``path``."""
    fbank = raw_fbank(path, config)
    return ((fbank - config.mean) / (2 * config.std)).unsqueeze(0)


@dataclass(frozen=True)
class FbankStats:
    """Mean and std of all values of the padded/cut, unnormalised fbanks of a dataset."""

    mean: float
    std: float
    clips: int
    sample_rate: int
    num_mel_bins: int
    target_length: int

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FbankStats:
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except OSError as error:
            raise DataError(
                path, f"cannot read fbank statistics ({error.strerror or error})"
            ) from None
        except (ValueError, TypeError) as error:
            raise DataError(path, f"not an fbank statistics file ({error})") from None


def compute_fbank_stats(
    paths: Iterable[str | Path], config: AudioConfig, progress: bool | None = None
) -> FbankStats:
    """Statistics of the fbanks of ``paths`` as the network sees them before normalisation
    (padding included), accumulated in float64 with per-clip Chan merges. ``progress``: a
    progress bar (default: when stderr is a terminal)."""
    from tqdm.auto import tqdm

    count, mean, m2 = 0, 0.0, 0.0
    total = len(paths) if hasattr(paths, "__len__") else None
    for path in tqdm(
        paths,
        total=total,
        unit="clip",
        desc="fbank statistics",
        leave=False,
        disable=not progress_enabled(progress),
    ):
        values = raw_fbank(path, config).double()
        n = values.numel()
        clip_mean = values.mean().item()
        clip_m2 = ((values - clip_mean) ** 2).sum().item()
        delta = clip_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += clip_m2 + delta * delta * count * n / total
        count = total
    if count == 0:
        raise ValueError("no audio clip to compute fbank statistics from")
    clips = count // (config.target_length * config.num_mel_bins)
    return FbankStats(
        mean=mean,
        std=math.sqrt(m2 / count),
        clips=clips,
        sample_rate=config.sample_rate,
        num_mel_bins=config.num_mel_bins,
        target_length=config.target_length,
    )
