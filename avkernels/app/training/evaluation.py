"""Evaluation of a model: loss and accuracies on a dataset, pooled features of one encoder, and
linear probes of the frozen encoders; under several processes each rank takes a shard."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from avkernels.app.models import AVClassifier
from avkernels.app.training.config import MODALITIES
from avkernels.app.training.sampling import epoch_seed
from avkernels.distributed import Ranks


def accuracy_key(name: str) -> str:
    """The metrics key of the accuracy of a head: ``acc`` (joint), ``acc_audio``, ``acc_visual``."""
    return "acc" if name == "joint" else f"acc_{name}"


def _sequential(data: Dataset, batch_size: int, ranks: Ranks | None = None) -> DataLoader:
    """``data`` in order, or this rank's contiguous shard of it."""
    if ranks is not None and ranks.world_size > 1:
        data = Subset(data, ranks.shard(len(data)))
    return DataLoader(data, batch_size, shuffle=False, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def evaluate(
    model: AVClassifier,
    data: Dataset,
    stage: str,
    batch_size: int,
    device=None,
    modalities: Sequence[str] = MODALITIES,
    *,
    ranks: Ranks | None = None,
) -> dict:
    """Loss and accuracy on ``data`` in eval mode: per modality (``acc_audio``,
    ``acc_visual``) from the uni-modal heads of ``modalities`` for ``stage="stage1"``, else
    the joint ``acc`` and each modality's half of the fusion layer. Restores the model's
    training mode. With ``ranks`` of several processes (a collective), each rank evaluates its
    shard and every rank returns the totals of all."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    names = tuple(modalities) if stage == "stage1" else ("joint",) + MODALITIES
    loss, samples, correct = 0.0, 0, dict.fromkeys(names, 0)
    for batch in _sequential(data, batch_size, ranks):
        labels = batch["label"].to(device)
        if stage == "stage1":
            outputs = {m: getattr(model, f"forward_{m}")(batch[m].to(device)) for m in modalities}
            batch_loss = sum(F.cross_entropy(o, labels, reduction="sum") for o in outputs.values())
        else:
            output = model(batch["audio"].to(device), batch["visual"].to(device))
            outputs = dict(zip(names, output))
            batch_loss = F.cross_entropy(output.logits, labels, reduction="sum")
        loss += float(batch_loss)
        samples += labels.shape[0]
        for name, logits in outputs.items():
            correct[name] += int((logits.argmax(1) == labels).sum())
    model.train(was_training)
    if ranks is not None:
        totals = ranks.gather((loss, samples, correct))
        loss, samples = sum(t[0] for t in totals), sum(t[1] for t in totals)
        correct = {name: sum(t[2][name] for t in totals) for name in names}
    return {"loss": loss / samples, **{accuracy_key(n): c / samples for n, c in correct.items()}}


@torch.no_grad()
def _features(
    model: AVClassifier,
    modality: str,
    data: Dataset,
    batch_size: int,
    device,
    ranks: Ranks | None = None,
) -> tuple[Tensor, Tensor]:
    """Pooled features and labels of ``data`` in order; with ``ranks``, each rank encodes its
    shard and every rank gets the whole set."""
    encode = model.encode_audio if modality == "audio" else model.encode_visual
    width = getattr(model, f"{modality}_net").out_features
    features = [torch.empty(0, width, device=device)]  # a shard may be empty
    labels = [torch.empty(0, dtype=torch.long, device=device)]
    for batch in _sequential(data, batch_size, ranks):
        features.append(encode(batch[modality].to(device)))
        labels.append(batch["label"].to(device))
    features, labels = torch.cat(features), torch.cat(labels)
    if ranks is not None and ranks.world_size > 1:
        shards = ranks.gather((features.cpu(), labels.cpu()))
        features = torch.cat([shard[0] for shard in shards]).to(device)
        labels = torch.cat([shard[1] for shard in shards]).to(device)
    return features, labels


def linear_probe(
    model: AVClassifier,
    modality: str,
    train_data: Dataset,
    eval_data: Dataset | None = None,
    *,
    epochs: int = 20,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    device=None,
    ranks: Ranks | None = None,
) -> dict:
    """Linear-probe accuracy of one frozen encoder: pooled eval-mode features of
    ``train_data``, a Linear layer trained with Adam for ``epochs``; accuracy on the train
    features and on ``eval_data`` (when given). The global RNG state is left untouched. With
    ``ranks`` of several processes (a collective), the features are computed on shards and
    every rank trains the same probe on all of them."""
    if modality not in MODALITIES:
        raise ValueError(f"linear_probe: modality must be one of {MODALITIES}, got {modality!r}")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    train_x, train_y = _features(model, modality, train_data, batch_size, device, ranks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Linear(train_x.shape[1], model.num_classes).to(device)
        optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
        for epoch in range(epochs):
            generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            order = torch.randperm(train_x.shape[0], generator=generator).to(device)
            for rows in order.split(batch_size):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(probe(train_x[rows]), train_y[rows]).backward()
                optimizer.step()
    result = {"probe_train_acc": _accuracy(probe, train_x, train_y)}
    if eval_data is not None:
        eval_x, eval_y = _features(model, modality, eval_data, batch_size, device, ranks)
        result["probe_eval_acc"] = _accuracy(probe, eval_x, eval_y)
    model.train(was_training)
    return result


@torch.no_grad()
def _accuracy(probe: nn.Module, features: Tensor, labels: Tensor) -> float:
    return float((probe(features).argmax(1) == labels).double().mean())
