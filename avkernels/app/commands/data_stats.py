"""``avkernels data-stats``: fbank mean/std of a manifest split, for the audio normalisation.

The statistics are those of the padded/cut, unnormalised fbanks (the official ``skip_norm``
pass); the network input is then ``(fbank - mean) / (2 * std)``.
"""

from __future__ import annotations

import argparse

from avkernels.app.commands import arguments as types
from avkernels.app.errors import CommandError, RunError

NAME = "data-stats"
HELP = "compute the fbank mean/std of a manifest split (audio normalisation statistics)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=types.manifest_file, help="a manifest (.csv or .jsonl)")
    parser.add_argument("--split", default="train", help="split to use (default train)")
    parser.add_argument("--sample-rate", type=types.positive_int, default=16000)
    parser.add_argument("--mel-bins", type=types.positive_int, default=128)
    parser.add_argument(
        "--target-length", type=types.positive_int, default=1024, help="fbank frames per clip"
    )
    parser.add_argument(
        "--max-clips",
        type=types.positive_int,
        default=None,
        help="use at most this many clips (the first of the split)",
    )
    parser.add_argument(
        "--out",
        type=types.output_file,
        default=None,
        help="JSON file to write (default: fbank_stats.json next to the manifest)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )


def run(args: argparse.Namespace) -> int:
    from avkernels.app.data import AudioConfig, DataError, compute_fbank_stats, read_manifest

    try:
        config = AudioConfig(args.sample_rate, args.mel_bins, args.target_length)
    except ValueError as error:
        raise CommandError(str(error)) from None
    out = args.out or args.manifest.parent / "fbank_stats.json"
    types.check_writable(out.parent, "--out" if args.out else "the manifest's folder")
    try:
        records = [r for r in read_manifest(args.manifest) if r.split == args.split]
        if not records:
            raise CommandError(f"{args.manifest}: no clip in split {args.split!r}")
        records = records[: args.max_clips]
        stats = compute_fbank_stats([r.audio for r in records], config, progress=args.progress)
    except DataError as error:
        raise CommandError(str(error)) from None
    except OSError as error:
        raise CommandError(f"cannot read {args.manifest}: {error.strerror or error}") from None
    try:
        stats.save(out)
    except OSError as error:
        raise RunError(f"cannot write {out}: {error.strerror or error}") from None
    print(
        f"{args.split}: {stats.clips} clips, fbank mean {stats.mean:.6f}, std {stats.std:.6f} "
        f"-> {out}"
    )
    return 0
