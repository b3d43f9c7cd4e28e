"""Dataset manifests: one row per clip, as CSV (with a header) or JSON Lines.

Required fields: ``id`` (unique string), ``split`` (``train``/``val``/``test``...), ``label``
(int >= 0), ``audio`` (a WAV file) and ``frames`` (a folder of frames). Relative paths are
relative to the manifest's folder. Any further fields (source, licence, speaker, degradation
parameters...) are kept as strings in :attr:`ClipRecord.extra`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from avkernels.app.data.errors import DataError
from avkernels.files import atomic_write_text

REQUIRED_FIELDS = ("id", "split", "label", "audio", "frames")
SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class ClipRecord:
    """One clip of a manifest; ``audio``/``frames`` are absolute paths once read."""

    id: str
    split: str
    label: int
    audio: Path
    frames: Path
    extra: dict = field(default_factory=dict)


def _check_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(path, f"a manifest must end in {' or '.join(SUFFIXES)}")
    return suffix


def _record(values: dict, where: str, base: Path, path: Path) -> ClipRecord:
    missing = [name for name in REQUIRED_FIELDS if values.get(name) in (None, "")]
    if missing:
        raise DataError(path, f"{where}: missing {', '.join(missing)}")
    try:
        label = int(values["label"])
    except (TypeError, ValueError):
        label = -1
    if label < 0 or str(values["label"]).strip() != str(label):
        raise DataError(path, f"{where}: label must be an integer >= 0, got {values['label']!r}")
    extra = {k: "" if v is None else str(v) for k, v in values.items() if k not in REQUIRED_FIELDS}
    return ClipRecord(
        id=str(values["id"]),
        split=str(values["split"]),
        label=label,
        audio=base / str(values["audio"]),
        frames=base / str(values["frames"]),
        extra=extra,
    )


def read_manifest(path: str | Path) -> list[ClipRecord]:
    """The clips of the manifest at ``path``; :class:`DataError` (file, line, reason) if the
    manifest itself is malformed. Files are not opened here (see ``AVDataset``)."""
    path = Path(path)
    suffix = _check_suffix(path)
    if not path.is_file():
        raise DataError(path, "manifest not found")
    base = path.resolve().parent
    records: list[ClipRecord] = []
    with open(path, encoding="utf-8", newline="") as handle:
        try:
            rows = _csv_rows(handle, path) if suffix == ".csv" else _jsonl_rows(handle, path)
            for line, values in rows:
                records.append(_record(values, f"line {line}", base, path))
        except UnicodeDecodeError as error:
            raise DataError(
                path, f"not UTF-8 text (byte {error.start}): save the manifest as UTF-8"
            ) from None
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        if record.id in seen:
            raise DataError(
                path,
                f"clip id {record.id!r} appears twice: ids must be unique "
                "(they key the per-sample confidences)",
            )
        seen[record.id] = index
    return records


def _csv_rows(handle, path: Path):
    reader = csv.DictReader(handle)
    try:
        absent = [name for name in REQUIRED_FIELDS if name not in (reader.fieldnames or ())]
        if absent:
            raise DataError(
                path,
                f"CSV header lacks column(s) {', '.join(absent)} "
                f"(needs {', '.join(REQUIRED_FIELDS)})",
            )
        for row in reader:
            if None in row:  # DictReader's key for the cells beyond the header's columns
                raise DataError(
                    path,
                    f"line {reader.line_num}: {len(row) - 1 + len(row[None])} "
                    f"fields, the header has {len(reader.fieldnames)} (quote cells "
                    "that hold commas)",
                )
            yield reader.line_num, row
    except csv.Error as error:
        raise DataError(path, f"after line {reader.line_num}: malformed CSV ({error})") from None


def _jsonl_rows(handle, path: Path):
    for line, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            values = json.loads(text)
        except ValueError as error:
            raise DataError(path, f"line {line}: not JSON ({error})") from None
        if not isinstance(values, dict):
            raise DataError(path, f"line {line}: expected a JSON object")
        yield line, values


def write_manifest(path: str | Path, records: Iterable[ClipRecord]) -> Path:
    """Writes ``records`` to ``path`` (CSV or JSONL by suffix); paths inside the manifest's
    folder are stored relative to it, others absolute. Returns ``path``."""
    path = Path(path)
    suffix = _check_suffix(path)
    base = path.resolve().parent
    records = list(records)
    extra_fields: list[str] = []
    for record in records:
        extra_fields += [k for k in record.extra if k not in extra_fields]
    rows = [_row(record, base, extra_fields) for record in records]
    if suffix == ".csv":
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(REQUIRED_FIELDS) + extra_fields)
        writer.writeheader()
        writer.writerows(rows)
        return atomic_write_text(path, text.getvalue())
    return atomic_write_text(
        path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    )


def _relative(target: Path, base: Path) -> str:
    target = Path(os.path.abspath(target))
    try:
        return target.relative_to(base).as_posix()
    except ValueError:
        return str(target)


def _row(record: ClipRecord, base: Path, extra_fields: list[str]) -> dict:
    row = {
        "id": record.id,
        "split": record.split,
        "label": record.label,
        "audio": _relative(record.audio, base),
        "frames": _relative(record.frames, base),
    }
    row.update({name: record.extra.get(name, "") for name in extra_fields})
    return row


def select_split(records: Iterable[ClipRecord], split: str | None) -> list[ClipRecord]:
    """The records of ``split`` (all when None)."""
    return [r for r in records if split is None or r.split == split]
