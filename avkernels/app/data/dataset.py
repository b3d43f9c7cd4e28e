"""``AVDataset``: the clips of a manifest split as network inputs (see ``avkernels.app.data``)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from avkernels.app.data.audio import AudioConfig, audio_input
from avkernels.app.data.errors import ClipError, DataError
from avkernels.app.data.manifest import ClipRecord, read_manifest, select_split
from avkernels.app.data.visual import VisualConfig, list_frames, load_frames
from avkernels.app.progress import progress_enabled
from avkernels.app.training.sampling import sample_seed

ON_ERROR = ("raise", "skip")
MODALITIES = ("audio", "visual")
_SHOWN_PROBLEMS = 5


def check_clip(record: ClipRecord, visual: VisualConfig, modalities: Sequence[str]) -> None:
    """Raise :class:`DataError` if a file ``record`` needs is missing, unreadable or too short
    (headers are read, samples are not decoded)."""
    if "audio" in modalities:
        import soundfile

        if not record.audio.is_file():
            raise DataError(record.audio, "audio file not found")
        try:
            info = soundfile.info(str(record.audio))
        except Exception as error:  # noqa: BLE001 - libsndfile's errors vary by format
            raise DataError(
                record.audio, f"cannot read audio header ({str(error).strip()})"
            ) from None
        if info.frames <= 0:
            raise DataError(record.audio, "audio file holds no samples")
    if "visual" in modalities:
        count = len(list_frames(record.frames))
        if count < visual.frames_per_clip:
            raise DataError(
                record.frames,
                f"{count} frame(s), fewer than the {visual.frames_per_clip} a clip needs",
            )


class AVDataset(Dataset):
    """Clips of one split of a manifest; item ``i`` is a dict

    ``{"audio": (1, frames, mel_bins) float32, "visual": (3, T, H, W) float32, "label": int,
    "id": str}`` (keys of modalities left out by ``modalities`` are absent).

    Args:
        manifest: a manifest file (CSV/JSONL) or already-read records.
        split: the split to use (None: every record).
        audio, visual: front-end settings (official ones by default).
        train: random frame choice and crops/flips; default: ``split == "train"``. They are
            drawn from a generator seeded by ``(seed, epoch, index)`` (:meth:`set_epoch`), never
            the global RNG, so any number of processes see the data one process sees.
        on_error: every file is checked when the dataset is built. ``"raise"``: the first
            problem raises :class:`DataError` (file and reason); ``"skip"``: problem clips are
            left out, listed in :attr:`skipped` and reported in one warning. A file that breaks
            later, while decoding, always raises.
        modalities: the inputs to load (``("audio",)`` for an audio-only stage-1 run).
        check_files: set False to skip the up-front check (for manifests known to be sound).
        cache_audio: keep each clip's normalised fbank in memory after its first load (exact:
            the audio input has no random augmentation); saves the fbank, the costliest step,
            on every later epoch. Each DataLoader worker keeps its own cache.
        progress: a progress bar while the files are checked (default: when stderr is a
            terminal).
    """

    def __init__(
        self,
        manifest: str | Path | Sequence[ClipRecord],
        split: str | None = None,
        audio: AudioConfig = AudioConfig(),
        visual: VisualConfig = VisualConfig(),
        train: bool | None = None,
        on_error: str = "raise",
        modalities: Sequence[str] = MODALITIES,
        check_files: bool = True,
        cache_audio: bool = False,
        progress: bool | None = None,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        modalities = tuple(modalities)
        if not modalities or any(m not in MODALITIES for m in modalities):
            raise ValueError(
                f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}"
            )
        all_records = (
            read_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
        )
        records = select_split(all_records, split)
        if not records:
            splits = sorted({r.split for r in all_records})
            raise DataError(
                manifest if isinstance(manifest, (str, Path)) else "<records>",
                f"no clip in split {split!r} (splits present: {splits})",
            )
        self.audio_config, self.visual_config = audio, visual
        self.train = split == "train" if train is None else train
        self.modalities = modalities
        self.num_classes = max(r.label for r in all_records) + 1
        self.skipped: list[DataError] = []
        self._audio_cache: dict | None = {} if cache_audio else None
        self.seed, self.epoch = 0, 0
        if check_files:
            records = self._checked(records, on_error, progress)
        self.records = records

    def _checked(
        self, records: list[ClipRecord], on_error: str, progress: bool | None
    ) -> list[ClipRecord]:
        from tqdm.auto import tqdm

        kept = []
        for record in tqdm(
            records,
            unit="clip",
            desc="checking files",
            leave=False,
            disable=not progress_enabled(progress),
        ):
            try:
                check_clip(record, self.visual_config, self.modalities)
            except DataError as error:
                if on_error == "raise":
                    raise ClipError(error.path, f"{error.reason} (clip {record.id!r})") from None
                self.skipped.append(DataError(error.path, f"{error.reason} (clip {record.id!r})"))
                continue
            kept.append(record)
        if self.skipped:
            shown = "; ".join(str(e) for e in self.skipped[:_SHOWN_PROBLEMS])
            more = len(self.skipped) - _SHOWN_PROBLEMS
            warnings.warn(
                f"AVDataset skipped {len(self.skipped)} clip(s) with missing or corrupt "
                f"files: {shown}" + (f" (+{more} more)" if more > 0 else ""),
                stacklevel=3,
            )
        if not kept:
            raise DataError(
                self.skipped[0].path,
                f"every clip of the split was skipped; first problem: {self.skipped[0].reason}",
            )
        return kept

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Draw the augmentation of item ``i`` from ``(seed, epoch, i)`` from now on (the trainer
        calls it at the start of every epoch)."""
        self.seed, self.epoch = seed, epoch

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def _audio(self, record: ClipRecord) -> torch.Tensor:
        if self._audio_cache is None:
            return audio_input(record.audio, self.audio_config)
        if record.id not in self._audio_cache:
            self._audio_cache[record.id] = audio_input(record.audio, self.audio_config)
        return self._audio_cache[record.id].clone()

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        item = {}
        if "audio" in self.modalities:
            item["audio"] = self._audio(record)
        if "visual" in self.modalities:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
            item["visual"] = load_frames(record.frames, self.visual_config, self.train, generator)
        item["label"] = record.label
        item["id"] = record.id
        return item
