"""The benchmark report people read and compare: interleaved rows show the interleaved times,
misses one per line, ratios in pytest-benchmark's extra_info, compare.py over two saved runs
(benchmarks/report.py, benchmarks/conftest.py, benchmarks/compare.py)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import compare, report
from benchmarks import conftest as bench_conftest
from benchmarks.harness import Case, Comparison, Implementation


def make_case() -> Case:
    implementations = {
        key: Implementation(label, build=lambda: lambda: {})
        for key, label in (("ours", "TrackedBN"), ("torch", "nn.BatchNorm2d"), ("fast", "Fast"))
    }
    return Case(
        id="relu-cpu",
        title="BN+ReLU (2,3,4,4)",
        device=torch.device("cpu"),
        implementations=implementations,
        reference=lambda: lambda: {},
        comparisons=(
            Comparison("ours", "torch", target=0.85),
            Comparison("fast", "torch", target=0.85),
            Comparison("ours", "fast"),
        ),
    )


def timing(median: float) -> report.Timing:
    return report.Timing(median, median, median, 0.0, 5, 1, roofline_fraction=None)


TIMINGS = {
    ("relu-cpu", "ours"): timing(3e-3),  # separate runs: 3 ms vs 2 ms (a slow stretch)
    ("relu-cpu", "torch"): timing(2e-3),
    ("relu-cpu", "fast"): timing(1e-3),
}
INTERLEAVED = {
    ("relu-cpu", "ours", "torch"): report.InterleavedRatio(0.8, 20, 1.6e-3, 2e-3),
    ("relu-cpu", "fast", "torch"): report.InterleavedRatio(0.9, 20, 1.8e-3, 2e-3),
}


def rows() -> list[dict]:
    return report.comparison_rows([make_case()], TIMINGS, INTERLEAVED)


def test_interleaved_rows_show_the_interleaved_times():
    ours_vs_torch, _, ours_vs_fast = rows()
    assert ours_vs_torch["ratio"] == 0.8 and ours_vs_torch["timing"] == "interleaved"
    assert (ours_vs_torch["candidate_s"], ours_vs_torch["baseline_s"]) == (1.6e-3, 2e-3)
    assert ours_vs_fast["timing"] == "separate"
    assert ours_vs_fast["ratio"] == pytest.approx(3.0)
    assert (ours_vs_fast["candidate_s"], ours_vs_fast["baseline_s"]) == (3e-3, 1e-3)


def test_each_missed_target_on_its_own_line():
    summary = report.target_summary(rows()).split("\n")
    assert summary == [
        "Targets: 1 of 2 met.",
        "- MISSED 0.90x > 0.85x: BN+ReLU (2,3,4,4): Fast vs nn.BatchNorm2d",
    ]
    assert "Targets:" not in report.markdown(rows(), with_summary=False)


class FakeConfig:
    def __init__(self, session):
        self.stash = {bench_conftest._SESSION: session}


def saved_run() -> dict:
    """What pytest-benchmark saves for the three implementations, ratios filled in by the hook."""
    session = bench_conftest._BenchSession()
    case = make_case()
    for (_, implementation), value in TIMINGS.items():
        session.record("batch_norm", case, implementation, value)
    for (_, candidate, baseline), ratio in INTERLEAVED.items():
        comparison = Comparison(candidate, baseline, target=0.85)
        session.record_interleaved("batch_norm", case, comparison, ratio)
    output = {
        "benchmarks": [
            {
                "group": case.title,
                "extra_info": {
                    "suite": "batch_norm",
                    "case_id": case.id,
                    "implementation_id": key,
                    "implementation": case.implementations[key].label,
                },
            }
            for key in ("ours", "torch", "fast")
        ]
    }
    bench_conftest.pytest_benchmark_update_json(FakeConfig(session), [], output)
    return output


def test_ratios_go_into_extra_info():
    ours, torch_entry, _ = saved_run()["benchmarks"]
    assert ours["extra_info"]["ratios"]["torch"]["ratio"] == 0.8
    assert ours["extra_info"]["ratios"]["fast"]["timing"] == "separate"
    assert torch_entry["extra_info"]["ratios"] == {}  # a baseline only


def test_compare_shows_two_runs_side_by_side(tmp_path, capsys):
    old = saved_run()
    (tmp_path / "old.json").write_text(json.dumps(old))
    new = {"suite": "batch_norm", "comparisons": rows()}
    new["comparisons"][0] = {**new["comparisons"][0], "ratio": 0.4}
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert compare.main([str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 0
    table = capsys.readouterr().out
    assert (
        "| BN+ReLU (2,3,4,4) | TrackedBN vs nn.BatchNorm2d | <= 0.85x | 0.80x | 0.40x | 0.50 |"
        in table
    )
    assert "| BN+ReLU (2,3,4,4) | TrackedBN vs Fast | - | 3.00x | 3.00x | 1.00 |" in table


def test_compare_names_a_file_it_cannot_use(tmp_path):
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit, match="neither a ratio file"):
        compare.load_ratios(tmp_path / "other.json")


def test_cpu_rows_get_bandwidth_and_share_of_the_measured_copy():
    """4 MB a call: 2 GB/s at 2 ms; the copy-bandwidth fraction follows the interleaved time."""
    case = make_case()
    case = Case(**{**case.__dict__, "roofline_bytes": 4_000_000})
    timings = {
        key: report.Timing(t.median, t.minimum, t.mean, 0.0, 5, 1, roofline_fraction=0.1)
        for key, t in TIMINGS.items()
    }
    ours_vs_torch = report.comparison_rows([case], timings, INTERLEAVED)[0]
    assert ours_vs_torch["baseline_GBps"] == pytest.approx(2.0)
    assert ours_vs_torch["candidate_GBps"] == pytest.approx(2.5)  # 1.6 ms interleaved
    assert ours_vs_torch["candidate_roofline"] == pytest.approx(0.1 * 3e-3 / 1.6e-3)
    table = report.markdown([ours_vs_torch])
    assert "| 2.5 GB/s (19%) / 2 GB/s (10%) |" in table
