"""``avkernels diagnose``: dead-channel report of a ResNet-18/34 checkpoint.

Reads torchvision-layout checkpoints (with or without ``fc``, i.e. also the official plain
backbone), official ABRi checkpoints (``bn1_addition``, ``fusion_weight1``, ``downsample.conv``)
and avkernels ABRi checkpoints (``bn1.abri_weight``...), as a plain state dict or wrapped under
a ``model``/``state_dict`` key, with or without a DDP ``module.`` prefix. Writes ``report.md``,
``report.json`` and PNG plots into ``--out`` and prints a short summary.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from avkernels.cli import CommandError

NAME = "diagnose"
HELP = "report the dead BatchNorm channels of a ResNet-18/34 checkpoint"

BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_WRAPPER_KEYS = ("model", "state_dict")
_KEYS_SHOWN = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="a .pth/.pt file holding a state dict")
    parser.add_argument("--arch", choices=sorted(BLOCKS), default=None,
                        help="network (default: recognised from the checkpoint's keys)")
    parser.add_argument("--in-channels", type=int, choices=(1, 3), default=None,
                        help="input channels: 1 for spectrograms, 3 for images (default: from "
                        "the checkpoint's first convolution)")
    parser.add_argument("--prefix", default=None,
                        help="diagnose the encoder stored under this key prefix (e.g. "
                        "'audio_net.'); default: found automatically")
    parser.add_argument("--data", type=Path, default=None,
                        help="inputs for the activation statistics: a .pt/.pth file with a "
                        "tensor (N, C, H, W) (or (N, H, W) for 1 channel), or .npy/.npz")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size for --data")
    parser.add_argument("--max-batches", type=int, default=None, help="use at most this many")
    parser.add_argument("--threshold", type=float, default=None,
                        help="tau of the |gamma|, |beta| criterion (default 1e-10, 1e-3 with "
                        "--relative)")
    parser.add_argument("--relative", action="store_true",
                        help="tau is a fraction of each layer's median |gamma|")
    parser.add_argument("--before", type=Path, default=None,
                        help="report.json of an earlier diagnosis (e.g. before fine-tuning) to "
                        "compare with: writes comparison.md and comparison.png")
    parser.add_argument("--device", default=None,
                        help="device for the forward passes (default: cuda if available)")
    parser.add_argument("--out", type=Path, default=Path("diagnosis"),
                        help="output directory (default ./diagnosis)")


def run(args: argparse.Namespace) -> int:
    from avkernels.diagnosis import DiagnosisReport, compare, diagnose

    if args.batch_size < 1:
        raise CommandError("--batch-size must be >= 1")
    state_dict = load_state_dict(args.checkpoint)
    state_dict, prefix_note = select_encoder(state_dict, args.prefix)
    model, description = build_resnet(state_dict, args.arch, args.in_channels)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model.to(torch.device(device))
    except (RuntimeError, AssertionError) as error:
        raise CommandError(f"cannot use --device {device}: {_first_line(error)}") from None
    in_channels = model.conv1.in_channels
    batches = None
    if args.data is not None:
        batches = load_batches(args.data, in_channels, args.batch_size)
    report = diagnose(
        model,
        batches,
        threshold=args.threshold,
        relative=args.relative,
        max_batches=args.max_batches,
        title=f"{args.checkpoint.name} ({description})",
    )
    out = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "report.md", out / "report.json"]
        written[0].write_text(report.to_markdown(), encoding="utf-8")
        written[1].write_text(report.to_json(), encoding="utf-8")
        written += report.plot(out)
        if args.before is not None:
            before = _read_report(args.before, DiagnosisReport)
            try:
                comparison = compare(before, report, labels=("before", "now"))
            except ValueError as error:
                raise CommandError(f"{args.before}: {error}") from None
            (out / "comparison.md").write_text(comparison.to_markdown(), encoding="utf-8")
            written += [out / "comparison.md", comparison.plot(out / "comparison.png")]
    except OSError as error:
        reason = error.strerror or error
        raise CommandError(f"cannot write the report into {out}: {reason}") from None
    print(f"{args.checkpoint}: {description}{prefix_note}")
    print(report.summary())
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


# --- checkpoint -> model ------------------------------------------------------------------------


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (unwrapped from ``model``/``state_dict``), or a CommandError."""
    if not path.exists():
        raise CommandError(f"{path}: no such file")
    if not path.is_file():
        raise CommandError(f"{path}: not a file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for foreign files
        raise CommandError(
            f"{path} is not a PyTorch checkpoint that can be loaded safely ({_first_line(error)})"
        ) from None
    for _ in range(2):  # e.g. {"model": {"state_dict": ...}}
        if isinstance(content, dict):
            wrapped = [key for key in _WRAPPER_KEYS if isinstance(content.get(key), dict)]
            if wrapped and not _is_state_dict(content):
                content = content[wrapped[0]]
    if not _is_state_dict(content):
        raise CommandError(
            f"{path} holds no state dict (expected a dict of tensors, possibly under a "
            f"'model' or 'state_dict' key; found {_describe(content)})"
        )
    if all(key.startswith("module.") for key in content):  # saved from DistributedDataParallel
        content = {key[len("module."):]: value for key, value in content.items()}
    return content


def _is_state_dict(content: Any) -> bool:
    return (
        isinstance(content, dict)
        and bool(content)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items())
    )


def _describe(content: Any) -> str:
    if isinstance(content, dict):
        keys = list(content)[:_KEYS_SHOWN]
        return f"a dict with keys {keys}" if keys else "an empty dict"
    return f"a {type(content).__name__}"


def select_encoder(
    state_dict: dict[str, torch.Tensor], prefix: Optional[str]
) -> tuple[dict[str, torch.Tensor], str]:
    """Keys of the ResNet stored under ``prefix`` (found when None), and a note saying so."""
    if prefix is None:
        candidates = sorted(
            key[: -len("layer1.0.conv1.weight")]
            for key in state_dict
            if key.endswith("layer1.0.conv1.weight")
        )
        if len(candidates) > 1:
            raise CommandError(
                f"the checkpoint holds several ResNets (prefixes {candidates}); choose one "
                "with --prefix"
            )
        prefix = candidates[0] if candidates else ""
    if not prefix:
        return state_dict, ""
    selected = {
        key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)
    }
    if not selected:
        raise CommandError(f"no key of the checkpoint starts with --prefix {prefix!r}")
    ignored = len(state_dict) - len(selected)
    note = f" (the encoder under {prefix!r}"
    note += f"; {ignored} other keys ignored)" if ignored else ")"
    return selected, note


def detect_arch(state_dict: dict[str, torch.Tensor]) -> Optional[str]:
    """``resnet18``/``resnet34`` from the number of blocks per stage, or None."""
    blocks = [0, 0, 0, 0]
    for key in state_dict:
        match = re.match(r"layer([1-4])\.(\d+)\.", key)
        if match:
            stage, block = int(match.group(1)) - 1, int(match.group(2))
            blocks[stage] = max(blocks[stage], block + 1)
    if any(key.startswith("layer") and ".conv3." in key for key in state_dict):
        return None  # bottleneck blocks: ResNet-50 and deeper
    return next((arch for arch, counts in BLOCKS.items() if tuple(blocks) == counts), None)


def _abri_layout(state_dict: dict[str, torch.Tensor]) -> Optional[str]:
    if any(re.search(r"(^|\.)(bn\d*_addition\.|fusion_weight\d*$)", key) for key in state_dict):
        return "official ABRi"
    if any(".abri_" in key for key in state_dict):
        return "avkernels ABRi"
    return None


def _abri_granularity(state_dict: dict[str, torch.Tensor], layout: str) -> str:
    pattern = r"(^|\.)fusion_weight\d*$" if layout == "official ABRi" else r"\.abri_alpha$"
    sizes = {value.numel() == 1 for key, value in state_dict.items() if re.search(pattern, key)}
    if len(sizes) != 1:
        raise CommandError(
            "the checkpoint mixes per-layer and per-channel ABRi weights; not supported"
        )
    return "layer" if sizes.pop() else "channel"


def build_resnet(
    state_dict: dict[str, torch.Tensor], arch: Optional[str], in_channels: Optional[int]
) -> tuple[nn.Module, str]:
    """A torchvision-layout ResNet holding ``state_dict`` (loaded strictly), and a description."""
    try:
        import torchvision
    except ImportError as error:
        raise CommandError(
            f"torchvision is needed to build the ResNet ({error}); "
            "install it with `pip install 'avkernels[av]'`"
        ) from None
    from avkernels import abri

    detected = detect_arch(state_dict)
    if detected is None:
        raise CommandError(
            "the checkpoint's keys are not those of a ResNet-18 or ResNet-34 "
            f"(first keys: {', '.join(list(state_dict)[:_KEYS_SHOWN])})"
        )
    if arch is not None and arch != detected:
        raise CommandError(
            f"the checkpoint's keys are those of a {detected}, not of --arch {arch}; "
            f"use --arch {detected}"
        )
    conv1 = state_dict.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        raise CommandError("the checkpoint has no 4-D 'conv1.weight': not a ResNet stem")
    stored_channels = conv1.shape[1]
    if in_channels is not None and in_channels != stored_channels:
        raise CommandError(
            f"--in-channels {in_channels} but the checkpoint's first convolution takes "
            f"{stored_channels} channels"
        )
    fc = state_dict.get("fc.weight")
    classes = fc.shape[0] if fc is not None else 1000
    model = getattr(torchvision.models, detected)(num_classes=classes)
    model.conv1 = nn.Conv2d(stored_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if fc is None:
        model.fc = nn.Identity()
    layout = _abri_layout(state_dict)
    if layout is not None:
        model = abri.apply(model, granularity=_abri_granularity(state_dict, layout))
    try:
        if layout == "official ABRi":
            abri.load_official_state_dict(model, state_dict)
        else:
            _load_strict(model, state_dict, detected)
    except (KeyError, ValueError, RuntimeError) as error:
        raise CommandError(_one_line(error.args[0] if error.args else error)) from None
    kind = layout or ("torchvision layout" if fc is not None else "torchvision layout, no fc")
    return model, f"{detected}, {kind}, {stored_channels} input channel(s)"


def _load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], arch: str) -> None:
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_shorten(missing)}")
        if unexpected:
            parts.append(f"unexpected {_shorten(unexpected)}")
        raise KeyError(f"the checkpoint does not match a {arch}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


def _shorten(keys: list[str]) -> str:
    extra = f" (+{len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else ""
    return ", ".join(keys[:_KEYS_SHOWN]) + extra


# --- data -------------------------------------------------------------------------------------


def load_batches(path: Path, in_channels: int, batch_size: int) -> list[torch.Tensor]:
    """Inputs from a .pt/.pth/.npy/.npz file as (N, C, H, W) float batches."""
    if not path.is_file():
        raise CommandError(f"--data {path}: no such file")
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
        raise CommandError(f"--data {path}: cannot read it ({_first_line(error)})") from None
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
            f"{_describe(content)}"
        )
    return content


def _read_report(path: Path, report_class):
    try:
        return report_class.from_json(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CommandError(f"--before {path}: {error.strerror or error}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise CommandError(
            f"--before {path}: not a diagnosis report ({_first_line(error)})"
        ) from None


def _one_line(message: Any, limit: int = 400) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
