"""The training tests' shared pieces (tests/app/test_train.py and test_train_distributed.py,
whose spawned ranks import them): tiny synthetic data in the batch contract, a tiny config, a
run, bitwise comparisons of checkpoint states, and a Ctrl-C inside the linear probes."""

from __future__ import annotations

import json
import os
import signal

import torch

from avkernels.app.training import CHECKPOINT, TrainConfig, Trainer, linear_probe

NUM_CLASSES = 3


class SyntheticAV(torch.utils.data.Dataset):
    """Batch-contract samples: audio (1, 64, 32), visual (3, 2, 32, 32), int label, str id.

    The inputs carry the label (a class offset) so training makes progress; ``noise`` draws
    extra noise from torch's global generator per item, like a random augmentation.
    """

    def __init__(self, size: int = 10, seed: int = 0, noise: bool = False, fail_at=None):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(size) % NUM_CLASSES
        offset = self.labels.float()[:, None, None, None]
        self.audio = torch.randn(size, 1, 64, 32, generator=generator) + offset
        self.visual = torch.randn(size, 3, 2, 32, 32, generator=generator) - offset[..., None]
        self.noise, self.fail_at, self.fetched = noise, fail_at, 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        self.fetched += 1
        if self.fail_at is not None and self.fetched == self.fail_at:
            raise RuntimeError("simulated crash")
        audio = self.audio[index]
        if self.noise:
            audio = audio + 0.1 * torch.randn(audio.shape)
        return {
            "audio": audio,
            "visual": self.visual[index],
            "label": int(self.labels[index]),
            "id": f"clip{index:03d}",
        }


def tiny_config(**overrides) -> TrainConfig:
    values = dict(
        num_classes=NUM_CLASSES,
        epochs=2,
        batch_size=4,
        width=4,
        optimizer="adam",
        lr=1e-2,
        schedule="cosine",
        seed=7,
    )
    values.update(overrides)
    return TrainConfig(**values)


def run(config, run_dir, data=None, **kwargs) -> Trainer:
    trainer = Trainer(
        config,
        data or SyntheticAV(noise=True),
        run_dir,
        eval_data=SyntheticAV(6, seed=1),
        progress=False,
        **kwargs,
    )
    trainer.fit()
    return trainer


def assert_same_state(left: dict, right: dict, path: str = "") -> None:
    """Bitwise equality of nested checkpoint states (tensors, numbers, strings, containers)."""
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and left.dtype == right.dtype, path
        assert (
            torch.equal(left, right)
            or (left.isnan() == right.isnan()).all()
            and torch.equal(left.nan_to_num(), right.nan_to_num())
        ), f"{path} differs"
    elif isinstance(left, dict):
        assert set(left) == set(right), f"{path}: keys {set(left) ^ set(right)}"
        for key in left:
            assert_same_state(left[key], right[key], f"{path}.{key}")
    elif isinstance(left, (list, tuple)):
        assert len(left) == len(right), path
        for index, (a, b) in enumerate(zip(left, right)):
            assert_same_state(a, b, f"{path}[{index}]")
    else:
        assert left == right, f"{path}: {left!r} != {right!r}"


def without_wall_time(rows: list[dict]) -> list[dict]:
    """Metrics rows less their wall-clock ``seconds``, the one figure a rerun changes."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def metrics_rows(run_dir) -> list[dict]:
    """``metrics.jsonl``'s rows, less their wall time."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return without_wall_time([json.loads(line) for line in lines])


def final_state(run_dir) -> dict:
    """The state a resumed run must reproduce exactly (the history less its wall times)."""
    state = torch.load(run_dir / CHECKPOINT, weights_only=True)
    state["history"] = without_wall_time(state["history"])
    return {
        key: state[key]
        for key in (
            "model",
            "optimizer",
            "scheduler",
            "rng",
            "epoch",
            "global_step",
            "trackers",
            "history",
        )
    }


def sigint_inside_the_probe(monkeypatch) -> None:
    """Make the trainer's first linear probe receive a real Ctrl-C (SIGINT) as it starts."""
    from avkernels.app.training import trainer as trainer_module

    sent = []

    def interrupted_probe(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return linear_probe(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "linear_probe", interrupted_probe)
