"""FusT mask policy: per-sample mask ratios of the audio and visual inputs from stage-1 confidences.

Rules (docs/DESIGN.md, "Fusion Tuning (FusT)"; ``tau`` = threshold, ``eta``/``rho`` per
modality, unpublished in the paper, so required here):

``"symmetric"`` (default, the paper's intent: mask the easier, more confident modality)
    gap = c_a - c_v;  gap > 0 and c_a >= tau: r_a = rho_a * tanh(eta_a * gap);
    gap < 0 and c_v >= tau: r_v = rho_v * tanh(eta_v * -gap); otherwise no masking.
``"official"`` (the released code, bit for bit, evaluated per sample in numpy float64 as it is)
    c_v >= tau: r_a = tanh(eta_a * (c_a - c_v)) * rho_a;  elif c_a >= tau:
    r_v = tanh(eta_v * (c_v - c_a)) * rho_v;  else 0. A ratio <= 0 masks nothing, so this rule
    never masks the visual input (in the elif branch c_v < tau <= c_a makes r_v negative).

Modes: ``"conf"`` gives each sample its own ratio; ``"mean"`` gives every sample the dataset
mean ratio: negatives clipped to 0 before averaging, except under ``rule="official"``, which
averages the raw values as the released code does (negative ratios can switch masking off).
Final ratios are clipped to [0, 1).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch import Tensor

from avkernels.fust.confidence import (
    Confidences,
    ConfidenceTracker,
    SampleIds,
    _normalise_ids,
    as_confidences,
)

logger = logging.getLogger(__name__)

RULES = ("symmetric", "official")
MODES = ("conf", "mean")
MAX_RATIO = float(np.nextafter(1.0, 0.0))  # ratios lie in [0, 1)

Pair = Union[float, Sequence[float]]
# What mask_ratios accepts for one modality's confidences (see its docstring).
ConfidenceSource = Union[
    ConfidenceTracker,
    Confidences,
    str,
    os.PathLike,
    dict,
    Sequence[float],
    torch.Tensor,
    np.ndarray,
]


@dataclass(frozen=True)
class MaskRatios:
    """Per-sample mask ratios (float64), ``audio[i]``/``visual[i]`` for sample ``ids[i]``.

    Unpacks as ``r_a, r_v = ratios``. ``ids`` is None when the confidences were given by
    position (then :meth:`gather` takes positions). ``str(ratios)`` is the summary.
    """

    ids: tuple | None
    audio: Tensor
    visual: Tensor
    rule: str
    mode: str
    threshold: float
    eta: tuple[float, float]
    rho: tuple[float, float]

    def __iter__(self):
        return iter((self.audio, self.visual))

    def __len__(self) -> int:
        return self.audio.numel()

    def gather(self, sample_ids: SampleIds) -> tuple[Tensor, Tensor]:
        """``(r_a, r_v)`` of a batch, by sample id (or by position when ``ids`` is None)."""
        if self.ids is None:
            rows = torch.as_tensor(sample_ids, dtype=torch.long)
        else:
            index = self._index()
            ids = _normalise_ids(sample_ids)
            unknown = [i for i in ids if i not in index]
            if unknown:
                raise KeyError(
                    f"MaskRatios.gather: {len(unknown)} sample id(s) have no mask "
                    f"ratio (e.g. {unknown[:5]}); they were not in the stage-1 "
                    "confidences"
                )
            rows = torch.tensor([index[i] for i in ids], dtype=torch.long)
        return self.audio[rows], self.visual[rows]

    def summary(self) -> dict:
        """Samples masked (ratio > 0) and mean ratios, per modality."""
        result = {"samples": len(self)}
        for name, ratio in (("audio", self.audio), ("visual", self.visual)):
            masked = ratio > 0
            result[f"{name}_masked"] = int(masked.sum())
            result[f"{name}_mean_ratio"] = float(ratio.mean()) if len(self) else 0.0
            result[f"{name}_mean_ratio_masked"] = (
                float(ratio[masked].mean()) if masked.any() else 0.0
            )
            result[f"{name}_max_ratio"] = float(ratio.max()) if len(self) else 0.0
        return result

    def __str__(self) -> str:
        s = self.summary()
        parts = [
            f"{name} masked in {s[f'{name}_masked']}/{s['samples']} samples (mean ratio "
            f"{s[f'{name}_mean_ratio']:.4f}; {s[f'{name}_mean_ratio_masked']:.4f} where masked, "
            f"max {s[f'{name}_max_ratio']:.4f})"
            for name in ("audio", "visual")
        ]
        return (
            f"FusT mask ratios (rule={self.rule}, mode={self.mode}, threshold="
            f"{self.threshold}, eta={self.eta}, rho={self.rho}): " + "; ".join(parts)
        )

    def _index(self) -> dict:
        index = self.__dict__.get("_index_cache")
        if index is None:
            index = {sample_id: i for i, sample_id in enumerate(self.ids)}
            object.__setattr__(self, "_index_cache", index)
        return index


def mask_ratios(
    conf_a: ConfidenceSource,
    conf_v: ConfidenceSource,
    threshold: float,
    eta: Pair,
    rho: Pair,
    rule: str = "symmetric",
    mode: str = "conf",
    verbose: bool = True,
) -> MaskRatios:
    """Per-sample FusT mask ratios ``(r_a, r_v)`` from the stage-1 confidences.

    Args:
        conf_a, conf_v: audio and visual confidences, joined by sample id: each a
            :class:`~avkernels.fust.ConfidenceTracker`, :class:`~avkernels.fust.Confidences`,
            a confidence file (``.pt``/``.npz``) or a dict id -> confidence. A missing or extra
            id on either side is an error. Or both by position: 1-D tensors/arrays/lists of
            the same length.
        threshold: tau; a sample is masked only if its more confident modality reaches it.
        eta, rho: steepness and scale per modality, ``(audio, visual)`` or one value for both.
        rule: ``"symmetric"`` (the paper's intent) or ``"official"`` (the released code).
        mode: ``"conf"`` (per-sample ratios) or ``"mean"`` (the dataset mean for everyone).
        verbose: log the summary (how many samples get masked per modality, mean ratios) at
            INFO level on the ``avkernels.fust.policy`` logger; nothing goes to stdout.

    Returns:
        :class:`MaskRatios` (unpacks as ``r_a, r_v``; float64, clipped to [0, 1), in the order
        of ``conf_a``'s ids), with :meth:`~MaskRatios.summary` and
        :meth:`~MaskRatios.gather` for a batch's ids.
    """
    if rule not in RULES:
        raise ValueError(f"mask_ratios: rule must be one of {RULES}, got {rule!r}")
    if mode not in MODES:
        raise ValueError(f"mask_ratios: mode must be one of {MODES}, got {mode!r}")
    eta, rho = _pair(eta, "eta"), _pair(rho, "rho")
    threshold = float(threshold)
    if math.isnan(threshold):  # compares false with every confidence: nothing masked, silently
        raise ValueError("mask_ratios: threshold (tau) is NaN; give a confidence (> 1: no masking)")
    ids, audio, visual = _joined(conf_a, conf_v)
    ratio = _official_ratio if rule == "official" else _symmetric_ratio
    pairs = [ratio(a, v, threshold, eta, rho) for a, v in zip(audio.tolist(), visual.tolist())]
    ratios = []
    for modality in (0, 1):
        raw = np.array([pair[modality] for pair in pairs], dtype=np.float64)
        if mode == "mean" and len(raw):
            # The released code averages the raw ratios (np.mean of the 1-D list), negatives
            # included; the symmetric rule clips them first.
            raw = np.full_like(raw, np.mean(raw if rule == "official" else np.maximum(raw, 0.0)))
        ratios.append(torch.from_numpy(np.clip(raw, 0.0, MAX_RATIO)))
    result = MaskRatios(ids, ratios[0], ratios[1], rule, mode, threshold, eta, rho)
    if verbose:
        logger.info("%s", result)
    return result


def _official_ratio(c_a: float, c_v: float, threshold: float, eta, rho) -> tuple[float, float]:
    # Scalar numpy float64, in the released code's order of operations.
    if c_v >= threshold:
        return np.tanh(eta[0] * (c_a - c_v)) * rho[0], 0.0
    if c_a >= threshold:
        return 0.0, np.tanh(eta[1] * (c_v - c_a)) * rho[1]
    return 0.0, 0.0


def _symmetric_ratio(c_a: float, c_v: float, threshold: float, eta, rho) -> tuple[float, float]:
    gap = c_a - c_v
    if gap > 0 and c_a >= threshold:
        return rho[0] * np.tanh(eta[0] * gap), 0.0
    if gap < 0 and c_v >= threshold:
        return 0.0, rho[1] * np.tanh(eta[1] * -gap)
    return 0.0, 0.0


def _pair(value: Pair, name: str) -> tuple[float, float]:
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or not all(np.isfinite(float(p)) for p in pair):
        raise ValueError(
            f"mask_ratios: {name} must be a finite number or an (audio, visual) "
            f"pair of them, got {value!r}"
        )
    return float(pair[0]), float(pair[1])


def _is_keyed(source) -> bool:
    return isinstance(source, (ConfidenceTracker, Confidences, dict, str, os.PathLike))


def _joined(conf_a, conf_v) -> tuple[tuple | None, Tensor, Tensor]:
    """(ids or None, audio, visual): float64 confidences of the same samples, aligned."""
    keyed = _is_keyed(conf_a), _is_keyed(conf_v)
    if keyed[0] != keyed[1]:
        raise TypeError(
            "mask_ratios: give both confidences keyed by sample id (trackers, "
            "Confidences, files or dicts) or both by position (1-D tensors or "
            "arrays), not one of each"
        )
    if keyed[0]:
        audio, visual = as_confidences(conf_a), as_confidences(conf_v)
        ids = audio.ids
        values = (audio.values, visual.aligned(ids, "the visual confidences"))
    else:
        ids = None
        values = tuple(torch.as_tensor(np.asarray(c, dtype=np.float64)) for c in (conf_a, conf_v))
        if values[0].dim() != 1 or values[0].shape != values[1].shape:
            raise ValueError(
                f"mask_ratios: positional confidences must be 1-D of the same "
                f"length, got shapes {tuple(values[0].shape)} and "
                f"{tuple(values[1].shape)}"
            )
    for name, value in zip(("audio", "visual"), values):
        if not torch.isfinite(value).all() or (value < 0).any() or (value > 1).any():
            raise ValueError(f"mask_ratios: {name} confidences must be probabilities in [0, 1]")
    return ids, values[0], values[1]
