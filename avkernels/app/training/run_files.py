"""The files of a run directory (:mod:`avkernels.app.training`, "Run directory"): their names,
and how a run writes them (atomically: an interruption never leaves a half-written file) and
reads its checkpoint back."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch

from avkernels.files import atomic_write, atomic_write_text

CHECKPOINT, CONFIG, MODEL = "checkpoint.pt", "config.json", "model.pt"
METRICS_JSONL, METRICS_CSV = "metrics.jsonl", "metrics.csv"
# The format every training checkpoint names. It is the name of the module that wrote the first
# ones, kept so that those runs still resume.
CHECKPOINT_FORMAT = "avkernels.app.train.checkpoint"
CHECKPOINT_VERSION = 1


def write_checkpoint(run_dir: Path, config: dict, state: dict, history: list[dict]) -> Path:
    """``config.json``, ``checkpoint.pt`` (``state``) and the metrics files of ``history``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / CONFIG, json.dumps(config, indent=2) + "\n")
    atomic_write(run_dir / CHECKPOINT, lambda file: torch.save(state, file))
    write_metrics(run_dir, history)
    return run_dir / CHECKPOINT


def write_model(run_dir: Path, weights: dict) -> Path:
    """``model.pt``: the final model's state dict."""
    return atomic_write(run_dir / MODEL, lambda file: torch.save(weights, file))


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """``metrics.jsonl`` and ``metrics.csv``, one row per epoch and split, rewritten whole from
    the history (so a resumed run never duplicates a row). The csv flattens nested values
    (:func:`flat_row`)."""
    lines = "".join(json.dumps(row) + "\n" for row in history)
    atomic_write_text(run_dir / METRICS_JSONL, lines)
    rows = [flat_row(row) for row in history]
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / METRICS_CSV, text.getvalue())


def flat_row(row: dict) -> dict:
    """``row`` with each nested dict spread into ``key.inner`` columns (``dead_fraction`` ->
    ``dead_fraction.audio_net.layer1.0.bn1``...), for the csv."""
    flat = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[key] = value
    return flat


def read_checkpoint(path: Path) -> dict:
    """The state saved in a training checkpoint; ``ValueError`` for a foreign or damaged file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or damaged file; torch's advice does not apply
        raise ValueError(
            f"Trainer: {path} is not a readable training checkpoint ({type(error).__name__}); "
            "start a new run with --overwrite, or in a new --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"Trainer: {path} is not an avkernels training checkpoint")
    return state
