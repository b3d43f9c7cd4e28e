"""``avkernels diagnose``: dead-channel report of a ResNet-18/34 checkpoint.

Reads torchvision-layout checkpoints (with or without ``fc``, i.e. also the official plain
backbone), official ABRi checkpoints (``bn1_addition``, ``fusion_weight1``, ``downsample.conv``)
and avkernels ABRi checkpoints (``bn1.abri_weight``...), as a plain state dict or wrapped under
a ``model``/``state_dict`` key, with or without a DDP ``module.`` prefix; encoders of any width
(the width is the checkpoint's own: its stem's output channels, e.g. ``avkernels train
--width 16`` runs). Writes ``report.md``,
``report.json`` and PNG plots into ``--out`` and prints a short summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from avkernels.app.commands import arguments as types
from avkernels.app.errors import CommandError, RunError
from avkernels.checkpoints import (
    BLOCKS,
    CheckpointError,
    build_resnet,
    describe,
    detect_arch,
    first_line,
    load_state_dict,
    select_encoder,
)
from avkernels.files import atomic_write_text

NAME = "diagnose"
HELP = "report the dead BatchNorm channels of a ResNet-18/34 checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", type=types.existing_file, help="a .pth/.pt file holding a state dict"
    )
    parser.add_argument(
        "--arch",
        choices=sorted(BLOCKS),
        default=None,
        help="network (default: recognised from the checkpoint's keys)",
    )
    parser.add_argument(
        "--in-channels",
        type=int,
        choices=(1, 3),
        default=None,
        help="input channels: 1 for spectrograms, 3 for images (default: from "
        "the checkpoint's first convolution)",
    )
    parser.add_argument(
        "--prefix",
        default=None,
        help="diagnose the encoder stored under this key prefix (e.g. "
        "'audio_net.'); default: found automatically",
    )
    parser.add_argument(
        "--data",
        type=types.existing_file,
        default=None,
        help="inputs for the activation statistics: a .pt/.pth file with a "
        "tensor (N, C, H, W) (or (N, H, W) for 1 channel), or .npy/.npz",
    )
    parser.add_argument(
        "--batch-size", type=types.positive_int, default=32, help="batch size for --data"
    )
    parser.add_argument(
        "--max-batches", type=types.positive_int, default=None, help="use at most this many"
    )
    parser.add_argument(
        "--threshold",
        type=types.non_negative_float,
        default=None,
        help="tau of the |gamma|, |beta| criterion (default 1e-10, 1e-3 with --relative; "
        "with --relative a fraction in [0, 1])",
    )
    parser.add_argument(
        "--relative", action="store_true", help="tau is a fraction of each layer's median |gamma|"
    )
    parser.add_argument(
        "--before",
        type=types.existing_file,
        default=None,
        help="report.json of an earlier diagnosis (e.g. before fine-tuning) to "
        "compare with: writes comparison.md and comparison.png",
    )
    parser.add_argument(
        "--device",
        type=types.device,
        default=None,
        help="device for the forward passes (default: cuda if available)",
    )
    parser.add_argument(
        "--out",
        type=types.output_dir,
        default=Path("diagnosis"),
        help="output directory (default ./diagnosis)",
    )


def run(args: argparse.Namespace) -> int:
    from avkernels.diagnosis import DiagnosisReport, compare, diagnose

    if args.relative and args.threshold is not None and args.threshold > 1:
        raise CommandError(
            f"--threshold {args.threshold} with --relative is a fraction of each layer's "
            "median |gamma|: give one in [0, 1]"
        )
    types.check_device(args.device)
    # Read before anything is written: --before may lie in --out and be replaced below.
    before = None if args.before is None else _read_report(args.before, DiagnosisReport)
    try:
        state_dict = load_state_dict(args.checkpoint)
        state_dict, prefix_note = select_encoder(state_dict, args.prefix)
        model, description = _build_model(state_dict, args.arch, args.in_channels)
    except CheckpointError as error:
        raise CommandError(str(error)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(torch.device(device))
    in_channels = model.conv1.in_channels
    batches = None
    if args.data is not None:
        batches = load_batches(args.data, in_channels, args.batch_size)
    try:
        report = diagnose(
            model,
            batches,
            threshold=args.threshold,
            relative=args.relative,
            max_batches=args.max_batches,
            title=f"{args.checkpoint.name} ({description})",
        )
        comparison = None if before is None else compare(before, report, labels=("before", "now"))
    except ValueError as error:
        raise CommandError(f"{args.before or args.data or args.checkpoint}: {error}") from None
    # Everything is computed first, so a failure never leaves a mix of old and new files.
    texts = {"report.md": report.to_markdown(), "report.json": report.to_json()}
    if comparison is not None:
        texts["comparison.md"] = comparison.to_markdown()
    out = args.out
    types.check_writable(out)
    try:
        written = [atomic_write_text(out / name, text) for name, text in texts.items()]
        written += report.plot(out)
        if comparison is not None:
            written.append(comparison.plot(out / "comparison.png"))
    except OSError as error:
        reason = error.strerror or error
        raise RunError(f"cannot write the report into {out}: {reason}") from None
    print(f"{args.checkpoint}: {description}{prefix_note}")
    print(report.summary())
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def _build_model(state_dict: dict, arch: str | None, in_channels: int | None):
    """The ResNet of ``state_dict``: torchvision's at width 64, avkernels' encoder otherwise."""
    stem = state_dict.get("conv1.weight")
    width = stem.shape[0] if stem is not None and stem.dim() == 4 else 64
    if width == 64:
        return build_resnet(state_dict, arch, in_channels)
    from avkernels.app.models import ResNetEncoder, load_encoder

    detected = detect_arch(state_dict)
    if detected is None or (arch is not None and arch != detected):
        return build_resnet(state_dict, arch, in_channels)  # its errors name the problem
    stored = stem.shape[1]
    if in_channels is not None and in_channels != stored:
        raise CheckpointError(
            f"--in-channels {in_channels} but the checkpoint's first convolution takes "
            f"{stored} channels"
        )
    if stored not in (1, 3):
        raise CheckpointError(f"the checkpoint's stem takes {stored} channels; 1 or 3 expected")
    encoder = ResNetEncoder(detected, stored, width=width, fuse_relu=False)
    load_encoder(encoder, state_dict)
    return encoder, f"{detected} of width {width}, {stored} input channel(s)"


# --- data -------------------------------------------------------------------------------------


def load_batches(path: Path, in_channels: int, batch_size: int) -> list[torch.Tensor]:
    """Inputs from a .pt/.pth/.npy/.npz file as (N, C, H, W) float batches."""
    try:
        if path.suffix in (".npy", ".npz"):
            import numpy as np

            content = np.load(path, allow_pickle=False)
            if path.suffix == ".npz":
                if len(content.files) != 1:
                    raise CommandError(f"--data {path}: expected one array, found {content.files}")
                content = content[content.files[0]]
            inputs = torch.from_numpy(np.asarray(content))
        else:
            inputs = torch.load(path, map_location="cpu", weights_only=True)
    except CommandError:
        raise
    except Exception as error:  # noqa: BLE001 - foreign files raise many error types
        raise CommandError(f"--data {path}: cannot read it ({first_line(error)})") from None
    inputs = _input_tensor(inputs, path)
    if inputs.dim() == 3 and in_channels == 1:
        inputs = inputs.unsqueeze(1)
    if inputs.dim() != 4 or inputs.shape[1] != in_channels or inputs.shape[0] == 0:
        raise CommandError(
            f"--data {path}: expected a tensor (N, {in_channels}, H, W), got shape "
            f"{tuple(inputs.shape)}"
        )
    if not inputs.is_floating_point():
        inputs = inputs.float()
    return list(inputs.split(batch_size))


def _input_tensor(content: Any, path: Path) -> torch.Tensor:
    if isinstance(content, dict) and len(content) == 1:
        content = next(iter(content.values()))
    elif isinstance(content, dict):
        content = next((content[k] for k in ("inputs", "x", "data") if k in content), content)
    if isinstance(content, (tuple, list)) and content:
        content = content[0]
    if not isinstance(content, torch.Tensor):
        raise CommandError(
            f"--data {path}: expected a tensor (or a dict/tuple holding one), found "
            f"{describe(content)}"
        )
    return content


def _read_report(path: Path, report_class):
    try:
        return report_class.from_json(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CommandError(f"--before {path}: {error.strerror or error}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise CommandError(
            f"--before {path}: not a diagnosis report ({first_line(error)})"
        ) from None
