"""The demo's steps (:mod:`avkernels.app.demo`): each runs its part of the story and returns
its section of the report, a dict of measured numbers and figure names."""

from __future__ import annotations

import torch
from torch import nn

from avkernels import HAS_EXTENSION, TrackedBN, diagnose
from avkernels.app.data import load_av_digits
from avkernels.app.demo.context import (
    Demo,
    TensorSamples,
    audio_accuracy_by_speaker,
    curve,
    last_row,
    probe_accuracies,
)
from avkernels.app.demo.figures import (
    plot_confidences,
    plot_curves,
    plot_dead_maps,
    plot_dead_three_ways,
    plot_nonpositive,
    plot_ratios,
)
from avkernels.app.models import ResNetEncoder, load_encoder
from avkernels.diagnosis import compare
from avkernels.files import atomic_write
from avkernels.fust import ConfidenceTracker

KERNEL_ROUNDS = 5  # timing rounds per kernel ratio; the report gives their median and range


def step_data(demo: Demo) -> dict:
    """Build (or open) AV-Digits and load both splits into memory; the same numbers whenever it
    runs (its time is in the report's timings)."""
    digits = load_av_digits(config=demo.settings.data, progress=demo.progress)
    demo.train, demo.test = (
        TensorSamples(digits, split, demo.progress) for split in ("train", "test")
    )
    info = digits.info
    return {
        "root": str(digits.root),
        "clips": info["clips"],
        "speaker_disjoint": info["speaker_disjoint"],
        "speakers": info["speakers"],
        "test_speakers": info["test_speakers"],
        "speaker_clips": info["speaker_clips"],
        "audio_input": info["audio_input"],
        "visual_input": info["visual_input"],
        "classes": len(digits.classes),
    }


def step_pretrain(demo: Demo) -> dict:
    """(1) The source model: a ResNet-18 trained on the visual modality alone."""
    trainer = demo.train_run(
        "pretrain_visual",
        demo.base_config(
            stage="stage1",
            modalities=("visual",),
            epochs=demo.settings.pretrain_epochs,
            bn_weight_decay=demo.settings.source_bn_weight_decay,
            schedule="step",
            lr_step=demo.settings.source_lr_step,
            lr_gamma=0.1,
        ),
    )
    source = demo.out / "source" / "visual_encoder.pt"
    weights = trainer.model.visual_net.state_dict()
    atomic_write(source, lambda file: torch.save(weights, file))
    return {
        "encoder": str(source),
        "epochs": demo.settings.pretrain_epochs,
        "bn_weight_decay": demo.settings.source_bn_weight_decay,
        "lr": trainer.config.lr,
        "lr_step": demo.settings.source_lr_step,
        "eval_acc_visual": last_row(trainer.history, "eval")["acc_visual"],
        "curve": curve(trainer.history, "acc_visual"),
    }


def _audio_batches(demo: Demo) -> list:
    size = demo.settings.batch_size
    return [
        demo.test.audio[i : i + size]
        for i in range(0, min(len(demo.test), size * demo.settings.diagnosis_batches), size)
    ]


# The relative parameter criterion: tau = this x the layer's median |gamma| (the absolute
# one is the paper's 1e-10, the library default).
RELATIVE_ABNORMAL = 1e-5


def dead_three_ways(model: nn.Module, batches: list, title: str = "") -> tuple:
    """Dead channels of ``model`` per layer three ways: abnormal parameters (absolute
    ``|gamma|, |beta| < 1e-10`` and relative to the layer's median ``|gamma|``), dead on the
    audio batches (never firing on >= 99% of the samples) and the overlap of each parameter
    criterion with the activation one. Returns the absolute diagnosis and the summary."""
    absolute = diagnose(model, batches, title=title)
    relative = diagnose(model, batches, relative=True, threshold=RELATIVE_ABNORMAL)
    summary = _diagnosis_summary(absolute)
    per_layer = {}
    for by_abs, by_rel in zip(absolute.layers, relative.layers, strict=True):
        ratio = lambda count, n=by_abs.channels: None if count is None else count / n  # noqa: E731
        per_layer[by_abs.name] = {
            "channels": by_abs.channels,
            "abnormal_absolute": by_abs.abnormal_ratio,
            "abnormal_relative": by_rel.abnormal_ratio,
            "activation_dead": by_abs.dead_channel_ratio,
            "overlap_absolute": ratio(by_abs.abnormal_and_dead),
            "overlap_relative": ratio(by_rel.abnormal_and_dead),
        }
    channels = max(absolute.channels, 1)
    summary["abnormal_absolute_ratio"] = absolute.abnormal / channels
    summary["abnormal_relative_ratio"] = relative.abnormal / channels
    summary["relative_threshold"] = RELATIVE_ABNORMAL
    summary["per_layer"] = per_layer
    return absolute, summary


@torch.no_grad()
def _feature_maps(model: nn.Module, clip: torch.Tensor, report) -> tuple:
    """The ReLU'd BN outputs of one clip in the layer with the most activation-dead channels
    (the paper's Fig. 2b): the layer's name, its maps (C, H, W) and which channels are dead."""
    layer = max(
        (layer for layer in report.layers if layer.feeds_relu and layer.has_activations),
        key=lambda layer: layer.dead_on_all_samples,
    )
    captured = []
    hook = model.get_submodule(layer.name).register_forward_hook(
        lambda module, inputs, output: captured.append(output.clamp(min=0)[0])
    )
    training = model.training
    try:
        model.eval()(clip)
    finally:
        hook.remove()
        model.train(training)
    dead = layer.dead_sample_fraction >= layer.activation_threshold
    return layer.name, captured[0], dead


def _diagnosis_summary(report) -> dict:
    feeding = [layer for layer in report.layers if layer.feeds_relu]
    dead = sum(layer.dead_on_all_samples or 0 for layer in feeding)
    channels = sum(layer.channels for layer in feeding)
    nonpositive = sum((layer.mean_dead_fraction or 0.0) * layer.channels for layer in feeding)
    return {
        "layers": len(report.layers),
        "channels": report.channels,
        "abnormal_channels": report.abnormal,
        "threshold": report.threshold,
        "relu_fed_channels": channels,
        "dead_relu_fed_channels": dead,
        "dead_relu_fed_ratio": dead / max(channels, 1),
        "nonpositive_output_fraction": nonpositive / max(channels, 1),
        "per_layer_dead_ratio": {layer.name: layer.dead_channel_ratio for layer in report.layers},
        "per_layer_nonpositive": {layer.name: layer.mean_dead_fraction for layer in report.layers},
    }


def step_transfer(demo: Demo) -> dict:
    """(2) Cross-modal initialisation, dead-channel diagnosis, audio fine-tuning x3."""
    source = demo.sections["pretrain"]["encoder"]
    s = demo.settings
    batches = _audio_batches(demo)
    initialised = load_encoder(ResNetEncoder("resnet18", 1, width=s.width), source, adapt="sum")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)  # the seed the random-init audio run starts from
        untrained = diagnose(ResNetEncoder("resnet18", 1, width=s.width), batches)
    before, initialised_summary = dead_three_ways(
        initialised, batches, title="audio encoder initialised from visual"
    )
    dead_maps = plot_dead_maps(
        *_feature_maps(initialised, batches[0][:1], before), demo.figures / "dead_maps.png"
    )

    def audio_run(**fields):
        return demo.base_config(
            stage="stage1", modalities=("audio",), epochs=s.finetune_epochs, **fields
        )

    runs = {
        "random_init": audio_run(),
        "pretrained": audio_run(audio_init=source),
        "pretrained_abri": audio_run(audio_init=source, abri=("audio",)),
        "pretrained_abri_channel": audio_run(
            audio_init=source, abri=("audio",), abri_granularity="channel"
        ),
    }
    results = {}
    diagnoses = {
        "random_init_untrained": _diagnosis_summary(untrained),
        "initialised_from_visual": initialised_summary,
    }
    figures = {"dead_maps": dead_maps.name}
    for name, config in runs.items():
        trainer = demo.train_run(f"audio_{name}", config)
        results[name] = {
            "eval_acc_audio": last_row(trainer.history, "eval")["acc_audio"],
            "train_acc_audio": last_row(trainer.history, "train")["acc_audio"],
            "eval_acc_audio_by_speaker": audio_accuracy_by_speaker(
                trainer.model, demo.test, s.batch_size
            ),
            "curve": curve(trainer.history, "acc_audio"),
        }
        if name == "random_init":
            continue
        after, diagnoses[f"finetuned_{name}"] = dead_three_ways(
            trainer.model.audio_net, batches, title=f"audio encoder, {name}"
        )
        path = demo.figures / f"dead_channels_{name}.png"
        compare(before, after, ("initialised from visual", f"fine-tuned ({name})")).plot(path)
        figures[f"dead_channels_{name}"] = path.name
    figures["dead_three_ways"] = plot_dead_three_ways(
        diagnoses, demo.figures / "dead_three_ways.png"
    ).name
    figures["outputs_nonpositive"] = plot_nonpositive(
        diagnoses, demo.figures / "outputs_nonpositive.png"
    ).name
    figures["audio_finetuning"] = plot_curves(
        {name: r["curve"] for name, r in results.items()},
        "audio fine-tuning: test accuracy",
        demo.figures / "audio_finetuning.png",
    ).name
    test_size = len(demo.test)
    return {
        "source": source,
        "epochs": s.finetune_epochs,
        "test_samples": test_size,
        "diagnosis": diagnoses,
        "finetune": results,
        "figures": figures,
    }


def step_fust(demo: Demo) -> dict:
    """(3) FusT: stage 1, confidences and mask ratios, stage 2 vs naive joint training."""
    s = demo.settings
    source = demo.sections["pretrain"]["encoder"]
    stage1 = demo.train_run(
        "fust_stage1", demo.base_config(stage="stage1", epochs=s.stage1_epochs, visual_init=source)
    )
    stage2 = demo.train_run(
        "fust_stage2",
        demo.base_config(
            stage="stage2",
            epochs=s.stage2_epochs,
            init_from=str(stage1.run_dir.resolve()),
            probe_epochs=s.probe_epochs,
        ),
    )
    ratios = stage2.ratios  # what stage 2 trained with, from the stage-1 confidence files
    confidences = {
        m: ConfidenceTracker.load(stage1.run_dir / f"confidence_{m}.pt").mean()
        for m in ("audio", "visual")
    }
    joint = demo.train_run(
        "joint_naive",
        demo.base_config(
            stage="joint",
            epochs=s.stage1_epochs + s.stage2_epochs,
            visual_init=source,
            probe_epochs=s.probe_epochs,
        ),
    )
    demo.figures.mkdir(parents=True, exist_ok=True)
    conf_a = confidences["audio"].values
    conf_v = confidences["visual"].aligned(confidences["audio"].ids, "visual confidences")
    figures = {
        "confidences": plot_confidences(conf_a, conf_v, demo.figures / "confidences.png").name,
        "mask_ratios": plot_ratios(ratios, demo.figures / "mask_ratios.png").name,
    }
    runs = {}
    for name, trainer in (("fust_stage2", stage2), ("joint_naive", joint)):
        final = last_row(trainer.history, "eval")
        runs[name] = {
            "epochs": trainer.config.epochs,
            "eval_acc_joint": final["acc"],
            "eval_acc_audio_half": final["acc_audio"],
            "eval_acc_visual_half": final["acc_visual"],
            "probe_acc": probe_accuracies(trainer.history),
            "curve": curve(trainer.history, "acc"),
        }
    stage1_final = last_row(stage1.history, "eval")
    summary = ratios.summary()
    return {
        "stage1": {
            "epochs": s.stage1_epochs,
            "eval_acc_audio": stage1_final["acc_audio"],
            "eval_acc_visual": stage1_final["acc_visual"],
            "mean_confidence_audio": float(conf_a.mean()),
            "mean_confidence_visual": float(conf_v.mean()),
        },
        "mask_policy": {
            "rule": ratios.rule,
            "mode": ratios.mode,
            "threshold": ratios.threshold,
            "eta": list(ratios.eta),
            "rho": list(ratios.rho),
            "target": stage2.config.mask_target,
            **summary,
        },
        "runs": runs,
        "figures": figures,
        "test_samples": len(demo.test),
    }


def _step_timer(layer: nn.Module, x: torch.Tensor):
    """A Timer of one training step (forward + backward with a materialised gradient)."""
    from torch.utils.benchmark import Timer

    x = x.detach().requires_grad_(True)
    grad = torch.randn_like(x)

    def step() -> None:
        layer(x).backward(grad)

    step()  # warm-up
    return Timer("step()", globals={"step": step})


def _time_ratio(
    candidate: nn.Module,
    baseline: nn.Module,
    x: torch.Tensor,
    seconds: float,
    rounds: int = KERNEL_ROUNDS,
) -> list:
    """candidate / baseline step time, once per round, the two timed back to back in each
    round so that a change of load on a shared machine hits both alike."""
    timers = _step_timer(candidate, x), _step_timer(baseline, x)
    ratios = []
    for _ in range(rounds):
        new, old = (t.blocked_autorange(min_run_time=seconds).median for t in timers)
        ratios.append(new / old)
    return sorted(ratios)


def step_kernels(demo: Demo) -> dict:
    """(4) TrackedBN (dead statistics on) vs nn.BatchNorm2d, training step time ratio: the
    median of the rounds, with their range."""
    seconds, rows = demo.settings.kernel_time, []
    for shape in demo.settings.kernel_shapes:
        x = torch.randn(shape)
        channels = shape[1]
        row = {"shape": list(shape)}
        for name, candidate, baseline in (
            ("tracked_over_batchnorm", TrackedBN(channels), nn.BatchNorm2d(channels)),
            (
                "tracked_relu_over_batchnorm_relu",
                TrackedBN(channels, activation="relu"),
                nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()),
            ),
        ):
            ratios = _time_ratio(candidate, baseline, x, seconds)
            row[name] = ratios[len(ratios) // 2]
            row[f"{name}_range"] = [ratios[0], ratios[-1]]
        rows.append(row)
    return {
        "backend": "C++ (avkernels._C)" if HAS_EXTENSION else "PyTorch reference",
        "rounds": KERNEL_ROUNDS,
        "rows": rows,
    }
