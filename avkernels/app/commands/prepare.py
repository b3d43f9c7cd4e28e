"""``avkernels prepare``: write a manifest for a dataset on disk, or build AV-Digits.

``avkernels prepare {ks,vggsound,cremad,ave} --root RAW --out DIR`` reads the official/OGM-GE
layout under RAW (see ``avkernels.app.data.importers``) and writes ``DIR/manifest.csv`` (or
``.jsonl``), ``DIR/classes.txt`` and, when clips had missing files, ``DIR/problems.txt``.
``avkernels prepare av-digits --out DIR`` builds the embedded AV-Digits dataset into DIR.
"""

from __future__ import annotations

import argparse
import sys

from avkernels.app.commands import arguments as types
from avkernels.app.errors import CommandError, RunError
from avkernels.files import atomic_write_text

NAME = "prepare"
HELP = "write a dataset manifest from a raw layout (ks, vggsound, cremad, ave) or build AV-Digits"
LAYOUTS = ("ks", "vggsound", "cremad", "ave")
_SHOWN_PROBLEMS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "format",
        choices=LAYOUTS + ("av-digits",),
        help="dataset layout: ks (Kinetics-Sounds), vggsound, cremad (CREMA-D), "
        "ave, or av-digits (built offline)",
    )
    parser.add_argument(
        "--root",
        type=types.existing_dir,
        default=None,
        help="the raw dataset folder (not used by av-digits)",
    )
    parser.add_argument("--out", type=types.output_dir, required=True, help="output folder")
    parser.add_argument("--manifest-format", choices=("csv", "jsonl"), default="csv")
    parser.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="clips with a missing WAV or frame folder: fail (default, exit 2) or "
        "skip them (listed in problems.txt and on stderr)",
    )
    digits = parser.add_argument_group("av-digits")
    digits.add_argument("--train-per-class", type=types.positive_int, default=160)
    digits.add_argument("--test-per-class", type=types.positive_int, default=40)
    digits.add_argument("--image-size", type=types.positive_int, default=32)
    digits.add_argument(
        "--visual-difficulty",
        type=types.probability,
        nargs=2,
        default=(0.0, 0.5),
        metavar=("LOW", "HIGH"),
        help="per-clip visual difficulty range in [0, 1]",
    )
    digits.add_argument(
        "--audio-difficulty",
        type=types.probability,
        nargs=2,
        default=(0.0, 0.5),
        metavar=("LOW", "HIGH"),
        help="per-clip audio difficulty range in [0, 1]",
    )
    digits.add_argument(
        "--no-asterisk", action="store_true", help="ignore installed Asterisk digit recordings"
    )
    digits.add_argument("--no-espeak", action="store_true", help="ignore espeak-ng")
    digits.add_argument("--seed", type=types.seed, default=0)


def run(args: argparse.Namespace) -> int:
    from avkernels.app.data import DataError

    try:
        if args.format == "av-digits":
            return _build_av_digits(args)
        return _import(args)
    except DataError as error:
        raise CommandError(str(error)) from None


def _build_av_digits(args: argparse.Namespace) -> int:
    from avkernels.app.data import AVDigitsConfig, load_av_digits

    if args.root is not None:
        raise CommandError("av-digits is built from installed packages: drop --root")
    try:
        config = AVDigitsConfig(
            train_per_class=args.train_per_class,
            test_per_class=args.test_per_class,
            image_size=args.image_size,
            visual_difficulty=tuple(args.visual_difficulty),
            audio_difficulty=tuple(args.audio_difficulty),
            use_asterisk=not args.no_asterisk,
            use_espeak=not args.no_espeak,
            seed=args.seed,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    types.check_writable(args.out)
    built = load_av_digits(args.out, config)
    info = built.info
    print(
        f"AV-Digits in {built.root}: {info['clips']['train']} train / {info['clips']['test']} "
        f"test clips, audio {tuple(info['audio_input'])}, visual {tuple(info['visual_input'])}, "
        f"speaker-disjoint: {'yes' if info['speaker_disjoint'] else 'no'}"
    )
    print(f"manifest: {built.manifest}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from avkernels.app.data import import_layout, write_manifest

    if args.root is None:
        raise CommandError(f"{args.format} needs --root, the folder holding the raw dataset")
    types.check_writable(args.out)
    result = import_layout(args.format, args.root)
    problems = result.problems
    if problems and args.on_error == "fail":
        raise CommandError(
            f"{len(problems)} clip(s) have missing files, first: {problems[0]} "
            "(pass --on-error skip to leave them out)"
        )
    if not result.records:
        raise CommandError(
            f"no clip of {args.root} has both its WAV and its frame folder"
            + (f"; first problem: {problems[0]}" if problems else "")
        )
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        manifest = write_manifest(args.out / f"manifest.{args.manifest_format}", result.records)
        atomic_write_text(args.out / "classes.txt", "\n".join(result.classes) + "\n")
        if problems:
            atomic_write_text(args.out / "problems.txt", "".join(f"{p}\n" for p in problems))
    except OSError as error:
        raise RunError(f"cannot write into {args.out}: {error.strerror or error}") from None
    splits: dict[str, int] = {}
    for record in result.records:
        splits[record.split] = splits.get(record.split, 0) + 1
    counts = ", ".join(f"{n} {split}" for split, n in splits.items())
    print(f"{manifest}: {len(result.records)} clips ({counts}), {len(result.classes)} classes")
    if problems:
        print(
            f"skipped {len(problems)} clip(s) with missing files (all in "
            f"{args.out / 'problems.txt'}):",
            file=sys.stderr,
        )
        for problem in problems[:_SHOWN_PROBLEMS]:
            print(f"  {problem}", file=sys.stderr)
    return 0
