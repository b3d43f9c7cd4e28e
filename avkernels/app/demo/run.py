"""``run_demo``: the demo's output folder checks, the steps in order for each seed (each
cached in ``OUT/seed-<seed>/steps/<step>.json``, so a re-run skips the steps a seed finished;
each seed holds out its own test speakers, so builds its own AV-Digits), the claims over the
seeds, and the report."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy
import torch

from avkernels import HAS_EXTENSION, __version__
from avkernels.app.data import cache_folder
from avkernels.app.demo.context import Demo
from avkernels.app.demo.findings import claims, measurements
from avkernels.app.demo.report import REPORT_VERSION, write_report
from avkernels.app.demo.settings import DEFAULT_SEEDS, DemoError, DemoSettings, settings
from avkernels.app.demo.steps import (
    step_data,
    step_fust,
    step_kernels,
    step_pretrain,
    step_transfer,
)
from avkernels.files import atomic_write_text


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "avkernels": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "cpp_extension": HAS_EXTENSION,
        "cuda_available": torch.cuda.is_available(),
    }


def _check_data(seed_out: Path, av_digits: str) -> None:
    """Every step of one seed must use one AV-Digits build: installing or removing a voice
    package between two invocations makes a new build (another folder name), and resuming on it
    would mix two datasets in one seed's results."""
    record = seed_out / "dataset.json"
    if record.is_file():
        try:
            saved = json.loads(record.read_text(encoding="utf-8")).get("av_digits")
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved != av_digits:
            raise DemoError(
                f"{seed_out} was run on another AV-Digits build ({saved}; now {av_digits}: "
                "voices were installed or removed since); choose another --out or "
                "delete it"
            )
        return
    if (seed_out / "steps").exists():
        raise DemoError(
            f"{seed_out} holds demo steps but no record of their AV-Digits build (made "
            "by an older avkernels); choose another --out or delete it"
        )
    atomic_write_text(record, json.dumps({"av_digits": av_digits}, indent=2) + "\n")


def _check_out(out: Path, demo_settings: DemoSettings) -> None:
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file; give a folder (new, or a demo folder to resume)")
    marker = out / "demo.json"
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if saved != demo_settings.sizes():
            raise DemoError(
                f"{out} holds a demo run with other settings (e.g. --quick vs "
                "default); choose another --out or delete it"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise DemoError(f"{out} is not empty and holds no demo run; choose another --out")


STEPS = {
    "pretrain": step_pretrain,
    "transfer": step_transfer,
    "fust": step_fust,
    "kernels": step_kernels,
}


def _run_seed(demo: Demo, timings: dict) -> dict:
    """Every step for one seed (finished ones read back); returns the seed's sections."""
    demo.out.mkdir(parents=True, exist_ok=True)
    _check_data(demo.out, cache_folder(config=demo.settings.data).name)
    started = time.perf_counter()
    demo.sections["data"] = step_data(demo)  # the data in memory: loaded at every invocation
    timings["data"] = timings.get("data", 0.0) + time.perf_counter() - started
    data = demo.sections["data"]
    demo.log(
        f"  seed {demo.settings.seed} data: AV-Digits {data['clips']}, test speakers "
        f"{', '.join(data['test_speakers'])} ({time.perf_counter() - started:.0f} s)"
    )
    for step, run_step in STEPS.items():
        path = demo.section_path(step)
        if path.is_file():
            section = json.loads(path.read_text(encoding="utf-8"))
            demo.log(f"  seed {demo.settings.seed} {step}: done earlier, skipped")
        else:
            demo.log(f"  seed {demo.settings.seed} {step}: running")
            step_started = time.perf_counter()
            section = run_step(demo)
            section["seconds"] = time.perf_counter() - step_started
            atomic_write_text(path, json.dumps(section, indent=2) + "\n")
        demo.sections[step] = section
        timings[step] = timings.get(step, 0.0) + section["seconds"]
    return demo.sections


def run_demo(
    out,
    quick: bool = False,
    seeds: int | None = None,
    first_seed: int = 0,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) the demo into ``out`` for ``seeds`` seeds from ``first_seed``
    (default: ``DEFAULT_SEEDS``); write the report; return report.json's dict."""
    out = Path(out)
    demo_settings = settings(quick, first_seed)
    seeds = DEFAULT_SEEDS[demo_settings.mode] if seeds is None else seeds
    if seeds < 2:
        raise DemoError(
            f"--seeds {seeds}: a claim needs an interval over at least 2 seeds; give --seeds 2 "
            "or more"
        )
    seed_list = list(range(first_seed, first_seed + seeds))
    _check_out(out, demo_settings)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "demo.json", json.dumps(demo_settings.sizes(), indent=2) + "\n")
    threads = torch.get_num_threads()
    # Tiny kernels on a shared CPU: one thread is several times faster than contending for two.
    torch.set_num_threads(1)
    started = time.perf_counter()
    timings = {}
    per_seed = {}
    try:
        measured_on = environment()
        log(f"avkernels demo ({demo_settings.mode}, seeds {seed_list}) -> {out}")
        for seed in seed_list:
            demo = Demo(out / f"seed-{seed}", settings(quick, seed), progress, log)
            per_seed[seed] = _run_seed(demo, timings)
    finally:
        torch.set_num_threads(threads)
    sections = list(per_seed.values())
    report = {
        "version": REPORT_VERSION,
        "mode": demo_settings.mode,
        "seeds": seed_list,
        "settings": demo_settings.sizes(),
        "environment": measured_on,
        "data": per_seed[seed_list[0]]["data"],
        # Computed at every invocation, so a resumed run states them the same way.
        "claims": claims(sections),
        "measurements": measurements(sections),
        "per_seed": {str(seed): section for seed, section in per_seed.items()},
        "timings": {"steps": timings, "this_invocation_seconds": time.perf_counter() - started},
    }
    write_report(out, report)
    return report
