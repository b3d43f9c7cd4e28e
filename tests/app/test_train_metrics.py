"""What a run writes about each epoch: metrics.jsonl's rows (stage, losses, accuracies, learning
rate, wall time, dead fractions per BN layer), the flattened metrics.csv, and the one line per
epoch on stderr."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from avkernels.nn.tracked_bn import TrackedBN
from tests.app.training_fixtures import SyntheticAV, run, tiny_config

TRAIN_BATCHES = 3  # SyntheticAV's 10 samples in batches of 4


def count_training_outputs(model) -> dict[str, list[tuple[int, int]]]:
    """Per TrackedBN, (outputs <= 0, outputs) of each training forward, counted by a hook: the
    output is before the activation, or after a fused ReLU, which is 0 exactly where it was
    <= 0 before."""
    counts: dict[str, list[tuple[int, int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, TrackedBN):
            counts[name] = []

            def hook(module, inputs, output, name=name):
                if module.training:
                    counts[name].append((int((output <= 0).sum()), output.numel()))

            module.register_forward_hook(hook)
    return counts


def test_rows_hold_stage_lr_wall_time_and_each_epochs_dead_fractions(tmp_path, monkeypatch):
    from avkernels.app.training import trainer as trainer_module

    counts = {}
    build_model = trainer_module.build_model

    def counted_model(config):
        model = build_model(config)
        counts.update(count_training_outputs(model))
        return model

    monkeypatch.setattr(trainer_module, "build_model", counted_model)
    run(tiny_config(stage="joint"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in rows] == [
        (1, "train"),
        (1, "eval"),
        (2, "train"),
        (2, "eval"),
    ]
    assert {r["stage"] for r in rows} == {"joint"}
    for row in rows:
        assert row["seconds"] > 0 and {"loss", "acc", "acc_audio", "acc_visual"} <= set(row)
    train = [r for r in rows if r["split"] == "train"]
    assert train[0]["lr"] == pytest.approx(1e-2)  # cosine over 2 epochs: lr, then lr / 2
    assert train[1]["lr"] == pytest.approx(0.5e-2)
    for epoch, row in enumerate(train):
        assert set(row["dead_fraction"]) == set(counts)
        for name, forwards in counts.items():
            window = forwards[epoch * TRAIN_BATCHES : (epoch + 1) * TRAIN_BATCHES]
            expected = sum(dead for dead, _ in window) / sum(size for _, size in window)
            assert row["dead_fraction"][name] == pytest.approx(expected, abs=1e-12), name
    assert "dead_fraction" not in rows[1]  # evaluation forwards are not counted


def test_stage1_rows_name_their_stage_and_leave_out_unused_layers(tmp_path):
    run(tiny_config(stage="stage1", modalities=("audio",), epochs=1), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["stage1"] * len(rows)
    layers = set(rows[0]["dead_fraction"])
    assert layers and all(name.startswith("audio") for name in layers)  # visual never ran


def test_csv_flattens_the_dead_fractions_into_columns(tmp_path):
    run(tiny_config(stage="joint", epochs=1), tmp_path)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    with open(tmp_path / "metrics.csv", newline="") as file:
        first = next(csv.DictReader(file))
    assert "dead_fraction" not in first
    for name, value in row["dead_fraction"].items():
        assert float(first[f"dead_fraction.{name}"]) == pytest.approx(value)
    assert float(first["seconds"]) == pytest.approx(row["seconds"])


def epoch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("joint epoch ")]


def test_without_bars_each_epoch_prints_one_plain_line(tmp_path, capsys):
    trainer = run(tiny_config(stage="joint"), tmp_path)  # progress=False, as in a log file
    err = capsys.readouterr().err
    lines = epoch_lines(err)
    assert len(lines) == 2 and "\r" not in err  # no bar
    first = trainer.history[0]
    assert lines[0].startswith("joint epoch 1/2: train loss ")
    assert f"acc {first['acc']:.4f}" in lines[0] and "; eval loss " in lines[0]
    assert f"lr {first['lr']:.3g}" in lines[0] and lines[1].startswith("joint epoch 2/2: ")
    assert math.isfinite(float(lines[0].split("train loss ")[1].split(",")[0]))


def test_with_bars_the_line_is_written_above_the_bar(tmp_path, capsys):
    from avkernels.app.training import Trainer

    data = SyntheticAV(noise=True)
    Trainer(tiny_config(stage="joint"), data, tmp_path, progress=True).fit()
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if ": train loss " in line]
    assert [line[:16] for line in lines] == ["joint epoch 1/2:", "joint epoch 2/2:"]
    assert "it/s" in err or "s/it" in err  # the tqdm bar was drawn too


def test_a_checkpoint_without_the_new_figures_still_resumes(tmp_path):
    """Checkpoints written before wall times and dead counters were saved resume."""
    from avkernels.app.training import TrainingInterrupted

    def stop_at_step_4(trainer, step):
        if step == 4:
            trainer.request_stop()

    config = tiny_config(stage="joint")
    with pytest.raises(TrainingInterrupted):
        run(config, tmp_path, on_step=stop_at_step_4)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["dead_counters"], state["totals"]["seconds"]
    torch.save(state, tmp_path / "checkpoint.pt")
    history = run(config, tmp_path, resume=True).history
    assert [r["split"] for r in history] == ["train", "eval"] * 2
    assert history[2]["seconds"] > 0 and history[2]["dead_fraction"]
