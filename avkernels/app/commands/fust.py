"""``avkernels fust MANIFEST --out DIR``: two-stage Fusion Tuning end to end on a manifest.

``DIR/stage1``: each encoder fine-tuned alone, recording per-sample confidences;
``DIR/stage2``: joint training from the stage-1 encoders with the FusT mask ratios; with
``--baseline`` also ``DIR/joint``: naive joint training from the same initial encoders. The
options are those of ``avkernels train`` (they apply to every stage); ``--resume`` continues
whichever stage was interrupted and skips the finished ones. Writes ``DIR/summary.json``.
Runs under ``torchrun`` like ``avkernels train`` (one process group for every stage).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from avkernels.app.cli import CommandError
from avkernels.app.commands.train import (
    add_config_arguments,
    add_data_arguments,
    config_from_args,
    open_datasets,
    run_stage,
    summary_line,
)
from avkernels.files import atomic_write_text

NAME = "fust"
HELP = "two-stage Fusion Tuning (stage 1, then stage 2; optionally the naive joint baseline)"

# Set by the pipeline itself, not by options.
_PIPELINE_FIELDS = {"stage", "init_from", "audio_confidence", "visual_confidence", "modalities"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument(
        "--out", type=Path, required=True, help="directory of the runs (stage1/, stage2/, joint/)"
    )
    parser.add_argument(
        "--baseline", action="store_true", help="also train the naive joint baseline into DIR/joint"
    )
    add_config_arguments(parser, skip=_PIPELINE_FIELDS)


def run(args: argparse.Namespace) -> int:
    from avkernels.app.training import torchrun_process_group

    with torchrun_process_group(args.device) as device:
        args.device = device
        return _run_stages(args)


def _run_stages(args: argparse.Namespace) -> int:
    from avkernels.app.training import CHECKPOINT
    from avkernels.distributed import Ranks

    main_rank = Ranks.current().is_main
    train_data, eval_data = open_datasets(args)
    num_classes = getattr(train_data, "num_classes", None)
    stages = [("stage1", {}), ("stage2", {"init_from": str((args.out / "stage1").resolve())})]
    if args.baseline:
        stages.append(("joint", {}))
    if not args.resume:
        taken = [str(args.out / name) for name, _ in stages if (args.out / name).exists()]
        if taken:
            raise CommandError(
                f"{', '.join(taken)} already exist: add --resume to continue, "
                "or choose another --out"
            )
    summary = {}
    for stage, fixed in stages:
        run_dir = args.out / stage
        stage_args = argparse.Namespace(**vars(args))
        stage_args.resume = args.resume and (run_dir / CHECKPOINT).is_file()
        config = config_from_args(
            stage_args, run_dir, num_classes=num_classes, stage=stage, **fixed
        )
        history = run_stage(config, train_data, eval_data, run_dir, stage_args)
        summary[stage] = history
        if main_rank:
            print(summary_line(stage, history))
    if not main_rank:
        return 0
    try:
        atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    except OSError as error:
        raise CommandError(
            f"cannot write {args.out / 'summary.json'}: {error.strerror or error}"
        ) from None
    print(f"wrote {args.out}")
    return 0
