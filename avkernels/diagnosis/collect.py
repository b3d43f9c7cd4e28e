"""Dead-channel diagnosis of a model's BatchNorm layers (``avkernels.diagnose``).

Two signals per BN channel (docs/DESIGN.md, "Dead channels"):

* parameter criterion: ``|gamma| < tau`` and ``|beta| < tau`` ("abnormal", the paper's
  criterion), split into *closed* (``beta <= 0``: always 0 after ReLU) and *constant*
  (``beta > 0``). ``tau`` is absolute (default 1e-10) or, with ``relative=True``, a fraction
  (default 1e-3) of the layer's median ``|gamma|``. ABRi layers are judged by their blended
  training-mode affine ``a*g1 + (1-a)*g2``, ``a*b1 + (1-a)*b2``.
* activation criterion, when ``data`` is given: the model runs in eval mode and every
  :class:`~avkernels.nn.tracked_bn.TrackedBN` counts, inside its kernel, the outputs ``<= 0`` before
  the activation and the samples whose whole HxW map is ``<= 0``.

The report also says which layers feed a ReLU directly: torchvision/timm ResNets end each
residual branch with a BN that feeds the residual sum (and may zero-init its gamma by design),
so its "dead" outputs mean something else.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from avkernels.convert import convert
from avkernels.diagnosis.report import (
    ABSOLUTE_THRESHOLD,
    ACTIVATION_THRESHOLD,
    RELATIVE_THRESHOLD,
    DiagnosisReport,
    LayerDiagnosis,
)
from avkernels.model_stats import dead_stats
from avkernels.nn.tracked_bn import TrackedBN
from avkernels.ops.batch_norm.reference import effective_affine

# --- the diagnosis ------------------------------------------------------------------------------


def diagnose(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    threshold: float | None = None,
    relative: bool = False,
    activation_threshold: float = ACTIVATION_THRESHOLD,
    max_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    title: str = "",
    counters: bool = False,
) -> DiagnosisReport:
    """Diagnose dead channels in every BatchNorm2d of ``model``; return a :class:`DiagnosisReport`.

    Args:
        model: any module; plain ``nn.BatchNorm2d`` and :class:`TrackedBN` layers (ABRi
            included) are diagnosed.
        data: optional iterable of batches (a tensor, or a tuple/list whose first item is the
            input tensor). The model runs on them in eval mode without gradients and TrackedBN
            counts the outputs ``<= 0``; plain BNs are counted in a converted copy, so ``model``
            itself is left unchanged (its counters and train/eval mode are restored).
        threshold: ``tau`` of the parameter criterion; default 1e-10, or 1e-3 with ``relative``.
        relative: ``tau`` is a fraction of each layer's median ``|gamma|``.
        activation_threshold: a channel counts as dead by its activations when its whole map is
            ``<= 0`` on at least this fraction of samples.
        max_batches: stop after this many batches of ``data``.
        forward: ``forward(model, batch)`` for models whose call is not ``model(batch_input)``.
        title: shown in the report.
        counters: instead of a pass over ``data``, take the activation statistics from the
            counters every TrackedBN (``track_dead=True``) collected while the user's own
            training or evaluation ran, since its last reset (see
            :func:`avkernels.dead_stats`); layers that counted nothing get none.
    """
    if threshold is None:
        threshold = RELATIVE_THRESHOLD if relative else ABSOLUTE_THRESHOLD
    if not threshold >= 0 or math.isinf(threshold):  # NaN compares false
        raise ValueError(f"diagnose: threshold must be a finite number >= 0, got {threshold}")
    relu_feeders = _relu_feeders(model)
    layers = []
    for name, bn in _batchnorms(model):
        layer = LayerDiagnosis(
            name=name,
            channels=bn.num_features,
            feeds_relu=_feeds_relu(bn, name, relu_feeders),
            abri=isinstance(bn, TrackedBN) and bn.abri_enabled,
            activation_threshold=activation_threshold,
        )
        _parameter_criterion(layer, bn, threshold, relative)
        layers.append(layer)
    report = DiagnosisReport(layers, threshold, relative, activation_threshold, title=title)
    if counters:
        if data is not None:
            raise ValueError("diagnose: pass data or counters=True, not both")
        _counted_activations(report, model)
    elif data is not None:
        report.batches = _activation_criterion(report, model, data, max_batches, forward)
    return report


def _batchnorms(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


@torch.no_grad()
def _parameter_criterion(
    layer: LayerDiagnosis, bn: nn.BatchNorm2d, threshold: float, relative: bool
) -> None:
    if bn.weight is None:
        return
    channels = bn.num_features
    abri = (bn.abri_weight, bn.abri_bias, bn.abri_alpha) if layer.abri else (None, None, None)
    # The training-mode affine: effective_affine with a zero mean and unit invstd.
    zeros = torch.zeros(1, channels, dtype=torch.float64, device=bn.weight.device)
    gamma, beta = effective_affine(bn.weight, bn.bias, *abri, zeros, zeros + 1)
    gamma, beta = gamma.cpu().numpy(), beta.cpu().numpy()
    tau = threshold * float(np.median(np.abs(gamma))) if relative else threshold
    abnormal = (np.abs(gamma) < tau) & (np.abs(beta) < tau)
    layer.threshold = tau
    layer.gamma, layer.beta = gamma, beta
    layer.status = [
        "ok" if not bad else ("constant" if b > 0 else "closed") for bad, b in zip(abnormal, beta)
    ]


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


class _BatchNormLeafTracer(torch.fx.Tracer):
    """Keeps every BatchNorm2d (TrackedBN included) as one node."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, nn.BatchNorm2d) or super().is_leaf_module(module, qualified_name)


def _relu_feeders(model: nn.Module) -> dict[str, bool] | None:
    """``{BN name: whether every use of its output is a ReLU}``, or None if untraceable."""
    try:
        graph = _BatchNormLeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - any Python control flow on tensors defeats tracing
        return None
    modules = dict(model.named_modules())
    feeders: dict[str, bool] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.BatchNorm2d):
            direct = bool(node.users) and all(_is_relu(user, modules) for user in node.users)
            feeders[node.target] = feeders.get(node.target, True) and direct
    return feeders


def _feeds_relu(bn: nn.BatchNorm2d, name: str, feeders: dict[str, bool] | None) -> bool | None:
    if isinstance(bn, TrackedBN) and bn.activation == "relu":
        return True
    if feeders is None:
        return None
    return feeders.get(name, False)


def _counted_activations(report: DiagnosisReport, model: nn.Module) -> None:
    """Fill the layers' activation statistics from the TrackedBN counters already collected."""
    counted = dead_stats(model)  # raises when no TrackedBN of the model counts
    for layer in report.layers:
        stats = counted.get(layer.name)
        if stats is not None and stats.samples:
            layer.samples = stats.samples
            layer.dead_fraction = stats.dead_fraction.cpu().numpy()
            layer.dead_sample_fraction = stats.dead_sample_fraction.cpu().numpy()
    report.from_counters = True


def _activation_criterion(
    report: DiagnosisReport,
    model: nn.Module,
    data: Iterable,
    max_batches: int | None,
    forward: Callable[[nn.Module, Any], Any] | None,
) -> int:
    """Runs ``data`` through the model in eval mode; fills the layers' activation statistics."""
    plain = any(not isinstance(bn, TrackedBN) for _, bn in _batchnorms(model))
    # Plain BNs have no counters: count in a converted copy rather than rewire the user's model.
    work = convert(copy.deepcopy(model)) if plain else model
    tracked = dict(_batchnorms(work))
    saved_modes = {name: module.training for name, module in work.named_modules()}
    saved = {
        name: (bn.track_dead, bn.dead_count.clone(), bn.dead_sample_count.clone(), bn.seen.clone())
        for name, bn in tracked.items()
    }
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    batches = 0
    try:
        work.eval()
        for bn in tracked.values():
            bn.track_dead = True
            bn.reset_dead_stats()
        with torch.no_grad():
            for batch in data:
                if max_batches is not None and batches >= max_batches:
                    break
                if forward is not None:
                    forward(work, batch)
                else:
                    inputs = _batch_input(batch)
                    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
                        # NaN activations compare false with 0: every channel would look alive.
                        raise ValueError(
                            f"diagnose: batch {batches} of the data holds NaN or infinite "
                            "values; the dead-channel counts need finite inputs"
                        )
                    work(inputs.to(device))
                batches += 1
        for layer in report.layers:
            bn = tracked[layer.name]
            layer.samples = int(bn.seen[1])
            if layer.samples:
                layer.dead_fraction = bn.dead_fraction().cpu().numpy()
                layer.dead_sample_fraction = bn.dead_sample_fraction().cpu().numpy()
    finally:
        for name, module in work.named_modules():
            module.training = saved_modes[name]
        for name, (track_dead, *counters) in saved.items():
            bn = tracked[name]
            bn.track_dead = track_dead
            for buffer, value in zip((bn.dead_count, bn.dead_sample_count, bn.seen), counters):
                buffer.copy_(value)
    if batches == 0:
        raise ValueError("diagnose: data yielded no batches")
    return batches


def _batch_input(batch: Any) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            f"diagnose: a batch must be a tensor or a tuple/list starting with one, got "
            f"{type(batch).__name__}; pass forward=lambda model, batch: ... for other layouts"
        )
    return batch
