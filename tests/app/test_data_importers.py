"""Importers of the official/OGM-GE layouts, the ``prepare`` and ``data-stats`` commands."""

import pytest

from avkernels.app.cli import main
from avkernels.app.data import (
    AudioConfig,
    AVDataset,
    DataError,
    FbankStats,
    VisualConfig,
    import_layout,
    read_manifest,
)
from tests.app.data_fixtures import write_clip

AUDIO = AudioConfig(num_mel_bins=16, target_length=32)


def make_ks(root):
    (root / "train_1fps_path.txt").write_text("/data/ks/visual/train/a1 3\n/x/train/b2/ 0\n")
    (root / "test_1fps_path.txt").write_text("/data/ks/visual/test/c3 30\n")
    for split, name in (("train", "a1"), ("train", "b2"), ("test", "c3")):
        write_clip(root, f"ks_audio/{split}/{name}.wav", f"ks_visual/{split}/{name}")
    return {"train/a1": ("train", 3), "train/b2": ("train", 0), "test/c3": ("test", 30)}


def make_vggsound(root):
    (root / "vggsound.csv").write_text(
        "abc,30,dog barking,train\nxyz,5,car horn,train\nqqq,000012,dog barking,test\n"
    )
    write_clip(
        root,
        "train-audios/train-set/abc_30.wav",
        "train-videos/train-set-img/Image-01-FPS/abc_30.mp4",
    )
    write_clip(
        root,
        "train-audios/train-set/xyz_000005.wav",  # zero-padded start on disk
        "train-videos/train-set-img/Image-01-FPS/xyz_000005.mp4",
    )
    write_clip(
        root,
        "test-audios/test-set/qqq_000012.wav",
        "test-videos/test-set-img/Image-01-FPS/qqq_000012.mp4",
    )
    return {"abc_30": ("train", 1), "xyz_000005": ("train", 0), "qqq_000012": ("test", 1)}


def make_cremad(root):
    (root / "train.csv").write_text("\ufeff1001_DFA_ANG_XX,ANG\n1002_IEO_NEU_LO,NEU\n")
    (root / "test.csv").write_text("1003_TIE_SAD_MD,SAD\n")
    for clip in ("1001_DFA_ANG_XX", "1002_IEO_NEU_LO", "1003_TIE_SAD_MD"):
        write_clip(root, f"AudioWAV/{clip}.wav", f"Image-01-FPS/{clip}")
    return {
        "1001_DFA_ANG_XX": ("train", 5),
        "1002_IEO_NEU_LO": ("train", 0),
        "1003_TIE_SAD_MD": ("test", 2),
    }


def make_ave(root):
    (root / "stat.txt").write_text("Church bell\nBarking\nAcoustic guitar\n")
    (root / "my_train.txt").write_text("Barking,vid1,good,0,10\nChurch bell,vid2\n")
    (root / "my_test.txt").write_text("Acoustic guitar,vid3\n")
    for video in ("vid1", "vid2", "vid3"):
        write_clip(root, f"audio/{video}.wav", f"visual/{video}")
    return {"train/vid1": ("train", 1), "train/vid2": ("train", 2), "test/vid3": ("test", 0)}


LAYOUTS = {"ks": make_ks, "vggsound": make_vggsound, "cremad": make_cremad, "ave": make_ave}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("manifest_format", ["csv", "jsonl"])
def test_prepare_round_trip(tmp_path, capsys, layout, manifest_format):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    expected = LAYOUTS[layout](raw)
    code = main(
        [
            "prepare",
            layout,
            "--root",
            str(raw),
            "--out",
            str(out),
            "--manifest-format",
            manifest_format,
        ]
    )
    assert code == 0, capsys.readouterr().err
    manifest = out / f"manifest.{manifest_format}"
    assert f"{len(expected)} clips" in capsys.readouterr().out
    records = read_manifest(manifest)
    assert {r.id: (r.split, r.label) for r in records} == expected
    classes = (out / "classes.txt").read_text().split("\n")
    for record in records:
        assert record.audio.is_file() and record.frames.is_dir()
        assert classes[record.label] == record.extra["class"]
    train = AVDataset(manifest, "train", AUDIO, VisualConfig(size=8))
    assert train[0]["visual"].shape == (3, 3, 8, 8) and train[0]["audio"].shape == (1, 32, 16)


def test_ave_duplicates_are_dropped_and_reported(tmp_path):
    make_ave(tmp_path)
    (tmp_path / "my_train.txt").write_text("Barking,vid1\nChurch bell,vid2\nBarking,vid2\n")
    result = import_layout("ave", tmp_path)
    assert [r.id for r in result.records if r.split == "train"] == ["train/vid1"]
    assert "'vid2' listed 2 times (lines 2, 3)" in str(result.problems[0])


def test_missing_files_fail_or_are_skipped(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    make_cremad(raw)
    (raw / "AudioWAV/1002_IEO_NEU_LO.wav").unlink()
    args = ["prepare", "cremad", "--root", str(raw), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("avkernels prepare: error: 1 clip(s) have missing files, first: ")
    assert "1002_IEO_NEU_LO.wav: audio of clip '1002_IEO_NEU_LO' not found" in error
    assert "--on-error skip" in error and not (tmp_path / "out/manifest.csv").exists()
    assert main(args + ["--on-error", "skip"]) == 0
    streams = capsys.readouterr()
    assert "skipped 1 clip(s)" in streams.err and "2 clips" in streams.out
    assert "1002_IEO_NEU_LO" in (tmp_path / "out/problems.txt").read_text()
    assert len(read_manifest(tmp_path / "out/manifest.csv")) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "ks", "--out", "{out}"], "ks needs --root"),
        (
            ["prepare", "ks", "--root", "{tmp}/none", "--out", "{out}"],
            "argument --root: ",
        ),
        (
            ["prepare", "ks", "--root", "{tmp}", "--out", "{out}"],
            "no {train,val,test}_1fps_path.txt",
        ),
        (["prepare", "vggsound", "--root", "{tmp}", "--out", "{out}"], "vggsound.csv: not found"),
        (["prepare", "cremad", "--root", "{tmp}", "--out", "{out}"], "no train.csv/test.csv"),
        (["prepare", "ave", "--root", "{tmp}", "--out", "{out}"], "stat.txt: not found"),
        (["prepare", "av-digits", "--root", "{tmp}", "--out", "{out}"], "drop --root"),
        (
            ["prepare", "av-digits", "--out", "{out}", "--test-per-class", "0"],
            "must be an integer >= 1",
        ),
        (["data-stats", "{tmp}/none.csv"], "none.csv: no such file"),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, out=tmp_path / "out") for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse rejected an argument: usage, then one line
        code = exit_info.code
    assert code == 2
    error = capsys.readouterr().err
    assert message in error.strip().splitlines()[-1]
    assert "Traceback" not in error


def test_malformed_lists_name_the_line(tmp_path, capsys):
    (tmp_path / "train_1fps_path.txt").write_text("a 1\nb label\n")
    with pytest.raises(DataError, match="train_1fps_path.txt: line 2: expected"):
        import_layout("ks", tmp_path)
    (tmp_path / "train.csv").write_text("clip,XYZ\n")
    with pytest.raises(DataError, match="train.csv: line 1: expected 'clip,EMOTION'"):
        import_layout("cremad", tmp_path)


def test_bad_format_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "kinetics", "--out", "x"])
    assert exit_info.value.code == 2 and "invalid choice: 'kinetics'" in capsys.readouterr().err


def test_data_stats_command(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    make_cremad(raw)
    assert main(["prepare", "cremad", "--root", str(raw), "--out", str(tmp_path / "out")]) == 0
    manifest = tmp_path / "out/manifest.csv"
    argv = ["data-stats", str(manifest), "--mel-bins", "16", "--target-length", "32"]
    assert main(argv) == 0
    assert "train: 2 clips" in capsys.readouterr().out
    stats = FbankStats.load(tmp_path / "out/fbank_stats.json")
    from avkernels.app.data import compute_fbank_stats

    records = [r for r in read_manifest(manifest) if r.split == "train"]
    assert stats == compute_fbank_stats([r.audio for r in records], AUDIO)
    assert main(argv + ["--split", "val"]) == 2
    assert "no clip in split 'val'" in capsys.readouterr().err
    (raw / "AudioWAV/1001_DFA_ANG_XX.wav").write_bytes(b"broken")
    assert main(argv) == 2
    assert "1001_DFA_ANG_XX.wav: cannot decode audio" in capsys.readouterr().err


def test_data_stats_names_an_unreadable_manifest_or_output(tmp_path, capsys, monkeypatch):
    import avkernels.app.data

    raw = tmp_path / "raw"
    raw.mkdir()
    make_cremad(raw)
    assert main(["prepare", "cremad", "--root", str(raw), "--out", str(tmp_path / "out")]) == 0
    manifest = tmp_path / "out/manifest.csv"
    (tmp_path / "file").write_text("x")
    argv = ["data-stats", str(manifest), "--mel-bins", "16", "--target-length", "32"]
    with pytest.raises(SystemExit) as exit_info:  # checked before any fbank is computed
        main(argv + ["--out", str(tmp_path / "file/stats.json")])
    assert exit_info.value.code == 2
    assert "argument --out" in capsys.readouterr().err

    def unreadable(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(avkernels.app.data, "read_manifest", unreadable)
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert f"cannot read {manifest}: Permission denied" in error and error.count("\n") == 1
