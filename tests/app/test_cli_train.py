"""``avkernels train`` and ``avkernels fust``: exit codes and messages for bad arguments and
missing data, and tiny end-to-end runs on a manifest of on-disk clips."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("PIL")

from avkernels.app.cli import main  # noqa: E402
from avkernels.app.data import ClipRecord, write_manifest  # noqa: E402
from tests.app.data_fixtures import TINY_TRAINING_OPTIONS as TINY  # noqa: E402
from tests.app.training_fixtures import sigint_inside_the_probe  # noqa: E402


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def test_missing_manifest_is_a_usage_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "joint", str(tmp_path / "none.csv"), "--out", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert "argument manifest" in line and "none.csv: no such file" in line


def test_missing_media_file_is_named(tmp_path, capsys):
    record = ClipRecord("gone", "train", 0, tmp_path / "gone.wav", tmp_path / "frames")
    path = write_manifest(tmp_path / "manifest.csv", [record])
    argv = ["train", "joint", str(path), "--out", str(tmp_path / "r"), *TINY]
    assert main(argv) == 2
    assert "gone.wav" in error_line(capsys)


def test_unknown_stage_and_bad_choice_are_argparse_errors(tmp_path, clips_manifest):
    for argv in (
        ["train", "stage3", str(clips_manifest), "--out", str(tmp_path)],
        ["train", "joint", str(clips_manifest), "--out", str(tmp_path), "--mask-target", "x"],
        ["train", "joint", str(clips_manifest)],
    ):  # --out is required
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "options, message",
    [
        (["--train-split", "dev"], "has no split 'dev'"),
        (["--eval-split", "val"], "has no split 'val'"),
        (["--fbank-stats", "missing.json"], "--fbank-stats missing.json: no such file"),
    ],
)
def test_bad_values_are_exit_2_with_the_option_named(
    tmp_path, clips_manifest, capsys, options, message
):
    argv = ["train", "joint", str(clips_manifest), "--out", str(tmp_path / "run"), *TINY, *options]
    assert main(argv) == 2
    assert message in error_line(capsys)


def test_stage2_without_stage1_confidences(tmp_path, clips_manifest, capsys):
    argv = ["train", "stage2", str(clips_manifest), "--out", str(tmp_path / "run"), *TINY]
    assert main(argv) == 2
    assert "needs the stage-1 confidences" in error_line(capsys)


def test_train_stage1_then_stage2_then_resume_rules(tmp_path, clips_manifest, capsys):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    assert main(["train", "stage1", str(clips_manifest), "--out", str(stage1), *TINY]) == 0
    output = capsys.readouterr().out
    assert "stage1: epoch 1 eval: acc_audio" in output
    assert (stage1 / "confidence_audio.pt").is_file() and (stage1 / "metrics.csv").is_file()
    config = json.loads((stage1 / "config.json").read_text())
    assert config["num_classes"] == 2 and config["width"] == 4  # classes from the manifest

    argv = [
        "train",
        "stage2",
        str(clips_manifest),
        "--out",
        str(stage2),
        *TINY,
        "--init-from",
        str(stage1),
        "--mask-threshold",
        "0",
        "--mask-target",
        "both",
    ]
    assert main(argv) == 0
    assert "stage2: epoch 1 eval: acc " in capsys.readouterr().out

    assert main(argv) == 1  # the directory holds a run
    assert "add --resume" in error_line(capsys)
    assert main(argv + ["--resume"]) == 0  # finished: nothing left to do, same result
    assert (
        main(
            [
                "train",
                "stage2",
                str(clips_manifest),
                "--out",
                str(stage2),
                *TINY,
                "--resume",
                "--lr",
                "0.5",
            ]
        )
        == 2
    )
    assert "lr: 0.01 != 0.5" in error_line(capsys)
    assert (
        main(
            [
                "train",
                "joint",
                str(clips_manifest),
                "--out",
                str(tmp_path / "new"),
                *TINY,
                "--resume",
            ]
        )
        == 1
    )
    assert "nothing to resume" in error_line(capsys)


def test_fust_pipeline_and_resume(tmp_path, clips_manifest, capsys):
    out = tmp_path / "fust"
    argv = [
        "fust",
        str(clips_manifest),
        "--out",
        str(out),
        *TINY,
        "--baseline",
        "--mask-threshold",
        "0",
        "--probe-epochs",
        "2",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for stage in ("stage1", "stage2", "joint"):
        assert f"{stage}: epoch 1" in printed
        assert (out / stage / "model.pt").is_file()
    assert "probe_audio" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"stage1", "stage2", "joint"}
    stage2 = json.loads((out / "stage2" / "config.json").read_text())
    assert stage2["init_from"] == str(out / "stage1")
    assert main(argv) == 1
    assert "already holds a run" in error_line(capsys)
    before = torch.load(out / "stage2" / "model.pt", weights_only=True)
    assert main(argv + ["--resume"]) == 0
    after = torch.load(out / "stage2" / "model.pt", weights_only=True)
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_ctrl_c_during_the_probes_exits_130_and_resume_finishes(
    tmp_path, clips_manifest, capsys, monkeypatch
):
    out = tmp_path / "run"
    argv = ["train", "joint", str(clips_manifest), "--out", str(out), *TINY, "--probe-epochs", "1"]
    sigint_inside_the_probe(monkeypatch)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "linear probes" in err and "--resume" in err
    assert "Traceback" not in err and not (out / "model.pt").exists()
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    assert "probe_audio" in capsys.readouterr().out and (out / "model.pt").is_file()
