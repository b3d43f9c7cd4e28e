"""The demo's statistics over seeds against hand computation (no scipy)."""

from __future__ import annotations

import math

import pytest

from avkernels.app.demo.statistics import mean_interval, paired_claim, t_quantile_975, verdict


def test_t_interval_of_three_values_by_hand():
    # values 1, 2, 6: mean 3, sample sd sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7),
    # half width t(0.975, 2) * sqrt(7) / sqrt(3) = 4.303 * 1.527525 = 6.572941
    mean, (lo, hi) = mean_interval([1, 2, 6])
    assert mean == 3
    assert math.isclose(hi - mean, 4.303 * math.sqrt(7 / 3), rel_tol=1e-12)
    assert math.isclose(mean - lo, 6.572941, rel_tol=1e-6)


def test_t_quantiles_from_the_table_and_past_it():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(30) == 2.042
    assert t_quantile_975(100) == 2.042  # conservative beyond the table
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval([0.5])


@pytest.mark.parametrize(
    "interval, higher_is_better, expected",
    [
        ((0.01, 0.2), True, "better"),
        ((-0.2, -0.01), True, "worse"),
        ((-0.1, 0.2), True, "no difference shown"),
        ((0.01, 0.2), False, "worse"),
        ((-0.2, -0.01), False, "better"),
    ],
)
def test_verdict_needs_an_interval_excluding_zero(interval, higher_is_better, expected):
    assert verdict(interval, higher_is_better) == expected


def test_paired_claim_is_the_interval_of_the_per_seed_differences():
    # differences 0.10, 0.12, 0.14: mean 0.12, sd 0.02, half width 4.303 * 0.02 / sqrt(3)
    claim = paired_claim("x", [0.60, 0.62, 0.64], [0.50, 0.50, 0.50])
    assert [round(d, 12) for d in claim["per_seed"]] == [0.10, 0.12, 0.14]
    half = 4.303 * 0.02 / math.sqrt(3)
    assert math.isclose(claim["ci95"][0], 0.12 - half) and math.isclose(
        claim["ci95"][1], 0.12 + half
    )
    assert claim["verdict"] == "better"
    # the same means unpaired would overlap; pairing by seed removes the shared seed effect
    noisy = paired_claim("y", [0.600, 0.711, 0.802], [0.58, 0.69, 0.78])
    assert noisy["verdict"] == "better"
    with pytest.raises(ValueError, match="pair them by seed"):
        paired_claim("z", [0.1, 0.2], [0.1])
