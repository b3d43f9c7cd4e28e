"""``avkernels prepare extract``: videos synthesised with ffmpeg become clips the importers read."""

import json
import os
import shutil
import subprocess

import pytest

from avkernels.app.cli import main
from avkernels.app.data import (
    AudioConfig,
    AVDataset,
    DataError,
    VisualConfig,
    import_layout,
    read_wav,
)
from avkernels.app.data.extract import FAILURES_FILE, find_videos

needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None,
    reason="ffmpeg is not installed (sudo apt-get install ffmpeg): extraction cannot be tested",
)
DURATIONS = {"short": 3, "long": 4}  # seconds; the AVE importer needs >= 3 frames a clip


def synthesise(path, seconds):
    """A 64x64 test-pattern video at 10 fps with a 44.1 kHz stereo sine: rates that differ from
    the extracted ones, so a passing test shows that ffmpeg resampled them."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi"]
        + ["-i", f"testsrc=duration={seconds}:size=64x64:rate=10", "-f", "lavfi"]
        + ["-i", f"sine=frequency=440:duration={seconds}:sample_rate=44100", "-ac", "2"]
        + ["-shortest", str(path)],
        check=True,
    )


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (sudo apt-get install ffmpeg)")
    folder = tmp_path_factory.mktemp("videos")
    synthesise(folder / "short.mp4", DURATIONS["short"])
    (folder / "nested").mkdir()
    synthesise(folder / "nested" / "long.mkv", DURATIONS["long"])
    (folder / "broken.avi").write_bytes(bytes(range(256)) * 40)  # not a video
    (folder / "notes.txt").write_text("not a video suffix: ignored\n")
    return folder


def run_extract(videos, out, *extra):
    return main(["prepare", "extract", "--root", str(videos), "--out", str(out), *extra])


@needs_ffmpeg
def test_extract_resume_and_import(videos, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_extract(videos, out, "--jobs", "2") == 1  # the broken video fails, the rest go on
    captured = capsys.readouterr()
    assert "2 clip(s) extracted, 0 already done, 1 failed of 3 video(s)" in captured.out
    assert "broken.avi" in captured.err.strip().splitlines()[-1]
    failures = json.loads((out / FAILURES_FILE).read_text())
    assert [f["video"] for f in failures] == [str(videos / "broken.avi")] and failures[0]["error"]
    for name, seconds in DURATIONS.items():
        frames = sorted((out / "visual" / name).iterdir())
        assert abs(len(frames) - seconds) <= 1, frames  # 1 fps
        assert all(f.suffix == ".jpg" for f in frames)
        waveform, rate = read_wav(out / "audio" / f"{name}.wav")
        assert rate == 16000 and waveform.shape[0] == 1
        assert abs(waveform.shape[1] - seconds * 16000) < 0.05 * 16000  # AAC adds padding
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no temporary left
    assert not (out / "visual" / "broken").exists() and not (out / "audio" / "broken.wav").exists()

    # A re-run skips the done clips (their files are not rewritten) and retries the broken one.
    wav = out / "audio" / "short.wav"
    stamp = wav.stat().st_mtime_ns
    (out / "visual" / ".long.0123.partial").mkdir()  # as an interrupted run leaves it
    assert run_extract(videos, out) == 1
    assert "0 clip(s) extracted, 2 already done, 1 failed" in capsys.readouterr().out
    assert wav.stat().st_mtime_ns == stamp
    assert not (out / "visual" / ".long.0123.partial").exists()
    # A clip missing one output counts as not done and is extracted again.
    wav.unlink()
    (videos / "broken.avi").rename(tmp_path / "broken.avi")
    try:
        assert run_extract(videos, out) == 0
    finally:
        (tmp_path / "broken.avi").rename(videos / "broken.avi")
    assert "1 clip(s) extracted, 1 already done, 0 failed of 2" in capsys.readouterr().out
    assert wav.is_file() and not (out / FAILURES_FILE).exists()

    # The output is the AVE layout: with its class lists the importer and AVDataset read it.
    (out / "stat.txt").write_text("tone\nsilence\n")
    (out / "my_train.txt").write_text("tone,short\nsilence,long\n")
    result = import_layout("ave", out)
    assert not result.problems and len(result.records) == 2
    dataset = AVDataset(
        result.records,
        "train",
        AudioConfig(num_mel_bins=16, target_length=32),
        VisualConfig(size=8),
    )
    sample = dataset[0]
    assert sample["visual"].shape == (3, 3, 8, 8) and sample["audio"].shape == (1, 32, 16)

    # Other settings on the same folder would mix rates in one dataset: refused.
    assert run_extract(videos, out, "--fps", "2") == 2
    assert "extracted with" in capsys.readouterr().err


@needs_ffmpeg
def test_fps_and_cremad_layout(videos, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_extract(videos, out, "--fps", "2", "--layout", "cremad", "--extensions", "mp4")
    assert code == 0, capsys.readouterr().err
    frames = list((out / "Image-01-FPS" / "short").iterdir())
    assert abs(len(frames) - 2 * DURATIONS["short"]) <= 1
    assert (out / "AudioWAV" / "short.wav").is_file()
    assert not (out / "Image-01-FPS" / "long").exists()  # .mkv not asked for


def test_duplicate_clip_names_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "clip.mp4").write_bytes(b"")
    (tmp_path / "clip.mov").write_bytes(b"")
    with pytest.raises(DataError, match="same clip name 'clip'"):
        find_videos(tmp_path, ("mp4", "mov"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--root", "{tmp}/none"], "argument --root: "),
        (["--fps", "0"], "argument --fps: must be a finite number > 0"),
        (["--fps", "nan"], "argument --fps: must be a finite number"),
        (["--jobs", "0"], "argument --jobs: must be an integer >= 1"),
        (["--extensions", ","], "argument --extensions: must list file suffixes"),
        (["--out", "{tmp}/file.txt"], "is a file, not a folder"),
        ([], "extract needs --root"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "file.txt").write_text("x")
    argv = ["prepare", "extract", "--out", str(tmp_path / "out")] + [
        a.format(tmp=tmp_path) for a in argv
    ]
    if "--root" not in argv and message != "extract needs --root":
        argv += ["--root", str(tmp_path)]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse rejected an argument
        code = exit_info.code
    assert code == 2
    error = capsys.readouterr().err
    assert message in error.strip().splitlines()[-1] and "Traceback" not in error


@needs_ffmpeg
def test_no_video_names_the_extensions(tmp_path, capsys):
    (tmp_path / "clip.txt").write_text("x")
    assert main(["prepare", "extract", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no video found (looked for .avi, .mkv, .mov, .mp4, .webm files)" in (
        capsys.readouterr().err
    )


@needs_ffmpeg
def test_unwritable_out_is_refused(videos, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: folder permissions are not enforced")
        assert run_extract(videos, locked / "out") == 2
    finally:
        locked.chmod(0o700)
    error = capsys.readouterr().err
    assert "--out" in error and "cannot write there" in error


def test_missing_ffmpeg_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without ffmpeg
    (tmp_path / "clip.mp4").write_bytes(b"")
    assert run_extract(tmp_path, tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert "ffmpeg is not on PATH" in error and "sudo apt-get install ffmpeg" in error
    assert not (tmp_path / "out").exists()  # checked before any work
