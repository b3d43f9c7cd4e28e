"""Audio front end against torchaudio called directly with the official arguments."""

import numpy as np
import pytest
import torch
import torchaudio

from avkernels.app.data import (
    AudioConfig,
    DataError,
    FbankStats,
    audio_input,
    compute_fbank_stats,
    kaldi_fbank,
    load_waveform,
    pad_or_cut,
    raw_fbank,
    read_wav,
)
from tests.app.data_fixtures import write_wav


def official_fbank(samples: np.ndarray, rate: int, bins: int) -> torch.Tensor:
    waveform = torch.from_numpy(samples.T.copy()).float()
    waveform = waveform - waveform.mean()
    return torchaudio.compliance.kaldi.fbank(
        waveform,
        htk_compat=True,
        sample_frequency=rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=bins,
        dither=0.0,
        frame_shift=10,
    )


@pytest.mark.parametrize("target_length", [20, 48, 200])  # cut, exact, pad
def test_input_matches_the_official_pipeline(tmp_path, target_length):
    samples = write_wav(tmp_path / "a.wav", seconds=0.5)
    config = AudioConfig(
        sample_rate=16000, num_mel_bins=32, target_length=target_length, mean=-3.0, std=2.5
    )
    expected = official_fbank(samples, 16000, 32)
    assert expected.shape[0] == 48
    missing = target_length - expected.shape[0]
    if missing > 0:
        expected = torch.cat([expected, torch.zeros(missing, 32)])
    expected = ((expected[:target_length] + 3.0) / 5.0).unsqueeze(0)
    actual = audio_input(tmp_path / "a.wav", config)
    assert actual.shape == (1, target_length, 32) and actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_stereo_is_averaged_and_other_rates_resampled(tmp_path):
    samples = write_wav(tmp_path / "s.wav", seconds=0.3, rate=8000, channels=2)
    waveform = load_waveform(tmp_path / "s.wav", 16000)
    mono = torch.from_numpy(samples.mean(axis=1, keepdims=True).T.copy())
    torch.testing.assert_close(waveform, torchaudio.functional.resample(mono, 8000, 16000))
    assert waveform.shape == (1, 4800)


def test_pad_or_cut():
    fbank = torch.arange(12.0).reshape(4, 3)
    assert torch.equal(pad_or_cut(fbank, 2), fbank[:2])
    padded = pad_or_cut(fbank, 6)
    assert torch.equal(padded[:4], fbank) and torch.equal(padded[4:], torch.zeros(2, 3))


def test_kaldi_fbank_needs_mono():
    with pytest.raises(ValueError, match="mono"):
        kaldi_fbank(torch.zeros(2, 1000), 16000, 32)


def test_bad_audio_files_name_the_file_and_the_reason(tmp_path):
    with pytest.raises(DataError, match="missing.wav: audio file not found"):
        read_wav(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF garbage, not audio")
    with pytest.raises(DataError, match="junk.wav: cannot decode audio"):
        read_wav(tmp_path / "junk.wav")
    write_wav(tmp_path / "short.wav", seconds=0.01)
    with pytest.raises(DataError, match="short.wav: audio shorter than one 25 ms"):
        raw_fbank(tmp_path / "short.wav", AudioConfig(num_mel_bins=32, target_length=10))


def test_fbank_stats_match_a_direct_computation(tmp_path):
    config = AudioConfig(num_mel_bins=24, target_length=40)
    paths = []
    for seed, seconds in enumerate((0.2, 0.5, 0.3)):
        paths.append(tmp_path / f"{seed}.wav")
        write_wav(paths[-1], seconds=seconds, seed=seed)
    stats = compute_fbank_stats(paths, config)
    every = torch.stack(
        [pad_or_cut(official_fbank(read_wav(p)[0].numpy().T, 16000, 24), 40) for p in paths]
    ).double()
    assert stats.clips == 3
    assert stats.mean == pytest.approx(every.mean().item(), rel=1e-12)
    assert stats.std == pytest.approx(every.std(unbiased=False).item(), rel=1e-10)
    stats.save(tmp_path / "stats.json")
    assert FbankStats.load(tmp_path / "stats.json") == stats
    assert config.with_stats(stats).mean == stats.mean
    with pytest.raises(ValueError, match="recompute them"):
        AudioConfig(num_mel_bins=128).with_stats(stats)


def test_audio_config_rejects_bad_values():
    with pytest.raises(ValueError, match="std > 0"):
        AudioConfig(std=0.0)
    with pytest.raises(ValueError, match="positive"):
        AudioConfig(target_length=0)
