"""The line a run prints on stderr at the end of each epoch: its key numbers, per split."""

from __future__ import annotations

import sys


def epoch_line(stage: str, epoch: int, epochs: int, rows: list[dict]) -> str:
    """``stage epoch E/N: split figures; split figures`` for the metrics ``rows`` of one epoch."""
    return f"{stage} epoch {epoch}/{epochs}: " + "; ".join(
        f"{row['split']} " + ", ".join(epoch_figures(row)) for row in rows
    )


def epoch_figures(row: dict) -> list[str]:
    """The key numbers of one metrics row, as ``name value`` texts: losses, accuracies, the
    learning rate and the wall time."""
    figures = [f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("loss", "acc"))]
    if "lr" in row:
        figures.append(f"lr {row['lr']:.3g}")
    if "seconds" in row:
        figures.append(f"{row['seconds']:.1f}s")
    return figures


def print_epoch_line(line: str, above_bar: bool) -> None:
    """``line`` on stderr: above the progress bar (tqdm.write) when bars are shown, plain
    otherwise, so that a log file shows the run's progress too."""
    if above_bar:
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)
