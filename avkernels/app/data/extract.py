"""Videos to the clip files the importers read: 1-fps JPEG frames and a 16 kHz mono WAV per clip.

``extract_videos(root, out)`` finds the videos under ``root`` (by file suffix, recursively) and
runs one ``ffmpeg`` per video, ``jobs`` at a time, writing (``ave`` layout, the default)
``out/audio/<name>.wav`` and ``out/visual/<name>/000001.jpg ...``; ``cremad`` writes
``out/AudioWAV/<name>.wav`` and ``out/Image-01-FPS/<name>/``. ``<name>`` is the video's file
name without its suffix. Each output is written under a hidden temporary name in its own folder
and renamed when ffmpeg has finished, so an output that exists is complete: a re-run skips it,
and an interrupted run leaves no half clip behind (only ``.partial`` leftovers, removed by the
next run). Videos ffmpeg cannot decode are returned with its message; the others go on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from avkernels.app.data.errors import DataError
from avkernels.files import atomic_write_text

VIDEO_EXTENSIONS = ("mp4", "mkv", "avi", "webm", "mov")
# (audio folder, frame folder) under the output folder, as the importer of that layout reads them.
OUTPUT_LAYOUTS = {"ave": ("audio", "visual"), "cremad": ("AudioWAV", "Image-01-FPS")}
SETTINGS_FILE = "extract_settings.json"
FAILURES_FILE = "extract_failures.json"
_PARTIAL = ".partial"


@dataclass(frozen=True)
class ExtractSettings:
    fps: float = 1.0
    sample_rate: int = 16000
    layout: str = "ave"

    def as_dict(self) -> dict:
        return {"fps": self.fps, "sample_rate": self.sample_rate, "layout": self.layout}


@dataclass
class ExtractResult:
    """Names of the clips extracted now and of those already done; failed videos -> message."""

    extracted: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    failures: dict = field(default_factory=dict)


def find_ffmpeg() -> str:
    """The ffmpeg executable on PATH; :class:`FileNotFoundError` saying how to install it."""
    found = shutil.which("ffmpeg")
    if found is None:
        raise FileNotFoundError(
            "ffmpeg is not on PATH: install it (`sudo apt-get install ffmpeg` on Debian/Ubuntu)"
        )
    return found


def find_videos(root: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """Clip name -> video file for every file under ``root`` whose suffix is in ``extensions``.

    :class:`DataError` when there is none, or when two videos would give the same clip name.
    """
    suffixes = {f".{extension.lower().lstrip('.')}" for extension in extensions}
    videos: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        if path.stem in videos:
            raise DataError(
                path,
                f"gives the same clip name {path.stem!r} as {videos[path.stem]}: "
                "rename one of them (clip names are file names without their suffix)",
            )
        videos[path.stem] = path
    if not videos:
        raise DataError(root, f"no video found (looked for {', '.join(sorted(suffixes))} files)")
    return videos


def check_settings(out: Path, settings: ExtractSettings) -> None:
    """Refuse to add clips to a folder extracted with other settings (re-runs skip done clips,
    which would mix frame rates or sample rates); record the settings otherwise."""
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            earlier = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DataError(path, f"unreadable ({error}): delete it to start afresh") from None
        if earlier != settings.as_dict():
            raise DataError(
                path,
                f"this folder was extracted with {earlier}, not {settings.as_dict()}: "
                "pass the same settings, or another --out",
            )
        return
    atomic_write_text(path, json.dumps(settings.as_dict(), indent=2) + "\n")


def _remove_partials(folder: Path) -> None:
    if not folder.is_dir():
        return
    for path in folder.glob(f".*{_PARTIAL}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _extract_clip(
    ffmpeg: str, video: Path, wav: Path, frames: Path, settings: ExtractSettings
) -> None:
    """Write the clip's WAV and frame folder from one ffmpeg run; raise RuntimeError with
    ffmpeg's message when it fails. Temporary outputs are renamed only on success."""
    tag = uuid.uuid4().hex[:12]
    partial_wav = wav.with_name(f".{wav.stem}.{tag}{_PARTIAL}.wav")
    partial_frames = frames.with_name(f".{frames.name}.{tag}{_PARTIAL}")
    partial_frames.mkdir()
    try:
        command = [ffmpeg, "-nostdin", "-loglevel", "error", "-y", "-i", str(video)]
        command += ["-map", "0:v:0", "-vf", f"fps={settings.fps}", "-q:v", "2"]
        command += [str(partial_frames / "%06d.jpg")]
        command += ["-map", "0:a:0", "-ac", "1", "-ar", str(settings.sample_rate)]
        command += ["-c:a", "pcm_s16le", str(partial_wav)]
        done = subprocess.run(command, capture_output=True, text=True, errors="replace")
        message = done.stderr.strip()
        if done.returncode != 0:
            raise RuntimeError(message or f"ffmpeg exited with status {done.returncode}")
        if not any(partial_frames.iterdir()):
            raise RuntimeError("no frame decoded" + (f": {message}" if message else ""))
        if not frames.exists():
            os.rename(partial_frames, frames)
        if not wav.exists():
            os.replace(partial_wav, wav)
    finally:
        shutil.rmtree(partial_frames, ignore_errors=True)
        partial_wav.unlink(missing_ok=True)


def extract_videos(
    videos: dict[str, Path],
    out: Path,
    settings: ExtractSettings = ExtractSettings(),
    jobs: int = 1,
    on_done: Callable[[str], None] | None = None,
) -> ExtractResult:
    """Extract every clip of ``videos`` (from :func:`find_videos`) into ``out`` whose WAV or frame
    folder is missing, ``jobs`` ffmpeg processes at a time; ``on_done(name)`` after each clip."""
    ffmpeg = find_ffmpeg()
    audio_folder, frame_folder = (out / name for name in OUTPUT_LAYOUTS[settings.layout])
    result = ExtractResult()
    pending = {}
    for folder in (audio_folder, frame_folder):
        folder.mkdir(parents=True, exist_ok=True)
        _remove_partials(folder)
    for name, video in videos.items():
        wav, frames = audio_folder / f"{name}.wav", frame_folder / name
        if wav.is_file() and frames.is_dir():
            result.skipped.append(name)
            if on_done is not None:
                on_done(name)
        else:
            pending[name] = (video, wav, frames)
    # Threads suffice: each waits on its ffmpeg process, which does the work.
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {
            pool.submit(_extract_clip, ffmpeg, *paths, settings): name
            for name, paths in pending.items()
        }
        for future in as_completed(futures):
            name = futures[future]
            error = future.exception()
            if error is None:
                result.extracted.append(name)
            elif isinstance(error, (RuntimeError, OSError)):
                result.failures[str(videos[name])] = str(error)
            else:
                raise error
            if on_done is not None:
                on_done(name)
    finally:
        # On Ctrl-C the running ffmpeg processes get the signal too; start no other clip.
        pool.shutdown(wait=True, cancel_futures=True)
    return result
