"""Reading checkpoints strictly, in one place for the library and the application: state dicts
from files (unwrapped, DDP prefix removed), the encoder under a key prefix, the layouts
recognised from the keys (torchvision, the official backbone without ``fc``, official ABRi,
avkernels ABRi), strict loading into a ResNet of any of them (:func:`load_resnet`), and
torchvision-layout ResNets built from a checkpoint (:func:`build_resnet`).

Every problem raises :class:`CheckpointError` with a one-line message that names the file or the
keys at fault; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avkernels import abri
from avkernels._text import KEYS_SHOWN, first_line, one_line, shorten_keys

__all__ = [
    "BLOCKS",
    "CheckpointError",
    "abri_granularity",
    "abri_layout",
    "build_resnet",
    "describe",
    "detect_arch",
    "load_resnet",
    "load_state_dict",
    "load_strict",
    "select_encoder",
]

BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_WRAPPER_KEYS = ("model", "state_dict")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model: a one-line message."""


def load_state_dict(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The state dict in the file ``source`` (unwrapped from ``model``/``state_dict``, a
    ``DistributedDataParallel`` ``module.`` prefix removed), or a CheckpointError; a mapping
    ``source`` is taken as the state dict itself."""
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types for foreign files
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint that can be loaded safely ({_load_failure(error)})"
        ) from None
    for _ in range(2):  # e.g. {"model": {"state_dict": ...}}
        if isinstance(content, dict):
            wrapped = [key for key in _WRAPPER_KEYS if isinstance(content.get(key), dict)]
            if wrapped and not _is_state_dict(content):
                content = content[wrapped[0]]
    if not _is_state_dict(content):
        raise CheckpointError(
            f"{path} holds no state dict (expected a dict of tensors, possibly under a "
            f"'model' or 'state_dict' key; found {describe(content)})"
        )
    if all(key.startswith("module.") for key in content):  # saved from DistributedDataParallel
        content = {key[len("module.") :]: value for key, value in content.items()}
    return content


def _load_failure(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, without torch's advice to load the file
    unsafely (a file that needs it is not a checkpoint this package reads)."""
    text = str(error)
    if "Unsupported global" in text:
        return "it holds Python objects besides tensors, which are not loaded for safety"
    if "weights_only" in text or "Weights only" in text:
        return "not a file written by torch.save"
    return first_line(error)


def _is_state_dict(content: Any) -> bool:
    return (
        isinstance(content, dict)
        and bool(content)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items())
    )


def describe(content: Any) -> str:
    """What ``content`` (a loaded checkpoint) is, in a few words, for error messages."""
    if isinstance(content, dict):
        keys = list(content)[:KEYS_SHOWN]
        return f"a dict with keys {keys}" if keys else "an empty dict"
    return f"a {type(content).__name__}"


def select_encoder(
    state_dict: dict[str, torch.Tensor], prefix: str | None
) -> tuple[dict[str, torch.Tensor], str]:
    """Keys of the ResNet stored under ``prefix`` (found when None), and a note saying so."""
    if prefix is None:
        candidates = sorted(
            key[: -len("layer1.0.conv1.weight")]
            for key in state_dict
            if key.endswith("layer1.0.conv1.weight")
        )
        if len(candidates) > 1:
            raise CheckpointError(
                f"the checkpoint holds several ResNets (prefixes {candidates}); choose one "
                "(--prefix)"
            )
        prefix = candidates[0] if candidates else ""
    if not prefix:
        return state_dict, ""
    selected = {
        key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)
    }
    if not selected:
        raise CheckpointError(f"no key of the checkpoint starts with the prefix {prefix!r}")
    ignored = len(state_dict) - len(selected)
    note = f" (the encoder under {prefix!r}"
    note += f"; {ignored} other keys ignored)" if ignored else ")"
    return selected, note


def detect_arch(state_dict: dict[str, torch.Tensor]) -> str | None:
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


def abri_layout(state_dict: dict[str, torch.Tensor]) -> str | None:
    """``"official ABRi"``, ``"avkernels ABRi"`` or None (no ABRi key) from the keys."""
    if any(re.search(r"(^|\.)(bn\d*_addition\.|fusion_weight\d*$)", key) for key in state_dict):
        return "official ABRi"
    if any(".abri_" in key for key in state_dict):
        return "avkernels ABRi"
    return None


def abri_granularity(state_dict: dict[str, torch.Tensor], layout: str) -> str:
    """``"layer"`` or ``"channel"``: the size of the ABRi mixing weights of ``layout``."""
    pattern = r"(^|\.)fusion_weight\d*$" if layout == "official ABRi" else r"\.abri_alpha$"
    sizes = {value.numel() == 1 for key, value in state_dict.items() if re.search(pattern, key)}
    if len(sizes) != 1:
        raise CheckpointError(
            "the checkpoint mixes per-layer and per-channel ABRi weights; not supported"
        )
    return "layer" if sizes.pop() else "channel"


def build_resnet(
    state_dict: dict[str, torch.Tensor],
    arch: str | None = None,
    in_channels: int | None = None,
) -> tuple[nn.Module, str]:
    """A torchvision-layout ResNet holding ``state_dict`` (loaded strictly), and a description.

    ``arch`` (resnet18/resnet34) and ``in_channels`` are recognised from the keys when None and
    checked against them otherwise. ABRi checkpoints (official or avkernels layout) give a model
    converted with :func:`avkernels.abri.apply`.
    """
    try:
        import torchvision
    except ImportError as error:
        raise CheckpointError(
            f"torchvision is needed to build the ResNet ({error}); "
            "install it with `pip install 'avkernels[av]'`"
        ) from None
    detected = detect_arch(state_dict)
    if detected is None:
        raise CheckpointError(
            "the checkpoint's keys are not those of a ResNet-18 or ResNet-34 "
            f"(first keys: {', '.join(list(state_dict)[:KEYS_SHOWN])})"
        )
    if arch is not None and arch != detected:
        raise CheckpointError(
            f"the checkpoint's keys are those of a {detected}, not of --arch {arch}; use {detected}"
        )
    conv1 = state_dict.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        raise CheckpointError("the checkpoint has no 4-D 'conv1.weight': not a ResNet stem")
    stored_channels = conv1.shape[1]
    if in_channels is not None and in_channels != stored_channels:
        raise CheckpointError(
            f"in_channels={in_channels} but the checkpoint's first convolution takes "
            f"{stored_channels} channels"
        )
    fc = state_dict.get("fc.weight")
    classes = fc.shape[0] if fc is not None else 1000
    model = getattr(torchvision.models, detected)(num_classes=classes)
    model.conv1 = nn.Conv2d(stored_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if fc is None:
        model.fc = nn.Identity()
    layout = load_resnet(model, state_dict, detected)
    kind = layout or ("torchvision layout" if fc is not None else "torchvision layout, no fc")
    return model, f"{detected}, {kind}, {stored_channels} input channel(s)"


def load_resnet(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    arch: str,
    *,
    description: str | None = None,
    caller: str = "",
) -> str | None:
    """Load a ResNet checkpoint of any recognised layout into ``model``, strictly; return its
    ABRi layout (:func:`abri_layout`: ``"official ABRi"``, ``"avkernels ABRi"`` or None).

    An ABRi checkpoint turns ABRi on in a model that does not have it yet
    (:func:`avkernels.abri.apply`, with the checkpoint's granularity); official ABRi keys are
    mapped by :func:`avkernels.abri.load_official_state_dict`, every other layout is loaded by
    :func:`load_strict` (``arch``, ``description`` and ``caller`` name the model in its errors).
    Every problem raises :class:`CheckpointError`.
    """
    layout = abri_layout(state_dict)
    if layout is not None and not any(True for _ in abri.abri_layers(model)):
        abri.apply(model, granularity=abri_granularity(state_dict, layout))
    try:
        if layout == "official ABRi":
            abri.load_official_state_dict(model, state_dict)
        else:
            load_strict(model, state_dict, arch, description=description, caller=caller)
    except CheckpointError:
        raise
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(one_line(error.args[0] if error.args else error)) from None
    return layout


def load_strict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    arch: str,
    *,
    description: str | None = None,
    caller: str = "",
) -> None:
    """``model.load_state_dict(state_dict, strict=True)``, with the problem named first.

    Missing and unexpected keys, then mis-shaped ones, raise :class:`CheckpointError`
    (``"{caller}: the checkpoint does not match a {description}: ..."``, ``description``
    defaulting to ``arch``; a hint names the arch the checkpoint's blocks are those of when it
    is not ``arch``). ABRi's added BN keys (``abri_*``) are optional when the state dict has
    none: a plain checkpoint loaded into an ABRi model is its original BNs and the added ones
    start fresh (as :class:`avkernels.TrackedBN` loads it).
    """
    context = f"{caller}: " if caller else ""
    expected = model.state_dict()
    required = set(expected)
    abri_keys = {key for key in expected if re.search(r"(^|\.)abri_\w+$", key)}
    if not abri_keys & set(state_dict):
        required -= abri_keys
    missing = sorted(required - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = [
            f"{name} {shorten_keys(keys)}"
            for name, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        detected = detect_arch(state_dict)
        hint = (
            f" (its blocks are those of a {detected}: build the model with arch={detected!r})"
            if detected not in (None, arch)
            else ""
        )
        raise CheckpointError(
            f"{context}the checkpoint does not match a {description or arch}: "
            + "; ".join(parts)
            + hint
        )
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}"
        for key, value in state_dict.items()
        if value.shape != expected[key].shape
    ]
    if mismatched:
        raise CheckpointError(f"{context}shape mismatch for " + shorten_keys(mismatched, "; "))
    model.load_state_dict(state_dict, strict=True)
