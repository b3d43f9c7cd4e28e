"""``avkernels train/fust --tensorboard``: the epoch's metrics as TensorBoard scalars, read back
from the event file; without the tensorboard package, a usage error before any training."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("PIL")

from avkernels.app.cli import main  # noqa: E402
from avkernels.app.commands.tensorboard_log import scalars  # noqa: E402
from tests.app.data_fixtures import TINY_TRAINING_OPTIONS as TINY  # noqa: E402


def test_scalars_tag_stage_split_and_each_layer():
    row = {
        "epoch": 3,
        "stage": "stage2",
        "split": "train",
        "lr": 0.1,
        "loss": 1.5,
        "acc": 0.5,
        "dead_fraction": {"audio_net.bn1": 0.2, "visual_net.bn1": 0.4},
    }
    assert scalars(row) == {
        "stage2/train/lr": 0.1,
        "stage2/train/loss": 1.5,
        "stage2/train/acc": 0.5,
        "stage2/train/dead_fraction/audio_net.bn1": 0.2,
        "stage2/train/dead_fraction/visual_net.bn1": 0.4,
        "stage2/train/dead_fraction_mean": pytest.approx(0.3),
    }


def test_train_logs_every_epochs_scalars(tmp_path, clips_manifest):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["train", "joint", str(clips_manifest), "--out", str(out), "--tensorboard", *TINY]
    assert main(argv + ["--epochs", "2"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tags = set(events.Tags()["scalars"])
    for row in rows:
        for tag, value in scalars(row).items():
            assert tag in tags
            logged = {e.step: e.value for e in events.Scalars(tag)}
            assert logged[row["epoch"]] == pytest.approx(value, rel=1e-6), tag
    assert "joint/train/loss" in tags and "joint/eval/acc" in tags


@pytest.mark.parametrize("command", [["train", "joint"], ["fust"]])
def test_without_tensorboard_the_flag_fails_before_training(
    tmp_path, clips_manifest, capsys, monkeypatch, command
):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    out = tmp_path / "run"
    argv = [*command, str(clips_manifest), "--out", str(out), "--tensorboard", *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--tensorboard" in err and "pip install tensorboard" in err
    assert "Traceback" not in err and "epoch" not in err
    assert not out.exists() or not any(out.rglob("*"))


def test_overwrite_replaces_the_old_event_files(tmp_path, clips_manifest):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    argv = ["train", "joint", str(clips_manifest), "--out", str(out), "--tensorboard", *TINY]
    assert main(argv + ["--epochs", "1"]) == 0
    first = list((out / "tensorboard").iterdir())
    assert main(argv + ["--epochs", "1", "--overwrite"]) == 0
    second = list((out / "tensorboard").iterdir())
    assert len(first) == len(second) == 1 and first != second
