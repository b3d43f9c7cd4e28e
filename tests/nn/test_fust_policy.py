"""``avkernels.fust.mask_ratios``: the released rule bit for bit, the symmetric rule, "mean" mode,
joining the two modalities' confidences by sample id, and the summary."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch

from avkernels.fust import Confidences, ConfidenceTracker, mask_ratios
from avkernels.fust.policy import MAX_RATIO

GRID = (0.0, 0.05, 0.3, 0.45, 0.5, 0.55, 0.7, 0.9, 0.99, 1.0)
PAIRS = list(itertools.product(GRID, GRID))
CONF_A = [a for a, _ in PAIRS]
CONF_V = [v for _, v in PAIRS]


def released_ratios(
    conf_a, conf_v, threshold, eta_audio, eta_visual, rho_audio, rho_visual, mask="conf"
):
    """The released data loader's ratio computation, transcribed from docs/DESIGN.md, "Fusion
    Tuning (FusT)": per sample in numpy float64, then every sample gets the raw mean in "mean"
    mode."""
    a_mask_ratio, v_mask_ratio = [], []
    for a_conf, v_conf in zip(conf_a, conf_v):
        if v_conf >= threshold:
            a_sample, v_sample = np.tanh(eta_audio * (a_conf - v_conf)) * rho_audio, 0.0
        elif a_conf >= threshold:
            a_sample, v_sample = 0.0, np.tanh(eta_visual * (v_conf - a_conf)) * rho_visual
        else:
            a_sample, v_sample = 0.0, 0.0
        a_mask_ratio.append(a_sample)
        v_mask_ratio.append(v_sample)
    if mask == "mean":
        mean_a, mean_v = np.mean(a_mask_ratio), np.mean(v_mask_ratio)
        a_mask_ratio = [mean_a] * len(a_mask_ratio)
        v_mask_ratio = [mean_v] * len(v_mask_ratio)
    return a_mask_ratio, v_mask_ratio


def applied(ratios) -> list[float]:
    """What the loader masks with: ratio if > 0 (``if ratio > 0: mask``), else nothing."""
    return [float(r) if r > 0 else 0.0 for r in ratios]


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.95, 1.0, 1.01])
@pytest.mark.parametrize(
    "eta,rho", [((1.0, 1.0), (0.5, 0.5)), ((3.0, 0.5), (0.8, 0.3)), ((10.0, 10.0), (0.99, 0.99))]
)
def test_official_rule_reproduces_released_code(threshold, eta, rho):
    r_a, r_v = mask_ratios(CONF_A, CONF_V, threshold, eta, rho, rule="official", verbose=False)
    released_a, released_v = released_ratios(CONF_A, CONF_V, threshold, *eta, *rho)
    assert r_a.tolist() == applied(released_a)  # bit for bit
    assert r_v.tolist() == applied(released_v)
    assert (r_v == 0).all(), "the released rule never masks the visual input"


def test_official_rule_cases_that_mask_nothing():
    # both below tau; visual confident but audio weaker (negative tanh); only audio confident
    # (elif branch: v - a < 0)
    conf_a, conf_v = [0.2, 0.4, 0.6, 0.9, 0.7], [0.3, 0.1, 0.8, 0.2, 0.7]
    r_a, r_v = mask_ratios(conf_a, conf_v, 0.5, 2.0, 0.8, rule="official", verbose=False)
    assert r_a.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert r_v.tolist() == [0.0] * 5
    # the only case that masks: visual confident and audio more confident still
    r_a, _ = mask_ratios([0.9], [0.6], 0.5, 2.0, 0.8, rule="official", verbose=False)
    assert r_a.tolist() == [np.tanh(2.0 * (0.9 - 0.6)) * 0.8]


def test_official_mean_mode_quirk():
    # the raw mean includes negative ratios: here it is negative, so nothing is masked at all
    conf_a, conf_v = [0.95, 0.1, 0.2], [0.9, 0.9, 0.8]
    r_a, r_v = mask_ratios(
        conf_a, conf_v, 0.5, 2.0, 0.8, rule="official", mode="mean", verbose=False
    )
    released_a, released_v = released_ratios(conf_a, conf_v, 0.5, 2.0, 2.0, 0.8, 0.8, "mean")
    assert released_a[0] < 0 and r_a.tolist() == [0.0] * 3 and r_v.tolist() == [0.0] * 3
    # positive raw mean: every sample gets it
    conf_a, conf_v = [0.95, 0.99, 0.6], [0.6, 0.5, 0.55]
    r_a, _ = mask_ratios(conf_a, conf_v, 0.5, 2.0, 0.8, rule="official", mode="mean", verbose=False)
    released_a, _ = released_ratios(conf_a, conf_v, 0.5, 2.0, 2.0, 0.8, 0.8, "mean")
    assert r_a.tolist() == applied(released_a) and len(set(r_a.tolist())) == 1
    # the whole grid, both modes
    for threshold in (0.3, 0.9):
        r_a, r_v = mask_ratios(
            CONF_A, CONF_V, threshold, 1.5, 0.7, rule="official", mode="mean", verbose=False
        )
        released_a, released_v = released_ratios(
            CONF_A, CONF_V, threshold, 1.5, 1.5, 0.7, 0.7, "mean"
        )
        assert r_a.tolist() == applied(released_a) and r_v.tolist() == applied(released_v)


def test_symmetric_rule_masks_the_more_confident_modality():
    eta, rho = (2.0, 3.0), (0.8, 0.6)
    conf_a = [0.9, 0.2, 0.4, 0.7, 0.6, 0.95]
    conf_v = [0.3, 0.8, 0.3, 0.7, 0.4, 0.05]
    r_a, r_v = mask_ratios(conf_a, conf_v, 0.5, eta, rho, verbose=False)
    expected_a = [
        0.8 * np.tanh(2.0 * (0.9 - 0.3)),
        0.0,
        0.0,
        0.0,
        0.8 * np.tanh(2.0 * (0.6 - 0.4)),
        0.8 * np.tanh(2.0 * (0.95 - 0.05)),
    ]
    expected_v = [0.0, 0.6 * np.tanh(3.0 * (0.8 - 0.2)), 0.0, 0.0, 0.0, 0.0]
    # 0.4 vs 0.3: more confident modality below tau; 0.7 vs 0.7: no gap
    torch.testing.assert_close(
        r_a, torch.tensor(expected_a, dtype=torch.float64), rtol=0, atol=1e-15
    )
    torch.testing.assert_close(
        r_v, torch.tensor(expected_v, dtype=torch.float64), rtol=0, atol=1e-15
    )


def test_symmetric_rule_on_grid():
    r_a, r_v = mask_ratios(CONF_A, CONF_V, 0.5, 2.0, 0.9, verbose=False)
    official_a, _ = mask_ratios(CONF_A, CONF_V, 0.5, 2.0, 0.9, rule="official", verbose=False)
    for (a, v), ra, rv, oa in zip(PAIRS, r_a.tolist(), r_v.tolist(), official_a.tolist()):
        assert ra == 0.0 or rv == 0.0, "one modality per sample at most"
        assert (ra > 0) == (a > v and a >= 0.5)
        assert (rv > 0) == (v > a and v >= 0.5)
        if a > v >= 0.5:  # where the released rule masks, both agree bit for bit
            assert ra == oa
        if v > a and v >= 0.5:  # the swapped-role case the released rule cannot mask
            assert rv == mask_ratios([v], [a], 0.5, 2.0, 0.9, verbose=False).audio.item()
    assert (r_v > 0).sum() == (r_a > 0).sum(), "the grid is symmetric"


def test_symmetric_mean_mode_clips_before_averaging():
    conf_a, conf_v = [0.9, 0.3, 0.1, 0.6], [0.2, 0.3, 0.95, 0.6]
    per_sample = mask_ratios(conf_a, conf_v, 0.5, 2.0, 0.8, verbose=False)
    mean = mask_ratios(conf_a, conf_v, 0.5, 2.0, 0.8, mode="mean", verbose=False)
    assert mean.audio.tolist() == [per_sample.audio.mean().item()] * 4
    assert mean.visual.tolist() == [per_sample.visual.mean().item()] * 4
    assert (mean.audio > 0).all() and (mean.visual > 0).all()


def test_ratios_clipped_below_one():
    r_a, _ = mask_ratios([1.0, 0.9], [0.0, 0.8], 0.5, 50.0, 3.0, verbose=False)
    assert r_a.tolist()[0] == MAX_RATIO < 1.0
    assert 0.0 <= r_a.tolist()[1] < 1.0


def test_join_by_id():
    conf_a = {"clip_b": 0.9, "clip_a": 0.2, "clip_c": 0.8}
    conf_v = {"clip_a": 0.7, "clip_c": 0.1, "clip_b": 0.3}  # another order
    ratios = mask_ratios(conf_a, conf_v, 0.5, 2.0, 0.8, verbose=False)
    assert ratios.ids == ("clip_b", "clip_a", "clip_c")
    positional = mask_ratios([0.9, 0.2, 0.8], [0.3, 0.7, 0.1], 0.5, 2.0, 0.8, verbose=False)
    assert torch.equal(ratios.audio, positional.audio)
    assert torch.equal(ratios.visual, positional.visual)
    r_a, r_v = ratios.gather(["clip_c", "clip_a"])
    assert r_a.tolist() == [positional.audio[2].item(), 0.0]
    assert r_v.tolist() == [0.0, positional.visual[1].item()]
    with pytest.raises(KeyError, match="clip_z"):
        ratios.gather(["clip_z"])
    assert positional.gather(torch.tensor([2, 0]))[0].tolist() == [
        positional.audio[2].item(),
        positional.audio[0].item(),
    ]


@pytest.mark.parametrize(
    "conf_v,message",
    [
        ({"a": 0.5, "b": 0.5}, r"lack 1 sample id.*\['c'\]"),
        ({"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.5}, r"have 1 sample id.*\['d'\]"),
        ({0: 0.5, 1: 0.5, 2: 0.5}, "id type"),
    ],
)
def test_missing_or_extra_ids_are_errors(conf_v, message):
    with pytest.raises(ValueError, match=message):
        mask_ratios({"a": 0.9, "b": 0.1, "c": 0.5}, conf_v, 0.5, 1.0, 0.5, verbose=False)


def test_trackers_and_files_are_joined(tmp_path):
    trackers = []
    for labels in ([0, 1, 1], [1, 1, 0]):
        tracker = ConfidenceTracker(3)
        tracker.update([10, 11, 12], torch.eye(3, 2) * 4, torch.tensor(labels))
        tracker.end_epoch()
        trackers.append(tracker)
    trackers[1].save(tmp_path / "visual.npz")
    from_objects = mask_ratios(trackers[0], trackers[1].mean(), 0.5, 2.0, 0.8, verbose=False)
    from_file = mask_ratios(trackers[0], tmp_path / "visual.npz", 0.5, 2.0, 0.8, verbose=False)
    assert from_objects.ids == (10, 11, 12)
    assert torch.equal(from_objects.audio, from_file.audio)
    assert torch.equal(from_objects.visual, from_file.visual)
    assert isinstance(trackers[0].mean(), Confidences)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rule"):
        mask_ratios([0.5], [0.5], 0.5, 1.0, 1.0, rule="paper")
    with pytest.raises(ValueError, match="mode"):
        mask_ratios([0.5], [0.5], 0.5, 1.0, 1.0, mode="median")
    with pytest.raises(ValueError, match="eta"):
        mask_ratios([0.5], [0.5], 0.5, (1.0, 2.0, 3.0), 1.0)
    with pytest.raises(ValueError, match="same length"):
        mask_ratios([0.5, 0.2], [0.5], 0.5, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mask_ratios([0.5, 1.2], [0.5, 0.1], 0.5, 1.0, 1.0)
    with pytest.raises(TypeError, match="both"):
        mask_ratios({"a": 0.5}, [0.5], 0.5, 1.0, 1.0)


def test_summary_is_logged_and_returned(caplog, capsys):
    """The summary goes to the avkernels.fust.policy logger at INFO, nothing to stdout."""
    with caplog.at_level(logging.INFO, logger="avkernels.fust.policy"):
        ratios = mask_ratios([0.9, 0.2, 0.4, 0.8], [0.3, 0.8, 0.3, 0.1], 0.5, 2.0, 0.8)
    assert capsys.readouterr().out == ""
    printed = "\n".join(record.getMessage() for record in caplog.records)
    summary = ratios.summary()
    assert summary["samples"] == 4
    assert summary["audio_masked"] == 2 and summary["visual_masked"] == 1
    assert summary["audio_mean_ratio"] == pytest.approx(ratios.audio.mean().item())
    assert summary["audio_mean_ratio_masked"] == pytest.approx(
        ratios.audio[ratios.audio > 0].mean().item()
    )
    assert "audio masked in 2/4 samples" in printed and "visual masked in 1/4 samples" in printed
    assert str(ratios) in printed
