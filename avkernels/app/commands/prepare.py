"""``avkernels prepare``: write a manifest for a dataset on disk, or build AV-Digits.

``avkernels prepare {ks,vggsound,cremad,ave} --root RAW --out DIR`` reads the official/OGM-GE
layout under RAW (see ``avkernels.app.data.importers``) and writes ``DIR/manifest.csv`` (or
``.jsonl``), ``DIR/classes.txt`` and, when clips had missing files, ``DIR/problems.txt``.
``avkernels prepare av-digits --out DIR`` builds the embedded AV-Digits dataset into DIR.
``avkernels prepare extract --root VIDEOS --out DIR`` decodes a folder of videos with ffmpeg into
the clip files of the ``ave`` (or ``cremad``) layout (see ``avkernels.app.data.extract``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from avkernels.app.commands import arguments as types
from avkernels.app.data.extract import (
    FAILURES_FILE,
    OUTPUT_LAYOUTS,
    VIDEO_EXTENSIONS,
    ExtractSettings,
    check_settings,
    extract_videos,
    find_ffmpeg,
    find_videos,
)
from avkernels.app.errors import CommandError, RunError
from avkernels.app.progress import progress_enabled
from avkernels.files import atomic_write_text

NAME = "prepare"
HELP = (
    "write a dataset manifest from a raw layout (ks, vggsound, cremad, ave), build AV-Digits, "
    "or extract frames and audio from videos"
)
LAYOUTS = ("ks", "vggsound", "cremad", "ave")
_SHOWN_PROBLEMS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "format",
        choices=LAYOUTS + ("av-digits", "extract"),
        help="dataset layout: ks (Kinetics-Sounds), vggsound, cremad (CREMA-D), "
        "ave, av-digits (built offline), or extract (videos to frames and WAVs)",
    )
    parser.add_argument(
        "--root",
        type=types.existing_dir,
        default=None,
        help="the raw dataset folder, or the folder of videos for extract (not used by av-digits)",
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
    extract = parser.add_argument_group("extract")
    extract.add_argument(
        "--fps", type=types.positive_float, default=1.0, help="frames kept per second"
    )
    extract.add_argument(
        "--sample-rate", type=types.positive_int, default=16000, help="WAV sample rate in Hz"
    )
    extract.add_argument(
        "--extensions",
        type=_extensions,
        default=VIDEO_EXTENSIONS,
        help=f"comma-separated video file suffixes (default {','.join(VIDEO_EXTENSIONS)})",
    )
    extract.add_argument(
        "--jobs",
        type=types.positive_int,
        default=min(4, os.cpu_count() or 1),
        help="ffmpeg processes at a time (default: min(4, CPU count))",
    )
    extract.add_argument(
        "--layout",
        choices=sorted(OUTPUT_LAYOUTS),
        default="ave",
        help="folder names of the output: ave (audio/, visual/, default) or cremad "
        "(AudioWAV/, Image-01-FPS/)",
    )


def _extensions(text: str) -> tuple[str, ...]:
    extensions = tuple(part.strip().lstrip(".") for part in text.split(",") if part.strip())
    if not extensions:
        raise argparse.ArgumentTypeError(f"must list file suffixes such as mp4,mkv, got {text!r}")
    return extensions


def run(args: argparse.Namespace) -> int:
    from avkernels.app.data import DataError

    try:
        if args.format == "av-digits":
            return _build_av_digits(args)
        if args.format == "extract":
            return _extract(args)
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


def _extract(args: argparse.Namespace) -> int:
    if args.root is None:
        raise CommandError("extract needs --root, the folder holding the videos")
    try:
        find_ffmpeg()
    except FileNotFoundError as error:
        raise RunError(str(error)) from None
    videos = find_videos(args.root, args.extensions)
    types.check_writable(args.out)
    settings = ExtractSettings(fps=args.fps, sample_rate=args.sample_rate, layout=args.layout)
    check_settings(args.out, settings)
    bar = None
    if progress_enabled(None):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(videos), desc="extract", unit="clip")
    try:
        result = extract_videos(
            videos,
            args.out,
            settings,
            args.jobs,
            on_done=None if bar is None else (lambda _: bar.update()),
        )
    except OSError as error:
        raise RunError(f"cannot write into {args.out}: {error.strerror or error}") from None
    finally:
        if bar is not None:
            bar.close()
    failures_path = args.out / FAILURES_FILE
    failures = [{"video": video, "error": error} for video, error in result.failures.items()]
    if failures:
        atomic_write_text(failures_path, json.dumps(failures, indent=2) + "\n")
    else:
        failures_path.unlink(missing_ok=True)  # an earlier run's failures are fixed now
    audio, frames = OUTPUT_LAYOUTS[args.layout]
    print(
        f"{args.out}: {len(result.extracted)} clip(s) extracted, {len(result.skipped)} already "
        f"done, {len(failures)} failed of {len(videos)} video(s) ({audio}/<name>.wav, "
        f"{frames}/<name>/)"
    )
    if failures:
        first = failures[0]
        raise RunError(
            f"{len(failures)} video(s) could not be decoded, first {first['video']}: "
            f"{first['error'].splitlines()[-1] if first['error'] else 'no message'} "
            f"(all in {failures_path}); the other clips are done: fix or remove those videos "
            "and re-run, done clips are skipped"
        )
    return 0
