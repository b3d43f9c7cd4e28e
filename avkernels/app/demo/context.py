"""One demo run's context (settings, output folder, data in memory, the report sections so
far), its training runs through the :class:`~avkernels.app.training.Trainer`, and what the
steps read from a run's metrics history."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from avkernels.app.data import AVDataset
from avkernels.app.demo.settings import DemoError, DemoSettings
from avkernels.app.progress import progress_enabled
from avkernels.app.training import CHECKPOINT, TrainConfig, Trainer


class TensorSamples(Dataset):
    """One split of AV-Digits decoded once into memory, in the batch contract of
    :mod:`avkernels.app.data` (evaluation front end: no random crop)."""

    def __init__(self, digits, split: str, progress: bool | None = None) -> None:
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
        speaker_of = digits.speakers(split)
        self.speakers = [speaker_of[clip] for clip in self.ids]
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


@dataclass
class Demo:
    """One demo run: settings, output folder, data, and the report sections so far."""

    out: Path
    settings: DemoSettings
    progress: bool | None = None
    log: Callable[[str], None] = print
    train: TensorSamples | None = None
    test: TensorSamples | None = None
    sections: dict = field(default_factory=dict)

    @property
    def figures(self) -> Path:
        return self.out / "figures"

    def section_path(self, step: str) -> Path:
        return self.out / "steps" / f"{step}.json"

    def base_config(self, **fields):
        """A run's TrainConfig: the settings' sizes and optimizer, ``fields`` overriding them."""
        s = self.settings
        return TrainConfig(
            num_classes=self.train.num_classes,
            batch_size=s.batch_size,
            seed=s.seed,
            width=s.width,
            **{**s.optimizer, **fields},
        )

    def train_run(self, name: str, config):
        """Train (or resume, or reopen when finished) ``OUT/runs/name``; return the Trainer."""
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
        final = ", ".join(f"{k} {v:.3f}" for k, v in last_row(trainer.history, "eval").items())
        self.log(f"  {name}: test {final}" + (" (trained earlier)" if finished_earlier else ""))
        return trainer


@torch.no_grad()
def audio_accuracy_by_speaker(model, samples: TensorSamples, batch_size: int) -> dict:
    """Test accuracy of ``model``'s audio head on the clips of each speaker of ``samples``."""
    was_training = model.training
    model.eval()
    predicted = torch.cat(
        [
            model.forward_audio(samples.audio[i : i + batch_size]).argmax(1)
            for i in range(0, len(samples), batch_size)
        ]
    )
    model.train(was_training)
    right = predicted == torch.tensor(samples.labels)
    return {
        speaker: right[[i for i, s in enumerate(samples.speakers) if s == speaker]]
        .float()
        .mean()
        .item()
        for speaker in sorted(set(samples.speakers))
    }


def last_row(history: list, split: str) -> dict:
    """The metrics of the last row of ``split`` in a run's history: its losses and accuracies
    (not the epoch, stage, split, wall time or dead fractions)."""
    rows = [row for row in history if row["split"] == split]
    left_out = ("epoch", "stage", "split", "seconds", "dead_fraction")
    return {k: v for k, v in rows[-1].items() if k not in left_out} if rows else {}


def curve(history: list, key: str) -> list:
    """``key`` of every evaluation row, epoch by epoch."""
    return [row[key] for row in history if row["split"] == "eval" and key in row]


def probe_accuracies(history: list) -> dict:
    """The linear probes' test accuracy per modality."""
    return {
        row["split"][len("probe_") :]: row["probe_eval_acc"]
        for row in history
        if row["split"].startswith("probe_")
    }
