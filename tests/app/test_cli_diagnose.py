"""``avkernels diagnose``: torchvision, official ABRi and avkernels checkpoints (wrapped, with a
DDP prefix, under a key prefix), inputs from files, the before/after comparison, and one-line
errors with exit code 2 for bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")

from avkernels import DiagnosisReport, abri  # noqa: E402
from avkernels.app.cli import main  # noqa: E402
from tests.helpers.diagnosis import PNG_SIGNATURE, layer, resnet_with_dead_channels  # noqa: E402
from tests.helpers.official import OfficialResNet18, randomise  # noqa: E402


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(["diagnose", *map(str, argv)])
    except SystemExit as exit_info:  # argparse rejected an argument
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_torchvision_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "tv.pth"
    torch.save(resnet_with_dead_channels().state_dict(), checkpoint)
    code, out, err = run_cli(capsys, checkpoint, "--out", tmp_path / "out")
    assert code == 0, err
    assert "resnet18, torchvision layout, 3 input channel(s)" in out
    assert "2 abnormal" in out and "layer1.0.bn1" in out
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["gamma_beta.png", "layer_dead_ratio.png", "report.json", "report.md"]
    report = DiagnosisReport.from_json((tmp_path / "out" / "report.json").read_text())
    assert layer(report, "layer1.0.bn1").abnormal == 2


def test_cli_official_abri_checkpoint_with_data_and_comparison(tmp_path, capsys):
    official = randomise(OfficialResNet18("channel", in_channels=1), 3)
    checkpoint = tmp_path / "official.pth"
    torch.save({"model": official.state_dict(), "epoch": 3}, checkpoint)
    data = tmp_path / "fbank.pt"
    torch.save(torch.randn(3, 32, 24), data)  # (N, time, mel): one channel
    plain = tmp_path / "plain.pth"
    torch.save(torchvision.models.resnet18().state_dict(), plain)
    code, _, err = run_cli(capsys, plain, "--out", tmp_path / "before")
    assert code == 0, err
    code, out, err = run_cli(
        capsys,
        checkpoint,
        "--data",
        data,
        "--batch-size",
        2,
        "--in-channels",
        1,
        "--before",
        tmp_path / "before" / "report.json",
        "--out",
        tmp_path / "out",
    )
    assert code == 0, err
    assert "resnet18, official ABRi, 1 input channel(s)" in out
    assert "activations (2 batches, eval)" in out
    report = DiagnosisReport.from_json((tmp_path / "out" / "report.json").read_text())
    assert all(item.abri and item.has_activations for item in report.layers)
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "before vs now" in (tmp_path / "out" / "comparison.md").read_text()


def test_cli_avkernels_checkpoint_from_ddp_classifier(tmp_path, capsys):
    encoder = abri.apply(torchvision.models.resnet34(), granularity="channel")
    classifier = nn.ModuleDict({"audio_net": encoder, "fc": nn.Linear(512, 3)})
    checkpoint = tmp_path / "ddp.pth"
    torch.save(
        {"state_dict": {"module." + k: v for k, v in classifier.state_dict().items()}}, checkpoint
    )
    code, out, err = run_cli(capsys, checkpoint, "--out", tmp_path / "out")
    assert code == 0, err
    assert "resnet34, avkernels ABRi" in out and "'audio_net.'; 2 other keys ignored" in out


def save(path, value):
    torch.save(value, path)
    return path


@pytest.mark.parametrize(
    "make_checkpoint, extra, message",
    [
        (lambda tmp: tmp / "missing.pth", [], "no such file"),
        (lambda tmp: tmp, [], "not a file"),
        (
            lambda tmp: (tmp / "notes.pth").write_text("hello") and tmp / "notes.pth",
            [],
            "is not a PyTorch checkpoint",
        ),
        (lambda tmp: save(tmp / "list.pth", [1, 2]), [], "holds no state dict"),
        (
            lambda tmp: save(tmp / "r34.pth", torchvision.models.resnet34().state_dict()),
            ["--arch", "resnet18"],
            "those of a resnet34, not of --arch resnet18",
        ),
        (
            lambda tmp: save(tmp / "r50.pth", torchvision.models.resnet50().state_dict()),
            [],
            "not those of a ResNet-18 or ResNet-34",
        ),
        (
            lambda tmp: save(tmp / "r18.pth", torchvision.models.resnet18().state_dict()),
            ["--in-channels", "1"],
            "takes 3 channels",
        ),
        (
            lambda tmp: save(
                tmp / "r18x.pth",
                dict(torchvision.models.resnet18().state_dict(), extra=torch.zeros(1)),
            ),
            [],
            "unexpected extra",
        ),
        (
            lambda tmp: save(tmp / "r18d.pth", torchvision.models.resnet18().state_dict()),
            ["--data", "nowhere.pt"],
            "argument --data: nowhere.pt: no such file",
        ),
    ],
    ids=[
        "missing",
        "directory",
        "text",
        "not-a-dict",
        "other-arch",
        "resnet50",
        "in-channels",
        "extra-key",
        "no-data",
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(
    tmp_path, capsys, make_checkpoint, extra, message
):
    checkpoint = make_checkpoint(tmp_path)
    code, out, err = run_cli(capsys, checkpoint, *extra, "--out", tmp_path / "out")
    assert code == 2
    line = err.strip().splitlines()[-1]  # argparse's errors come after its usage lines
    assert line.startswith("avkernels diagnose: error: ") and message in line, err
    assert "Traceback" not in err
