"""FusT stage 1: per-sample confidence, the softmax probability of the ground-truth class.

Fine-tune each encoder alone; every training step call :meth:`ConfidenceTracker.update` with
the batch's sample ids, logits and labels, and :meth:`ConfidenceTracker.end_epoch` after each
epoch. :meth:`ConfidenceTracker.mean` is the sample-wise mean over epochs (docs/DESIGN.md,
"Fusion Tuning (FusT)"), joined by id with the other modality's in
:func:`avkernels.fust.mask_ratios`.
A training checkpoint stores :meth:`ConfidenceTracker.state_dict` (the unfinished epoch
included) and restores it with :meth:`ConfidenceTracker.load_state_dict`.

Files (:meth:`ConfidenceTracker.save`, written atomically: a crash mid-write leaves the old file
or none, never a truncated one), chosen by suffix:

* ``.pt``: ``torch.save`` of a dict ``{"format": "avkernels.fust.confidence", "version": 1,
  "num_samples": int, "ids": list, "per_epoch": float64 (epochs, n), "mean": float64 (n,)}``
  (loads with ``torch.load(weights_only=True)``);
* ``.npz``: the same keys as numpy arrays (ids as int64 or unicode strings; no pickle).

``per_epoch`` is NaN where a sample was not seen in an epoch (e.g. ``drop_last=True``);
``mean`` averages the epochs that saw the sample.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from avkernels.files import atomic_write

SampleId = Union[int, str]
# A batch's sample ids: a sequence of ids, or a 1-D integer tensor.
SampleIds = Union[Sequence[SampleId], Tensor]
FILE_FORMAT = "avkernels.fust.confidence"
FILE_VERSION = 1
SUFFIXES = (".pt", ".npz")
_SHOWN_IDS = 5  # ids quoted in an error message


@dataclass(frozen=True)
class Confidences:
    """Confidence per sample id: ``values[i]`` (float64) belongs to ``ids[i]``."""

    ids: tuple
    values: Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def as_dict(self) -> dict:
        """``{sample id: confidence}``."""
        return dict(zip(self.ids, self.values.tolist()))

    def aligned(self, ids: Sequence[SampleId], what: str = "confidences") -> Tensor:
        """Values in the order of ``ids``; a missing or extra id is an error."""
        index = {sample_id: i for i, sample_id in enumerate(self.ids)}
        check_same_ids(ids, self.ids, "the reference ids", what)
        return self.values[torch.tensor([index[i] for i in ids], dtype=torch.long)]


def check_same_ids(
    expected: Iterable[SampleId], actual: Iterable[SampleId], expected_name: str, actual_name: str
) -> None:
    """Raise ``ValueError`` naming the ids one side has and the other lacks."""
    expected, actual = list(expected), list(actual)
    expected_set, actual_set = set(expected), set(actual)
    if expected_set == actual_set:
        return
    missing = [i for i in expected if i not in actual_set]
    extra = [i for i in actual if i not in expected_set]
    parts = []
    if missing:
        parts.append(
            f"{actual_name} lack {len(missing)} sample id(s) of {expected_name} "
            f"(e.g. {missing[:_SHOWN_IDS]})"
        )
    if extra:
        parts.append(
            f"{actual_name} have {len(extra)} sample id(s) that {expected_name} lack "
            f"(e.g. {extra[:_SHOWN_IDS]})"
        )
    raise ValueError(
        "; ".join(parts) + ". Both must cover the same training samples, with "
        "the same ids (check the id type too: 7 and '7' differ)"
    )


class ConfidenceTracker:
    """Records, every epoch, each training sample's softmax probability of its true class.

    Args:
        num_samples: size of the training set; :meth:`mean` requires every one of them to have
            been seen, so a sampler that skips samples (``drop_last``) is caught, not ignored.

    Sample ids are what the dataset uses, ints or strings (one kind per tracker). A sample seen
    several times in one epoch gets the mean of those probabilities for that epoch.
    """

    def __init__(self, num_samples: int) -> None:
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(
                f"ConfidenceTracker: num_samples must be a positive int, got {num_samples!r}"
            )
        self.num_samples = num_samples
        self._ids: list[SampleId] = []
        self._index: dict[SampleId, int] = {}
        self._epochs: list[Tensor] = []  # completed epochs, (num_samples,) float64, NaN: unseen
        self._sum = torch.zeros(num_samples, dtype=torch.float64)
        self._count = torch.zeros(num_samples, dtype=torch.long)

    @property
    def ids(self) -> tuple:
        """Sample ids in the order they were first seen."""
        return tuple(self._ids)

    @property
    def num_epochs(self) -> int:
        """Completed epochs."""
        return len(self._epochs)

    def update(self, sample_ids: SampleIds, logits: Tensor, labels: Tensor) -> None:
        """Record ``softmax(logits)[label]`` of each sample of a batch (no gradient is kept)."""
        ids = _normalise_ids(sample_ids)
        if logits.dim() != 2:
            raise ValueError(
                f"ConfidenceTracker.update: logits must be (B, num_classes), got "
                f"shape {tuple(logits.shape)}"
            )
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(
                f"ConfidenceTracker.update: labels must be (B,) class indices, got "
                f"a {labels.dtype} tensor of shape {tuple(labels.shape)}"
            )
        if not len(ids) == logits.shape[0] == labels.shape[0]:
            raise ValueError(
                f"ConfidenceTracker.update: {len(ids)} sample ids, {logits.shape[0]} "
                f"rows of logits and {labels.shape[0]} labels: one each per sample"
            )
        labels = labels.detach().long().to(logits.device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[1]):
            raise ValueError(
                f"ConfidenceTracker.update: labels must lie in [0, "
                f"{logits.shape[1]}) (the columns of logits)"
            )
        precision = torch.promote_types(logits.dtype, torch.float32)  # float64 stays float64
        probabilities = torch.softmax(logits.detach().to(precision), dim=1)
        confidence = probabilities.gather(1, labels[:, None])[:, 0].to("cpu", torch.float64)
        rows = torch.tensor([self._row(i) for i in ids], dtype=torch.long)
        self._sum.index_add_(0, rows, confidence)
        self._count.index_add_(0, rows, torch.ones_like(rows))

    def end_epoch(self) -> None:
        """Close the epoch: its per-sample confidences become part of :meth:`mean`."""
        if not self._count.any():
            raise RuntimeError(
                "ConfidenceTracker.end_epoch: no update() since the last "
                "end_epoch(); record the epoch's batches first"
            )
        epoch = self._sum / self._count
        epoch[self._count == 0] = float("nan")
        self._epochs.append(epoch)
        self._sum.zero_()
        self._count.zero_()

    def per_epoch(self) -> Tensor:
        """(epochs, samples seen) float64, columns in :attr:`ids` order; NaN where unseen."""
        if not self._epochs:
            return torch.empty((0, len(self._ids)), dtype=torch.float64)
        return torch.stack(self._epochs)[:, : len(self._ids)]

    def mean(self) -> Confidences:
        """The per-sample mean over completed epochs (epochs that saw the sample)."""
        if not self._epochs:
            raise RuntimeError(
                "ConfidenceTracker.mean: no completed epoch; call end_epoch() "
                "after each training epoch"
            )
        if len(self._ids) != self.num_samples:
            raise RuntimeError(
                f"ConfidenceTracker.mean: only {len(self._ids)} of num_samples="
                f"{self.num_samples} sample ids were ever seen; a sampler that drops samples "
                "(drop_last=True) or a wrong num_samples would leave the others without a "
                "confidence"
            )
        values = _nanmean(self.per_epoch())
        unseen = [i for i, value in zip(self._ids, values.tolist()) if value != value]
        if unseen:
            raise RuntimeError(
                f"ConfidenceTracker.mean: {len(unseen)} sample(s) were seen only in the current, "
                f"unfinished epoch (e.g. {unseen[:_SHOWN_IDS]}); call end_epoch() first"
            )
        return Confidences(tuple(self._ids), values)

    # --- files ----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the completed epochs to ``path`` (``.pt`` or ``.npz``) atomically."""
        path = Path(path)
        suffix = _checked_suffix(path)
        if self._count.any():
            raise RuntimeError(
                "ConfidenceTracker.save: the current epoch has updates that "
                "end_epoch() has not closed; call end_epoch() before save()"
            )
        per_epoch = self.per_epoch()
        payload = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "num_samples": self.num_samples,
            "ids": list(self._ids),
            "per_epoch": per_epoch,
            "mean": _nanmean(per_epoch),
        }
        atomic_write(path, lambda file: _write(file, suffix, payload))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConfidenceTracker:
        """A tracker holding the epochs saved at ``path``."""
        path = Path(path)
        suffix = _checked_suffix(path)
        if not path.is_file():
            raise FileNotFoundError(f"ConfidenceTracker.load: no confidence file at {path}")
        payload = _read(path, suffix)
        tracker = cls(int(payload["num_samples"]))
        ids, per_epoch = payload["ids"], payload["per_epoch"]
        if per_epoch.dim() != 2 or per_epoch.shape[1] != len(ids) or len(ids) > tracker.num_samples:
            raise ValueError(
                f"ConfidenceTracker.load: {path} is inconsistent ({len(ids)} ids, "
                f"per_epoch of shape {tuple(per_epoch.shape)}, num_samples "
                f"{tracker.num_samples})"
            )
        for sample_id in ids:
            tracker._row(sample_id)
        for epoch in per_epoch:
            full = torch.full((tracker.num_samples,), float("nan"), dtype=torch.float64)
            full[: len(ids)] = epoch
            tracker._epochs.append(full)
        return tracker

    # --- resuming ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The full state, the unfinished epoch included, for a training checkpoint (plain
        Python and tensors: ``torch.load(weights_only=True)`` reads it). :meth:`save` writes
        only completed epochs; this is what resuming mid-epoch needs.

        Keys: ``num_samples``, ``ids`` (first-seen order), ``epochs`` (completed epochs, each
        (num_samples,) float64, NaN where unseen), ``sum``/``count`` (the unfinished epoch's
        per-sample totals).
        """
        return {
            "num_samples": self.num_samples,
            "ids": list(self._ids),
            "epochs": [epoch.clone() for epoch in self._epochs],
            "sum": self._sum.clone(),
            "count": self._count.clone(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Replace this tracker's state by ``state`` (from :meth:`state_dict`)."""
        missing = {"num_samples", "ids", "epochs", "sum", "count"} - set(state)
        if missing:
            raise ValueError(
                f"ConfidenceTracker.load_state_dict: the state lacks "
                f"{sorted(missing)}; pass a ConfidenceTracker.state_dict()"
            )
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"ConfidenceTracker.load_state_dict: the state is of a tracker with "
                f"num_samples={state['num_samples']}, this one has "
                f"{self.num_samples}"
            )
        shape = (self.num_samples,)
        tensors = [*state["epochs"], state["sum"], state["count"]]
        if any(tuple(tensor.shape) != shape for tensor in tensors):
            raise ValueError(
                f"ConfidenceTracker.load_state_dict: every tensor of the state must "
                f"have shape {shape}"
            )
        self._ids, self._index = [], {}
        for sample_id in state["ids"]:
            self._row(sample_id)
        self._epochs = [epoch.to("cpu", torch.float64, copy=True) for epoch in state["epochs"]]
        self._sum.copy_(state["sum"])
        self._count.copy_(state["count"])

    # --- internals ------------------------------------------------------------------------------

    def _row(self, sample_id: SampleId) -> int:
        row = self._index.get(sample_id)
        if row is not None:
            return row
        if self._ids and type(sample_id) is not type(self._ids[0]):
            raise TypeError(
                f"ConfidenceTracker: sample id {sample_id!r} is a "
                f"{type(sample_id).__name__} but earlier ids are "
                f"{type(self._ids[0]).__name__}s; use one id type"
            )
        if len(self._ids) == self.num_samples:
            raise ValueError(
                f"ConfidenceTracker: sample id {sample_id!r} would be the "
                f"{self.num_samples + 1}-th distinct id, but num_samples="
                f"{self.num_samples}"
            )
        self._index[sample_id] = len(self._ids)
        self._ids.append(sample_id)
        return self._index[sample_id]


def as_confidences(source) -> Confidences:
    """:class:`Confidences` from a tracker, a confidence file, or a mapping id -> value."""
    if isinstance(source, Confidences):
        return source
    if isinstance(source, ConfidenceTracker):
        return source.mean()
    if isinstance(source, (str, os.PathLike)):
        return ConfidenceTracker.load(source).mean()
    if isinstance(source, Mapping):
        ids = _normalise_ids(list(source.keys()))
        return Confidences(
            tuple(ids), torch.tensor([float(source[i]) for i in source.keys()], dtype=torch.float64)
        )
    raise TypeError(
        f"expected confidences keyed by sample id (a ConfidenceTracker, Confidences, "
        f"a confidence file path or a dict id -> value), got {type(source).__name__}"
    )


def _normalise_ids(sample_ids) -> list[SampleId]:
    if isinstance(sample_ids, Tensor):
        if sample_ids.is_floating_point() or sample_ids.dim() != 1:
            raise TypeError(
                f"sample ids given as a tensor must be 1-D integers, got a "
                f"{sample_ids.dtype} tensor of shape {tuple(sample_ids.shape)}"
            )
        return sample_ids.tolist()
    if isinstance(sample_ids, (str, bytes)) or not isinstance(sample_ids, Iterable):
        raise TypeError(
            f"sample ids must be a sequence of ints or strings, got {type(sample_ids).__name__}"
        )
    ids = []
    for sample_id in sample_ids:
        if isinstance(sample_id, (np.integer, Tensor)):
            sample_id = int(sample_id)
        elif isinstance(sample_id, np.str_):
            sample_id = str(sample_id)
        if isinstance(sample_id, bool) or not isinstance(sample_id, (int, str)):
            raise TypeError(
                f"sample ids must be ints or strings, got {sample_id!r} "
                f"({type(sample_id).__name__})"
            )
        ids.append(sample_id)
    return ids


def _nanmean(per_epoch: Tensor) -> Tensor:
    seen = ~per_epoch.isnan()
    total = torch.where(seen, per_epoch, 0.0).sum(dim=0)
    return total / seen.sum(dim=0)  # NaN where no epoch saw the sample


def _checked_suffix(path: Path) -> str:
    if path.suffix not in SUFFIXES:
        raise ValueError(f"confidence files are .pt or .npz (chosen by suffix), got {path}")
    return path.suffix


def _write(file, suffix: str, payload: dict) -> None:
    if suffix == ".pt":
        torch.save(payload, file)
        return
    ids = payload["ids"]
    id_array = np.array(ids, dtype=np.int64 if ids and isinstance(ids[0], int) else np.str_)
    np.savez(
        file,
        format=np.array(payload["format"]),
        version=np.array(payload["version"]),
        num_samples=np.array(payload["num_samples"]),
        ids=id_array,
        per_epoch=payload["per_epoch"].numpy(),
        mean=payload["mean"].numpy(),
    )


def _read(path: Path, suffix: str) -> dict:
    try:
        if suffix == ".pt":
            payload = torch.load(path, map_location="cpu", weights_only=True)
        else:
            payload = _read_npz(path)
    except Exception as error:  # a truncated or foreign file
        raise ValueError(
            f"ConfidenceTracker.load: {path} is not a readable confidence file ({error})"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise ValueError(
            f"ConfidenceTracker.load: {path} is not an avkernels confidence file "
            f"(no format={FILE_FORMAT!r} entry)"
        )
    if payload.get("version") != FILE_VERSION:
        raise ValueError(
            f"ConfidenceTracker.load: {path} has version {payload.get('version')}, "
            f"this avkernels reads version {FILE_VERSION}"
        )
    missing = {"num_samples", "ids", "per_epoch"} - set(payload)
    if missing:
        raise ValueError(f"ConfidenceTracker.load: {path} lacks {sorted(missing)}")
    return payload


_NPZ_CONVERTERS = {
    "format": str,
    "version": int,
    "num_samples": int,
    "ids": lambda array: _normalise_ids(array.tolist()),
    "per_epoch": lambda array: torch.from_numpy(array).double(),
    "mean": lambda array: torch.from_numpy(array).double(),
}


def _read_npz(path: Path) -> dict:
    """The .npz arrays as the .pt payload's Python and torch types."""
    with np.load(path, allow_pickle=False) as arrays:
        return {
            key: _NPZ_CONVERTERS.get(key, lambda array: array)(arrays[key]) for key in arrays.files
        }
