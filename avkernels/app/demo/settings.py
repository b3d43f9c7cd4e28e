"""The sizes of a demo run (the default one and ``--quick``) and the error a user can fix."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from avkernels.app.data import AVDigitsConfig


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
    # The source's BatchNorm weight decay, and its learning rate: held for source_lr_step
    # epochs, then divided by 10 (a step schedule): the decay a long training run applies to
    # channels whose ReLU never fires, given in this short one (docs/DESIGN.md, the demo's
    # source).
    source_bn_weight_decay: float = 0.05
    source_lr_step: int = 25
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

    def sizes(self) -> dict:
        """Everything but the seed (and the held-out speakers it rotates): what the seeds of one
        demo folder must share."""
        values = self.to_dict()
        del values["seed"], values["data"]["held_out_rotation"]
        return values

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["kernel_shapes"] = [list(shape) for shape in self.kernel_shapes]
        values["data"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in values["data"].items()
        }
        return values


DEFAULT_SEEDS = {"default": 3, "quick": 2}  # seeds run when --seeds is not given


def settings(quick: bool = False, seed: int = 0) -> DemoSettings:
    """The default demo (a few minutes on 2 CPU cores) or the ``--quick`` one (for tests).
    Seed ``n`` holds out the ``n``-th choice of test speakers, so that the intervals over seeds
    include speaker-to-speaker variation."""
    if quick:
        return DemoSettings(
            mode="quick",
            data=AVDigitsConfig(train_per_class=20, test_per_class=10, held_out_rotation=seed),
            width=8,
            batch_size=32,
            pretrain_epochs=2,
            source_lr_step=1,
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
        data=AVDigitsConfig(held_out_rotation=seed),
        width=16,
        batch_size=32,
        pretrain_epochs=30,
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
