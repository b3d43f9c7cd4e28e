"""``avkernels train stage1|stage2|joint MANIFEST --out DIR``: one training run on a manifest.

Every :class:`~avkernels.app.training.TrainConfig` field is an option (``--lr``,
``--mask-target``...); with ``--resume`` the run's saved ``config.json`` is the starting point
and an option given again must keep its value. Ctrl-C stops after the current step with a
checkpoint (exit 130); ``--resume`` continues exactly there.

Under ``torchrun --nproc_per_node N avkernels ...`` (or ``python -m avkernels.app``) every
process joins the process group (:func:`~avkernels.app.training.torchrun_process_group`) and
trains with DDP; ``--batch-size`` stays the global batch, and rank 0 alone prints and writes the
run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from avkernels.app.commands import arguments as types
from avkernels.app.commands import run_settings
from avkernels.app.commands.tensorboard_log import TensorBoardLog, require_tensorboard
from avkernels.app.errors import CommandError, RunError

NAME = "train"
HELP = "train one run on a manifest: FusT stage 1 or stage 2, or naive joint training"

# One line of help per TrainConfig field (defaults are appended).
FIELD_HELP = {
    "num_classes": "classes (default: from the manifest's labels)",
    "epochs": "training epochs",
    "batch_size": "samples per batch (under torchrun: the global batch, split over the processes)",
    "seed": "seed of the initialisation, data order and masks",
    "optimizer": "optimizer",
    "lr": "learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
    "bn_weight_decay": "weight decay of the BatchNorm parameters (default: --weight-decay)",
    "schedule": "learning-rate schedule, stepped every epoch",
    "lr_step": "epochs between learning-rate drops (--schedule step)",
    "lr_gamma": "factor of each drop (--schedule step)",
    "audio_arch": "audio encoder",
    "visual_arch": "visual encoder",
    "width": "encoder width (64 = ResNet; smaller for quick experiments)",
    "visual_channels": "colour channels of the frames",
    "audio_init": "checkpoint of the audio encoder (torchvision, official or avkernels layout)",
    "visual_init": "checkpoint of the visual encoder",
    "adapt_first_conv": "how RGB stem weights become the audio encoder's one channel",
    "init_from": "run directory (or checkpoint) whose audio_net/visual_net start this run "
    "(stage 2: the stage-1 run)",
    "abri": "modalities whose encoder gets ABRi",
    "abri_granularity": "ABRi blend weight alpha: one per layer or one per channel",
    "modalities": "stage 1: modalities to fine-tune",
    "audio_confidence": "stage 2: audio confidence file (default: from --init-from)",
    "visual_confidence": "stage 2: visual confidence file (default: from --init-from)",
    "mask_threshold": "stage 2: tau, the confidence an easy sample's stronger modality reaches",
    "mask_eta": "stage 2: eta (audio, visual)",
    "mask_rho": "stage 2: rho, the largest ratio (audio, visual)",
    "mask_rule": "stage 2: mask-ratio rule",
    "mask_mode": "stage 2: per-sample ratios or their dataset mean",
    "mask_target": "stage 2: mask input patches (official), fused features, or both",
    "audio_patch_grid": "stage 2: patch grid over (frames, mel) (32 16: 32x8 patches on 1024x128)",
    "visual_patch_grid": "stage 2: patch grid over (H, W) (22 22: 10x10 patches on 224x224)",
    "feature_group": "stage 2: features per masked group (--mask-target features/both)",
    "checkpoint_every": "also checkpoint every N steps (0: at epoch ends only)",
    "probe_epochs": "epochs of the final linear probes of each encoder (0: none)",
    "probe_lr": "learning rate of the linear probes",
    "sync_bn": "under torchrun: BN statistics of the whole global batch (N processes then train "
    "as one does)",
    "precision": "training steps in fp32, bf16 (autocast, CPU or GPU) or fp16 (autocast with "
    "a gradient scaler, GPU only); evaluation stays fp32",
    "channels_last": "model and inputs in channels_last memory format",
}
# The argument type of each TrainConfig field that is a number or a file (the others take
# choices or names); the pairs take two values of it.
FIELD_TYPES = {
    "num_classes": types.positive_int,
    "epochs": types.positive_int,
    "batch_size": types.positive_int,
    "seed": types.seed,
    "lr": types.positive_float,
    "momentum": types.probability,
    "weight_decay": types.non_negative_float,
    "bn_weight_decay": types.non_negative_float,
    "lr_step": types.positive_int,
    "lr_gamma": types.positive_float,
    "width": types.positive_int,
    "audio_init": types.existing_file,
    "visual_init": types.existing_file,
    "init_from": types.existing_path,
    "audio_confidence": types.existing_file,
    "visual_confidence": types.existing_file,
    "mask_threshold": types.probability,
    "mask_eta": types.non_negative_float,
    "mask_rho": types.probability,
    "audio_patch_grid": types.positive_int,
    "visual_patch_grid": types.positive_int,
    "feature_group": types.positive_int,
    "checkpoint_every": types.non_negative_int,
    "probe_epochs": types.non_negative_int,
    "probe_lr": types.positive_float,
}
_PAIRS = ("mask_eta", "mask_rho", "audio_patch_grid", "visual_patch_grid")
RGB = 3  # channels of the frames the visual front end reads (avkernels.app.data.visual)
_MODALITY_LISTS = ("abri", "modalities")
_PATH_FIELDS = ("audio_init", "visual_init", "init_from", "audio_confidence", "visual_confidence")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from avkernels.app.training import STAGES

    parser.add_argument(
        "stage",
        choices=STAGES,
        help="stage1: uni-modal fine-tuning with confidences; stage2: FusT "
        "joint training with masking; joint: naive joint training",
    )
    add_data_arguments(parser)
    parser.add_argument("--out", type=types.output_dir, required=True, help="run directory")
    add_run_folder_arguments(parser)
    add_config_arguments(parser, skip={"stage"})


def add_run_folder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run that --out already holds (its files are deleted first)",
    )
    parser.add_argument(
        "--allow-data-changes",
        action="store_true",
        help="with --resume: continue although the data settings differ from the saved ones",
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Manifest, splits, front-end settings, device and run control (shared with ``fust``)."""
    parser.add_argument("manifest", type=types.manifest_file, help="a manifest (.csv or .jsonl)")
    parser.add_argument(
        "--config",
        action=run_settings.ConfigFile,
        default=None,
        help="a TOML file of option values (keys: the option names without '--'); "
        "options on the command line win",
    )
    parser.add_argument("--train-split", default="train", help="training split (default train)")
    parser.add_argument(
        "--eval-split",
        default=None,
        help="split evaluated after every epoch (default: test, when the "
        "manifest has it); 'none' to skip",
    )
    parser.add_argument(
        "--fbank-stats",
        default=None,
        help=f"audio normalisation statistics (default: {run_settings.FBANK_STATS} next to "
        f"the manifest; '{run_settings.OFFICIAL_STATS}': the official Kinetics-Sounds values)",
    )
    data_help = {
        "mel_bins": "fbank mel bins",
        "target_length": "fbank frames per clip",
        "sample_rate": "audio sample rate",
        "image_size": "frame side",
        "frames": "frames per clip",
    }
    for name, default in run_settings.DATA_DEFAULTS.items():
        parser.add_argument(
            run_settings.option(name),
            type=types.positive_int,
            default=None,
            help=f"{data_help[name]} (default: the resumed run's, the dataset's build.json, "
            f"else {default})",
        )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the output directory where it stopped",
    )
    parser.add_argument(
        "--device",
        type=types.device,
        default=None,
        help="default: cuda if available, else cpu (under torchrun: cuda:LOCAL_RANK)",
    )
    parser.add_argument(
        "--num-workers", type=types.non_negative_int, default=0, help="DataLoader workers"
    )
    parser.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="clips with a missing or unreadable file: fail (default) or skip them (a warning "
        "lists them)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: when stderr is a terminal)",
    )
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log each epoch's metrics as TensorBoard scalars in RUN_DIR/tensorboard "
        "(needs: pip install tensorboard)",
    )


def add_config_arguments(parser: argparse.ArgumentParser, skip=frozenset()) -> None:
    """One option per TrainConfig field, default None (= the config's or the saved value)."""
    from avkernels.app.training import CHOICES, MODALITIES, TrainConfig

    group = parser.add_argument_group("training configuration (TrainConfig fields)")
    for field in dataclasses.fields(TrainConfig):
        if field.name in skip:
            continue
        option = "--" + field.name.replace("_", "-")
        help_text = FIELD_HELP[field.name]
        if "default" not in help_text and field.default is not dataclasses.MISSING:
            help_text += f" (default {_shown(field.default)})"
        if field.name in _MODALITY_LISTS:
            group.add_argument(option, nargs="*", choices=MODALITIES, default=None, help=help_text)
        elif field.name in _PAIRS:
            group.add_argument(
                option,
                nargs=2,
                type=FIELD_TYPES[field.name],
                default=None,
                metavar=("AUDIO", "VISUAL") if field.name.startswith("mask") else ("ROWS", "COLS"),
                help=help_text,
            )
        elif field.default is None:
            group.add_argument(option, type=FIELD_TYPES[field.name], default=None, help=help_text)
        elif isinstance(field.default, bool):
            group.add_argument(
                option, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            # num_classes, the one field without a default, is an int
            kind = FIELD_TYPES.get(field.name, type(field.default))
            group.add_argument(
                option, type=kind, default=None, choices=CHOICES.get(field.name), help=help_text
            )


def _shown(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


def run(args: argparse.Namespace) -> int:
    from avkernels.app.training import torchrun_process_group
    from avkernels.distributed import Ranks

    types.check_device(args.device)
    if args.tensorboard:
        require_tensorboard()
    replaced = run_settings.check_run_folder(args.out, args)
    resolve_data_settings(args, [args.out])
    with torchrun_process_group(args.device) as device:
        args.device = device
        train_data, eval_data = open_datasets(args)
        config = config_from_args(
            args, args.out, stage=args.stage, num_classes=getattr(train_data, "num_classes", None)
        )
        check_fits_data(config, train_data)
        history = run_stage(config, train_data, eval_data, args.out, args, replaced)
        if Ranks.current().is_main:
            print(summary_line(args.stage, history))
            print(f"wrote {args.out}")
    return 0


# --- shared with `avkernels fust` ---------------------------------------------------------------


def resolve_data_settings(args: argparse.Namespace, run_dirs: list[Path]) -> None:
    """The data settings of this run: given, else those of the resumed run (the first of
    ``run_dirs`` that has them), else the dataset's build.json, else the defaults."""
    saved = {}
    if args.resume:
        saved = next(filter(None, map(run_settings.read_settings, run_dirs)), {})
    run_settings.resolve_data_settings(args, saved)


def open_datasets(args: argparse.Namespace):
    """(train, eval or None) AVDatasets of the manifest; CommandError for every data problem."""
    from avkernels.app.data import (
        AudioConfig,
        AVDataset,
        ClipError,
        DataError,
        VisualConfig,
        read_manifest,
    )

    manifest = args.manifest
    try:
        audio = AudioConfig(args.sample_rate, args.mel_bins, args.target_length)
        stats = run_settings.fbank_stats(args)
        if stats is not None:
            audio = audio.with_stats(stats)
        visual = VisualConfig(frames_per_clip=args.frames, size=args.image_size)
        splits = {record.split for record in read_manifest(manifest)}
        if args.train_split not in splits:
            raise CommandError(
                f"manifest {manifest} has no split {args.train_split!r} "
                f"(splits: {sorted(splits)}); choose one with --train-split"
            )
        on_error = "raise" if args.on_error == "fail" else "skip"
        train_data = AVDataset(manifest, args.train_split, audio, visual, on_error=on_error)
        eval_split = args.eval_split
        if eval_split is None:
            eval_split = "test" if "test" in splits else "none"
        eval_data = None
        if eval_split != "none":
            if eval_split not in splits:
                raise CommandError(
                    f"manifest {manifest} has no split {eval_split!r} "
                    f"(splits: {sorted(splits)}); choose one with --eval-split "
                    "or pass --eval-split none"
                )
            eval_data = AVDataset(manifest, eval_split, audio, visual, on_error=on_error)
    except ClipError as error:
        raise CommandError(
            f"{error}; fix the file or the manifest, or pass --on-error skip to leave such "
            "clips out"
        ) from None
    except (DataError, ValueError) as error:
        raise CommandError(str(error)) from None
    args.resolved_eval_split = eval_split
    return train_data, eval_data


def check_fits_data(config, train_data) -> None:
    """What the config must agree on with the dataset, checked before the model is built."""
    classes = getattr(train_data, "num_classes", config.num_classes)
    if config.num_classes < classes:
        raise CommandError(
            f"--num-classes {config.num_classes}: the manifest has labels up to {classes - 1}, "
            f"so at least {classes} classes; pass --num-classes {classes} or leave it out"
        )
    if config.visual_channels != RGB:
        raise CommandError(
            f"--visual-channels {config.visual_channels}: the frames are read as RGB "
            f"({RGB} channels); leave --visual-channels out"
        )
    features = 8 * config.width  # each encoder's pooled features (ResNetEncoder.out_features)
    if config.mask_target != "input" and config.feature_group > features:
        raise CommandError(
            f"--feature-group {config.feature_group}: an encoder of --width {config.width} has "
            f"{features} features, so no group would ever be masked; use at most {features}"
        )


def config_from_args(args: argparse.Namespace, run_dir: Path, *, num_classes: int | None, **fixed):
    """The TrainConfig of this run: the saved config when resuming, else the defaults; then
    the options given on the command line, then ``fixed`` values."""
    from avkernels.app.training import CONFIG, TrainConfig

    values = {}
    saved = run_dir / CONFIG
    if args.resume and saved.is_file():
        try:
            values = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise RunError(f"{saved}: cannot read the saved config ({error})") from None
    for field in dataclasses.fields(TrainConfig):
        given = getattr(args, field.name, None)
        if isinstance(given, list):
            given = tuple(given)
        elif field.name in _PATH_FIELDS and given is not None:
            given = str(Path(given).resolve())  # the saved config must work from any directory
        if given is not None:
            values[field.name] = given
    values.update(fixed)
    if not values.get("num_classes"):
        if num_classes is None:
            raise CommandError(
                "--num-classes is required: the dataset does not say how many classes it has"
            )
        values["num_classes"] = num_classes
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise CommandError(_option_names(str(error))) from None


def _option_names(message: str) -> str:
    """``TrainConfig.lr_step`` -> ``--lr-step`` in messages meant for the command line."""
    import re

    return re.sub(r"TrainConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message)


def run_stage(
    config, train_data, eval_data, run_dir: Path, args: argparse.Namespace, replaced=()
) -> list:
    """Train (or resume) one run; CommandError for setup problems, exit 130 on Ctrl-C.
    ``replaced``: the files of an old run that ``--overwrite`` deletes once the setup is done."""
    from avkernels.app.data import DataError
    from avkernels.app.training import CHECKPOINT, Trainer, TrainingInterrupted
    from avkernels.checkpoints import CheckpointError
    from avkernels.distributed import Ranks

    main_rank = Ranks.current().is_main
    if main_rank:
        for path in replaced:
            path.unlink(missing_ok=True)
    log = TensorBoardLog(run_dir) if args.tensorboard and main_rank else None
    try:
        trainer = Trainer(
            config,
            train_data,
            run_dir,
            eval_data=eval_data,
            resume=args.resume,
            device=args.device,
            num_workers=args.num_workers,
            progress=args.progress,
            on_epoch=log,
        )
    except FileNotFoundError as error:
        message = str(error).removeprefix("Trainer: ")
        raise CommandError(_option_names(message)) from None
    except CheckpointError as error:
        raise CommandError(str(error)) from None
    except (ValueError, KeyError, RuntimeError) as error:
        message = str(error.args[0] if error.args else error).removeprefix("Trainer: ")
        raise CommandError(_option_names(message)) from None
    check_confidences_cover(trainer, train_data)
    if main_rank:
        run_settings.write_settings(
            run_dir, args, train_data.audio_config, args.resolved_eval_split
        )
    try:
        return trainer.fit()
    except TrainingInterrupted as stop:
        raise KeyboardInterrupt(f"{stop}: run the same command with --resume") from None
    except DataError as error:
        saved = (run_dir / CHECKPOINT).is_file()
        raise RunError(
            f"{error} ("
            + (
                f"the checkpoint in {run_dir} holds the progress so far: fix the file and "
                "run the same command with --resume"
                if saved
                else "nothing was saved yet: fix the file and run the same command again"
            )
            + ")"
        ) from None
    finally:
        if log is not None:
            log.close()


def check_confidences_cover(trainer, train_data) -> None:
    """Stage 2: every training clip has a stage-1 confidence (else they were recorded on
    another dataset), checked before the first step."""
    if trainer.ratios is None or trainer.ratios.ids is None:
        return
    ids = [record.id for record in train_data.records]
    try:
        trainer.ratios.gather(ids)
    except KeyError:
        known = set(trainer.ratios.ids)
        missing = [i for i in ids if i not in known]
        raise CommandError(
            f"the stage-1 confidences have no value for {len(missing)} of the {len(ids)} "
            f"training clips (e.g. {missing[:3]}): they were recorded on another dataset; "
            "give the stage-1 run of this manifest with --init-from (or "
            "--audio-confidence/--visual-confidence)"
        ) from None


def summary_line(stage: str, history: list) -> str:
    """The last epoch's evaluation (or training) accuracies, and the probes, in one line."""
    last = {}
    for row in history:
        if row["split"] in ("train", "eval"):
            last[row["split"]] = row
    row = last.get("eval") or last.get("train") or {}
    split = "eval" if "eval" in last else "train"
    parts = [f"{key} {value:.4f}" for key, value in row.items() if key.startswith("acc")]
    for probe in (r for r in history if r["split"].startswith("probe_")):
        accuracy = probe.get("probe_eval_acc", probe["probe_train_acc"])
        parts.append(f"{probe['split']} {accuracy:.4f}")
    return f"{stage}: epoch {row.get('epoch', 0)} {split}: " + ", ".join(parts)
