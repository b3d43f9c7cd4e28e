"""``avkernels.fust.ConfidenceTracker``: per-epoch softmax probability of the true class, the
mean over epochs, the open file formats and their atomic writes, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from avkernels.fust import ConfidenceTracker
from avkernels.fust import confidence as confidence_module


def logits_for(probabilities: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is ``probabilities`` (rows sum to 1)."""
    return torch.tensor(probabilities, dtype=torch.float64).log()


def test_records_true_class_probability_and_mean_over_epochs():
    tracker = ConfidenceTracker(3)
    epochs = [
        [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5]],
        [[0.9, 0.05, 0.05], [0.3, 0.4, 0.3], [0.5, 0.25, 0.25]],
    ]
    labels = torch.tensor([0, 1, 2])
    for probabilities in epochs:
        logits = logits_for(probabilities)
        tracker.update(["x", "y"], logits[:2], labels[:2])  # two batches per epoch
        tracker.update(["z"], logits[2:], labels[2:])
        tracker.end_epoch()
    expected = torch.tensor([[0.7, 0.6, 0.5], [0.9, 0.4, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(tracker.per_epoch(), expected, rtol=0, atol=1e-12)
    mean = tracker.mean()
    assert mean.ids == ("x", "y", "z") and tracker.num_epochs == 2
    torch.testing.assert_close(mean.values, expected.mean(0), rtol=0, atol=1e-12)
    assert mean.as_dict()["y"] == pytest.approx(0.5)


def test_ids_as_tensor_numpy_and_float32_logits_without_grad():
    tracker = ConfidenceTracker(4)
    logits = torch.randn(4, 5, requires_grad=True)
    labels = torch.tensor([4, 0, 2, 2])
    tracker.update(torch.tensor([3, 1, 0, 2]), logits[:, :], labels)
    tracker.end_epoch()
    tracker.update(np.array([2, 0, 1, 3]), logits.flip(0), labels.flip(0))  # same pairs
    tracker.end_epoch()
    assert tracker.ids == (3, 1, 0, 2)
    expected = torch.softmax(logits.detach().double(), 1)[torch.arange(4), labels]
    torch.testing.assert_close(tracker.mean().values, expected, rtol=1e-6, atol=1e-7)


def test_repeated_and_missing_samples():
    tracker = ConfidenceTracker(2)
    # epoch 1: sample 0 seen twice (a sampler with replacement), sample 1 once
    tracker.update(
        [0, 0, 1], logits_for([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]), torch.tensor([0, 0, 1])
    )
    tracker.end_epoch()
    # epoch 2: sample 1 dropped (drop_last)
    tracker.update([0], logits_for([[0.9, 0.1]]), torch.tensor([0]))
    tracker.end_epoch()
    per_epoch = tracker.per_epoch()
    assert per_epoch[0].tolist() == pytest.approx([0.4, 0.5])
    assert per_epoch[1, 0].item() == pytest.approx(0.9) and per_epoch[1, 1].isnan()
    assert tracker.mean().values.tolist() == pytest.approx([0.65, 0.5])


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
@pytest.mark.parametrize("ids", [[5, 9, 2], ["b", "a", "clip/3"]])
def test_save_load_round_trip(tmp_path, suffix, ids):
    tracker = ConfidenceTracker(3)
    tracker.update(ids, torch.randn(3, 4), torch.tensor([0, 1, 2]))
    tracker.end_epoch()
    tracker.update(ids[:2], torch.randn(2, 4), torch.tensor([3, 3]))
    tracker.end_epoch()
    path = tracker.save(tmp_path / f"conf{suffix}")
    loaded = ConfidenceTracker.load(path)
    assert loaded.ids == tuple(ids) and loaded.num_samples == 3 and loaded.num_epochs == 2
    assert torch.equal(loaded.per_epoch().isnan(), tracker.per_epoch().isnan())
    assert torch.equal(loaded.per_epoch().nan_to_num(), tracker.per_epoch().nan_to_num())
    assert torch.equal(loaded.mean().values, tracker.mean().values)
    # the open format, read without avkernels
    if suffix == ".pt":
        raw = torch.load(path, weights_only=True)
        saved_ids, mean = raw["ids"], raw["mean"]
    else:
        with np.load(path, allow_pickle=False) as raw:
            saved_ids, mean = raw["ids"].tolist(), torch.from_numpy(raw["mean"])
    assert saved_ids == ids and torch.equal(mean, tracker.mean().values)
    # loading then continuing to record
    loaded.update(ids, torch.randn(3, 4), torch.tensor([0, 0, 0]))
    loaded.end_epoch()
    assert loaded.num_epochs == 3


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_crash_mid_write_keeps_the_old_file(tmp_path, monkeypatch, suffix):
    tracker = ConfidenceTracker(2)
    tracker.update([0, 1], torch.randn(2, 3), torch.tensor([0, 1]))
    tracker.end_epoch()
    path = tracker.save(tmp_path / f"conf{suffix}")
    before = path.read_bytes()
    tracker.update([0, 1], torch.randn(2, 3), torch.tensor([2, 2]))
    tracker.end_epoch()

    def crash(*args, **kwargs):  # torch.save(obj, file) / np.savez(file, **arrays)
        next(a for a in args if hasattr(a, "write")).write(b"half a file")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(
        confidence_module.torch if suffix == ".pt" else confidence_module.np,
        "save" if suffix == ".pt" else "savez",
        crash,
    )
    with pytest.raises(KeyboardInterrupt):
        tracker.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name], "no partial file left"
    monkeypatch.undo()
    assert ConfidenceTracker.load(path).num_epochs == 1


def record_epoch(tracker, epoch: int, batches: list[list[int]]) -> None:
    """Update ``tracker`` with one batch per entry of ``batches`` (logits a function of the
    epoch and the ids, so two trackers fed the same calls see the same values)."""
    for ids in batches:
        generator = torch.Generator().manual_seed(1000 * epoch + sum(ids))
        logits = torch.randn(len(ids), 4, generator=generator, dtype=torch.float64)
        tracker.update(ids, logits, torch.tensor(ids) % 4)


def test_state_dict_round_trip_mid_epoch_then_continue_equals_never_stopping(tmp_path):
    batches = [[3, 0], [4, 1], [2]]  # epoch 1 sees 5 samples in 3 batches
    uninterrupted = ConfidenceTracker(5)
    interrupted = ConfidenceTracker(5)
    for tracker in (uninterrupted, interrupted):
        record_epoch(tracker, 0, batches)
        tracker.end_epoch()
        record_epoch(tracker, 1, batches[:2])  # stopped after two batches of epoch 2
    path = tmp_path / "tracker.pt"
    torch.save(interrupted.state_dict(), path)
    del interrupted
    resumed = ConfidenceTracker(5)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert resumed.ids == uninterrupted.ids and resumed.num_epochs == 1
    for tracker in (uninterrupted, resumed):
        record_epoch(tracker, 1, batches[2:])
        tracker.end_epoch()
        record_epoch(tracker, 2, batches[::-1])
        tracker.end_epoch()
    assert torch.equal(resumed.per_epoch(), uninterrupted.per_epoch())
    assert resumed.mean().ids == uninterrupted.mean().ids
    assert torch.equal(resumed.mean().values, uninterrupted.mean().values)
    # the unfinished epoch was restored: without it, samples 3, 0, 4, 1 would be NaN in epoch 2
    assert not resumed.per_epoch()[1].isnan().any()


def test_state_dict_is_a_copy_and_load_state_dict_checks_the_state():
    tracker = ConfidenceTracker(2)
    record_epoch(tracker, 0, [[0, 1]])
    state = tracker.state_dict()
    tracker.end_epoch()
    assert state["epochs"] == [] and state["count"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="num_samples=2, this one has 3"):
        ConfidenceTracker(3).load_state_dict(state)
    with pytest.raises(ValueError, match=r"lacks \['sum'\]"):
        ConfidenceTracker(2).load_state_dict({k: v for k, v in state.items() if k != "sum"})


def test_errors(tmp_path):
    tracker = ConfidenceTracker(3)
    with pytest.raises(RuntimeError, match="no update"):
        tracker.end_epoch()
    with pytest.raises(RuntimeError, match="no completed epoch"):
        tracker.mean()
    tracker.update([1, 2], torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="end_epoch"):
        tracker.save(tmp_path / "c.pt")
    tracker.end_epoch()
    with pytest.raises(RuntimeError, match="only 2 of num_samples=3"):
        tracker.mean()
    with pytest.raises(TypeError, match="one id type"):
        tracker.update(["3"], torch.randn(1, 3), torch.tensor([0]))
    tracker.update([3], torch.randn(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="4-th distinct id"):
        tracker.update([4], torch.randn(1, 3), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="unfinished epoch"):
        tracker.mean()
    with pytest.raises(ValueError, match="labels must lie"):
        tracker.update([1], torch.randn(1, 3), torch.tensor([3]))
    with pytest.raises(ValueError, match="one each per sample"):
        tracker.update([1, 2], torch.randn(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="num_samples"):
        ConfidenceTracker(0)
    with pytest.raises(FileNotFoundError, match="no confidence file"):
        ConfidenceTracker.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=".pt or .npz"):
        ConfidenceTracker.load(tmp_path / "conf.json")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable confidence file"):
        ConfidenceTracker.load(tmp_path / "garbage.npz")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not an avkernels confidence file"):
        ConfidenceTracker.load(tmp_path / "model.pt")
