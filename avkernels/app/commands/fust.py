"""``avkernels fust MANIFEST --out DIR``: two-stage Fusion Tuning end to end on a manifest.

``DIR/stage1``: each encoder fine-tuned alone, recording per-sample confidences;
``DIR/stage2``: joint training from the stage-1 encoders with the FusT mask ratios; with
``--baseline`` also ``DIR/joint``: naive joint training from the same initial encoders. The
options are those of ``avkernels train`` (they apply to every stage, except that
``--stage1-epochs``/``--stage1-lr`` and ``--stage2-epochs``/``--stage2-lr`` override
``--epochs``/``--lr`` for one stage; the baseline takes stage 2's); ``--resume`` continues
whichever stage was interrupted and skips the finished ones. Writes ``DIR/summary.json``.
Runs under ``torchrun`` like ``avkernels train`` (one process group for every stage).
"""

from __future__ import annotations

import argparse
import json

from avkernels.app.commands import arguments as types
from avkernels.app.commands import run_settings
from avkernels.app.commands.tensorboard_log import require_tensorboard
from avkernels.app.commands.train import (
    add_config_arguments,
    add_data_arguments,
    add_run_folder_arguments,
    check_fits_data,
    config_from_args,
    open_datasets,
    resolve_data_settings,
    run_stage,
    summary_line,
)
from avkernels.app.errors import RunError
from avkernels.files import atomic_write_text

NAME = "fust"
HELP = "two-stage Fusion Tuning (stage 1, then stage 2; optionally the naive joint baseline)"

# Set by the pipeline itself, not by options.
_PIPELINE_FIELDS = {"stage", "init_from", "audio_confidence", "visual_confidence", "modalities"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser)
    parser.add_argument(
        "--out",
        type=types.output_dir,
        required=True,
        help="directory of the runs (stage1/, stage2/, joint/)",
    )
    add_run_folder_arguments(parser)
    for stage in ("stage1", "stage2"):
        baseline = " and of the baseline" if stage == "stage2" else ""
        parser.add_argument(
            f"--{stage}-epochs",
            type=types.positive_int,
            default=None,
            help=f"epochs of {stage}{baseline} (default: --epochs)",
        )
        parser.add_argument(
            f"--{stage}-lr",
            type=types.positive_float,
            default=None,
            help=f"learning rate of {stage}{baseline} (default: --lr)",
        )
    parser.add_argument(
        "--baseline", action="store_true", help="also train the naive joint baseline into DIR/joint"
    )
    add_config_arguments(parser, skip=_PIPELINE_FIELDS)


def run(args: argparse.Namespace) -> int:
    from avkernels.app.training import CHECKPOINT, torchrun_process_group

    types.check_device(args.device)
    if args.tensorboard:
        require_tensorboard()
    stages = ["stage1", "stage2"] + (["joint"] if args.baseline else [])
    types.check_writable(args.out)
    replaced, resumed = {}, {}
    for stage in stages:
        run_dir = args.out / stage
        resumed[stage] = args.resume and (run_dir / CHECKPOINT).is_file()
        stage_args = argparse.Namespace(**{**vars(args), "resume": resumed[stage]})
        replaced[stage] = run_settings.check_run_folder(run_dir, stage_args)
    resolve_data_settings(args, [args.out / stage for stage in stages])
    with torchrun_process_group(args.device) as device:
        args.device = device
        return _run_stages(args, stages, resumed, replaced)


def _stage_settings(args: argparse.Namespace, stage: str) -> dict:
    """The fields the pipeline sets for ``stage``: its source and its own epochs and lr."""
    fixed = {"init_from": str((args.out / "stage1").resolve())} if stage == "stage2" else {}
    own = "stage1" if stage == "stage1" else "stage2"  # the baseline trains like stage 2
    for field in ("epochs", "lr"):
        value = getattr(args, f"{own}_{field}")
        if value is not None:
            fixed[field] = value
    return fixed


def _run_stages(args: argparse.Namespace, stages: list, resumed: dict, replaced: dict) -> int:
    from avkernels.distributed import Ranks

    main_rank = Ranks.current().is_main
    train_data, eval_data = open_datasets(args)
    num_classes = getattr(train_data, "num_classes", None)
    runs = []  # every stage's config is checked before stage 1 starts
    for stage in stages:
        stage_args = argparse.Namespace(**{**vars(args), "resume": resumed[stage]})
        config = config_from_args(
            stage_args,
            args.out / stage,
            num_classes=num_classes,
            stage=stage,
            **_stage_settings(args, stage),
        )
        check_fits_data(config, train_data)
        runs.append((stage, config, stage_args))
    summary = {}
    for stage, config, stage_args in runs:
        run_dir = args.out / stage
        history = run_stage(config, train_data, eval_data, run_dir, stage_args, replaced[stage])
        summary[stage] = history
        if main_rank:
            print(summary_line(stage, history))
    if not main_rank:
        return 0
    try:
        atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    except OSError as error:
        raise RunError(
            f"cannot write {args.out / 'summary.json'}: {error.strerror or error}"
        ) from None
    print(f"wrote {args.out}")
    return 0
