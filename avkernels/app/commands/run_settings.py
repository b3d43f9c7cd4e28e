"""What ``train`` and ``fust`` settle before any work: the ``--config`` TOML file, the data
settings of a run (recorded in ``run.json`` and compared on ``--resume``), and the state of the
run folder (docs/cli.md, "avkernels train").

Data settings come from, in order: the command line (or ``--config``), the resumed run's
``run.json``, the dataset's own ``build.json`` (AV-Digits), the defaults.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from avkernels.app.commands.arguments import existing_file
from avkernels.app.errors import CommandError, RunError
from avkernels.files import atomic_write_text

SETTINGS = "run.json"  # the data settings and versions of a run, beside config.json
FBANK_STATS = "fbank_stats.json"  # where `avkernels data-stats` writes by default
OFFICIAL_STATS = "kinetics-sounds"  # --fbank-stats value: the official Kinetics-Sounds values
DATA_DEFAULTS = {
    "mel_bins": 128,
    "target_length": 1024,
    "sample_rate": 16000,
    "image_size": 224,
    "frames": 3,
}
# build.json (AV-Digits) names of the data settings.
_BUILD_NAMES = {
    "mel_bins": "num_mel_bins",
    "target_length": "num_frames",
    "sample_rate": "sample_rate",
    "image_size": "image_size",
    "frames": "frames_per_clip",
}
_NOT_IN_FILES = {"help", "config", "debug"}


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


class ConfigFile(argparse.Action):
    """``--config FILE``: a TOML table whose keys are the command's option names (``lr``,
    ``mel-bins`` or ``mel_bins``...). Options given on the command line win over the file."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            import tomllib
        except ImportError:  # Python 3.10
            parser.error("argument --config: TOML files need Python 3.11 or newer")
        try:
            path = existing_file(values)
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except argparse.ArgumentTypeError as error:
            parser.error(f"argument --config: {error}")
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            parser.error(f"argument --config: {values} is not a readable TOML file ({error})")
        actions = {
            a.dest: a for a in parser._actions if a.option_strings and a.dest not in _NOT_IN_FILES
        }
        for key, value in table.items():
            action = actions.get(key.replace("-", "_"))
            if action is None:
                parser.error(
                    f"argument --config: {path}: unknown key {key!r}; the keys are the "
                    f"options of the command without '--' (e.g. {sorted(actions)[:4]})"
                )
            if getattr(namespace, action.dest, None) != action.default:
                continue  # given on the command line before --config
            try:
                setattr(namespace, action.dest, _value(action, value))
            except (argparse.ArgumentTypeError, TypeError) as error:
                parser.error(f"argument --config: {path}: key {key!r}: {error}")
        setattr(namespace, self.dest, path)


def _value(action: argparse.Action, value):
    """``value`` from TOML, checked as the command line checks ``action``'s values."""
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise TypeError(f"must be true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value
        return action.const if value else action.default
    many = action.nargs in ("*", "+") or isinstance(action.nargs, int)
    items = value if isinstance(value, list) else None
    if many != (items is not None):
        raise TypeError(f"must be {'a list' if many else 'one value'}, got {value!r}")
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise TypeError(f"must be a list of {action.nargs} values, got {value!r}")
    converted = [_item(action, item) for item in (items if many else [value])]
    return converted if many else converted[0]


def _item(action: argparse.Action, item):
    if isinstance(item, (dict, list)):
        raise TypeError(f"must be a plain value, got {item!r}")
    text = str(item).lower() if isinstance(item, bool) else str(item)
    result = action.type(text) if action.type else text
    if action.choices is not None and result not in action.choices:
        raise TypeError(f"must be one of {list(action.choices)}, got {item!r}")
    return result


# --- data settings -------------------------------------------------------------------------------


def read_settings(run_dir: Path) -> dict:
    """The saved ``run.json`` of a run ({} for runs written before it existed)."""
    path = run_dir / SETTINGS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunError(f"{path}: cannot read the run's settings ({error})") from None


def build_settings(manifest: Path) -> dict:
    """The data settings a dataset records itself (AV-Digits' ``build.json``), if any."""
    path = manifest.parent / "build.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))["config"]
        return {name: int(config[key]) for name, key in _BUILD_NAMES.items() if key in config}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def resolve_data_settings(args: argparse.Namespace, saved: dict) -> None:
    """Fill the data settings left None in ``args`` (saved run, build.json, defaults), and
    refuse a resume whose given settings differ from the saved ones unless
    ``--allow-data-changes``."""
    saved_data = saved.get("data", {})
    built = build_settings(args.manifest)
    changed = []
    for name, default in DATA_DEFAULTS.items():
        given = getattr(args, name)
        if given is not None and name in saved_data and given != saved_data[name]:
            changed.append(f"{option(name)}: saved {saved_data[name]}, given {given}")
        if given is None:
            setattr(args, name, saved_data.get(name, built.get(name, default)))
    manifest = str(args.manifest.resolve())
    if saved_data.get("manifest") not in (None, manifest):
        changed.append(f"MANIFEST: saved {saved_data['manifest']}, given {manifest}")
    if changed and not args.allow_data_changes:
        raise CommandError(
            f"--resume: the data settings differ from those of the run in {args.out} ("
            + "; ".join(changed)
            + "): give the saved values (or leave the options out), or pass "
            "--allow-data-changes to continue with the new ones"
        )


def fbank_stats(args: argparse.Namespace):
    """The FbankStats of the run, or None for the official Kinetics-Sounds values (only when
    asked for: a missing ``fbank_stats.json`` is an error)."""
    from avkernels.app.data import FbankStats

    if args.fbank_stats == OFFICIAL_STATS:
        return None
    path = Path(args.fbank_stats) if args.fbank_stats else args.manifest.parent / FBANK_STATS
    if not path.is_file():
        given = args.fbank_stats is not None
        raise CommandError(
            f"{'--fbank-stats ' if given else ''}{path}: no such file; compute it with "
            f"`avkernels data-stats {args.manifest}`"
            + ("" if given else " or pass --fbank-stats FILE")
            + f" (or --fbank-stats {OFFICIAL_STATS} for the official Kinetics-Sounds values)"
        )
    return FbankStats.load(path)


def write_settings(run_dir: Path, args: argparse.Namespace, audio, eval_split: str) -> None:
    """``run.json``: the resolved data settings (what a resume compares) and the versions."""
    import torch

    from avkernels import __version__

    data = {name: getattr(args, name) for name in DATA_DEFAULTS}
    data.update(
        manifest=str(args.manifest.resolve()),
        train_split=args.train_split,
        eval_split=eval_split,
        fbank_stats=args.fbank_stats or str(args.manifest.parent.resolve() / FBANK_STATS),
        fbank_mean=audio.mean,
        fbank_std=audio.std,
    )
    versions = {"avkernels": __version__, "torch": torch.__version__}
    versions["python"] = platform.python_version()
    text = json.dumps({"data": data, "versions": versions}, indent=2) + "\n"
    atomic_write_text(run_dir / SETTINGS, text)


# --- the run folder ------------------------------------------------------------------------------


def check_run_folder(run_dir: Path, args: argparse.Namespace) -> list[Path]:
    """Before any work: ``run_dir`` can be written, and holds what ``--resume`` needs, or no
    other run (unless ``--overwrite``). Returns the old run's files ``--overwrite`` replaces."""
    from avkernels.app.commands.arguments import check_writable
    from avkernels.app.commands.tensorboard_log import FOLDER as TENSORBOARD_FOLDER
    from avkernels.app.training import CHECKPOINT, CONFIG, MODEL
    from avkernels.app.training.run_files import METRICS_CSV, METRICS_JSONL

    if args.resume and args.overwrite:
        raise CommandError("--resume continues a run and --overwrite replaces it: choose one")
    check_writable(run_dir)
    if args.resume:
        if not (run_dir / CHECKPOINT).is_file():
            raise RunError(
                f"--resume: nothing to resume: no {CHECKPOINT} in {run_dir}; drop --resume "
                "to start a new run there"
            )
        return []
    # run.json alone (a start that failed before the first checkpoint) holds no work.
    names = (CONFIG, CHECKPOINT, METRICS_CSV, METRICS_JSONL, MODEL)
    taken = [run_dir / name for name in names if (run_dir / name).exists()]
    taken += sorted(run_dir.glob("confidence_*.pt"))
    taken += sorted(run_dir.glob(f"{TENSORBOARD_FOLDER}/events.out.tfevents.*"))
    if taken and not args.overwrite:
        raise RunError(
            f"{run_dir} already holds a run ({', '.join(p.name for p in taken)}): add --resume "
            "to continue it, choose a new --out, or pass --overwrite to replace it"
        )
    return taken
