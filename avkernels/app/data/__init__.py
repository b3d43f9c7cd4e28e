"""Audio-visual data: manifests, the official front ends, importers and the AV-Digits dataset.

Contract with the models and the trainer
----------------------------------------
A sample (``AVDataset[i]``) is a dict:

* ``"audio"``: float32 ``(1, frames, mel_bins)``: the normalised log-mel fbank (time first);
* ``"visual"``: float32 ``(3, T, H, W)``: colour, then time (``T`` frames at 1 fps), then space
  (the official dataset returns ``(T, C, H, W)``; with ``T = C = 3`` that mistake raises
  nothing, so this package never returns it);
* ``"label"``: ``int`` class index;
* ``"id"``: ``str`` sample id, the key of the FusT per-sample confidences.

A batch is what ``torch.utils.data.DataLoader``'s default collate makes of those dicts (use
:func:`collate` to say so explicitly): ``{"audio": (B, 1, frames, mel_bins) float32,
"visual": (B, 3, T, H, W) float32, "label": (B,) int64, "id": list[str]}``.

Audio (:mod:`avkernels.app.data.audio`): WAV read with soundfile, mixed to mono, resampled with
torchaudio, ``waveform - mean`` -> ``torchaudio.compliance.kaldi.fbank(htk_compat=True,
use_energy=False, window_type="hanning", num_mel_bins, dither=0.0, frame_shift=10)`` -> zero-pad
or cut to ``target_length`` frames -> ``(fbank - mean) / (2 * std)`` with the dataset's statistics
(``avkernels data-stats``). Visual (:mod:`avkernels.app.data.visual`): the official 3 frames per
clip, RandomResizedCrop + flip in training, Resize in evaluation, ImageNet normalisation.

Manifests (:mod:`avkernels.app.data.manifest`): CSV/JSONL rows ``id, split, label, audio, frames``
(+ free metadata); ``avkernels prepare FORMAT --root RAW --out DIR`` writes one from the
Kinetics-Sounds, VGGSound, CREMA-D or AVE layouts (:mod:`avkernels.app.data.importers`) or builds
AV-Digits (:mod:`avkernels.app.data.av_digits`); ``avkernels prepare extract`` decodes videos into
the clip files of those layouts (:mod:`avkernels.app.data.extract`). Missing and corrupt files
raise or are skipped with a report (:class:`DataError` names the file and the reason), never
returned as a wrong sample.
"""

from torch.utils.data import default_collate

from avkernels.app.data.audio import (
    AudioConfig,
    FbankStats,
    audio_input,
    compute_fbank_stats,
    kaldi_fbank,
    load_waveform,
    pad_or_cut,
    raw_fbank,
    read_wav,
)
from avkernels.app.data.av_digits import (
    AVDigits,
    AVDigitsConfig,
    cache_folder,
    default_cache_dir,
    held_out_speakers,
    load_av_digits,
)
from avkernels.app.data.dataset import AVDataset
from avkernels.app.data.errors import ClipError, DataError
from avkernels.app.data.importers import IMPORTERS, ImportResult, import_layout
from avkernels.app.data.manifest import ClipRecord, read_manifest, write_manifest
from avkernels.app.data.visual import VisualConfig, frame_indices, list_frames, load_frames


def collate(samples: list) -> dict:
    """A batch of :class:`AVDataset` samples: the dict described in this module's docstring."""
    return default_collate(samples)


__all__ = [
    "AVDataset",
    "AVDigits",
    "AVDigitsConfig",
    "AudioConfig",
    "ClipRecord",
    "ClipError",
    "DataError",
    "FbankStats",
    "IMPORTERS",
    "ImportResult",
    "VisualConfig",
    "audio_input",
    "cache_folder",
    "collate",
    "compute_fbank_stats",
    "default_cache_dir",
    "frame_indices",
    "held_out_speakers",
    "import_layout",
    "kaldi_fbank",
    "list_frames",
    "load_av_digits",
    "load_frames",
    "load_waveform",
    "pad_or_cut",
    "raw_fbank",
    "read_manifest",
    "read_wav",
    "write_manifest",
]
