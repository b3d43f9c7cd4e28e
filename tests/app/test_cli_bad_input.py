"""Every command with bad input, as a user gives it: exit status 2 (usage) or 1 (runtime), one
message naming the option or file and a fix, no traceback, and every file that existed before
left byte for byte as it was. Then what must keep working: --config, run.json and --resume,
AV-Digits' build.json, Ctrl-C, --debug, diagnose of a narrow encoder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("PIL")

from avkernels.app.cli import main  # noqa: E402
from avkernels.app.data import ClipRecord, read_manifest, write_manifest  # noqa: E402
from tests.app.cli_helpers import last_line, run_main  # noqa: E402
from tests.app.data_fixtures import TINY_TRAINING_OPTIONS as TINY  # noqa: E402

# TINY without its --fbank-stats, for the cases about the statistics file.
TINY_NO_STATS = TINY[2:]
assert TINY[:2] == ("--fbank-stats", "kinetics-sounds")


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, clips_manifest):
    """A manifest (2 classes), one with 4 labels, one of other clip ids with a finished stage-1
    run of width 4, a diagnosis report, a regular file, a folder holding a foreign run."""
    root = tmp_path_factory.mktemp("world")
    records = read_manifest(clips_manifest)
    four = [ClipRecord(r.id, r.split, i % 4, r.audio, r.frames) for i, r in enumerate(records)]
    other = [ClipRecord("other" + r.id, r.split, r.label, r.audio, r.frames) for r in records]
    paths = {
        "manifest": clips_manifest,
        "four": write_manifest(root / "four" / "manifest.csv", four),
        "other": write_manifest(root / "other" / "manifest.csv", other),
        "file": root / "file",
        "foreign": root / "foreign",
        "stage1": root / "stage1",
    }
    paths["file"].write_text("a regular file\n")
    import torchvision

    paths["plain"] = root / "plain.pth"
    torch.save(torchvision.models.resnet18().state_dict(), paths["plain"])
    paths["foreign"].mkdir()
    (paths["foreign"] / "config.json").write_text('{"lr": 1}\n')
    (paths["foreign"] / "metrics.csv").write_text("epoch,loss\n1,0.5\n")
    argv = ["train", "stage1", paths["other"], "--out", paths["stage1"], *TINY]
    assert main([str(a) for a in argv]) == 0
    return paths


def cases():
    """(command line with {name} placeholders, exit status, words of the message)."""
    train = ["train", "joint", "{manifest}", "--out", "{tmp}/run", *TINY]
    fust = ["fust", "{manifest}", "--out", "{tmp}/fust", *TINY]
    diagnose = ["diagnose", "{tmp}/plain.pth", "--out", "{tmp}/diag"]
    stage2 = ["train", "stage2", "{manifest}", "--out", "{tmp}/s2", *TINY]
    return [
        # train: values rejected while parsing
        (train + ["--device", "bogus"], 2, ["--device", "'bogus' is not a device", "cpu"]),
        (train + ["--audio-patch-grid", "0", "0"], 2, ["--audio-patch-grid", ">= 1"]),
        (train + ["--visual-patch-grid", "-1", "-1"], 2, ["--visual-patch-grid", ">= 1"]),
        (train + ["--mask-rho", "2", "0.5"], 2, ["--mask-rho", "[0, 1]"]),
        (train + ["--mask-rho", "-1", "0.5"], 2, ["--mask-rho", "[0, 1]"]),
        (train + ["--mask-threshold", "5"], 2, ["--mask-threshold", "[0, 1]"]),
        (train + ["--mask-threshold", "nan"], 2, ["--mask-threshold", "finite"]),
        (train + ["--mask-eta", "inf", "1"], 2, ["--mask-eta", "finite"]),
        (train + ["--seed", "-1"], 2, ["--seed", "[0, 4294967295]"]),
        (train + ["--lr-gamma", "nan"], 2, ["--lr-gamma", "finite"]),
        (train + ["--lr", "0"], 2, ["--lr", "> 0"]),
        (train + ["--epochs", "0"], 2, ["--epochs", ">= 1"]),
        (train + ["--batch-size", "x"], 2, ["--batch-size", "integer"]),
        (train + ["--num-workers", "-1"], 2, ["--num-workers", ">= 0"]),
        (train + ["--mel-bins", "0"], 2, ["--mel-bins", ">= 1"]),
        (train + ["--audio-init", "{tmp}/none.pth"], 2, ["--audio-init", "no such file"]),
        (train + ["--init-from", "{tmp}/none"], 2, ["--init-from", "no such file or folder"]),
        (["train", "joint", "{tmp}/none.csv", "--out", "{tmp}/r"], 2, ["none.csv", "prepare"]),
        (train[:4] + ["{file}"], 2, ["--out", "is a file", "choose a folder"]),
        (train[:4] + ["{file}/run"], 2, ["--out", "is a file", "another path"]),
        (train + ["--config", "{tmp}/none.toml"], 2, ["--config", "no such file"]),
        (train + ["--config", "{tmp}/bad.toml"], 2, ["--config", "not a readable TOML"]),
        (train + ["--config", "{tmp}/unknown.toml"], 2, ["--config", "unknown key 'colour'"]),
        (train + ["--config", "{tmp}/nan.toml"], 2, ["--config", "key 'momentum'", "finite"]),
        # train: checked before any work
        (train + ["--device", "cuda:7"], 2, ["--device cuda:7", "cpu"]),
        (train + ["--visual-channels", "1"], 2, ["--visual-channels 1", "RGB"]),
        (train + ["--num-classes", "1"], 2, ["--num-classes", ">= 2"]),
        (
            ["train", "joint", "{four}", "--out", "{tmp}/r", *TINY, "--num-classes", "2"],
            2,
            ["--num-classes 2", "labels up to 3", "--num-classes 4"],
        ),
        (
            train + ["--mask-target", "features", "--feature-group", "64"],
            2,
            ["--feature-group 64", "32 features", "at most 32"],
        ),
        (train[:4] + ["{foreign}", *TINY], 1, ["{foreign}", "--resume", "--out", "--overwrite"]),
        (train[:4] + ["{foreign}", *TINY, "--resume"], 1, ["nothing to resume", "drop --resume"]),
        (train + ["--resume", "--overwrite"], 2, ["--resume", "--overwrite", "choose one"]),
        (
            ["train", "joint", "{manifest}", "--out", "{tmp}/r", *TINY_NO_STATS],
            2,
            ["fbank_stats.json: no such file", "avkernels data-stats", "--fbank-stats"],
        ),
        (train + ["--fbank-stats", "{tmp}/none.json"], 2, ["--fbank-stats", "no such file"]),
        (
            [
                "train",
                "stage1",
                "{other}",
                "--out",
                "{stage1}",
                *TINY,
                "--resume",
                "--mel-bins",
                "16",
            ],
            2,
            ["--mel-bins: saved 32, given 16", "--allow-data-changes"],
        ),
        (
            ["train", "stage1", "{manifest}", "--out", "{stage1}", *TINY, "--resume"],
            2,
            ["MANIFEST: saved", "--allow-data-changes"],
        ),
        (
            ["train", "stage1", "{other}", "--out", "{stage1}", *TINY, "--resume", "--lr", "0.5"],
            2,
            ["lr: 0.01 != 0.5", "config.json"],
        ),
        (stage2 + ["--init-from", "{stage1}"], 2, ["another dataset", "--init-from"]),
        (stage2, 2, ["stage-1 confidences", "--audio-confidence or --init-from"]),
        # fust
        (fust[:2] + ["--out", "{file}"], 2, ["--out", "is a file"]),
        (fust + ["--stage1-epochs", "0"], 2, ["--stage1-epochs", ">= 1"]),
        (fust + ["--stage2-lr", "nan"], 2, ["--stage2-lr", "finite"]),
        (fust[:2] + ["--out", "{stage1}/..", *TINY], 1, ["stage1", "already holds a run"]),
        # diagnose
        (diagnose + ["--threshold", "-1"], 2, ["--threshold", ">= 0"]),
        (diagnose + ["--threshold", "nan"], 2, ["--threshold", "finite"]),
        (diagnose + ["--threshold", "5", "--relative"], 2, ["--threshold 5.0", "[0, 1]"]),
        (diagnose + ["--max-batches", "0"], 2, ["--max-batches", ">= 1"]),
        (diagnose + ["--batch-size", "0"], 2, ["--batch-size", ">= 1"]),
        (diagnose + ["--device", "bogus"], 2, ["--device", "cpu"]),
        (diagnose + ["--device", "cuda:7"], 2, ["--device cuda:7"]),
        (diagnose[:2] + ["--out", "{file}"], 2, ["--out", "is a file"]),
        (diagnose + ["--before", "{tmp}/none.json"], 2, ["--before", "no such file"]),
        (diagnose + ["--before", "{file}"], 2, ["--before", "not a diagnosis report"]),
        (diagnose + ["--data", "{tmp}/nan.pt"], 2, ["nan.pt", "NaN"]),
        (["diagnose", "{file}"], 2, ["is not a PyTorch checkpoint"]),
        (["diagnose", "{tmp}/pickled.pth"], 2, ["Python objects besides tensors"]),
        (["diagnose", "{tmp}/none.pth"], 2, ["none.pth: no such file"]),
        (
            train[:2] + ["{tmp}/gone.csv", "--out", "{tmp}/r", *TINY],
            2,
            ["gone.wav", "--on-error skip"],
        ),
        # prepare, data-stats, demo
        (["prepare", "ks", "--root", "{tmp}/none", "--out", "{tmp}/p"], 2, ["--root", "no such"]),
        (["prepare", "ks", "--root", "{tmp}", "--out", "{file}"], 2, ["--out", "is a file"]),
        (
            ["prepare", "av-digits", "--out", "{tmp}/d", "--visual-difficulty", "2", "0"],
            2,
            ["--visual-difficulty", "[0, 1]"],
        ),
        (["prepare", "av-digits", "--out", "{tmp}/d", "--seed", "-1"], 2, ["--seed"]),
        (["data-stats", "{tmp}/none.csv"], 2, ["none.csv: no such file"]),
        (["data-stats", "{manifest}", "--max-clips", "0"], 2, ["--max-clips", ">= 1"]),
        (["data-stats", "{manifest}", "--out", "{foreign}"], 2, ["--out", "is a folder"]),
        (["data-stats", "{manifest}", "--out", "{file}/s.json"], 2, ["--out", "is a file"]),
        (["data-stats", "{manifest}", "--mel-bins", "0"], 2, ["--mel-bins", ">= 1"]),
        (["demo", "--seed", "-1"], 2, ["--seed"]),
        (["demo", "--out", "{file}"], 2, ["--out", "is a file"]),
    ]


def case_id(case) -> str:
    argv, code, _ = case
    return f"{argv[0]}-{code}-" + "-".join(
        a for a in argv[2:] if a.startswith("--") and a not in TINY
    )


@pytest.mark.parametrize("argv, code, words", cases(), ids=[case_id(c) for c in cases()])
def test_bad_input_is_one_message_and_loses_nothing(world, tmp_path, capsys, argv, code, words):
    if "cuda:7" in argv and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    (tmp_path / "bad.toml").write_text("lr = = 1\n")
    (tmp_path / "unknown.toml").write_text("colour = 'red'\n")
    (tmp_path / "nan.toml").write_text("momentum = nan\n")
    torch.save(torch.full((2, 3, 32, 32), float("nan")), tmp_path / "nan.pt")
    gone = ClipRecord("gone", "train", 0, tmp_path / "gone.wav", tmp_path / "frames")
    write_manifest(
        tmp_path / "gone.csv", [gone, ClipRecord("g2", "train", 1, gone.audio, gone.frames)]
    )
    torch.save({"conv1.weight": Path("x")}, tmp_path / "pickled.pth")
    (tmp_path / "plain.pth").symlink_to(world["plain"])
    names = {key: str(value) for key, value in world.items()}
    fill = lambda text: text.format(tmp=tmp_path, **names)  # noqa: E731
    before = {root: tree_hashes(root) for root in (tmp_path, world["file"].parent)}
    status, _, err = run_main(capsys, *map(fill, argv))
    assert status == code, err
    assert "Traceback" not in err
    message = last_line(err)
    assert message.startswith(f"avkernels {argv[0]}: error: "), err
    for word in map(fill, words):
        assert word in message, err
    for root, hashes in before.items():
        after = tree_hashes(root)
        assert {name: after.get(name) for name in hashes} == hashes


def test_config_file_flags_win_and_run_json_records_the_data(world, tmp_path, capsys):
    """--config: the file's values apply unless a flag gives one; AV-Digits' build.json gives
    the front end; run.json records the resolved data settings and the versions."""
    manifest = write_manifest(
        tmp_path / "digits" / "manifest.csv", read_manifest(world["manifest"])
    )
    build = {"num_mel_bins": 32, "num_frames": 64, "image_size": 32, "frames_per_clip": 2}
    (manifest.parent / "build.json").write_text(json.dumps({"config": build}))
    config = tmp_path / "run.toml"
    config.write_text("epochs = 1\nlr = 0.5\nwidth = 4\noptimizer = 'adam'\nno-progress = 1\n")
    argv = ["train", "joint", manifest, "--out", tmp_path / "run", "--config", config]
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and "unknown key 'no-progress'" in last_line(err)
    config.write_text("epochs = 1\nlr = 0.5\nwidth = 4\noptimizer = 'adam'\nprogress = false\n")
    argv += ["--lr", "0.01", "--fbank-stats", "kinetics-sounds", "--batch-size", "4"]
    code, _, err = run_main(capsys, *argv)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["lr"], saved["epochs"], saved["width"]) == (0.01, 1, 4)
    settings = json.loads((tmp_path / "run" / "run.json").read_text())
    data = settings["data"]
    assert (data["mel_bins"], data["target_length"], data["image_size"], data["frames"]) == (
        32,
        64,
        32,
        2,
    )
    assert data["manifest"] == str(manifest.resolve()) and data["fbank_stats"] == "kinetics-sounds"
    assert settings["versions"]["torch"] == torch.__version__
    # A resume with the recorded settings (none given again) continues; one that differs only
    # with --allow-data-changes.
    code, _, err = run_main(capsys, *argv, "--resume")
    assert code == 0, err
    code, _, err = run_main(capsys, *argv, "--resume", "--image-size", "16")
    assert code == 2 and "--image-size: saved 32, given 16" in last_line(err)
    code, _, err = run_main(capsys, *argv, "--resume", "--image-size", "16", "--allow-data-changes")
    assert code == 0, err


def test_overwrite_replaces_a_foreign_run(world, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("stale\n")
    (run / "notes.txt").write_text("mine\n")
    argv = ["train", "joint", world["manifest"], "--out", run, *TINY]
    assert run_main(capsys, *argv)[0] == 1
    assert (run / "metrics.csv").read_text() == "stale\n"
    code, _, err = run_main(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert (run / "metrics.csv").read_text() != "stale\n" and (run / "model.pt").is_file()
    assert (run / "notes.txt").read_text() == "mine\n"  # not a run file: kept


def test_ctrl_c_unexpected_errors_and_debug(world, tmp_path, capsys, monkeypatch):
    from avkernels.app.training import Trainer, TrainingInterrupted

    def interrupted(self):
        raise TrainingInterrupted("stopped at epoch 1, step 1")

    argv = ["train", "joint", world["manifest"], "--out", tmp_path / "run", *TINY]
    monkeypatch.setattr(Trainer, "fit", interrupted)
    code, _, err = run_main(capsys, *argv)
    assert code == 130 and "stopped at epoch 1" in err and "--resume" in err
    assert "Traceback" not in err

    def broken(self):
        raise AttributeError("something inside broke")

    monkeypatch.setattr(Trainer, "fit", broken)
    code, _, err = run_main(capsys, *argv, "--overwrite")
    assert code == 1 and "Traceback" not in err
    assert "AttributeError: something inside broke" in err and "--debug" in err
    code, _, err = run_main(capsys, *argv, "--overwrite", "--debug")
    assert code == 1 and "Traceback" in err


def test_diagnose_reads_before_first_and_any_width(world, tmp_path, capsys):
    from avkernels import DiagnosisReport
    from avkernels.diagnosis import compare
    from tests.helpers.diagnosis import resnet_with_dead_channels

    dead = tmp_path / "dead.pth"
    torch.save(resnet_with_dead_channels().state_dict(), dead)
    out = tmp_path / "diag"
    assert run_main(capsys, "diagnose", dead, "--out", out)[0] == 0
    old = DiagnosisReport.from_json((out / "report.json").read_text())
    argv = ["diagnose", world["plain"], "--out", out, "--before", out / "report.json"]
    code, _, err = run_main(capsys, *argv)
    assert code == 0, err
    new = DiagnosisReport.from_json((out / "report.json").read_text())
    assert old.abnormal > 0 and new.abnormal == 0
    comparison = (out / "comparison.md").read_text()
    labels = ("before", "now")
    assert comparison == compare(old, new, labels=labels).to_markdown()
    assert comparison != compare(new, new, labels=labels).to_markdown()
    model = Path(world["stage1"]) / "model.pt"  # an encoder of width 4
    code, out_text, err = run_main(
        capsys, "diagnose", model, "--prefix", "audio_net.", "--out", tmp_path / "narrow"
    )
    assert code == 0, err
    assert "resnet18 of width 4, 1 input channel(s)" in out_text
