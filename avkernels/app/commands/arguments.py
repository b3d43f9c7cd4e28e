"""The argument types of every command: argparse ``type=`` functions that reject a bad value
while the command line is parsed (exit 2 with argparse's usage message), before any work.

Each raises :class:`argparse.ArgumentTypeError` with what the value must be; argparse prefixes
the option's name (``argument --lr: must be a finite number > 0, got 'nan'``).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from avkernels.app.errors import CommandError

SEED_LIMIT = 2**32  # numpy's generators take seeds in [0, 2**32)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def seed(text: str) -> int:
    value = _integer(text)
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [0, {SEED_LIMIT - 1}], got {text!r}"
        )
    return value


def finite_float(text: str) -> float:
    return _number(text)


def positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def device(text: str) -> str:
    """A device name torch understands (``cpu``, ``cuda``, ``cuda:1``...); whether it is
    available is checked before the work starts (:func:`check_device`)."""
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device: use cpu, cuda or cuda:INDEX"
        ) from None
    return text


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a file")
    return path


def existing_path(text: str) -> Path:
    """A file or folder that exists."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return path


def manifest_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        reason = "not a file" if path.exists() else "no such file"
        raise argparse.ArgumentTypeError(
            f"{text}: {reason} (write a manifest with `avkernels prepare`)"
        )
    return path


def existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        reason = "not a folder" if path.exists() else "no such folder"
        raise argparse.ArgumentTypeError(f"{text}: {reason}")
    return path


def output_dir(text: str) -> Path:
    """A folder to write into: an existing folder, or one that can be made (no regular file at
    that path or above it). Writability is checked before the work (:func:`check_writable`)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text} is a file, not a folder: choose a folder (a new path is created)"
        )
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise argparse.ArgumentTypeError(
            f"{text}: {blocking} is a file, so no folder can be made under it; choose another path"
        )
    return path


def output_file(text: str) -> Path:
    """A file to write: not a folder, and not under a regular file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give the path of a file")
    output_dir(str(path.parent))
    return path


def check_writable(folder: Path, option: str = "--out") -> None:
    """Make ``folder`` (with its parents) and prove that a file can be written in it; raise
    :class:`~avkernels.app.cli.CommandError` naming ``option`` otherwise. Called before the work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A file of its own: ranks of a torchrun job check the same folder at the same time.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise CommandError(
            f"{option} {folder}: cannot write there ({error.strerror or error}); "
            "choose a folder you can write to"
        ) from None


def check_device(name: str | None, option: str = "--device") -> None:
    """A device that exists on this machine (None: the default, always fine)."""
    import torch

    if name is None:
        return
    chosen = torch.device(name)
    if chosen.type == "cpu":
        return
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CommandError(f"{option} {name}: no CUDA GPU is available; use {option} cpu")
        if chosen.index is not None and chosen.index >= count:
            raise CommandError(
                f"{option} {name}: there are {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
        return
    raise CommandError(f"{option} {name}: avkernels runs on cpu or cuda; use {option} cpu")
