"""``avkernels demo [--out DIR] [--quick] [--seeds N] [--seed S]``: the paper's story end
to end on AV-Digits, over several seeds.

Pre-trains a visual ResNet-18, initialises the audio encoder from it and diagnoses its dead
channels, fine-tunes audio from random init vs pre-trained vs pre-trained + ABRi, runs FusT
(stage 1 confidences, mask ratios, stage 2 vs naive joint training, linear probes), times
TrackedBN against nn.BatchNorm2d, and writes ``report.md``, ``report.html`` (plots inline) and
``report.json`` into ``--out``. Every number is measured in the run, for each seed, and
stated with its mean and 95% interval over the seeds; re-running with the same
``--out`` resumes an interrupted run and skips finished steps (see :mod:`avkernels.app.demo`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from avkernels.app.commands import arguments as types
from avkernels.app.errors import CommandError, RunError

NAME = "demo"
HELP = (
    "run the paper's story end to end on AV-Digits (pre-training, dead channels, ABRi, "
    "FusT) and write a report"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=types.output_dir,
        default=Path("avkernels-demo"),
        help="folder of the runs and the report (default ./avkernels-demo); "
        "an existing demo folder is resumed",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny data, models and epochs (about a minute; numbers are noise)",
    )
    parser.add_argument(
        "--seeds",
        type=types.positive_int,
        default=None,
        help="how many seeds run every step, the intervals are over them (at least 2; "
        "default 3, 2 with --quick); a re-run with more seeds reuses the finished ones",
    )
    parser.add_argument(
        "--seed", type=types.seed, default=0, help="the first seed (default 0): seeds SEED.."
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )


def run(args: argparse.Namespace) -> int:
    types.check_writable(args.out)
    try:
        from avkernels.app.data import DataError
        from avkernels.app.demo import DemoError, run_demo
    except ImportError as error:
        raise CommandError(
            f"the demo needs the audio-visual extras ({error}); install them "
            "with `pip install 'avkernels[av]'`"
        ) from None
    try:
        run_demo(
            args.out,
            quick=args.quick,
            seeds=args.seeds,
            first_seed=args.seed,
            progress=args.progress,
        )
    except (DemoError, DataError) as error:
        raise CommandError(str(error)) from None
    except ImportError as error:
        raise CommandError(
            f"the demo needs the audio-visual extras ({error}); install them "
            "with `pip install 'avkernels[av]'`"
        ) from None
    except OSError as error:
        raise RunError(f"cannot write into {args.out}: {error.strerror or error}") from None
    for name in ("report.md", "report.html", "report.json"):
        print(f"wrote {args.out / name}")
    return 0
