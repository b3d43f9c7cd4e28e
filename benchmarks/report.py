"""The ratio report: per-call timings, candidate/baseline rows, the environment, and its files.

``benchmarks/conftest.py`` collects a :class:`Timing` per (case, implementation) as tests run;
at the end of the session :func:`comparison_rows` turns them into one row per reported
comparison, :func:`markdown` renders the table (printed and saved) and :func:`write` saves
``<stem>.json`` and ``<stem>.md`` (and ``<stem>.png`` when matplotlib is installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from benchmarks.harness import Case

MET, MISSED, NOT_MEASURED = "met", "MISSED", "not measured"


@dataclass(frozen=True)
class Timing:
    """One implementation on one case, in seconds per call (pytest-benchmark rounds / calls)."""

    median: float
    minimum: float
    mean: float
    stddev: float
    rounds: int
    calls_per_round: int
    roofline_fraction: float | None  # roofline time / median (None: the case has no roofline)

    @classmethod
    def from_stats(cls, stats, calls_per_round: int, roofline_seconds: float | None) -> Timing:
        per_call = [
            getattr(stats, name) / calls_per_round for name in ("median", "min", "mean", "stddev")
        ]
        fraction = None if roofline_seconds is None else roofline_seconds / per_call[0]
        return cls(
            *per_call,
            rounds=stats.rounds,
            calls_per_round=calls_per_round,
            roofline_fraction=fraction,
        )


@dataclass(frozen=True)
class InterleavedRatio:
    """A candidate/baseline ratio timed interleaved (see ``conftest.py``)."""

    ratio: float  # median candidate round / median baseline round
    rounds: int  # rounds of each side
    candidate_s: float  # median candidate round, per call
    baseline_s: float  # median baseline round, per call


def comparison_rows(
    cases: Iterable[Case],
    timings: dict[tuple[str, str], Timing],
    interleaved: dict[tuple[str, str, str], InterleavedRatio],
) -> list[dict]:
    """One row per comparison of every case that had at least one implementation timed.

    ``timings`` maps (case id, implementation id) to its :class:`Timing`; ``interleaved``
    (case id, candidate id, baseline id) to the ratio timed interleaved, which is the row's
    ratio where there is one (``timing: "interleaved"``), and then the row's times (and roofline
    fractions) are the interleaved medians too, so that they agree with the ratio. Otherwise the
    ratio is candidate median / baseline median of their separate runs (``timing:
    "separate"``). ``ratio_min`` is always the fastest separate rounds' ratio.
    """
    rows = []
    for case in cases:
        for comparison in case.comparisons:
            baseline = timings.get((case.id, comparison.baseline))
            candidate = timings.get((case.id, comparison.candidate))
            paired = interleaved.get((case.id, comparison.candidate, comparison.baseline))
            ratio = ratio_min = None
            if baseline and candidate:
                ratio = candidate.median / baseline.median
                ratio_min = candidate.minimum / baseline.minimum
            candidate_s = candidate.median if candidate else None
            baseline_s = baseline.median if baseline else None
            if paired is not None:
                ratio, candidate_s, baseline_s = paired.ratio, paired.candidate_s, paired.baseline_s
            if ratio is None:
                status = NOT_MEASURED
            elif comparison.target is None:
                status = ""
            else:
                status = MET if ratio <= comparison.target else MISSED
            rows.append(
                {
                    "case": case.title,
                    "case_id": case.id,
                    "candidate_id": comparison.candidate,
                    "baseline_id": comparison.baseline,
                    "candidate": case.implementations[comparison.candidate].label,
                    "baseline": case.implementations[comparison.baseline].label,
                    "candidate_s": candidate_s,
                    "baseline_s": baseline_s,
                    "ratio": ratio,
                    "timing": "separate" if paired is None else "interleaved",
                    "interleaved_rounds": None if paired is None else paired.rounds,
                    "ratio_min": ratio_min,
                    "target": comparison.target,
                    "status": status,
                    "candidate_roofline": _roofline(candidate, candidate_s),
                    "baseline_roofline": _roofline(baseline, baseline_s),
                    "candidate_GBps": _bandwidth(case, candidate_s),
                    "baseline_GBps": _bandwidth(case, baseline_s),
                }
            )
    return rows


def _roofline(timing: Timing | None, seconds: float | None) -> float | None:
    """The roofline fraction of ``timing``'s implementation at ``seconds`` per call."""
    if timing is None or timing.roofline_fraction is None or seconds is None:
        return None
    return timing.roofline_fraction * timing.median / seconds


def _bandwidth(case: Case, seconds: float | None) -> float | None:
    """GB/s moved at the case's roofline bytes (docs/DESIGN.md, "Performance model")."""
    if case.roofline_bytes is None or seconds is None:
        return None
    return case.roofline_bytes / seconds / 1e9


def timing_rows(cases: Iterable[Case], timings: dict[tuple[str, str], Timing]) -> list[dict]:
    """Every timed implementation (per-call seconds), for the JSON file."""
    return [
        {
            "case": case.title,
            "case_id": case.id,
            "implementation": key,
            "label": impl.label,
            **asdict(timings[case.id, key]),
        }
        for case in cases
        for key, impl in case.implementations.items()
        if (case.id, key) in timings
    ]


def _format_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def _format_traffic(gigabytes_per_second: float | None, fraction: float | None) -> str:
    if gigabytes_per_second is None or fraction is None:
        return "-"
    return f"{gigabytes_per_second:.3g} GB/s ({fraction:.0%})"


def markdown(rows: list[dict], with_summary: bool = True) -> str:
    """The ratio table; a missed target reads **MISSED** and is summarised under the table
    (``with_summary``)."""
    with_roofline = any(row["candidate_roofline"] is not None for row in rows)
    header = [
        "Case",
        "Candidate",
        "Baseline",
        "Baseline time",
        "Candidate time",
        "Ratio",
        "Target",
        "Status",
    ]
    if with_roofline:
        header.append("GB/s, % of measured copy (candidate / baseline)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        status = f"**{row['status']}**" if row["status"] == MISSED else row["status"]
        cells = [
            row["case"],
            row["candidate"],
            row["baseline"],
            _format_time(row["baseline_s"]),
            _format_time(row["candidate_s"]),
            "-"
            if row["ratio"] is None
            else f"{row['ratio']:.2f}x" + ("\u2020" if row["timing"] == "interleaved" else ""),
            "-" if row["target"] is None else f"<= {row['target']:.2f}x",
            status,
        ]
        if with_roofline:
            cells.append(
                " / ".join(
                    _format_traffic(row[f"{side}_GBps"], row[f"{side}_roofline"])
                    for side in ("candidate", "baseline")
                )
            )
        lines.append("| " + " | ".join(cells) + " |")
    legend = (
        (
            "\u2020 timed interleaved with its baseline (each timed round after an untimed one of "
            "the same step), times and roofline fractions from those rounds too; other rows "
            "compare separate runs.\n\n"
        )
        if any(row["timing"] == "interleaved" for row in rows)
        else ""
    )
    summary = target_summary(rows) + "\n" if with_summary else ""
    return "\n".join(lines) + "\n\n" + legend + summary


def target_summary(rows: list[dict]) -> str:
    """``Targets: 3 of 5 met.`` then one ``- MISSED ...`` line per missed target (or a note that
    no target was measured)."""
    judged = [row for row in rows if row["status"] in (MET, MISSED)]
    if not judged:
        return "Targets: none measured in this run."
    missed = [row for row in judged if row["status"] == MISSED]
    lines = [f"Targets: {len(judged) - len(missed)} of {len(judged)} met."]
    lines += [
        f"- MISSED {row['ratio']:.2f}x > {row['target']:.2f}x: {row['case']}: "
        f"{row['candidate']} vs {row['baseline']}"
        for row in missed
    ]
    return "\n".join(lines)


def environment(
    config, load_at_start: tuple[float, float, float], copy_bandwidth: dict[str, float]
) -> dict:
    """Where and how the figures were measured."""
    benchmark_options = {
        name: config.getoption(f"benchmark_{name}", None)
        for name in ("min_rounds", "max_time", "min_time", "warmup", "disable_gc", "timer")
    }
    cuda = None
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        cuda = {
            "device": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "memory_GiB": round(properties.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    from avkernels import HAS_EXTENSION

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["pytest", *config.invocation_params.args]),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(load, 2) for load in load_at_start],
        "copy_bandwidth_GBps": {
            device: round(bandwidth / 1e9, 1) for device, bandwidth in copy_bandwidth.items()
        },
        "cuda": cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "pytest_benchmark": _version("pytest-benchmark"),
        "avkernels_cpp_extension": HAS_EXTENSION,
        "git": _git_revision(Path(str(config.rootpath))),
        "quick": config.getoption("bench_quick"),
        "benchmark_options": {key: str(value) for key, value in benchmark_options.items()},
    }


def environment_markdown(env: dict) -> str:
    cuda = env["cuda"]
    device = (
        "CPU only"
        if cuda is None
        else (f"{cuda['device']} (CUDA {cuda['cuda']}, cuDNN {cuda['cudnn']})")
    )
    bandwidths = env["copy_bandwidth_GBps"]
    lines = [
        f"- Date (UTC): {env['date']}",
        f"- Command: `{env['command']}`",
        f"- CPU: {env['cpu']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}; "
        f"load average at start {env['load_average_at_start']}",
        f"- GPU: {device}",
        "- Measured copy bandwidth (read + written): "
        + (", ".join(f"{dev}: {bw} GB/s" for dev, bw in bandwidths.items()) or "not measured"),
        f"- Versions: python {env['python']}, torch {env['torch']}, triton {env['triton']}, "
        f"pytest-benchmark {env['pytest_benchmark']}; avkernels C++ extension loaded: "
        f"{env['avkernels_cpp_extension']}; git {env['git']}",
        "- pytest-benchmark options: "
        + ", ".join(f"{key}={value}" for key, value in env["benchmark_options"].items()),
    ]
    warnings = load_warnings(env)
    return "\n".join(lines + [f"- **Warning:** {text}" for text in warnings]) + "\n"


def load_warnings(env: dict) -> list[str]:
    """Reasons not to trust the figures: quick mode, a busy machine, the reference fallback."""
    warnings = []
    if env["quick"]:
        warnings.append("quick mode (small smoke-test shapes): not the benchmark's figures.")
    if env["load_average_at_start"][0] >= 1.0:
        warnings.append(
            f"the 1-minute load average was {env['load_average_at_start'][0]} when the run "
            "started: other work shared the CPU, figures may be noisy."
        )
    if not env["avkernels_cpp_extension"]:
        warnings.append(
            "the avkernels C++ extension was not loaded: CPU figures are the "
            "PyTorch reference path, not the kernels."
        )
    return warnings


def write(
    directory: Path, stem: str, suite: str, env: dict, rows: list[dict], timings: list[dict]
) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and (with matplotlib) ``<stem>.png``; return them."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    json_path.write_text(
        json.dumps(
            {"suite": suite, "environment": env, "comparisons": rows, "timings": timings}, indent=2
        )
        + "\n"
    )
    md_path.write_text(
        f"# Benchmark ratios: {suite}\n\nRatio = candidate time / baseline time (medians per "
        "call, measured in the same run); a target is met when the ratio is at or under it.\n\n"
        + environment_markdown(env)
        + "\n"
        + markdown(rows)
    )
    written = [json_path, md_path]
    if importlib.util.find_spec("matplotlib") is None:  # no plot: the tables are the report
        return written
    from benchmarks.plot_ratios import plot_ratios

    written.append(plot_ratios(json_path, directory / f"{stem}.png"))
    return written


def cpu_model() -> str:
    """The CPU model name (Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _git_revision(root: Path) -> str | None:
    """``<commit>`` or ``<commit>+dirty`` (tracked files modified), None outside a checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")
