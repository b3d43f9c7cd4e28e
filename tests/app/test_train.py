"""The training loop: exact resume (stop or crash, mid-epoch or at an epoch boundary), run-dir
rules, stage outputs, data order, RNG state and linear probes, on tiny synthetic data."""

from __future__ import annotations

import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch

from avkernels.app.training import (
    CHECKPOINT,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    linear_probe,
    patch_size,
)
from avkernels.app.training.model_setup import build_model, build_optimizer
from avkernels.app.training.rng import rng_state, set_rng_state
from avkernels.app.training.sampling import EpochSampler
from avkernels.fust import ConfidenceTracker
from tests.app.training_fixtures import (
    NUM_CLASSES,
    SyntheticAV,
    assert_same_state,
    final_state,
    metrics_rows,
    run,
    sigint_inside_the_probe,
    tiny_config,
)


class Without(SyntheticAV):
    """:class:`SyntheticAV` whose samples lack the entry ``key``."""

    def __init__(self, key: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.key = key

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        del item[self.key]
        return item


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stage1") / "run"
    run(tiny_config(stage="stage1"), run_dir)
    return run_dir


def stop_at(step: int):
    def on_step(trainer, global_step):
        if global_step == step:
            trainer.request_stop()

    return on_step


# 10 samples, batch 4: 3 steps per epoch. Step 2 is mid-epoch 1, step 3 its last batch
# (before the epoch is closed), step 5 mid-epoch 2.
@pytest.mark.parametrize(
    "stage, stop_step", [("stage1", 2), ("stage1", 3), ("stage2", 3), ("stage2", 5)]
)
def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, stage1_dir, stage, stop_step):
    extra = (
        {
            "init_from": str(stage1_dir),
            "mask_target": "both",
            "mask_threshold": 0.0,
            "mask_rho": (0.9, 0.9),
        }
        if stage == "stage2"
        else {}
    )
    config = tiny_config(stage=stage, **extra)
    run(config, tmp_path / "straight")
    with pytest.raises(TrainingInterrupted):
        run(config, tmp_path / "resumed", on_step=stop_at(stop_step))
    interrupted = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    assert interrupted["global_step"] == stop_step and not interrupted["finished"]
    random.seed(123), np.random.seed(5), torch.manual_seed(99)  # the checkpoint must restore these
    run(config, tmp_path / "resumed", resume=True)
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))
    assert metrics_rows(tmp_path / "straight") == metrics_rows(tmp_path / "resumed")
    if stage == "stage1":
        for modality in ("audio", "visual"):
            files = [
                ConfidenceTracker.load(tmp_path / d / f"confidence_{modality}.pt").mean()
                for d in ("straight", "resumed")
            ]
            assert files[0].ids == files[1].ids and torch.equal(files[0].values, files[1].values)


@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_crash_resumes_from_last_checkpoint_with_nothing_lost(tmp_path, checkpoint_every):
    """A crash (no chance to checkpoint) in epoch 2: the resumed run redoes only what the last
    checkpoint (epoch 1 end, or step 4 with checkpoint_every=2) did not hold."""
    config = tiny_config(stage="joint", checkpoint_every=checkpoint_every)
    run(config, tmp_path / "straight")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(config, tmp_path / "resumed", data=SyntheticAV(noise=True, fail_at=10 + 7))
    saved = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    assert saved["global_step"] == (4 if checkpoint_every else 3)
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 2
    run(config, tmp_path / "resumed", resume=True)
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))


def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path):
    config = tiny_config(stage="joint")
    run(config, tmp_path / "straight")

    def interrupt(trainer, global_step):
        if global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="stopped at epoch 1, step 2"):
        run(config, tmp_path / "resumed", on_step=interrupt)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    run(config, tmp_path / "resumed", resume=True)
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))


def test_ctrl_c_during_the_probes_stops_them_and_resume_runs_them(tmp_path, monkeypatch):
    config = tiny_config(stage="joint", epochs=1, probe_epochs=2)
    run(config, tmp_path / "straight")
    sigint_inside_the_probe(monkeypatch)
    with pytest.raises(TrainingInterrupted, match="linear probes.*resume"):
        run(config, tmp_path / "resumed")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    saved = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    assert saved["epoch"] == 1 and not saved["finished"]
    monkeypatch.undo()
    history = run(config, tmp_path / "resumed", resume=True).history
    assert [row["split"] for row in history] == ["train", "eval", "probe_audio", "probe_visual"]
    assert_same_state(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))


def test_finished_run_resumes_to_itself(tmp_path):
    config = tiny_config(stage="joint", epochs=1)
    first = run(config, tmp_path / "run")
    again = Trainer(config, SyntheticAV(), tmp_path / "run", resume=True, progress=False)
    assert again.fit() == first.history and again.global_step == first.global_step


def test_run_directory_rules(tmp_path):
    config = tiny_config(stage="joint", epochs=1)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        Trainer(config, SyntheticAV(), tmp_path / "empty", resume=True)
    run(config, tmp_path / "run")
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(config, SyntheticAV(), tmp_path / "run")
    changed = tiny_config(stage="joint", epochs=1, lr=0.5, batch_size=2)
    with pytest.raises(ValueError, match=r"lr: 0\.01 != 0\.5.*batch_size|batch_size.*lr"):
        Trainer(changed, SyntheticAV(), tmp_path / "run", resume=True)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert TrainConfig.from_dict(saved) == config


def test_stage1_writes_confidences_of_every_sample(stage1_dir):
    for modality in ("audio", "visual"):
        tracker = ConfidenceTracker.load(stage1_dir / f"confidence_{modality}.pt")
        assert tracker.num_epochs == 2
        confidences = tracker.mean()
        assert sorted(confidences.ids) == [f"clip{i:03d}" for i in range(10)]
        assert ((confidences.values > 0) & (confidences.values < 1)).all()
    rows = [json.loads(line) for line in (stage1_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["split"]) for r in rows] == [
        (1, "train"),
        (1, "eval"),
        (2, "train"),
        (2, "eval"),
    ]
    assert {"acc_audio", "acc_visual", "loss"} <= set(rows[1])


def test_stage1_single_modality_needs_only_its_input(tmp_path):
    config = tiny_config(stage="stage1", modalities=("audio",), epochs=1, probe_epochs=2)
    trainer = Trainer(
        config,
        Without("visual"),
        tmp_path / "run",
        eval_data=Without("visual", 6, seed=1),
        progress=False,
    )
    history = trainer.fit()
    assert "acc_audio" in history[0] and "acc_visual" not in history[0]
    assert [row["split"] for row in history] == ["train", "eval", "probe_audio"]
    assert (tmp_path / "run" / "confidence_audio.pt").is_file()
    assert not (tmp_path / "run" / "confidence_visual.pt").exists()


def test_stage2_uses_stage1_encoders_and_reports_missing_confidences(tmp_path, stage1_dir):
    config = tiny_config(stage="stage2", init_from=str(stage1_dir), epochs=1)
    trainer = Trainer(config, SyntheticAV(), tmp_path / "run", progress=False)
    stage1 = torch.load(stage1_dir / "model.pt", weights_only=True)
    for key, value in trainer.model.audio_net.state_dict().items():
        assert torch.equal(value, stage1[f"audio_net.{key}"]), key
    assert len(trainer.ratios) == 10
    with pytest.raises(FileNotFoundError, match="no audio confidence file"):
        Trainer(
            tiny_config(
                stage="stage2",
                audio_confidence=str(tmp_path / "none.pt"),
                init_from=str(stage1_dir),
            ),
            SyntheticAV(),
            tmp_path / "other",
        )
    with pytest.raises(ValueError, match="needs the stage-1 confidences"):
        Trainer(tiny_config(stage="stage2"), SyntheticAV(), tmp_path / "third")


@pytest.mark.parametrize("target", ["input", "features"])
def test_stage2_masks_inputs_or_fused_features(tmp_path, stage1_dir, monkeypatch, target):
    """mask_mode="mean": every sample gets the same ratio per modality, so with
    mask_target="input" exactly floor(P * ratio) patches of each arrive as zeros, and with
    "features" the inputs arrive whole and the ratios go to the fusion layer."""
    config = tiny_config(
        stage="stage2",
        init_from=str(stage1_dir),
        epochs=1,
        mask_mode="mean",
        mask_threshold=0.0,
        mask_eta=(50.0, 50.0),
        mask_rho=(0.5, 0.5),
        mask_target=target,
    )
    trainer = Trainer(config, SyntheticAV(), tmp_path / "run", progress=False)
    seen = []
    forward = trainer.model.forward

    def recording_forward(audio, visual, *ratios):
        seen.append((audio.clone(), visual.clone(), ratios))
        return forward(audio, visual, *ratios)

    monkeypatch.setattr(trainer.model, "forward", recording_forward)
    trainer.fit()
    ratio_a, ratio_v = trainer.ratios.audio, trainer.ratios.visual
    assert float(ratio_a.max()) > 0 or float(ratio_v.max()) > 0
    for audio, visual, (fused_a, fused_v) in seen:
        # audio (64, 32) with the (32, 16) grid: 2x2 patches, 512 of them
        zero_patches = (audio.view(-1, 32, 2, 16, 2) == 0).all(-1).all(-2).flatten(1).sum(1)
        frames = visual.transpose(1, 2).reshape(-1, 3, 32, 32)  # 32x32 / 22: 1x1 patches
        zero_pixels = (frames == 0).all(1).flatten(1).sum(1)
        if target == "input":
            assert fused_a is None and fused_v is None
            assert (zero_patches == int(512 * float(ratio_a[0]))).all()
            assert (zero_pixels == int(1024 * float(ratio_v[0]))).all()
        else:
            assert (zero_patches == 0).all() and (zero_pixels == 0).all()
            assert torch.equal(fused_a, ratio_a[: len(fused_a)])
            assert torch.equal(fused_v, ratio_v[: len(fused_v)])


def test_patch_size_keeps_the_official_grid():
    assert patch_size((1024, 128), (32, 16)) == (32, 8)
    assert patch_size((224, 224), (22, 22)) == (10, 10)
    assert patch_size((64, 32), (32, 16)) == (2, 2)
    assert patch_size((16, 8), (32, 16)) == (1, 1)


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    sampler = EpochSampler(10, 4, seed=3)
    sampler.set_epoch(1)
    full = list(sampler)
    assert sorted(full) == list(range(10))
    sampler.set_epoch(1, start_batch=2)
    assert list(sampler) == full[8:] and len(sampler) == 2
    sampler.set_epoch(2)
    assert list(sampler) != full
    other = EpochSampler(10, 4, seed=3)
    other.set_epoch(1)
    assert list(other) == full


def test_rng_state_round_trip_through_a_safe_load(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_linear_probe_separates_separable_features_and_keeps_rng(tmp_path):
    from avkernels.app.models import AVClassifier

    torch.manual_seed(0)
    model = AVClassifier(NUM_CLASSES, width=4).eval()
    data = SyntheticAV(12)
    data.audio = data.labels.float()[:, None, None, None].expand(-1, 1, 64, 32) * 3.0
    state = torch.get_rng_state()
    result = linear_probe(model, "audio", data, data, epochs=200, lr=0.1, batch_size=12)
    assert torch.equal(torch.get_rng_state(), state)
    assert result["probe_train_acc"] == 1.0 and result["probe_eval_acc"] == 1.0
    assert not model.training


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("stage", "stage3", "stage must be one of"),
        ("num_classes", 0, "num_classes must be a positive int"),
        ("mask_target", "everything", "mask_target must be one of"),
        ("modalities", ("audio", "text"), "modalities"),
        ("mask_eta", (1.0,), "mask_eta must be an"),
        ("lr", 0.0, "lr must be > 0"),
        ("lr", float("nan"), "lr must be > 0"),
        ("audio_patch_grid", (0, 0), "audio_patch_grid must be two ints >= 1"),
        ("visual_patch_grid", (-1, -1), "visual_patch_grid must be two ints >= 1"),
        ("mask_rho", (2.0, 0.5), r"mask_rho must lie in \[0, 1\]"),
        ("mask_threshold", float("nan"), r"mask_threshold must lie in \[0, 1\]"),
        ("mask_eta", (float("inf"), 1.0), "mask_eta must be finite"),
        ("lr_gamma", float("nan"), "lr_gamma must be finite"),
        ("seed", -1, "seed must be an int"),
        ("bn_weight_decay", -1.0, "bn_weight_decay must be finite and >= 0"),
        ("abri_granularity", "pixel", "abri_granularity must be one of"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**{field: value})


def test_bad_batches_are_named(tmp_path):
    with pytest.raises(KeyError, match=r"lacks \['id'\]"):
        Trainer(tiny_config(), Without("id"), tmp_path / "run", progress=False).fit()


def _record_bn_outputs(model) -> tuple[list, list]:
    """Forward hooks on every BN: (dtype, is channels_last) of each output."""
    seen = []
    hooks = [
        m.register_forward_hook(
            lambda m, i, o: seen.append(
                (o.dtype, o.is_contiguous(memory_format=torch.channels_last))
            )
        )
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    return seen, hooks


@pytest.mark.parametrize("stage", ["stage1", "joint"])
def test_channels_last_training_matches_nchw(tmp_path, stage):
    reference = run(tiny_config(stage=stage, epochs=1), tmp_path / "nchw")
    trainer = Trainer(
        tiny_config(stage=stage, epochs=1, channels_last=True),
        SyntheticAV(noise=True),
        tmp_path / "cl",
        progress=False,
    )
    seen, _ = _record_bn_outputs(trainer.model)
    trainer.fit()
    assert seen and all(entry == (torch.float32, True) for entry in seen), set(seen)
    assert trainer.history[0]["loss"] == pytest.approx(reference.history[0]["loss"], rel=1e-4)
    for name, value in trainer.model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(
                value, reference.model.state_dict()[name], rtol=1e-3, atol=1e-4, msg=name
            )


@pytest.mark.parametrize("stage", ["stage1", "joint"])
def test_bf16_autocast_training(tmp_path, stage):
    """precision='bf16': every BN runs on bf16 activations (channels_last kept), float32
    parameters are updated, the loss stays finite."""
    trainer = Trainer(
        tiny_config(stage=stage, epochs=1, precision="bf16", channels_last=True),
        SyntheticAV(noise=True),
        tmp_path / "bf16",
        progress=False,
    )
    seen, _ = _record_bn_outputs(trainer.model)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    assert seen and all(entry == (torch.bfloat16, True) for entry in seen), set(seen)
    assert math.isfinite(trainer.history[0]["loss"])
    weight = "audio_net.conv1.weight"
    assert trainer.model.state_dict()[weight].dtype == torch.float32
    assert not torch.equal(trainer.model.state_dict()[weight], initial[weight])


def test_fp16_needs_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        Trainer(tiny_config(precision="fp16"), SyntheticAV(), tmp_path / "run", device="cpu")


def test_bn_weight_decay_applies_to_batchnorm_parameters_only():
    lr, wd, bn_wd = 0.1, 0.01, 0.5
    config = tiny_config(
        optimizer="sgd", momentum=0.0, lr=lr, weight_decay=wd, bn_weight_decay=bn_wd
    )
    model = build_model(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(config, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: SGD only decays, p <- p * (1 - lr * decay)
    bn_names = {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
        for name, _ in module.named_parameters(recurse=False)
    }
    assert bn_names and len(bn_names) < len(before)
    for name, p in model.named_parameters():
        decay = bn_wd if name in bn_names else wd
        torch.testing.assert_close(p.detach(), before[name] * (1 - lr * decay))


@pytest.mark.parametrize("granularity, alpha_size", [("layer", 1), ("channel", None)])
def test_abri_granularity_sets_the_blend_weight_shape(granularity, alpha_size):
    model = build_model(tiny_config(abri=("audio",), abri_granularity=granularity))
    layers = [m for m in model.audio_net.modules() if getattr(m, "abri_enabled", False)]
    assert layers
    for layer in layers:
        assert layer.abri_alpha.numel() == (alpha_size or layer.num_features)
