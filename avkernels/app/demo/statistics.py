"""Statistics over the demo's seeds (docs/DESIGN.md "Audio-visual setup"): mean, 95%
t-interval, and the verdict of a paired difference. Plain Python: no scipy, and
``torch.distributions.StudentT`` has no ``icdf``."""

from __future__ import annotations

import math

# Two-sided 95% critical values t(0.975, df) for df = 1..30, from the NIST/SEMATECH
# e-Handbook of Statistical Methods, section 1.3.6.7.2 "Critical Values of the Student's t
# Distribution" (the 0.975 column).
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip

VERDICTS = ("better", "worse", "no difference shown")


def t_quantile_975(df: int) -> float:
    """t(0.975, df); past the table, df 30's value (slightly wider than exact: conservative)."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df >= 1), got df {df}")
    return T_975[min(df, len(T_975)) - 1]


def mean_interval(values) -> tuple:
    """(mean, [lo, hi]): the mean of ``values`` and its 95% t-interval (sample standard
    deviation, n - 1 degrees of freedom)."""
    values = [float(v) for v in values]
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval over seeds needs at least 2 seeds, got {n}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, [mean - half, mean + half]


def verdict(interval, higher_is_better: bool = True) -> str:
    """ "better" / "worse" when the interval of (new - baseline) excludes 0, else "no
    difference shown"; ``higher_is_better`` False for counts such as dead channels."""
    lo, hi = interval
    if lo > 0:
        return VERDICTS[0] if higher_is_better else VERDICTS[1]
    if hi < 0:
        return VERDICTS[1] if higher_is_better else VERDICTS[0]
    return VERDICTS[2]


def measurement(name: str, per_seed) -> dict:
    """One number over the seeds: per seed, mean and 95% interval."""
    mean, ci95 = mean_interval(per_seed)
    return {"name": name, "per_seed": [float(v) for v in per_seed], "mean": mean, "ci95": ci95}


def paired_claim(name: str, new, baseline, higher_is_better: bool = True) -> dict:
    """The claim "new vs baseline": their per-seed difference (paired by seed), its mean,
    95% interval and verdict, with both sides' values kept."""
    if len(new) != len(baseline):
        raise ValueError(f"{name}: {len(new)} values against {len(baseline)}; pair them by seed")
    claim = measurement(name, [a - b for a, b in zip(new, baseline)])
    claim["verdict"] = verdict(claim["ci95"], higher_is_better)
    claim["higher_is_better"] = higher_is_better
    claim["new"] = [float(v) for v in new]
    claim["baseline"] = [float(v) for v in baseline]
    return claim
