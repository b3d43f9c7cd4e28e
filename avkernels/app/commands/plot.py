"""``avkernels plot RUN_DIR [--out FILE]``: learning curves of a run from its metrics.jsonl.

One PNG (default ``RUN_DIR/curves.png``): the loss and the accuracies of each split over the
epochs and, when the rows hold them, the dead fraction averaged over the BN layers. RUN_DIR is
a run of ``avkernels train``, or the ``--out`` of ``avkernels fust``, whose stages (stage1/,
stage2/, joint/) are drawn one after another: stage 2 and the baseline start where stage 1
ended.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from avkernels.app.commands import arguments as types
from avkernels.app.errors import CommandError, RunError
from avkernels.diagnosis.plots import new_figure
from avkernels.files import atomic_write

NAME = "plot"
HELP = "draw the learning curves of a run (or of a fust pipeline) from its metrics.jsonl"

FUST_STAGES = ("stage1", "stage2", "joint")  # the run folders of `avkernels fust`, in order
CURVES = "curves.png"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run directory (or a fust --out)")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"the PNG to write (default RUN_DIR/{CURVES})"
    )


def run(args: argparse.Namespace) -> int:
    from avkernels.app.training.run_files import METRICS_JSONL

    run_dir = args.run_dir
    if not run_dir.is_dir():
        raise CommandError(f"RUN_DIR {run_dir}: no such folder; give a run directory")
    files = metrics_files(run_dir)
    if not files:
        raise CommandError(
            f"{run_dir} holds no {METRICS_JSONL} (nor do its {'/, '.join(FUST_STAGES)}/ "
            "folders): give the directory of a run that finished at least one epoch"
        )
    rows = [row for path in files for row in read_rows(path)]
    out = args.out or run_dir / CURVES
    types.check_writable(out.parent, "--out")
    figure = draw(rows)
    try:
        atomic_write(out, lambda file: figure.savefig(file, format="png", dpi=120))
    except OSError as error:
        raise RunError(f"--out {out}: cannot write it ({error.strerror or error})") from None
    print(f"wrote {out}")
    return 0


def metrics_files(run_dir: Path) -> list[Path]:
    """The run's metrics.jsonl, else those of the fust stages it holds, in stage order."""
    from avkernels.app.training.run_files import METRICS_JSONL

    if (run_dir / METRICS_JSONL).is_file():
        return [run_dir / METRICS_JSONL]
    return [
        run_dir / stage / METRICS_JSONL
        for stage in FUST_STAGES
        if (run_dir / stage / METRICS_JSONL).is_file()
    ]


def read_rows(path: Path) -> list[dict]:
    """The rows of one metrics.jsonl; RunError naming the file and line of a damaged one."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise RunError(f"{path}: cannot read it ({error})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int) or "split" not in row:
            raise RunError(
                f"{path}, line {number}: not a metrics row (a JSON object with 'epoch' and "
                "'split'); the file is damaged: resume the run to rewrite it"
            )
        rows.append(row)
    if not rows:
        raise RunError(f"{path} is empty: the run has not finished an epoch yet")
    return rows


def curves(rows: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """Per panel (loss, accuracy, dead fraction), per ``stage split name`` curve, its (epochs,
    values); a stage after stage 1 continues from stage 1's last epoch. Probes are left out."""
    stage1_epochs = max((r["epoch"] for r in rows if r.get("stage") == "stage1"), default=0)
    panels: dict[str, dict[str, tuple[list, list]]] = {
        "loss": {},
        "accuracy": {},
        "dead fraction (mean over BN layers)": {},
    }
    for row in rows:
        if row["split"].startswith("probe_"):
            continue
        stage = row.get("stage", "")
        epoch = row["epoch"] + (stage1_epochs if stage not in ("stage1", "") else 0)
        values = {("loss", "loss"): row.get("loss")}
        values.update({("accuracy", k): v for k, v in row.items() if k.startswith("acc")})
        dead = row.get("dead_fraction")
        if dead:
            mean = sum(dead.values()) / len(dead)
            values[("dead fraction (mean over BN layers)", "dead fraction")] = mean
        for (panel, name), value in values.items():
            if isinstance(value, (int, float)):
                label = " ".join(filter(None, (stage, row["split"], name)))
                xs, ys = panels[panel].setdefault(label, ([], []))
                xs.append(epoch)
                ys.append(value)
    return {panel: lines for panel, lines in panels.items() if lines}


def draw(rows: list[dict]):
    """The figure of the learning curves of ``rows``: one panel per quantity."""
    from matplotlib.ticker import MaxNLocator

    panels = curves(rows)
    figure = new_figure(6.5, 3.0 * len(panels))
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (panel, lines) in zip(axes, panels.items()):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_ylabel(panel)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return figure
