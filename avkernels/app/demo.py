"""The ``avkernels demo`` pipeline: the paper's story end to end on AV-Digits, as a report.

Steps (each a function that returns its section of the report and caches it, so re-running
with the same output folder skips finished steps and resumes an interrupted training run):

1. ``pretrain``: a source ResNet-18 trained on the visual modality alone (FusT stage 1 with
   ``modalities=("visual",)``); its encoder is saved as ``source/visual_encoder.pt``.
2. ``transfer``: the audio encoder initialised from that visual encoder (RGB stem summed to one
   channel); dead-channel diagnosis on audio inputs before and after fine-tuning; audio
   fine-tuning from random init vs pre-trained vs pre-trained + ABRi.
3. ``fust``: FusT stage 1 (each encoder alone from the same initial weights: visual from the
   source, audio random), the per-sample confidences and the mask ratios they give, stage 2
   against naive joint training given as many epochs as stage 1 + stage 2, with each
   encoder's linear-probe accuracy.
4. ``kernels``: TrackedBN against ``nn.BatchNorm2d``, training step (forward + backward) time
   ratio on a few shapes, measured in the run.

Every training run goes through :class:`avkernels.app.train.Trainer` (``OUT/runs/<name>``), so
progress bars, checkpoints and resume behave as in ``avkernels train``. Every number of the
report is measured in the run that wrote it; ``report.json`` holds them all, ``report.md`` and
``report.html`` (plots inline, base64 PNG) present them.

The inputs are decoded once per split with the evaluation front end (no random crop) and
kept in memory: the CPU budget goes to training, not to decoding. Everything runs on the CPU
with one torch thread (the models are small; on a shared 2-core machine one thread is several
times faster than two contending ones).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from avkernels.app.data import AVDigitsConfig, cache_folder
from avkernels.app.progress import progress_enabled
from avkernels.files import atomic_write, atomic_write_text

REPORT_VERSION = 1
KERNEL_ROUNDS = 5  # timing rounds per kernel ratio; the report gives their median and range


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run; ``mode`` names it in the output folder (resuming needs the same)."""

    mode: str
    data: AVDigitsConfig
    width: int
    batch_size: int
    pretrain_epochs: int
    finetune_epochs: int
    stage1_epochs: int
    stage2_epochs: int
    probe_epochs: int
    diagnosis_batches: int
    kernel_shapes: tuple
    kernel_time: float  # seconds of timing per measurement
    seed: int = 0
    optimizer: dict = field(
        default_factory=lambda: {
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "cosine",
        }
    )

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["kernel_shapes"] = [list(shape) for shape in self.kernel_shapes]
        values["data"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in values["data"].items()
        }
        return values


def settings(quick: bool = False, seed: int = 0) -> DemoSettings:
    """The default demo (a few minutes on 2 CPU cores) or the ``--quick`` one (for tests)."""
    if quick:
        return DemoSettings(
            mode="quick",
            data=AVDigitsConfig(train_per_class=20, test_per_class=10),
            width=8,
            batch_size=32,
            pretrain_epochs=2,
            finetune_epochs=2,
            stage1_epochs=1,
            stage2_epochs=1,
            probe_epochs=5,
            diagnosis_batches=2,
            kernel_shapes=((8, 16, 16, 16),),
            kernel_time=0.02,
            seed=seed,
        )
    return DemoSettings(
        mode="default",
        data=AVDigitsConfig(),
        width=16,
        batch_size=32,
        pretrain_epochs=8,
        finetune_epochs=4,
        stage1_epochs=3,
        stage2_epochs=3,
        probe_epochs=20,
        diagnosis_batches=4,
        kernel_shapes=((32, 64, 28, 28), (32, 256, 7, 7)),
        kernel_time=0.2,
        seed=seed,
    )


class DemoError(Exception):
    """A problem the user can fix (wrong output folder, missing data source)."""


# --- data ---------------------------------------------------------------------------------------


class TensorSamples(Dataset):
    """One split of AV-Digits decoded once into memory, in the batch contract of
    :mod:`avkernels.app.data` (evaluation front end: no random crop)."""

    def __init__(self, digits, split: str, progress: bool | None = None) -> None:
        from tqdm.auto import tqdm

        from avkernels.app.data import AVDataset

        dataset = AVDataset(
            digits.manifest, split, digits.audio, digits.visual, train=False, progress=progress
        )
        samples = [
            dataset[i]
            for i in tqdm(
                range(len(dataset)),
                unit="clip",
                leave=False,
                desc=f"decoding the {split} split",
                disable=not progress_enabled(progress),
            )
        ]
        self.audio = torch.stack([sample["audio"] for sample in samples])
        self.visual = torch.stack([sample["visual"] for sample in samples])
        self.labels = [sample["label"] for sample in samples]
        self.ids = [sample["id"] for sample in samples]
        self.num_classes = len(digits.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {
            "audio": self.audio[index],
            "visual": self.visual[index],
            "label": self.labels[index],
            "id": self.ids[index],
        }


# --- context ------------------------------------------------------------------------------------


@dataclass
class Demo:
    """One demo run: settings, output folder, data, and the report sections so far."""

    out: Path
    settings: DemoSettings
    progress: bool | None = None
    log: Callable[[str], None] = print
    train: TensorSamples | None = None
    test: TensorSamples | None = None
    data_info: dict = field(default_factory=dict)
    sections: dict = field(default_factory=dict)

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    def section_path(self, step: str) -> Path:
        return self.out / "steps" / f"{step}.json"

    def base_config(self, **fields):
        from avkernels.app.train import TrainConfig

        s = self.settings
        return TrainConfig(
            num_classes=self.train.num_classes,
            batch_size=s.batch_size,
            seed=s.seed,
            width=s.width,
            **s.optimizer,
            **fields,
        )

    def train_run(self, name: str, config):
        """Train (or resume, or reopen when finished) ``OUT/runs/name``; return the Trainer."""
        from avkernels.app.train import CHECKPOINT, Trainer

        run_dir = self.out / "runs" / name
        resume = (run_dir / CHECKPOINT).is_file()
        try:
            trainer = Trainer(
                config,
                self.train,
                run_dir,
                eval_data=self.test,
                resume=resume,
                device="cpu",
                progress=self.progress,
            )
        except ValueError as error:
            raise DemoError(f"{run_dir}: {error}") from None
        finished_earlier = trainer.finished
        trainer.fit()
        final = ", ".join(f"{k} {v:.3f}" for k, v in _last(trainer.history, "eval").items())
        self.log(f"  {name}: test {final}" + (" (trained earlier)" if finished_earlier else ""))
        return trainer


def _last(history: list, split: str) -> dict:
    rows = [row for row in history if row["split"] == split]
    return {k: v for k, v in rows[-1].items() if k not in ("epoch", "split")} if rows else {}


def _curve(history: list, key: str) -> list:
    return [row[key] for row in history if row["split"] == "eval" and key in row]


def _probes(history: list) -> dict:
    return {
        row["split"][len("probe_") :]: row["probe_eval_acc"]
        for row in history
        if row["split"].startswith("probe_")
    }


# --- steps --------------------------------------------------------------------------------------


def step_data(demo: Demo) -> dict:
    """Build (or open) AV-Digits and load both splits into memory."""
    from avkernels.app.data import load_av_digits

    started = time.perf_counter()
    digits = load_av_digits(config=demo.settings.data, progress=demo.progress)
    built = time.perf_counter() - started
    demo.train, demo.test = (
        TensorSamples(digits, split, demo.progress) for split in ("train", "test")
    )
    info = digits.info
    return {
        "root": str(digits.root),
        "clips": info["clips"],
        "speaker_disjoint": info["speaker_disjoint"],
        "speakers": info["speakers"],
        "audio_input": info["audio_input"],
        "visual_input": info["visual_input"],
        "classes": len(digits.classes),
        "seconds": time.perf_counter() - started,
        "build_or_open_seconds": built,
    }


def step_pretrain(demo: Demo) -> dict:
    """(1) The source model: a ResNet-18 trained on the visual modality alone."""
    trainer = demo.train_run(
        "pretrain_visual",
        demo.base_config(
            stage="stage1", modalities=("visual",), epochs=demo.settings.pretrain_epochs
        ),
    )
    source = demo.out / "source" / "visual_encoder.pt"
    weights = trainer.model.visual_net.state_dict()
    atomic_write(source, lambda file: torch.save(weights, file))
    return {
        "encoder": str(source),
        "epochs": demo.settings.pretrain_epochs,
        "eval_acc_visual": _last(trainer.history, "eval")["acc_visual"],
        "curve": _curve(trainer.history, "acc_visual"),
    }


def _audio_batches(demo: Demo) -> list:
    size = demo.settings.batch_size
    return [
        demo.test.audio[i : i + size]
        for i in range(0, min(len(demo.test), size * demo.settings.diagnosis_batches), size)
    ]


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
    from avkernels.app.models import ResNetEncoder, load_encoder
    from avkernels.diagnosis import compare, diagnose

    source = demo.sections["pretrain"]["encoder"]
    s = demo.settings
    batches = _audio_batches(demo)
    initialised = load_encoder(ResNetEncoder("resnet18", 1, width=s.width), source, adapt="sum")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)  # the seed the random-init audio run starts from
        untrained = diagnose(ResNetEncoder("resnet18", 1, width=s.width), batches)
    before = diagnose(initialised, batches, title="audio encoder initialised from visual")
    runs = {
        "random_init": demo.base_config(
            stage="stage1", modalities=("audio",), epochs=s.finetune_epochs
        ),
        "pretrained": demo.base_config(
            stage="stage1", modalities=("audio",), epochs=s.finetune_epochs, audio_init=source
        ),
        "pretrained_abri": demo.base_config(
            stage="stage1",
            modalities=("audio",),
            epochs=s.finetune_epochs,
            audio_init=source,
            abri=("audio",),
        ),
    }
    results = {}
    diagnoses = {
        "random_init_untrained": _diagnosis_summary(untrained),
        "initialised_from_visual": _diagnosis_summary(before),
    }
    demo.figures.mkdir(parents=True, exist_ok=True)
    figures = {}
    for name, config in runs.items():
        trainer = demo.train_run(f"audio_{name}", config)
        results[name] = {
            "eval_acc_audio": _last(trainer.history, "eval")["acc_audio"],
            "train_acc_audio": _last(trainer.history, "train")["acc_audio"],
            "curve": _curve(trainer.history, "acc_audio"),
        }
        if name == "random_init":
            continue
        after = diagnose(trainer.model.audio_net, batches, title=f"audio encoder, {name}")
        diagnoses[f"finetuned_{name}"] = _diagnosis_summary(after)
        path = demo.figures / f"dead_channels_{name}.png"
        compare(before, after, ("initialised from visual", f"fine-tuned ({name})")).plot(path)
        figures[f"dead_channels_{name}"] = path.name
    figures["outputs_nonpositive"] = _plot_nonpositive(
        diagnoses, demo.figures / "outputs_nonpositive.png"
    ).name
    figures["audio_finetuning"] = _plot_curves(
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
    from avkernels.fust import ConfidenceTracker

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
        "confidences": _plot_confidences(conf_a, conf_v, demo.figures / "confidences.png").name,
        "mask_ratios": _plot_ratios(ratios, demo.figures / "mask_ratios.png").name,
    }
    runs = {}
    for name, trainer in (("fust_stage2", stage2), ("joint_naive", joint)):
        final = _last(trainer.history, "eval")
        runs[name] = {
            "epochs": trainer.config.epochs,
            "eval_acc_joint": final["acc"],
            "eval_acc_audio_half": final["acc_audio"],
            "eval_acc_visual_half": final["acc_visual"],
            "probe_acc": _probes(trainer.history),
            "curve": _curve(trainer.history, "acc"),
        }
    stage1_final = _last(stage1.history, "eval")
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
    from avkernels import HAS_EXTENSION, TrackedBN

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


# --- findings (worded from the measured numbers) ------------------------------------------------


def _noise(accuracy: float, samples: int) -> float:
    """Two binomial standard errors of the difference of two accuracies on ``samples``."""
    return 2 * math.sqrt(2 * max(accuracy * (1 - accuracy), 1e-4) / samples)


def _versus(name: str, new: float, old: float, samples: int, baseline: str) -> str:
    diff = new - old
    margin = _noise((new + old) / 2, samples)
    verdict = "within noise" if abs(diff) < margin else "better" if diff > 0 else "worse"
    return (
        f"{name}: {100 * new:.1f}% vs {100 * old:.1f}% for {baseline} "
        f"({100 * diff:+.1f} points, {verdict}; noise margin +-{100 * margin:.1f} on "
        f"{samples} test clips)"
    )


def _transfer_findings(section: dict) -> list:
    results, diagnoses, samples = section["finetune"], section["diagnosis"], section["test_samples"]
    acc = {name: r["eval_acc_audio"] for name, r in results.items()}
    first = {name: r["curve"][0] for name, r in results.items()}
    init, random = diagnoses["initialised_from_visual"], diagnoses["random_init_untrained"]
    lines = [
        f"Initialised from the visual source, {init['dead_relu_fed_channels']} of "
        f"{init['relu_fed_channels']} ReLU-fed BN channels of the audio encoder are dead on "
        f"audio inputs (<= 0 on >= 99% of the test samples; "
        f"{random['dead_relu_fed_channels']} in a randomly initialised one); "
        f"{_pct(init['nonpositive_output_fraction'])} of their outputs are <= 0 "
        f"({_pct(random['nonpositive_output_fraction'])} at random init)."
    ]
    for name in ("pretrained", "pretrained_abri"):
        key = f"finetuned_{name}"
        if key in diagnoses:
            lines.append(
                f"After fine-tuning ({name}): {diagnoses[key]['dead_relu_fed_channels']} dead."
            )
    lines.append(
        _versus("Pre-trained", acc["pretrained"], acc["random_init"], samples, "random init")
    )
    lines.append(
        _versus(
            "Pre-trained + ABRi",
            acc["pretrained_abri"],
            acc["pretrained"],
            samples,
            "pre-trained without ABRi",
        )
    )
    lines.append(
        _versus(
            "After one epoch, pre-trained",
            first["pretrained"],
            first["random_init"],
            samples,
            "random init",
        )
    )
    lines.append(
        _versus(
            "After one epoch, pre-trained + ABRi",
            first["pretrained_abri"],
            first["pretrained"],
            samples,
            "pre-trained without ABRi",
        )
    )
    return lines


def _fust_findings(section: dict) -> list:
    runs, samples = section["runs"], section["test_samples"]
    fust, joint = runs["fust_stage2"], runs["joint_naive"]
    lines = [
        _versus(
            "FusT joint accuracy",
            fust["eval_acc_joint"],
            joint["eval_acc_joint"],
            samples,
            "naive joint training",
        )
    ]
    for modality in ("audio", "visual"):
        if modality in fust["probe_acc"] and modality in joint["probe_acc"]:
            lines.append(
                _versus(
                    f"{modality.capitalize()} encoder linear probe",
                    fust["probe_acc"][modality],
                    joint["probe_acc"][modality],
                    samples,
                    "naive joint training",
                )
            )
    return lines


# --- plots --------------------------------------------------------------------------------------


def _figure(width: float = 6.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def _plot_curves(curves: dict, title: str, path: Path) -> Path:
    figure = _figure()
    axes = figure.add_subplot()
    for name, values in curves.items():
        axes.plot(range(1, len(values) + 1), [100 * v for v in values], marker="o", label=name)
    axes.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
    axes.legend()
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _plot_nonpositive(diagnoses: dict, path: Path) -> Path:
    figure = _figure(9.0, 3.8)
    axes = figure.add_subplot()
    for name, summary in diagnoses.items():
        layers = list(summary["per_layer_nonpositive"])
        values = [100 * (v or 0.0) for v in summary["per_layer_nonpositive"].values()]
        axes.plot(range(len(layers)), values, marker="o", label=name)
    axes.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    axes.set(
        ylabel="outputs <= 0 (%)",
        ylim=(0, 100),
        title="audio encoder on audio test inputs: BN outputs <= 0 per layer",
    )
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def _plot_confidences(conf_a: torch.Tensor, conf_v: torch.Tensor, path: Path) -> Path:
    figure = _figure(9.0, 3.6)
    scatter, histogram = figure.subplots(1, 2)
    scatter.scatter(conf_v.numpy(), conf_a.numpy(), s=6, alpha=0.5)
    scatter.plot([0, 1], [0, 1], color="grey", linewidth=0.8)
    scatter.set(
        xlabel="visual confidence c_v",
        ylabel="audio confidence c_a",
        title="stage 1: per-sample confidences",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    bins = [i / 20 for i in range(21)]
    histogram.hist([conf_a.numpy(), conf_v.numpy()], bins=bins, label=["audio", "visual"])
    histogram.set(
        xlabel="confidence (mean over epochs)",
        ylabel="samples",
        title="stage 1: confidence distribution",
    )
    histogram.legend()
    return _save(figure, path)


def _plot_ratios(ratios, path: Path) -> Path:
    figure = _figure()
    axes = figure.add_subplot()
    bins = [i / 40 for i in range(41)]
    axes.hist(
        [ratios.audio.numpy(), ratios.visual.numpy()],
        bins=bins,
        label=[
            f"audio ({int((ratios.audio > 0).sum())} masked)",
            f"visual ({int((ratios.visual > 0).sum())} masked)",
        ],
    )
    axes.set(
        xlabel="mask ratio",
        ylabel="samples",
        yscale="log",
        title=f"FusT mask ratios (rule {ratios.rule}, tau {ratios.threshold})",
    )
    axes.legend()
    return _save(figure, path)


# --- the run ------------------------------------------------------------------------------------


def environment() -> dict:
    from avkernels import HAS_EXTENSION, __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy

    return {
        "avkernels": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "cpp_extension": HAS_EXTENSION,
        "cuda_available": torch.cuda.is_available(),
    }


def _check_data(out: Path, av_digits: str) -> None:
    """Every step of one demo folder must use one AV-Digits build: installing or removing a
    voice package between two invocations makes a new build (another folder name), and
    resuming on it would mix two datasets in one report."""
    record = out / "dataset.json"
    if record.is_file():
        try:
            saved = json.loads(record.read_text(encoding="utf-8")).get("av_digits")
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved != av_digits:
            raise DemoError(
                f"{out} was run on another AV-Digits build ({saved}; now {av_digits}: "
                "voices were installed or removed since); choose another --out or "
                "delete it"
            )
        return
    if (out / "steps").is_dir():
        raise DemoError(
            f"{out} holds demo steps but no record of their AV-Digits build (made "
            "by an older avkernels); choose another --out or delete it"
        )
    atomic_write_text(record, json.dumps({"av_digits": av_digits}, indent=2) + "\n")


def _check_out(out: Path, demo_settings: DemoSettings) -> None:
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file; give a folder (new, or a demo folder to resume)")
    marker = out / "demo.json"
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if saved != demo_settings.to_dict():
            raise DemoError(
                f"{out} holds a demo run with other settings (e.g. --quick vs "
                "default, or another --seed); choose another --out or delete it"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise DemoError(f"{out} is not empty and holds no demo run; choose another --out")


def run_demo(
    out,
    quick: bool = False,
    seed: int = 0,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) the demo into ``out``; write the report; return report.json's dict."""
    out = Path(out)
    demo_settings = settings(quick, seed)
    _check_out(out, demo_settings)
    out.mkdir(parents=True, exist_ok=True)
    _check_data(out, cache_folder(config=demo_settings.data).name)
    atomic_write_text(out / "demo.json", json.dumps(demo_settings.to_dict(), indent=2) + "\n")
    threads = torch.get_num_threads()
    # Tiny kernels on a shared CPU: one thread is several times faster than contending for two.
    torch.set_num_threads(1)
    started = time.perf_counter()
    demo = Demo(out, demo_settings, progress, log)
    timings = {}
    try:
        measured_on = environment()
        log(f"avkernels demo ({demo_settings.mode}) -> {out}")
        step_started = time.perf_counter()
        demo.data_info = step_data(demo)
        timings["data"] = time.perf_counter() - step_started
        log(f"  data: AV-Digits {demo.data_info['clips']} ({timings['data']:.0f} s)")
        steps = {
            "pretrain": step_pretrain,
            "transfer": step_transfer,
            "fust": step_fust,
            "kernels": step_kernels,
        }
        for step, run_step in steps.items():
            path = demo.section_path(step)
            if path.is_file():
                section = json.loads(path.read_text(encoding="utf-8"))
                log(f"  {step}: done earlier, skipped")
            else:
                log(f"  {step}: running")
                step_started = time.perf_counter()
                section = run_step(demo)
                section["seconds"] = time.perf_counter() - step_started
                atomic_write_text(path, json.dumps(section, indent=2) + "\n")
            demo.sections[step] = section
            timings[step] = section["seconds"]
        # Worded from the numbers at every invocation, so a resumed run words them the same way.
        demo.sections["transfer"]["findings"] = _transfer_findings(demo.sections["transfer"])
        demo.sections["fust"]["findings"] = _fust_findings(demo.sections["fust"])
    finally:
        torch.set_num_threads(threads)
    report = {
        "version": REPORT_VERSION,
        "mode": demo_settings.mode,
        "seed": seed,
        "settings": demo_settings.to_dict(),
        "environment": measured_on,
        "data": demo.data_info,
        **demo.sections,
        "timings": {"steps": timings, "this_invocation_seconds": time.perf_counter() - started},
    }
    write_report(out, report)
    return report


# --- report files -------------------------------------------------------------------------------


def _pct(value) -> str:
    return "" if value is None else f"{100 * value:.1f}%"


def _table(headers: list, rows: list) -> list:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ]


def report_markdown(report: dict, image: Callable[[str, str], str]) -> str:
    """The report as Markdown; ``image(file, caption)`` renders a figure reference."""
    env, data, s = report["environment"], report["data"], report["settings"]
    pre, tr, fu, ke = (report[k] for k in ("pretrain", "transfer", "fust", "kernels"))
    lines = [
        "# avkernels demo: revisiting pre-training in audio-visual learning, on AV-Digits",
        "",
        f"Mode `{report['mode']}`, seed {report['seed']}. Every number below was measured by the "
        "run that wrote this report.",
        "",
        f"Versions: avkernels {env['avkernels']}, torch {env['torch']}, numpy {env['numpy']}, "
        f"Python {env['python']}. Hardware: {env['cpu']}, {env['cpu_cores']} cores, "
        f"{env['torch_threads']} torch thread, device {env['device']}, C++ kernels "
        f"{'on' if env['cpp_extension'] else 'off'}.",
        "",
        "## Data",
        "",
        "AV-Digits: a real handwritten digit (MNIST) paired with a spoken digit of the same class; "
        f"{data['clips']['train']} training and {data['clips']['test']} test clips, audio input "
        f"{data['audio_input']}, visual input {data['visual_input']}; speaker-disjoint splits: "
        f"{data['speaker_disjoint']}. Models: ResNet-18 layout of width {s['width']} "
        f"({s['width']}..{8 * s['width']} channels), SGD lr {s['optimizer']['lr']}, momentum "
        f"{s['optimizer']['momentum']}, weight decay {s['optimizer']['weight_decay']}, cosine "
        f"schedule, batch {s['batch_size']}.",
        "",
    ]
    voices = {
        split: ", ".join(f"`{source}`" for source in sources)
        for split, sources in data["speakers"].items()
    }
    lines += [
        f"Voices (package:folder): training audio {voices['train']}; test audio {voices['test']}.",
        "",
    ]
    if data["speaker_disjoint"]:
        lines += [
            f"The test audio comes from {len(data['speakers']['test'])} voice(s) never heard "
            "in training: audio accuracies measure generalisation to those voices only, and "
            "the noise margins below (binomial, over test clips) do not cover the variation "
            "from one speaker to another.",
            "",
        ]
    if not data["speaker_disjoint"]:
        lines += [
            "Only one real voice is installed (`spokennumbers`), so training and test audio "
            "share it and the audio task is much easier than a real one; install the Debian "
            "`asterisk-core-sounds-*-wav` packages (or `espeak-ng`) for several speakers "
            "and speaker-disjoint splits.",
            "",
        ]
    lines += [
        "## 1. Source model: visual pre-training",
        "",
        f"A ResNet-18 trained {pre['epochs']} epochs on the visual modality alone reaches "
        f"**{_pct(pre['eval_acc_visual'])}** test accuracy.",
        "",
        "## 2. Cross-modal initialisation of the audio encoder",
        "",
        "The visual encoder initialises the audio encoder (RGB stem weights summed to one "
        "channel). Dead channels, measured inside the TrackedBN kernels on audio test inputs "
        "(a ReLU-fed channel is dead when its map is <= 0 on >= 99% of samples; "
        f"parameter criterion |gamma|, |beta| < "
        f"{tr['diagnosis']['initialised_from_visual']['threshold']:g}):",
        "",
    ]
    rows = [
        [
            name,
            d["dead_relu_fed_channels"],
            d["relu_fed_channels"],
            _pct(d["dead_relu_fed_ratio"]),
            _pct(d["nonpositive_output_fraction"]),
            d["abnormal_channels"],
        ]
        for name, d in tr["diagnosis"].items()
    ]
    lines += _table(
        [
            "audio encoder",
            "dead ReLU-fed channels",
            "of",
            "ratio",
            "outputs <= 0",
            "abnormal (parameters)",
        ],
        rows,
    ) + [""]
    for name, file in tr["figures"].items():
        if name.startswith("dead_channels"):
            lines += [image(file, f"Dead channels per layer, {name[len('dead_channels_') :]}"), ""]
    lines += [image(tr["figures"]["outputs_nonpositive"], "BN outputs <= 0 per layer"), ""]
    lines += [f"Audio fine-tuning, {tr['epochs']} epochs, {tr['test_samples']} test clips:", ""]
    lines += _table(
        ["initialisation", "test accuracy", "after epoch 1", "train accuracy"],
        [
            [name, _pct(r["eval_acc_audio"]), _pct(r["curve"][0]), _pct(r["train_acc_audio"])]
            for name, r in tr["finetune"].items()
        ],
    ) + [""]
    lines += [image(tr["figures"]["audio_finetuning"], "Audio test accuracy per epoch"), ""]
    lines += [f"- {line}" for line in tr["findings"]] + [""]
    policy = fu["mask_policy"]
    lines += [
        "## 3. FusT: two-stage fusion tuning",
        "",
        f"Stage 1 ({fu['stage1']['epochs']} epochs, visual encoder from the source, audio from "
        f"random init): test accuracy audio {_pct(fu['stage1']['eval_acc_audio'])}, visual "
        f"{_pct(fu['stage1']['eval_acc_visual'])}; mean confidence audio "
        f"{fu['stage1']['mean_confidence_audio']:.3f}, visual "
        f"{fu['stage1']['mean_confidence_visual']:.3f}.",
        "",
        image(fu["figures"]["confidences"], "Stage-1 per-sample confidences"),
        "",
        f"Mask ratios (rule {policy['rule']}, mode {policy['mode']}, tau {policy['threshold']}, "
        f"eta {policy['eta']}, rho {policy['rho']}, on the {policy['target']}): audio masked in "
        f"{policy['audio_masked']}/{policy['samples']} samples (mean ratio where masked "
        f"{policy['audio_mean_ratio_masked']:.3f}), visual in {policy['visual_masked']}/"
        f"{policy['samples']} ({policy['visual_mean_ratio_masked']:.3f}).",
        "",
        image(fu["figures"]["mask_ratios"], "FusT mask ratio distribution"),
        "",
        "Stage 2 (from the stage-1 encoders, with masking) against naive joint training from the "
        "same initial encoders for as many epochs as stage 1 + stage 2:",
        "",
    ]
    lines += _table(
        [
            "run",
            "epochs",
            "joint test acc",
            "audio half",
            "visual half",
            "audio probe",
            "visual probe",
        ],
        [
            [
                name,
                r["epochs"],
                _pct(r["eval_acc_joint"]),
                _pct(r["eval_acc_audio_half"]),
                _pct(r["eval_acc_visual_half"]),
                _pct(r["probe_acc"].get("audio")),
                _pct(r["probe_acc"].get("visual")),
            ]
            for name, r in fu["runs"].items()
        ],
    )
    lines += [
        "",
        "(probe: linear classifier on each frozen encoder's pooled features, trained "
        f"{s['probe_epochs']} epochs on the training set, test accuracy)",
        "",
    ]
    lines += [f"- {line}" for line in fu["findings"]] + [""]
    lines += [
        "## 4. Kernel speed",
        "",
        f"Training step (forward + backward) time of TrackedBN (dead-channel statistics on, "
        f"{ke['backend']}) over nn.BatchNorm2d, measured in this run (< 1 is faster; the "
        f"machine may be shared: median of {ke['rounds']} back-to-back rounds, their range in "
        "brackets):",
        "",
    ]
    lines += _table(
        ["shape (N, C, H, W)", "TrackedBN / BatchNorm2d", "TrackedBN+ReLU / BatchNorm2d,ReLU"],
        [
            [tuple(r["shape"])]
            + [
                f"{r[key]:.2f}x ({r[key + '_range'][0]:.2f}-{r[key + '_range'][1]:.2f})"
                for key in ("tracked_over_batchnorm", "tracked_relu_over_batchnorm_relu")
            ]
            for r in ke["rows"]
        ],
    )
    steps = report["timings"]["steps"]
    lines += [
        "",
        "## Timings",
        "",
        "Seconds per step when it ran: "
        + ", ".join(f"{k} {v:.0f}" for k, v in steps.items())
        + f"; total {sum(steps.values()):.0f} s.",
        "",
    ]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    """report.json, report.md (figures as relative links), report.html (figures inline)."""
    figures = out / "figures"
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    markdown = report_markdown(report, lambda file, caption: f"![{caption}](figures/{file})")
    atomic_write_text(out / "report.md", markdown)

    def inline(file: str, caption: str) -> str:
        data = base64.b64encode((figures / file).read_bytes()).decode("ascii")
        return f"@@IMG@@{caption}@@{data}@@"

    atomic_write_text(out / "report.html", _html(report_markdown(report, inline)))


def _html(markdown: str) -> str:
    """A small Markdown subset (headings, tables, lists, bold, code, images) as HTML."""
    import re

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    body, table, items = [], [], []

    def flush() -> None:
        if table:
            rows = [r for r in table if not set(r) <= {"|", "-"}]
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
            body.append(
                "<table>"
                + "".join(
                    "<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in row) + "</tr>"
                    for tag, row in zip(["th"] + ["td"] * (len(cells) - 1), cells)
                )
                + "</table>"
            )
            table.clear()
        if items:
            body.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        if line.startswith("@@IMG@@"):
            caption, data = line.split("@@")[2:4]
            body.append(
                f'<figure><img alt="{html.escape(caption)}" '
                f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}'
                "</figcaption></figure>"
            )
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:auto;padding:1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
        "img{max-width:100%}"
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>avkernels demo</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
