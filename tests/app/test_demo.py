"""``avkernels demo``: the quick run end to end (report files, sections, inline figures,
resume) and the exit codes of bad arguments."""

from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")
if importlib.util.find_spec("spokennumbers") is None:  # found, not imported: it needs pydub
    pytest.skip(
        "AV-Digits needs spokennumbers (pip install --no-deps spokennumbers)",
        allow_module_level=True,
    )

import torch

from avkernels.app.cli import main
from avkernels.app.demo.figures import THREE_WAYS
from avkernels.app.demo.findings import DEAD_RATIOS
from avkernels.app.demo.settings import settings as demo_settings
from avkernels.app.demo.steps import RELATIVE_ABNORMAL, dead_three_ways
from tests.app.cli_helpers import last_line, run_main  # noqa: E402

SECTIONS = ("environment", "data", "claims", "measurements", "per_seed", "timings")
STEPS = ("pretrain", "transfer", "fust", "kernels")


@pytest.fixture(scope="module")
def quick_run(av_digits_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "quick"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def _numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_quick_demo_writes_the_three_report_files(quick_run):
    for name in ("report.md", "report.html", "report.json"):
        assert (quick_run / name).is_file() and (quick_run / name).stat().st_size > 0


def test_report_json_has_every_section_with_measured_numbers(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    for section in SECTIONS:
        assert section in report, section
        if section != "environment":
            assert list(_numbers(report[section])), f"{section} holds no number"
    assert all(math.isfinite(x) for x in _numbers(report))
    assert report["seeds"] == [0, 1] and report["mode"] == "quick"
    assert set(report["per_seed"]) == {"0", "1"}
    assert report["environment"]["torch"] and report["environment"]["cpu"]
    first = report["per_seed"]["0"]
    accuracies = [first["pretrain"]["eval_acc_visual"]]
    accuracies += [r["eval_acc_audio"] for r in first["transfer"]["finetune"].values()]
    assert set(first["transfer"]["finetune"]) == {
        "random_init",
        "pretrained",
        "pretrained_abri",
        "pretrained_abri_channel",
    }
    fust = first["fust"]
    assert set(fust["runs"]) == {"fust_stage2", "joint_naive"}
    for run in fust["runs"].values():
        accuracies += [run["eval_acc_joint"], *run["probe_acc"].values()]
        assert set(run["probe_acc"]) == {"audio", "visual"}
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    policy = fust["mask_policy"]
    assert policy["samples"] == report["data"]["clips"]["train"]
    assert 0 <= policy["audio_masked"] + policy["visual_masked"] <= policy["samples"]
    for row in first["kernels"]["rows"]:
        assert row["tracked_over_batchnorm"] > 0 and row["tracked_relu_over_batchnorm_relu"] > 0
    assert set(report["timings"]["steps"]) == {"data", "pretrain", "transfer", "fust", "kernels"}


def test_each_seed_holds_out_other_speakers_and_reports_accuracy_per_speaker(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    held_out = [set(report["per_seed"][str(seed)]["data"]["test_speakers"]) for seed in (0, 1)]
    assert all(len(speakers) == 2 for speakers in held_out) and held_out[0] != held_out[1]
    for seed in ("0", "1"):
        section = report["per_seed"][seed]
        clips = section["data"]["speaker_clips"]["test"]
        assert set(clips) == set(section["data"]["test_speakers"])
        for run in section["transfer"]["finetune"].values():
            by_speaker = run["eval_acc_audio_by_speaker"]
            assert set(by_speaker) == set(clips)
            # Weighted by the speakers' clips, they make the run's own test accuracy.
            pooled = sum(by_speaker[s] * n for s, n in clips.items()) / sum(clips.values())
            assert pooled == pytest.approx(run["eval_acc_audio"], abs=1e-6)
    table = (quick_run / "report.md").read_text().split("audio accuracy per held-out speaker")[1]
    for seed, speakers in enumerate(held_out):
        for speaker in speakers:
            assert re.search(rf"\| {seed} \| {speaker} \| [\d.]+% \|", table), (seed, speaker)


def test_claims_hold_per_seed_values_their_paired_interval_and_verdict(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    names = [claim["name"] for claim in report["claims"]]
    assert "audio accuracy final: pre-trained vs random init" in names
    assert "joint accuracy: FusT vs naive joint training" in names
    for claim in report["claims"]:
        assert {"name", "per_seed", "mean", "ci95", "verdict"} <= set(claim)
        assert len(claim["per_seed"]) == 2 and len(claim["ci95"]) == 2
        assert claim["ci95"][0] <= claim["mean"] <= claim["ci95"][1]
        assert claim["verdict"] in ("better", "worse", "no difference shown")
        pairs = zip(claim["new"], claim["baseline"], claim["per_seed"])
        assert all(math.isclose(a - b, d) for a, b, d in pairs)
    final = next(c for c in report["claims"] if c["name"].startswith("audio accuracy final: pre"))
    runs = [report["per_seed"][s]["transfer"]["finetune"] for s in ("0", "1")]
    assert final["new"] == [r["pretrained"]["eval_acc_audio"] for r in runs]
    assert final["baseline"] == [r["random_init"]["eval_acc_audio"] for r in runs]
    markdown = (quick_run / "report.md").read_text()
    assert "## Claims over seeds 0, 1" in markdown and "95% interval" in markdown


def test_report_has_dead_channels_three_ways_per_layer_and_abri_claims(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    diagnoses = report["per_seed"]["0"]["transfer"]["diagnosis"]
    for name in ("initialised_from_visual", "finetuned_pretrained_abri_channel"):
        summary = diagnoses[name]
        assert summary["relative_threshold"] == RELATIVE_ABNORMAL
        assert len(summary["per_layer"]) == summary["layers"]
        for row in summary["per_layer"].values():
            assert set(row) == {"channels", *(key for key, _ in THREE_WAYS), "overlap_relative"}
            # a channel abnormal and dead is counted in both criteria
            assert row["overlap_relative"] <= min(row["abnormal_relative"], row["activation_dead"])
            assert row["overlap_absolute"] <= min(row["abnormal_absolute"], row["activation_dead"])
    names = {claim["name"] for claim in report["claims"]}
    for variant in ("pretrained_abri", "pretrained_abri_channel"):
        assert f"audio accuracy final: {variant} vs pre-trained" in names
        assert f"audio accuracy after epoch 1: {variant} vs pre-trained" in names
        for _, label in DEAD_RATIOS:
            assert f"{label} after fine-tuning: {variant} vs pre-trained" in names
    figures = report["per_seed"]["0"]["transfer"]["figures"]
    assert {"dead_three_ways", "dead_maps"} <= set(figures)


def test_the_source_alone_drops_its_learning_rate_tenfold_after_source_lr_step(quick_run):
    settings = demo_settings(quick=True)
    runs = quick_run / "seed-0" / "runs"
    rows = [json.loads(line) for line in (runs / "pretrain_visual" / "metrics.jsonl").open()]
    rates = [row["lr"] for row in rows if row["split"] == "train"]
    base = settings.optimizer["lr"]
    expected = [base if epoch < settings.source_lr_step else base / 10 for epoch in range(2)]
    assert rates == pytest.approx(expected)
    # the fine-tuning runs keep the demo's cosine schedule
    config = json.loads((runs / "audio_pretrained" / "config.json").read_text())
    assert config["schedule"] == settings.optimizer["schedule"] == "cosine"


def test_dead_three_ways_on_a_hand_built_batchnorm():
    # gamma, beta per channel: live; abnormal (absolute) and dead; abnormal only relative to
    # the median |gamma| (~0.5, tau 5e-6) and live; normal but dead (beta far below any x).
    gamma = [1.0, 1e-12, 1e-7, 1.0]
    beta = [0.0, -1e-11, 1e-7, -100.0]
    conv = torch.nn.Conv2d(1, 4, 1, bias=False)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.tensor(beta))
    model = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).eval()  # x-hat = x: N(0, 1)
    batches = [torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(0))]
    _, summary = dead_three_ways(model, batches)
    assert summary["per_layer"]["1"] == {
        "channels": 4,
        "abnormal_absolute": 0.25,
        "abnormal_relative": 0.5,
        "activation_dead": 0.5,
        "overlap_absolute": 0.25,
        "overlap_relative": 0.25,
    }
    assert summary["abnormal_absolute_ratio"] == 0.25
    assert summary["abnormal_relative_ratio"] == 0.5


def test_html_embeds_every_figure_and_markdown_links_them(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    shown = report["per_seed"]["0"]
    figures = [*shown["transfer"]["figures"].values(), *shown["fust"]["figures"].values()]
    assert len(figures) >= 4
    page = (quick_run / "report.html").read_text()
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == len(figures)
    assert all(src.startswith("data:image/png;base64,iVBORw0KGgo") for src in images)
    markdown = (quick_run / "report.md").read_text()
    for file in figures:
        assert f"](seed-0/figures/{file})" in markdown
        assert (quick_run / "seed-0" / "figures" / file).stat().st_size > 1000


def test_rerun_with_the_same_out_skips_the_finished_steps(quick_run, capsys):
    before = json.loads((quick_run / "report.json").read_text())
    assert main(["demo", "--quick", "--out", str(quick_run), "--no-progress"]) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 2 * len(STEPS)
    after = json.loads((quick_run / "report.json").read_text())
    assert after["per_seed"] == before["per_seed"] and after["claims"] == before["claims"]


def test_a_lost_step_is_rebuilt_from_its_finished_runs_with_the_same_numbers(quick_run, capsys):
    before = json.loads((quick_run / "report.json").read_text())
    (quick_run / "seed-1" / "steps" / "fust.json").unlink()
    assert main(["demo", "--quick", "--out", str(quick_run), "--no-progress"]) == 0
    assert "(trained earlier)" in capsys.readouterr().out
    after = json.loads((quick_run / "report.json").read_text())
    for key in ("stage1", "mask_policy", "runs"):
        assert after["per_seed"]["1"]["fust"][key] == before["per_seed"]["1"]["fust"][key]
    assert after["claims"] == before["claims"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quick", "--seed", "-1"], "argument --seed: must be an integer in [0, "),
        (["--quick", "--seeds", "1"], "at least 2 seeds"),
        ([], "other settings"),  # the quick run's folder, default sizes
    ],
)
def test_bad_arguments_exit_2_with_one_line(quick_run, capsys, argv, message):
    code, _, error = run_main(capsys, "demo", "--out", quick_run, *argv)
    assert code == 2
    assert message in last_line(error) and "Traceback" not in error


def test_out_that_is_a_file_or_a_foreign_folder_exits_2(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    code, _, error = run_main(capsys, "demo", "--quick", "--out", file)
    assert code == 2 and "is a file" in last_line(error)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(foreign)]) == 2
    assert "holds no demo run" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("argv", [["--seed", "x"], ["--bogus"]])
def test_unparsable_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *argv])
    assert exit_info.value.code == 2


def test_resuming_on_another_av_digits_build_exits_2(quick_run, capsys):
    """Installing or removing a voice makes a new AV-Digits build: a demo folder made on the
    old one is not resumed on it (its report would mix two datasets)."""
    record = quick_run / "seed-1" / "dataset.json"
    saved = record.read_text()
    assert json.loads(saved)["av_digits"].startswith("av-digits-")
    try:
        record.write_text(json.dumps({"av_digits": "av-digits-000000000000"}))
        assert main(["demo", "--quick", "--out", str(quick_run), "--no-progress"]) == 2
        error = capsys.readouterr().err
        assert "another AV-Digits build (av-digits-000000000000" in error
        assert error.count("\n") == 1
        record.unlink()
        assert main(["demo", "--quick", "--out", str(quick_run), "--no-progress"]) == 2
        assert "no record of their AV-Digits build" in capsys.readouterr().err
    finally:
        record.write_text(saved)
