"""Dead-channel diagnosis (``avkernels.diagnose``), its report formats and plots (the
``avkernels diagnose`` command: tests/app/test_cli_diagnose.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from avkernels import DiagnosisReport, TrackedBN, abri, diagnose
from avkernels.diagnosis import compare
from tests.helpers.diagnosis import PNG_SIGNATURE, layer, resnet_with_dead_channels


def test_parameter_criterion_absolute():
    report = diagnose(resnet_with_dead_channels())
    assert len(report.layers) == 20
    bn = layer(report, "layer1.0.bn1")
    assert bn.status[:4] == ["closed", "constant", "ok", "ok"]
    assert (bn.closed, bn.constant, bn.abnormal) == (1, 1, 2)
    assert bn.abnormal_ratio == pytest.approx(2 / 64)
    assert bn.flagged and not layer(report, "bn1").flagged
    assert report.abnormal == 2 and report.channels == 4800
    assert bn.gamma[1] == pytest.approx(1e-12) and bn.beta[2] == pytest.approx(-0.5)
    assert not report.has_activations and bn.dead_fraction is None


def test_parameter_criterion_relative_and_threshold():
    model = torchvision.models.resnet18()
    with torch.no_grad():
        bn = model.layer2[0].bn1
        bn.weight.fill_(0.5)
        bn.weight[3], bn.bias[3] = 1e-4, -2e-4
    absolute = diagnose(model)
    relative = diagnose(model, relative=True)  # tau = 1e-3 x median |gamma| = 5e-4
    assert layer(absolute, "layer2.0.bn1").abnormal == 0
    assert layer(relative, "layer2.0.bn1").status[3] == "closed"
    assert layer(relative, "layer2.0.bn1").threshold == pytest.approx(5e-4)
    assert layer(diagnose(model, threshold=1e-3), "layer2.0.bn1").abnormal == 1
    with pytest.raises(ValueError, match="threshold"):
        diagnose(model, threshold=-1)


def test_which_layers_feed_a_relu():
    report = diagnose(torchvision.models.resnet18())
    feeds = {item.name: item.feeds_relu for item in report.layers}
    assert feeds["bn1"] and feeds["layer1.0.bn1"] and feeds["layer4.1.bn1"]
    assert feeds["layer1.0.bn2"] is False and feeds["layer2.0.downsample.1"] is False
    fused = nn.Sequential(nn.Conv2d(3, 4, 1), TrackedBN(4, activation="relu"), nn.Sigmoid())
    assert diagnose(fused).layers[0].feeds_relu is True

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(x).relu() if x.sum() > 0 else x  # control flow on a tensor

    assert diagnose(Untraceable()).layers[0].feeds_relu is None


def test_abri_layers_are_judged_by_their_blended_affine():
    model = abri.apply(resnet_with_dead_channels(), alpha=0.5)
    bn = layer(diagnose(model), "layer1.0.bn1")
    assert bn.abri and bn.abnormal == 0  # 0.5 * 0 + 0.5 * 1 (the fresh BN)
    np.testing.assert_allclose(bn.gamma[0], 0.5)
    with torch.no_grad():
        model.layer1[0].bn1.abri_alpha.fill_(1.0)
    assert layer(diagnose(model), "layer1.0.bn1").abnormal == 2


def conv_bn_model(bn: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), bn, nn.ReLU())
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.0, -3.0, 0.5, 3.0]))
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    return model


@pytest.mark.parametrize("tracked", [False, True])
def test_activation_statistics_match_a_direct_count(tracked):
    bn = TrackedBN(4) if tracked else nn.BatchNorm2d(4)
    model = conv_bn_model(bn).train()
    batches = [torch.randn(3, 2, 5, 5) for _ in range(3)]
    if tracked:
        bn.dead_count.fill_(7)
    kept = {name: value.clone() for name, value in model.state_dict().items()}
    report = diagnose(model, [(x, torch.zeros(3)) for x in batches])  # (input, label) batches
    with torch.no_grad():
        reference = conv_bn_model(nn.BatchNorm2d(4)).eval()
        reference.load_state_dict(kept)
        z = torch.cat([reference[1](reference[0](x)) for x in batches])
    stats = report.layers[0]
    assert report.batches == 3 and stats.samples == 9
    np.testing.assert_allclose(stats.dead_fraction, (z <= 0).double().mean((0, 2, 3)).numpy())
    np.testing.assert_allclose(
        stats.dead_sample_fraction, (z <= 0).flatten(2).all(2).double().mean(0).numpy()
    )
    assert stats.dead_on_all_samples == int(((z <= 0).flatten(2).all(2).all(0)).sum())
    # The user's model is left as it was: same layer types, mode, state and counters.
    assert type(model[1]) is type(bn) and model.training and model[1].training
    for name, value in model.state_dict().items():
        assert torch.equal(value, kept[name]), name
    if tracked:
        assert bn.dead_count.tolist() == [7] * 4 and bn.seen.tolist() == [0, 0]


def test_activation_options():
    model = conv_bn_model(nn.BatchNorm2d(4))
    batches = [torch.randn(2, 2, 4, 4) for _ in range(4)]
    assert diagnose(model, batches, max_batches=2).batches == 2
    calls = []
    diagnose(
        model,
        [{"image": x} for x in batches],
        forward=lambda m, batch: calls.append(m(batch["image"])),
    )
    assert len(calls) == 4
    with pytest.raises(TypeError, match="forward="):
        diagnose(model, [{"image": batches[0]}])
    with pytest.raises(ValueError, match="no batches"):
        diagnose(model, [])


def test_json_round_trip_tables_and_markdown():
    model = resnet_with_dead_channels()
    report = diagnose(model, [torch.randn(2, 3, 32, 32)], title="demo")
    data = json.loads(report.to_json())
    assert data["summary"] == {"channels": 4800, "abnormal": 2}
    assert len(data["layer_table"]) == 20
    restored = DiagnosisReport.from_json(report.to_json())
    assert restored.layer_table() == report.layer_table()
    assert restored.channel_table() == report.channel_table()
    assert len(report.channel_table()) == 4800
    row = report.channel_table()[64 + 1]  # layer1.0.bn1, channel 1
    assert (row["layer"], row["channel"], row["status"]) == ("layer1.0.bn1", 1, "constant")
    markdown = report.to_markdown()
    assert "# Dead-channel diagnosis: demo" in markdown
    assert "| layer1.0.bn2 | 64 | no |" in markdown
    assert "### layer1.0.bn1" in markdown and "| 1 | 1e-12 | 1e-12 | constant |" in markdown
    with pytest.raises(ValueError, match="version"):
        DiagnosisReport.from_json(json.dumps({"version": 0}))


def test_plots_and_before_after_comparison(tmp_path):
    model = resnet_with_dead_channels()
    batches = [torch.randn(2, 3, 32, 32)]
    before = diagnose(model, batches)
    after = diagnose(abri.apply(model), batches)
    paths = before.plot(tmp_path / "before")
    assert [p.name for p in paths] == ["layer_dead_ratio.png", "gamma_beta.png", "dead_samples.png"]
    comparison = compare(before, after, labels=("pre-trained", "ABRi"))
    paths.append(comparison.plot(tmp_path / "comparison.png"))
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    rows = {row["layer"]: row for row in comparison.rows()}
    assert rows["layer1.0.bn1"]["abnormal_ratio_pre-trained"] == pytest.approx(2 / 64)
    assert rows["layer1.0.bn1"]["abnormal_ratio_ABRi"] == 0
    assert "| layer1.0.bn1 | 3.1% | 0.0% |" in comparison.to_markdown()
    assert json.loads(comparison.to_json())["labels"] == ["pre-trained", "ABRi"]
    with pytest.raises(ValueError, match="different models"):
        compare(before, diagnose(nn.Sequential(nn.BatchNorm2d(3))))


def test_repr_is_one_line_and_save_writes_json_and_markdown(tmp_path):
    model = resnet_with_dead_channels()
    report = diagnose(model, [torch.randn(2, 3, 32, 32)], title="dead")
    text = repr(report)
    assert "\n" not in text and len(text) < 200
    assert text == (
        f"DiagnosisReport('dead', {len(report.layers)} layers, {report.channels} channels, "
        f"{report.abnormal} abnormal, activations: 1 batches, eval)"
    )
    assert "activations: none" in repr(diagnose(model))
    json_path, markdown_path = report.save(tmp_path / "out")
    assert DiagnosisReport.from_json(json_path.read_text()).to_dict() == report.to_dict()
    assert markdown_path.read_text() == report.to_markdown()


def test_report_from_the_counters_of_training():
    """counters=True reads what TrackedBN counted during the user's training: the same fractions
    as avkernels.dead_stats, with no pass over data and the counters left as they were."""
    from avkernels import convert, dead_stats

    model = convert(resnet_with_dead_channels()).train()
    for _ in range(2):
        model(torch.randn(2, 3, 32, 32))
    counted = dead_stats(model)
    report = diagnose(model, counters=True)
    assert report.from_counters and report.batches == 0
    for diagnosed in report.layers:
        np.testing.assert_array_equal(
            diagnosed.dead_fraction, counted[diagnosed.name].dead_fraction.numpy()
        )
        assert diagnosed.samples == 4
    assert "TrackedBN counters" in report.summary() and "TrackedBN counters" in repr(report)
    again = DiagnosisReport.from_json(report.to_json())
    assert again.from_counters and again.to_dict() == report.to_dict()
    assert int(dead_stats(model)["bn1"].samples) == 4  # untouched
    with pytest.raises(ValueError, match="not both"):
        diagnose(model, [torch.randn(2, 3, 32, 32)], counters=True)
