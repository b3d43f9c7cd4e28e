"""pytest glue for the avkernels benchmarks: one test per (case, implementation), ratio report.

A test marked ``@pytest.mark.bench_cases(factory=f)`` (``f(quick: bool) -> list[Case]``,
see ``benchmarks/harness.py``) is parametrised over every (case, implementation) pair and calls
the ``compare`` fixture, which

1. checks the implementation's result against the case's reference (a benchmark that checks
   nothing would time a wrong answer as happily as a right one),
2. warms it up outside the timed region (``torch.compile`` compiles here),
3. times it with pytest-benchmark, grouped by case (CUDA: synchronised at the end of every round),
4. records the per-call timing for the ratio report,
5. for every comparison with a target (or ``interleave=True``) in which it is the candidate,
   times it interleaved with that baseline (A A B B, B B A A, ... with the second round of each
   pair timed, for ``--benchmark-max-time`` seconds, at least ``--benchmark-min-rounds`` timed
   rounds of each): the reported ratio is the ratio of those medians. Timed
   in separate blocks, a slow minute of this shared machine lands on one side only; measured
   here, the same case read 0.60x in one run and 1.11x in the next, while interleaved runs agree.

At the end of the session each benchmark module's comparisons are printed as a ratio table
(candidate / baseline, medians from this run) and saved as ``<module>_<device>.json/.md/.png``
in a new timestamped folder under ``.benchmarks/ratios/`` (untracked): the committed figures in
``benchmarks/results/`` change only when asked (``--bench-results-dir benchmarks/results``).
Targets are reported as met or **MISSED**; they never fail the run.

Before anything imports avkernels, :mod:`benchmarks.package_under_test` picks the compiled
package (the checkout's copy when built, else the installed one) and stops the run with what to
do when there is none.

Options: ``--bench-quick`` (small smoke-test shapes; nothing saved unless ``--bench-results-dir``
is given), ``--bench-results-dir DIR``, ``--bench-no-save``, ``--bench-tag TAG`` (file-name
device part), ``--bench-threads N`` (CPU threads). pytest-benchmark's own options
(``--benchmark-min-rounds``, ``--benchmark-max-time``, ``--benchmark-disable`` to run every check
once without timing, ...) apply as usual.

On Linux/glibc the run first pins malloc's mmap and trim thresholds (:func:`_steady_malloc`):
otherwise glibc hands large freed blocks back to the OS and the next call page-faults them in
again, 0 to 1,500 faults a call, which swung single timings by 2x here. Baselines and
candidates allocate through the same malloc, so the setting is fair to both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config

from benchmarks import package_under_test, report
from benchmarks.harness import Case, Comparison, Step

COMMITTED_RESULTS_DIR = Path(__file__).parent / "results"
RUNS_DIR = package_under_test.CHECKOUT / ".benchmarks" / "ratios"  # untracked (.gitignore)
COPY_BYTES = 256 * 2**20  # well beyond any GPU's L2 or CPU's L3: the copy streams from memory
COPY_REPEATS = 20


class _BenchSession:
    """Everything the ratio report needs, filled in as the benchmarks run."""

    def __init__(self) -> None:
        self.load_at_start = os.getloadavg()
        self.cases: dict[str, dict[str, Case]] = {}  # module stem -> case id -> case, run order
        self.timings: dict[str, dict[tuple[str, str], report.Timing]] = {}
        self.copy_bandwidth: dict[str, float] = {}  # device -> bytes/s (read + written)
        # module stem -> (case id, candidate, baseline) -> ratio timed interleaved
        self.interleaved: dict[str, dict[tuple[str, str, str], report.InterleavedRatio]] = {}

    def record(self, suite: str, case: Case, implementation: str, timing: report.Timing) -> None:
        self.cases.setdefault(suite, {}).setdefault(case.id, case)
        self.timings.setdefault(suite, {})[case.id, implementation] = timing

    def record_interleaved(
        self, suite: str, case: Case, comparison: Comparison, ratio: report.InterleavedRatio
    ) -> None:
        key = (case.id, comparison.candidate, comparison.baseline)
        self.interleaved.setdefault(suite, {})[key] = ratio

    def device_copy_bandwidth(self, device: torch.device) -> float:
        """Bytes per second (read + written) of a large copy within ``device``, measured once
        (on the CPU with this run's torch threads)."""
        key = str(device)
        if key not in self.copy_bandwidth:
            self.copy_bandwidth[key] = _measure_copy_bandwidth(device)
        return self.copy_bandwidth[key]


_SESSION = pytest.StashKey[_BenchSession]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("avkernels benchmarks")
    group.addoption(
        "--bench-quick",
        action="store_true",
        help="small smoke-test shapes; results are not saved unless --bench-results-dir is given",
    )
    group.addoption(
        "--bench-results-dir",
        default=None,
        help="where to write the ratio files (default: a new timestamped folder under "
        f"{RUNS_DIR}; pass {COMMITTED_RESULTS_DIR} to update the committed figures)",
    )
    group.addoption(
        "--bench-no-save", action="store_true", help="print the ratio table only, write no files"
    )
    group.addoption(
        "--bench-tag",
        default=None,
        help="device part of the result file names (default: 'cpu' or the GPU name)",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="torch.set_num_threads for the run (default: torch's own choice)",
    )


# mallopt(3) parameters and values: keep freed memory in the heap instead of unmapping it.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TRIM_THRESHOLD = 2**31 - 1  # the largest int: never trim the heap top
MMAP_THRESHOLD = 32 * 2**20  # glibc's maximum on 64-bit: blocks below it come from the heap


def _steady_malloc() -> bool:
    """Pin glibc's malloc thresholds (see the module docstring); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without mallopt, ...)
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )


def pytest_configure(config: pytest.Config) -> None:
    try:
        package_under_test.import_avkernels()
    except package_under_test.NoCompiledAvkernels as error:
        raise pytest.UsageError(str(error)) from None
    _steady_malloc()
    config.addinivalue_line(
        "markers",
        "bench_cases(factory): parametrise a benchmark over "
        "every (case, implementation) of factory(quick)",
    )
    config.stash[_SESSION] = _BenchSession()
    config.addinivalue_line(  # raised inside Inductor's compile, not by the code measured
        "filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    )
    if config.getoption("bench_threads"):
        torch.set_num_threads(config.getoption("bench_threads"))
    # One function (e.g. BN -> ReLU) is compiled for many static shapes: past Dynamo's default
    # limit of 8 it would silently run eagerly and be timed as "compiled". Raise the limit and
    # make hitting it an error.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    # Inductor's graph caches do not key on the thread count: a kernel compiled in an earlier
    # 2-thread run keeps `omp parallel num_threads(2)` under --bench-threads=1 (measured here:
    # 20-40 ms instead of 0.08 ms on a loaded machine). Recompile instead; the C++ code cache
    # keys on the generated source, thread count included, so that stays.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False


def pytest_report_header(config: pytest.Config) -> str:
    import avkernels  # the package pytest_configure picked

    return (
        f"avkernels {avkernels.__version__}: {Path(avkernels.__file__).parent} "
        f"(C++ extension loaded: {avkernels.HAS_EXTENSION})"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("bench_cases")
    if marker is None:
        return
    names = ("case", "implementation")
    if _skipped(metafunc):  # one skipped placeholder instead of one skip line per case
        metafunc.parametrize(names, [pytest.param(None, None, id="skipped")])
        return
    cases = marker.kwargs["factory"](metafunc.config.getoption("bench_quick"))
    metafunc.parametrize(
        names,
        [
            pytest.param(case, key, id=f"{case.id}-{key}")
            for case in cases
            for key in case.implementations
        ],
    )


def _skipped(metafunc: pytest.Metafunc) -> bool:
    return any(
        mark.args and mark.args[0] is True for mark in metafunc.definition.iter_markers("skipif")
    )


@pytest.fixture
def compare(benchmark, request):
    """``compare(case, implementation)``: check, warm up, time and record one implementation."""
    session = request.config.stash[_SESSION]
    suite = _suite_name(request.node.path)

    def run(case: Case, implementation: str) -> None:
        step = _checked_step(case, implementation)
        calls = case.calls_per_round

        def timed_round() -> None:
            for _ in range(calls):
                step()
            _synchronize(case.device)

        if benchmark.enabled:
            for _ in range(case.warmup_calls):
                step()
            _synchronize(case.device)
        benchmark.group = case.title
        benchmark.extra_info.update(
            implementation=case.implementations[implementation].label,
            calls_per_round=calls,
            suite=suite,
            case_id=case.id,
            implementation_id=implementation,
        )
        benchmark(timed_round)
        if benchmark.stats is None:  # --benchmark-disable: checked and run once, not timed
            return
        roofline_seconds = None
        if case.roofline_bytes is not None:
            roofline_seconds = case.roofline_bytes / session.device_copy_bandwidth(case.device)
        timing = report.Timing.from_stats(benchmark.stats.stats, calls, roofline_seconds)
        session.record(suite, case, implementation, timing)
        options = request.config.getoption
        for comparison in case.comparisons:
            if comparison.candidate != implementation or not comparison.interleaved:
                continue
            baseline = case.implementations[comparison.baseline].build()
            ratio = _interleaved_ratio(
                step,
                baseline,
                case,
                float(options("benchmark_max_time")),
                max(int(options("benchmark_min_rounds")), INTERLEAVED_MIN_ROUNDS),
            )
            session.record_interleaved(suite, case, comparison, ratio)

    return run


# Timed rounds of each side at least, whatever the time limit: a median of 5 rounds of a 150 ms
# end-to-end step moved by 20% between comparisons of the same run.
INTERLEAVED_MIN_ROUNDS = 20


def _interleaved_ratio(
    candidate: Step, baseline: Step, case: Case, seconds: float, min_rounds: int
) -> report.InterleavedRatio:
    """Median candidate round / median baseline round, the implementations alternating.

    Each timed round follows an untimed round of the same step, so each implementation is timed
    in its own steady state (its data and recycled buffers where its previous call left them), as
    in pytest-benchmark's separate blocks, while alternating every two rounds keeps a slow
    stretch of a shared machine from landing on one side only. Timed right after the other
    implementation, a step would also pay for the other's cache footprint: at (32,512,7,7)
    channels_last BN+ReLU training, TrackedBN took 600 us after itself and 667 us after
    nn.BatchNorm2d -> ReLU, which took 734 and 742 us (2-core VM with about 20 MiB of usable L3).
    """

    def timed(step: Step) -> float:
        start = time.perf_counter()
        for _ in range(case.calls_per_round):
            step()
        _synchronize(case.device)
        return (time.perf_counter() - start) / case.calls_per_round

    for _ in range(case.warmup_calls):
        baseline()
    _synchronize(case.device)
    rounds: dict[Step, list[float]] = {candidate: [], baseline: []}
    orders = ((candidate, baseline), (baseline, candidate))
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rounds[candidate]) < min_rounds:
        for step in orders[len(rounds[candidate]) % 2]:
            timed(step)  # the untimed round before
            rounds[step].append(timed(step))
    medians = [statistics.median(rounds[step]) for step in (candidate, baseline)]
    return report.InterleavedRatio(medians[0] / medians[1], len(rounds[candidate]), *medians)


def _checked_step(case: Case, implementation: str):
    """Build the implementation's step and check its first result against the reference."""
    expected = case.reference()()
    step = case.implementations[implementation].build()
    actual = step()
    _synchronize(case.device)
    try:
        case.check(actual, expected)
    except AssertionError as error:
        label = case.implementations[implementation].label
        raise AssertionError(
            f"{label} on {case.title} does not match the reference: {error}"
        ) from None
    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_copy_bandwidth(device: torch.device) -> float:
    source = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    _synchronize(device)
    seconds = []
    for _ in range(COPY_REPEATS):
        if device.type != "cuda":
            start = time.perf_counter()
            target.copy_(source)
            seconds.append(time.perf_counter() - start)
            continue
        # CUDA events: a host timer and a synchronise would add ~10% to a 0.1 ms copy.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return 2 * COPY_BYTES / statistics.median(seconds)


def _suite_name(path: Path) -> str:
    """``test_bench_batch_norm.py`` -> ``batch_norm``."""
    return re.sub(r"^test_(bench_)?", "", path.stem)


def _results_dir(config: pytest.Config) -> Path | None:
    if config.getoption("bench_no_save"):
        return None
    explicit = config.getoption("bench_results_dir")
    if explicit:
        return Path(explicit)
    if config.getoption("bench_quick"):
        return None
    return RUNS_DIR / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def _device_tag(config: pytest.Config) -> str:
    tag = config.getoption("bench_tag")
    if tag:
        return tag
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _suite_rows(session: _BenchSession) -> dict[str, list[dict]]:
    """Each benchmark module's comparison rows (``report.comparison_rows``)."""
    return {
        suite: report.comparison_rows(
            cases.values(), session.timings[suite], session.interleaved.get(suite, {})
        )
        for suite, cases in session.cases.items()
    }


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    """Put each candidate's ratios into its ``extra_info`` in pytest-benchmark's saved runs
    (``--benchmark-autosave``, ``--benchmark-json``), for ``benchmarks/compare.py``."""
    session = config.stash.get(_SESSION, None)
    if session is None:
        return
    rows = _suite_rows(session)
    for entry in output_json["benchmarks"]:
        extra = entry["extra_info"]
        extra["ratios"] = {
            row["baseline_id"]: {
                key: row[key] for key in ("ratio", "timing", "target", "status", "baseline")
            }
            for row in rows.get(extra.get("suite"), [])
            if row["case_id"] == extra.get("case_id")
            and row["candidate_id"] == extra.get("implementation_id")
        }


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the ratios are what counts
def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    session = config.stash.get(_SESSION, None)
    if session is None or not session.timings:
        return
    env = report.environment(config, session.load_at_start, session.copy_bandwidth)
    directory = _results_dir(config)
    summaries = []
    for suite, rows in _suite_rows(session).items():
        terminalreporter.write_sep("=", f"ratios: {suite} (candidate / baseline, this run)")
        terminalreporter.write_line(report.markdown(rows, with_summary=False))
        summaries.append((suite, report.target_summary(rows)))
        if directory is not None:
            cases = session.cases[suite].values()
            written = report.write(
                directory,
                f"{suite}_{_device_tag(config)}",
                suite,
                env,
                rows,
                report.timing_rows(cases, session.timings[suite]),
            )
            terminalreporter.write_line("written: " + ", ".join(map(str, written)))
    terminalreporter.write_sep("=", "avkernels targets (ratios timed in this run)")
    for warning in report.load_warnings(env):
        terminalreporter.write_line(f"Warning: {warning}", yellow=True)
    for suite, summary in summaries:
        terminalreporter.write_line(f"{suite}: {summary}")
