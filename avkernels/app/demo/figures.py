"""The demo's plots, drawn with matplotlib's object API (no pyplot state, no display) into
PNG files."""

from __future__ import annotations

from pathlib import Path

import torch

from avkernels.diagnosis.plots import new_figure, save_figure

DPI = 100


def _figure(width: float = 6.0, height: float = 3.6):
    return new_figure(width, height)


def _save(figure, path: Path) -> Path:
    return save_figure(figure, path, DPI)


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


THREE_WAYS = (
    ("abnormal_absolute", "abnormal, |gamma|,|beta| < 1e-10"),
    ("abnormal_relative", "abnormal, relative"),
    ("activation_dead", "dead on audio"),
    ("overlap_absolute", "abnormal (1e-10) and dead"),
)


def plot_dead_three_ways(diagnoses: dict, path: Path) -> Path:
    """Per-layer bars of the dead-channel criteria, one panel per diagnosed model (Fig. 2a)."""
    shown = {name: d["per_layer"] for name, d in diagnoses.items() if "per_layer" in d}
    figure = _figure(10.0, 2.6 * len(shown))
    for axes, (name, per_layer) in zip(
        figure.subplots(len(shown), 1, squeeze=False)[:, 0], shown.items()
    ):
        layers = list(per_layer)
        width = 0.8 / len(THREE_WAYS)
        for index, (key, label) in enumerate(THREE_WAYS):
            values = [100 * (per_layer[layer][key] or 0.0) for layer in layers]
            positions = [i + (index - 1.5) * width for i in range(len(layers))]
            axes.bar(positions, values, width, label=label)
        axes.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
        axes.set(ylabel="channels (%)", ylim=(0, 100), title=name)
        axes.grid(alpha=0.3, axis="y")
    figure.axes[0].legend(fontsize=7, ncol=len(THREE_WAYS))
    return _save(figure, path)


def plot_dead_maps(layer: str, maps: torch.Tensor, dead, path: Path, shown: int = 8) -> Path:
    """One clip's feature maps after ReLU in ``layer``: dead channels first, then live ones
    for contrast (Fig. 2b)."""
    order = sorted(range(len(maps)), key=lambda c: not dead[c])[:shown]
    figure = _figure(2.0 * len(order), 2.6)
    top = float(maps[order].max()) or 1.0
    for axes, channel in zip(figure.subplots(1, len(order), squeeze=False)[0], order):
        axes.imshow(maps[channel].T.numpy(), origin="lower", aspect="auto", vmin=0, vmax=top)
        axes.set_title(f"ch {channel} ({'dead' if dead[channel] else 'live'})", fontsize=8)
        axes.set_xticks([])
        axes.set_yticks([])
    figure.suptitle(f"one audio clip, {layer} after ReLU (shared colour scale)", fontsize=9)
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
