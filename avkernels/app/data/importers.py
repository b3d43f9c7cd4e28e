"""Manifests from the on-disk layouts of the official / OGM-GE repositories.

Every importer checks that each listed clip's WAV and frame folder exist (files are not decoded:
``AVDataset`` does that) and returns the problems with the clips it kept. Layouts, ``ROOT`` being
``--root``:

``ks`` (Kinetics-Sounds, official Revisiting-Pre-training layout, 31 classes)
    ``ROOT/{train,val,test}_1fps_path.txt``: one clip a line, space-separated, first field a path
    whose last component is the clip name, last field the integer label;
    ``ROOT/ks_audio/<split>/<name>.wav``; frames in ``ROOT/ks_visual/<split>/<name>/``.
``vggsound`` (OGM-GE layout)
    ``ROOT/vggsound.csv``: ``youtube_id,start_seconds,class name,train|test``;
    ``ROOT/train-audios/train-set/<id>_<start>.wav`` (``test-audios/test-set`` for test);
    frames in ``ROOT/train-videos/train-set-img/Image-01-FPS/<id>_<start>.mp4/``
    (``test-videos/test-set-img``). ``<start>`` as written in the CSV, or zero-padded to 6 digits.
``cremad`` (CREMA-D, OGM-GE layout, 6 classes)
    ``ROOT/{train,test}.csv``: ``clip,EMOTION`` with EMOTION in NEU HAP SAD FEA DIS ANG (labels
    0-5 in that order); ``ROOT/AudioWAV/<clip>.wav``; frames in ``ROOT/Image-01-FPS/<clip>/``.
``ave`` (AVE, OGM-GE layout, 28 classes)
    ``ROOT/stat.txt``: one class name a line (first CSV field); ``ROOT/my_{train,val,test}.txt``:
    ``class,video_id[,...]``; ``ROOT/audio/<video_id>.wav`` (WAV from OGM-GE's ``video_to_wav``,
    not the pickled spectrograms); frames in ``ROOT/visual/<video_id>/``. A video id listed twice
    in a split is ambiguous: the official loader drops every copy, so do we, and report it.

Class names become labels in the order above (sorted names for ``vggsound`` and ``ave``). Clip
ids (the keys of the FusT confidences): ``<split>/<name>`` for ``ks`` and ``ave`` (a name may
recur across splits), ``<id>_<start>`` for ``vggsound``, the clip name for ``cremad``.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from avkernels.app.data.errors import DataError
from avkernels.app.data.manifest import ClipRecord

CREMAD_CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")


@dataclass
class ImportResult:
    """Records of the clips whose files exist, class names by label, and the problems seen."""

    records: list = field(default_factory=list)
    classes: list = field(default_factory=list)
    problems: list = field(default_factory=list)


class _Collector:
    """Keeps clips whose files exist; records a DataError for the others."""

    def __init__(self, classes: Iterable[str], dataset: str):
        self.result = ImportResult(classes=list(classes))
        self.dataset = dataset

    def add(self, clip_id: str, split: str, label: int, audio: Path, frames: Path) -> None:
        if not audio.is_file():
            self.result.problems.append(DataError(audio, f"audio of clip {clip_id!r} not found"))
        elif not frames.is_dir():
            self.result.problems.append(
                DataError(frames, f"frame folder of clip {clip_id!r} not found")
            )
        else:
            self.result.records.append(
                ClipRecord(
                    id=clip_id,
                    split=split,
                    label=label,
                    audio=audio,
                    frames=frames,
                    extra={"class": self.result.classes[label], "dataset": self.dataset},
                )
            )

    def problem(self, path: Path, reason: str) -> None:
        self.result.problems.append(DataError(path, reason))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(path, f"not found: is --root the {what} folder?")
    return path


def _rows(path: Path) -> Iterable[tuple[int, list[str]]]:
    """(line number, stripped CSV fields) of the non-blank lines of ``path``."""
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        for row in reader:
            if row and any(cell.strip() for cell in row):
                yield reader.line_num, [cell.strip() for cell in row]


def import_kinetics_sounds(root: Path) -> ImportResult:
    lists = [(split, root / f"{split}_1fps_path.txt") for split in ("train", "val", "test")]
    lists = [(split, path) for split, path in lists if path.is_file()]
    if not lists:
        raise DataError(
            root, "no {train,val,test}_1fps_path.txt list: is --root the Kinetics-Sounds folder?"
        )
    entries = []
    for split, path in lists:
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            fields = text.split()
            if not fields:
                continue
            if len(fields) < 2 or not fields[-1].isdigit():
                raise DataError(
                    path, f"line {line}: expected '<path> ... <integer label>', got {text!r}"
                )
            entries.append((split, fields[0].rstrip("/").split("/")[-1], int(fields[-1])))
    classes = [str(i) for i in range(max(label for _, _, label in entries) + 1)]
    collector = _Collector(classes, "kinetics-sounds")
    for split, name, label in entries:
        collector.add(
            f"{split}/{name}",
            split,
            label,
            root / "ks_audio" / split / f"{name}.wav",
            root / "ks_visual" / split / name,
        )
    return collector.result


def import_vggsound(root: Path) -> ImportResult:
    table = _require(root / "vggsound.csv", "VGGSound")
    rows = []
    for line, row in _rows(table):
        if len(row) < 4 or row[3] not in ("train", "test"):
            raise DataError(
                table,
                f"line {line}: expected 'youtube_id,start,class,train|test', got {','.join(row)!r}",
            )
        rows.append(row)
    collector = _Collector(sorted({row[2] for row in rows}), "vggsound")
    index = {name: i for i, name in enumerate(collector.result.classes)}
    folders = {
        "train": ("train-audios/train-set", "train-videos/train-set-img"),
        "test": ("test-audios/test-set", "test-videos/test-set-img"),
    }
    for youtube_id, start, name, split in (row[:4] for row in rows):
        audio_dir, video_dir = (root / folder for folder in folders[split])
        stems = [f"{youtube_id}_{start}"]
        if start.isdigit():
            stems.append(f"{youtube_id}_{int(start):06d}")
        stem = next((s for s in stems if (audio_dir / f"{s}.wav").is_file()), stems[0])
        collector.add(
            stem,
            split,
            index[name],
            audio_dir / f"{stem}.wav",
            video_dir / "Image-01-FPS" / f"{stem}.mp4",
        )
    return collector.result


def import_cremad(root: Path) -> ImportResult:
    lists = [(split, root / f"{split}.csv") for split in ("train", "test")]
    if not any(path.is_file() for _, path in lists):
        raise DataError(root, "no train.csv/test.csv: is --root the CREMA-D folder?")
    collector = _Collector(CREMAD_CLASSES, "crema-d")
    for split, path in lists:
        if not path.is_file():
            continue
        for line, row in _rows(path):
            if len(row) < 2 or row[1] not in CREMAD_CLASSES:
                raise DataError(
                    path,
                    f"line {line}: expected 'clip,EMOTION' with EMOTION in "
                    f"{' '.join(CREMAD_CLASSES)}, got {','.join(row)!r}",
                )
            collector.add(
                row[0],
                split,
                CREMAD_CLASSES.index(row[1]),
                root / "AudioWAV" / f"{row[0]}.wav",
                root / "Image-01-FPS" / row[0],
            )
    return collector.result


def import_ave(root: Path) -> ImportResult:
    stat = _require(root / "stat.txt", "AVE")
    classes = sorted({row[0] for _, row in _rows(stat)})
    lists = [(split, root / f"my_{split}.txt") for split in ("train", "val", "test")]
    if not any(path.is_file() for _, path in lists):
        raise DataError(
            root, "no my_train.txt/my_val.txt/my_test.txt list: is --root the AVE folder?"
        )
    collector = _Collector(classes, "ave")
    index = {name: i for i, name in enumerate(classes)}
    for split, path in lists:
        if not path.is_file():
            continue
        by_id: dict[str, list] = {}
        for line, row in _rows(path):
            if len(row) < 2 or row[0] not in index:
                raise DataError(
                    path,
                    f"line {line}: expected 'class,video_id' with a class of "
                    f"{stat.name}, got {','.join(row)!r}",
                )
            by_id.setdefault(row[1], []).append((line, row[0]))
        for video_id, occurrences in by_id.items():
            if len(occurrences) > 1:
                lines = ", ".join(str(line) for line, _ in occurrences)
                collector.problem(
                    path,
                    f"video {video_id!r} listed {len(occurrences)} times "
                    f"(lines {lines}): left out, as the official loader does",
                )
                continue
            collector.add(
                f"{split}/{video_id}",
                split,
                index[occurrences[0][1]],
                root / "audio" / f"{video_id}.wav",
                root / "visual" / video_id,
            )
    return collector.result


IMPORTERS: dict[str, Callable[[Path], ImportResult]] = {
    "ks": import_kinetics_sounds,
    "vggsound": import_vggsound,
    "cremad": import_cremad,
    "ave": import_ave,
}


def import_layout(layout: str, root: Path) -> ImportResult:
    """Records of the dataset at ``root`` laid out as ``layout`` (a key of ``IMPORTERS``)."""
    if layout not in IMPORTERS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(IMPORTERS)}")
    if not root.is_dir():
        raise DataError(root, "dataset root folder not found")
    return IMPORTERS[layout](root)
