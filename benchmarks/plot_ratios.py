"""Draw a benchmark ratio file (``benchmarks/results/*.json``) as a bar chart.

One horizontal bar per comparison (candidate time / baseline time, log scale), growing from a
dashed line at 1x (parity with the baseline), with a black tick at each target; bars are green
when the target is met, red when it is missed and grey without a target. The benchmark session
calls this after writing each JSON file; to redraw a saved one::

    python benchmarks/plot_ratios.py benchmarks/results/batch_norm_cpu.json [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

COLORS = {"met": "tab:green", "MISSED": "tab:red"}
NO_TARGET_COLOR = "tab:gray"


def plot_ratios(json_path: Path, png_path: Path) -> Path:
    """Draw the comparisons of ``json_path`` into ``png_path`` and return ``png_path``."""
    report = json.loads(Path(json_path).read_text())
    rows = [row for row in report["comparisons"] if row["ratio"] is not None]
    labels = [f"{row['case']}\n{row['candidate']} vs {row['baseline']}" for row in rows]
    figure, axes = plt.subplots(figsize=(10, 1.0 + 0.45 * max(len(rows), 1)))
    positions = range(len(rows))
    # Bars grow from parity: right of 1x the candidate is slower, left of it faster.
    axes.barh(
        positions,
        [row["ratio"] - 1 for row in rows],
        left=1,
        color=[COLORS.get(row["status"], NO_TARGET_COLOR) for row in rows],
    )
    for position, row in zip(positions, rows):
        if row["target"] is not None:
            axes.plot([row["target"]] * 2, [position - 0.4, position + 0.4], color="black", lw=2)
        axes.text(
            row["ratio"],
            position,
            f" {row['ratio']:.2f}x ",
            va="center",
            fontsize=7,
            ha="left" if row["ratio"] >= 1 else "right",
        )
    axes.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
    axes.set_xscale("log")  # ratios are multiplicative: 0.5x and 2x sit equally far from 1x
    axes.margins(x=0.12)  # room for the labels at the bar ends
    axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}x"))
    axes.set_yticks(list(positions), labels, fontsize=6)
    axes.invert_yaxis()  # first comparison on top, as in the table
    env = report["environment"]
    device = (
        env["cuda"]["device"]
        if env["cuda"]
        else f"{env['cpu']}, torch threads: {env['torch_threads']}"
    )
    axes.set_xlabel("time ratio, candidate / baseline (lower is better; black tick: target)")
    axes.set_title(f"{report['suite']}: {device}, torch {env['torch']}, {env['date']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)
    return Path(png_path)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python benchmarks/plot_ratios.py RESULTS.json [OUT.png]")
    source = Path(sys.argv[1])
    target = Path(sys.argv[2]) if len(sys.argv) == 3 else source.with_suffix(".png")
    print(plot_ratios(source, target))
