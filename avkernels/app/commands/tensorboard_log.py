"""``--tensorboard`` of ``avkernels train`` and ``avkernels fust``: each epoch's metrics rows as
TensorBoard scalars in ``RUN_DIR/tensorboard`` (the optional ``tensorboard`` package)."""

from __future__ import annotations

from pathlib import Path

from avkernels.app.errors import CommandError

FOLDER = "tensorboard"


def require_tensorboard() -> None:
    """CommandError, before any training, when ``--tensorboard`` cannot write event files."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (it imports the tensorboard package)
    except ImportError:
        raise CommandError(
            "--tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install 'avkernels[tensorboard]'), or leave --tensorboard out"
        ) from None


def scalars(row: dict) -> dict[str, float]:
    """The TensorBoard scalars of one metrics row, tagged ``stage/split/name``: its numbers,
    each BN layer's dead fraction (``.../dead_fraction/LAYER``) and their mean."""
    prefix = f"{row['stage']}/{row['split']}/"
    values = {
        prefix + key: float(value)
        for key, value in row.items()
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    dead = row.get("dead_fraction") or {}
    for layer, fraction in dead.items():
        values[f"{prefix}dead_fraction/{layer}"] = fraction
    if dead:
        values[prefix + "dead_fraction_mean"] = sum(dead.values()) / len(dead)
    return values


class TensorBoardLog:
    """The ``on_epoch`` callback of a Trainer that writes each epoch's rows, at step = epoch.
    The event file is opened at the first epoch end, so a run that fails to start leaves
    none."""

    def __init__(self, run_dir: Path) -> None:
        self.folder = Path(run_dir) / FOLDER
        self.writer = None

    def __call__(self, trainer, rows: list[dict]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.folder))
        for row in rows:
            for tag, value in scalars(row).items():
                self.writer.add_scalar(tag, value, global_step=row["epoch"])
        self.writer.flush()  # a crashed or stopped run keeps what it logged

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
