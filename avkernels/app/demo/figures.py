"""The demo's plots, drawn with matplotlib's object API (no pyplot state, no display) into
PNG files."""

from __future__ import annotations

from pathlib import Path

import torch


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


def plot_curves(curves: dict, title: str, path: Path) -> Path:
    figure = _figure()
    axes = figure.add_subplot()
    for name, values in curves.items():
        axes.plot(range(1, len(values) + 1), [100 * v for v in values], marker="o", label=name)
    axes.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
    axes.legend()
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_nonpositive(diagnoses: dict, path: Path) -> Path:
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


def plot_confidences(conf_a: torch.Tensor, conf_v: torch.Tensor, path: Path) -> Path:
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


def plot_ratios(ratios, path: Path) -> Path:
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
