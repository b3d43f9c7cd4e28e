"""ABRi (Adaptive BatchNorm Re-initialization) for whole models, and the official baselines.

ABRi is a mode of :class:`~avkernels.nn.tracked_bn.TrackedBN` (:meth:`TrackedBN.enable_abri`): one
kernel computes ``a * BN_orig(x) + (1 - a) * BN_new(x)`` at the cost of one BN. This module:

* :func:`apply` turns every BN of a model (or only the layers a diagnosis flags) into ABRi;
* :func:`fold` merges each ABRi layer into one ``nn.BatchNorm2d`` with the same eval output;
* :func:`load_official_state_dict` loads a checkpoint written by the official ABRi ResNet
  (``bn1_addition``, ``fusion_weight1``, ``downsample.conv``/``downsample.bn``...) into a
  torchvision-layout ResNet converted with :func:`apply`, strictly;
* :func:`reset_batchnorm` and :func:`reset_small_gamma` are the official code's two simpler
  baselines (re-initialise every BN, or only the channels whose ``|gamma|`` is tiny).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from avkernels._text import shorten_keys
from avkernels.convert import convert
from avkernels.diagnosis import diagnose
from avkernels.nn.tracked_bn import TrackedBN
from avkernels.ops.batch_norm.reference import effective_affine

__all__ = [
    "abri_layers",
    "apply",
    "fold",
    "load_official_state_dict",
    "official_key_map",
    "reset_batchnorm",
    "reset_small_gamma",
]

# Official name of each of our ABRi tensors, relative to the added BN module.
_ADDED_BN_FIELDS = {
    "abri_weight": "weight",
    "abri_bias": "bias",
    "abri_running_mean": "running_mean",
    "abri_running_var": "running_var",
    "abri_num_batches_tracked": "num_batches_tracked",
}
# torchvision's downsample Sequential vs the official DownSample module.
_DOWNSAMPLE_RENAMES = {"0": "conv", "1": "bn"}


def abri_layers(model: nn.Module) -> Iterator[tuple[str, TrackedBN]]:
    """``(name, layer)`` for every TrackedBN of ``model`` in ABRi mode."""
    for name, module in model.named_modules():
        if isinstance(module, TrackedBN) and module.abri_enabled:
            yield name, module


def apply(
    model: nn.Module,
    alpha: float = 0.5,
    granularity: str = "layer",
    only_dead: bool = False,
    **diagnose_kwargs: object,
) -> nn.Module:
    """Put every BatchNorm2d of ``model`` in ABRi mode; return the (possibly new) root.

    Plain ``nn.BatchNorm2d`` layers are first converted to :class:`TrackedBN` (sharing their
    parameters and buffers, see :func:`avkernels.convert`). ``alpha`` initialises the blend
    weight, ``granularity`` is ``"layer"`` (one weight per layer, the official default) or
    ``"channel"``. With ``only_dead=True`` only the layers that :func:`avkernels.diagnose`
    flags get ABRi; ``diagnose_kwargs`` go to it (e.g. ``data=`` for the activation criterion,
    ``threshold=``). Layers already in ABRi mode are left as they are. Build the optimizer
    afterwards: the added BNs bring new parameters.
    """
    flagged = None
    if only_dead:
        report = diagnose(model, **diagnose_kwargs)
        flagged = {layer.name for layer in report.layers if layer.flagged}
    model = convert(model)
    for name, module in model.named_modules():
        if not isinstance(module, TrackedBN) or module.abri_enabled:
            continue
        if flagged is None or name in flagged:
            module.enable_abri(alpha, granularity)
    return model


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """Replace every ABRi layer of ``model`` by an ``nn.BatchNorm2d`` with the same eval output.

    The folded layer holds the single per-channel affine of ABRi in eval (``scale``, ``shift``,
    docs/DESIGN.md, "ABRi as one BatchNorm") as ``running_mean = 0``, ``running_var = 1``,
    ``weight = scale * sqrt(1 + eps)``, ``bias = shift``: for export and inference, not for
    further training (its batch-statistics output differs). A layer with the fused
    ``activation="relu"`` becomes ``nn.Sequential(nn.BatchNorm2d, nn.ReLU())``, so its state-dict
    keys gain a ``0.`` (``bn1.weight`` -> ``bn1.0.weight``). Returns the (possibly new) root.
    """
    if isinstance(model, TrackedBN) and model.abri_enabled:
        return _fold_layer(model)
    for name, child in model.named_children():
        folded = fold(child)
        if folded is not child:
            model.add_module(name, folded)
    return model


def _fold_layer(layer: TrackedBN) -> nn.Module:
    if not layer.track_running_stats:
        raise ValueError(
            "cannot fold an ABRi layer built with track_running_stats=False: it normalises with "
            "batch statistics in eval too, so no fixed affine represents it"
        )
    means = torch.stack([layer.running_mean, layer.abri_running_mean]).double()
    variances = torch.stack([layer.running_var, layer.abri_running_var]).double()
    scale, shift = effective_affine(
        layer.weight,
        layer.bias,
        layer.abri_weight,
        layer.abri_bias,
        layer.abri_alpha,
        means,
        torch.rsqrt(variances + layer.eps),
    )
    weight = layer.weight
    plain = nn.BatchNorm2d(
        layer.num_features, layer.eps, layer.momentum, device=weight.device, dtype=weight.dtype
    )
    plain.weight.copy_(scale * (1 + layer.eps) ** 0.5)
    plain.bias.copy_(shift)
    plain.num_batches_tracked.copy_(layer.num_batches_tracked)
    plain.train(layer.training)
    if layer.activation is None:
        return plain
    # ReLU is the only fused activation (avkernels.functional.ACTIVATIONS).
    return nn.Sequential(plain, nn.ReLU()).train(layer.training)


# --- official checkpoint layout -----------------------------------------------------------------


def official_key_map(model: nn.Module) -> dict[str, str]:
    """``{official checkpoint key: key of model.state_dict()}`` for a torchvision-layout model.

    The official ABRi ResNet names the added BN of ``<prefix>bnK`` ``<prefix>bnK_addition`` and
    its blend weight ``<prefix>fusion_weightK`` (no ``K`` when the module holds one ABRi BN:
    the stem's ``fusion_weight``, ``downsample.fusion_weight``); its downsample is a module with
    ``conv``/``bn`` where torchvision has ``downsample.0``/``downsample.1``.
    """
    abri_names = {name for name, _ in abri_layers(model)}
    abri_per_parent: dict[str, int] = {}
    for name in abri_names:
        parent = name.rpartition(".")[0]
        abri_per_parent[parent] = abri_per_parent.get(parent, 0) + 1

    def official_module(name: str) -> str:
        return re.sub(
            r"(^|\.)downsample\.([01])(?=\.|$)",
            lambda m: f"{m.group(1)}downsample.{_DOWNSAMPLE_RENAMES[m.group(2)]}",
            name,
        )

    mapping = {}
    for key in model.state_dict():
        module_name, _, field = key.rpartition(".")
        official = official_module(module_name)
        if module_name in abri_names and field.startswith("abri_"):
            parent, _, official_leaf = official.rpartition(".")
            prefix = parent + "." if parent else ""
            if field == "abri_alpha":
                several = abri_per_parent[module_name.rpartition(".")[0]] > 1
                suffix = re.sub(r"^\D*", "", official_leaf) if several else ""
                mapping[prefix + "fusion_weight" + suffix] = key
            else:
                mapping[f"{prefix}{official_leaf}_addition.{_ADDED_BN_FIELDS[field]}"] = key
        else:
            mapping[f"{official}.{field}" if official else field] = key
    return mapping


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load an official-layout ABRi checkpoint into ``model``, strictly; return ``model``.

    ``model`` is a torchvision-layout ResNet whose BNs are in ABRi mode (:func:`apply`) with the
    checkpoint's granularity, and without ``fc`` when the checkpoint has none (the official
    backbone has no classifier: set ``model.fc = nn.Identity()``). Every checkpoint key must be
    used and every model key provided; otherwise a ``KeyError`` names the keys. Blend weights
    are accepted as scalars, (1,), (C,) or (1, C, 1, 1) and reshaped to the layer's shape.
    """
    mapping = official_key_map(model)
    unexpected = sorted(set(state_dict) - set(mapping))
    missing = sorted(set(mapping) - set(state_dict))
    if unexpected or missing:
        problems = []
        if missing:
            problems.append(f"missing official keys {shorten_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {shorten_keys(unexpected)}")
        hint = ""
        if any(key.startswith("fc.") for key in missing):
            hint = " (the official backbone has no classifier: set model.fc = nn.Identity())"
        elif any("_addition." in key or "fusion_weight" in key for key in unexpected + missing):
            hint = " (convert the model with avkernels.abri.apply(model) first)"
        raise KeyError(
            "load_official_state_dict: the checkpoint does not match the model: "
            + "; ".join(problems)
            + hint
        )
    own_state = model.state_dict()
    translated, mismatched = {}, []
    for official, key in mapping.items():
        value = state_dict[official]
        expected = own_state[key].shape
        blend_weight = key.endswith("abri_alpha") and value.numel() == expected.numel()
        if value.shape != expected and blend_weight:
            value = value.reshape(expected)
        if value.shape != expected:
            mismatched.append(
                f"{official}: checkpoint {tuple(value.shape)}, model {tuple(expected)}"
            )
        translated[key] = value
    if mismatched:
        hint = ""
        if any("fusion_weight" in problem for problem in mismatched):
            hint = " (a fusion_weight of C values needs granularity='channel', a scalar 'layer')"
        raise ValueError(
            f"load_official_state_dict: shape mismatch for {shorten_keys(mismatched, '; ')}{hint}"
        )
    model.load_state_dict(translated, strict=True)
    return model


# --- the official code's baselines --------------------------------------------------------------


def _batchnorms(model: nn.Module) -> Iterator[nn.BatchNorm2d]:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            yield module


@torch.no_grad()
def reset_batchnorm(model: nn.Module) -> nn.Module:
    """Baseline: re-initialise every BN (gamma 1, beta 0, running mean 0, running var 1).

    Applies to the original set of ABRi layers; returns ``model``.
    """
    for bn in _batchnorms(model):
        if bn.weight is not None:
            bn.weight.fill_(1)
        if bn.bias is not None:
            bn.bias.zero_()
        if bn.running_mean is not None:
            bn.running_mean.zero_()
            bn.running_var.fill_(1)
    return model


@torch.no_grad()
def reset_small_gamma(model: nn.Module, threshold: float = 1e-6) -> nn.Module:
    """Baseline: set gamma 1, beta 0 for the channels whose ``|gamma| < threshold``.

    Running statistics are left as they are (as the official code does); returns ``model``.
    """
    for bn in _batchnorms(model):
        if bn.weight is None:
            continue
        small = bn.weight.abs() < threshold
        bn.weight.masked_fill_(small, 1)
        if bn.bias is not None:
            bn.bias.masked_fill_(small, 0)
    return model
