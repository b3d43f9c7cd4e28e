"""Manifests and AVDataset on tiny clips written in a temp dir."""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from avkernels.app.data import (
    AudioConfig,
    AVDataset,
    ClipError,
    ClipRecord,
    DataError,
    VisualConfig,
    collate,
    frame_indices,
    list_frames,
    read_manifest,
    write_manifest,
)
from avkernels.app.data.visual import CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, crop_box
from tests.app.data_fixtures import frame_colour, write_clip, write_frames

AUDIO = AudioConfig(num_mel_bins=16, target_length=32, mean=-2.0, std=3.0)
VISUAL = VisualConfig(size=8)


def make_records(root, count=4, frame_count=3):
    records = []
    for i in range(count):
        write_clip(root, f"audio/c{i}.wav", f"frames/c{i}", seed=i, frame_count=frame_count)
        records.append(
            ClipRecord(
                f"c{i}",
                "train" if i < count - 1 else "test",
                i % 2,
                root / f"audio/c{i}.wav",
                root / f"frames/c{i}",
                {"note": f"clip {i}"},
            )
        )
    return records


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifest_round_trip(tmp_path, suffix):
    records = make_records(tmp_path, count=3)
    path = write_manifest(tmp_path / f"manifest{suffix}", records)
    text = path.read_text()
    assert str(tmp_path) not in text  # paths inside the manifest's folder are stored relative
    assert read_manifest(path) == records
    outside = ClipRecord("x", "train", 0, tmp_path.parent / "a.wav", tmp_path.parent / "f", {})
    again = read_manifest(write_manifest(tmp_path / "sub" / f"m{suffix}", [outside]))
    assert again[0].audio == outside.audio


@pytest.mark.parametrize(
    "content, message",
    [
        ("id,split,label,audio\nx,train,0,a.wav\n", "header lacks column"),
        ("id,split,label,audio,frames\nx,train,cat,a.wav,f\n", "line 2: label must be an integer"),
        ("id,split,label,audio,frames\nx,train,-1,a.wav,f\n", "label must be an integer >= 0"),
        ("id,split,label,audio,frames\nx,train,0,,f\n", "line 2: missing audio"),
        ("id,split,label,audio,frames\nx,train,0,a.wav,f\nx,test,1,b.wav,g\n", "'x' appears twice"),
        (
            "id,split,label,audio,frames\nx,train,0,a.wav,f,extra\n",
            "line 2: 6 fields, the header has 5",
        ),
        (
            "id,split,label,audio,frames\nx,train,0,a.wav," + "f" * 200_000,
            "after line 1: malformed CSV",
        ),
    ],
)
def test_malformed_csv_manifests(tmp_path, content, message):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        read_manifest(tmp_path / "m.csv")


def test_manifest_that_is_not_utf8_names_the_fix(tmp_path):
    (tmp_path / "m.csv").write_bytes(
        "id,split,label,audio,frames\ncaf\xe9,train,0,a,f\n".encode("latin-1")
    )
    with pytest.raises(DataError, match="m.csv: not UTF-8 text .*save the manifest as UTF-8"):
        read_manifest(tmp_path / "m.csv")


def test_malformed_jsonl_and_paths(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(DataError, match="line 1: missing split, label, audio, frames"):
        read_manifest(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").write_text(
        '{"id":"a","split":"t","label":0,"audio":"a","frames":"f"}\nnot json\n'
    )
    with pytest.raises(DataError, match="line 2: not JSON"):
        read_manifest(tmp_path / "m.jsonl")
    with pytest.raises(DataError, match="must end in .csv or .jsonl"):
        read_manifest(tmp_path / "m.txt")
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "none.csv")


def test_sample_layout_and_batch_contract(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", make_records(tmp_path))
    dataset = AVDataset(manifest, "train", AUDIO, VISUAL)
    assert len(dataset) == 3 and dataset.ids == ["c0", "c1", "c2"] and dataset.num_classes == 2
    assert dataset.train  # the train split augments by default
    sample = AVDataset(manifest, "train", AUDIO, VISUAL, train=False)[1]
    assert sample["audio"].shape == (1, 32, 16) and sample["label"] == 1 and sample["id"] == "c1"
    visual = sample["visual"]
    assert visual.shape == (3, 3, 8, 8)  # (C, T, H, W)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    pixels = visual.mean(dim=(2, 3)) * std[:, None] + mean[:, None]  # (C, T) in [0, 1]
    expected = torch.tensor([frame_colour(t) for t in (1, 2, 3)]).T / 255.0
    torch.testing.assert_close(pixels, expected, atol=2.5 / 255, rtol=0)  # JPEG rounding
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate)))
    assert set(batch) == {"audio", "visual", "label", "id"}
    assert batch["audio"].shape == (3, 1, 32, 16) and batch["audio"].dtype == torch.float32
    assert batch["visual"].shape == (3, 3, 3, 8, 8) and batch["visual"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [0, 1, 0]
    assert batch["id"] == ["c0", "c1", "c2"]


def test_frame_sampling_follows_the_official_rule(tmp_path):
    assert frame_indices(30, 3, train=False) == [4, 14, 24]  # 1-based 5, 15, 25
    assert frame_indices(3, 3, train=False) == [0, 1, 2]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        picks = frame_indices(31, 3, train=True, generator=generator)  # seg = 10
        assert all(10 * i <= p < 10 * i + 10 for i, p in enumerate(picks))
    with pytest.raises(ValueError, match="2 frame"):
        frame_indices(2, 3, train=False)
    names = write_frames(tmp_path / "f", 12, name=lambda i: f"frame_0000{i}.jpg")
    assert list_frames(tmp_path / "f") == names  # frame_000010 after frame_00009


@pytest.mark.parametrize(
    "height, width, scale",
    [(240, 320, (0.08, 1.0)), (16, 16, (0.5, 1.0)), (10, 200, (0.9, 1.0)), (200, 10, (0.9, 1.0))],
)
def test_crop_box_is_torchvisions_random_resized_crop(height, width, scale):
    """The same boxes as torchvision's RandomResizedCrop.get_params drawing from the global RNG
    with the same seed (the last two shapes exhaust the 10 tries: the centre fallback)."""
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    image = Image.new("RGB", (width, height))
    for seed in range(25):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, list(scale), list(CROP_RATIO))
        generator = torch.Generator().manual_seed(seed)
        assert crop_box(height, width, scale, CROP_RATIO, generator) == tuple(expected)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    """Training items depend on (seed, epoch, index) only, not on what else drew from the
    global RNG (as it differs between the ranks of a DDP run); another epoch differs."""
    records = []
    for i in range(2):
        write_clip(tmp_path, f"a{i}.wav", f"f{i}", seed=i, frame_count=6, textured=True)
        records.append(ClipRecord(f"c{i}", "train", i, tmp_path / f"a{i}.wav", tmp_path / f"f{i}"))
    visual = VisualConfig(frames_per_clip=2, size=8)
    dataset = AVDataset(records, "train", AUDIO, visual, modalities=("visual",))

    def items(seed, epoch, global_draws):
        torch.manual_seed(global_draws)
        torch.rand(global_draws)
        dataset.set_epoch(seed, epoch)
        return torch.stack([dataset[i]["visual"] for i in range(len(dataset))])

    first = items(seed=3, epoch=1, global_draws=0)
    assert torch.equal(first, items(seed=3, epoch=1, global_draws=17))
    assert not torch.equal(first[0], first[1])
    for other in (items(seed=3, epoch=2, global_draws=0), items(seed=4, epoch=1, global_draws=0)):
        assert all(not torch.equal(first[i], other[i]) for i in range(len(dataset)))


def test_modalities_and_audio_cache(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", make_records(tmp_path))
    audio_only = AVDataset(manifest, "train", AUDIO, VISUAL, modalities=("audio",))
    assert set(audio_only[0]) == {"audio", "label", "id"}
    cached = AVDataset(manifest, "train", AUDIO, VISUAL, modalities=("audio",), cache_audio=True)
    first = cached[0]["audio"]
    first.zero_()  # a caller changing its sample must not change the cache
    assert torch.equal(cached[0]["audio"], audio_only[0]["audio"])
    with pytest.raises(ValueError, match="modalities"):
        AVDataset(manifest, "train", AUDIO, VISUAL, modalities=("text",))


def test_missing_and_corrupt_files_raise_or_are_skipped(tmp_path):
    records = make_records(tmp_path, count=5)
    (tmp_path / "audio/c1.wav").unlink()
    (tmp_path / "audio/c2.wav").write_bytes(b"not a wav")
    for frame in list_frames(tmp_path / "frames/c3")[1:]:
        frame.unlink()
    manifest = write_manifest(tmp_path / "m.csv", records)
    with pytest.raises(ClipError, match=r"c1.wav: audio file not found \(clip 'c1'\)"):
        AVDataset(manifest, "train", AUDIO, VISUAL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = AVDataset(manifest, "train", AUDIO, VISUAL, on_error="skip")
    assert dataset.ids == ["c0"]
    reasons = [str(error) for error in dataset.skipped]
    assert "audio file not found (clip 'c1')" in reasons[0]
    assert "c2.wav: cannot read audio header" in reasons[1]
    assert "1 frame(s), fewer than the 3 a clip needs (clip 'c3')" in reasons[2]
    assert "skipped 3 clip(s)" in str(caught[0].message)
    with pytest.raises(DataError, match="no clip in split 'val'"):
        AVDataset(manifest, "val", AUDIO, VISUAL)
    # A frame that decodes badly after the up-front check raises at load time, naming the file.
    (list_frames(tmp_path / "frames/c0")[0]).write_bytes(b"garbage")
    with pytest.raises(DataError, match="frame_00001.jpg: cannot decode image"):
        dataset[0]
