"""PNG plots of dead-channel diagnoses (matplotlib, Agg canvas; no pyplot global state).

Each function takes a report (or a comparison) from :mod:`avkernels.diagnosis`, writes one PNG
and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from avkernels.diagnosis import DiagnosisReport, ReportComparison

# |gamma| and |beta| are drawn on log axes; exact zeros sit on this floor.
LOG_FLOOR = 1e-45
STATUS_COLOURS = {"ok": "tab:blue", "closed": "tab:red", "constant": "tab:orange"}


def new_figure(width: float, height: float):
    """A matplotlib figure of ``width`` x ``height`` inches on the Agg canvas: no pyplot state,
    no display; the application's plots use it too."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "avkernels plots need matplotlib: pip install matplotlib (or avkernels[av])"
        ) from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: Path, dpi: int = 120) -> Path:
    """``figure`` as an image file at ``path`` (its folder made when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def _layer_labels(report: DiagnosisReport) -> list[str]:
    """Layer names; a trailing '*' marks layers that do not feed a ReLU directly."""
    return [layer.name + ("" if layer.feeds_relu is not False else "*") for layer in report.layers]


def plot_layer_ratios(report: DiagnosisReport, path: Path) -> Path:
    """Per-layer bars of the abnormal-channel ratio (closed + constant stacked), and next to
    them, with data, the ratio of channels dead on (almost) every sample."""
    layers = report.layers
    positions = np.arange(len(layers))
    figure = new_figure(max(6.0, 0.45 * len(layers) + 2), 4.5)
    axes = figure.add_subplot()
    width = 0.4 if report.has_activations else 0.8
    offset = -width / 2 if report.has_activations else 0.0
    closed = np.array([layer.closed / layer.channels for layer in layers])
    constant = np.array([layer.constant / layer.channels for layer in layers])
    axes.bar(
        positions + offset,
        closed,
        width,
        color=STATUS_COLOURS["closed"],
        label="abnormal |gamma|, |beta| (closed)",
    )
    axes.bar(
        positions + offset,
        constant,
        width,
        bottom=closed,
        color=STATUS_COLOURS["constant"],
        label="abnormal |gamma|, |beta| (constant)",
    )
    if report.has_activations:
        dead = [layer.dead_channel_ratio or 0.0 for layer in layers]
        axes.bar(
            positions + width / 2,
            dead,
            width,
            color="tab:gray",
            label=f"map <= 0 on >= {100 * report.activation_threshold:.0f}% of samples",
        )
    axes.set_xticks(positions, _layer_labels(report), rotation=60, ha="right", fontsize=8)
    axes.set_ylim(0, 1)
    axes.set_ylabel("fraction of channels")
    axes.set_title(
        "Dead channels per BN layer"
        + (f" ({report.title})" if report.title else "")
        + "\n* = does not feed a ReLU directly",
        fontsize=10,
    )
    axes.legend(fontsize=8, loc="upper left")
    return save_figure(figure, path)


def plot_gamma_beta(report: DiagnosisReport, path: Path) -> Path:
    """|gamma| against |beta| of every channel on log axes, coloured by status."""
    figure = new_figure(6.0, 5.0)
    axes = figure.add_subplot()
    gammas, betas, statuses = [], [], []
    for layer in report.layers:
        if layer.status is None:
            continue
        gammas.append(np.abs(layer.gamma))
        betas.append(np.abs(layer.beta))
        statuses += layer.status
    if gammas:
        gamma = np.maximum(np.concatenate(gammas), LOG_FLOOR)
        beta = np.maximum(np.concatenate(betas), LOG_FLOOR)
        statuses = np.array(statuses)
        for status, colour in STATUS_COLOURS.items():
            chosen = statuses == status
            if chosen.any():
                axes.scatter(
                    gamma[chosen],
                    beta[chosen],
                    s=6,
                    color=colour,
                    alpha=0.6,
                    label=f"{status} ({int(chosen.sum())})",
                )
        axes.set_xscale("log")
        axes.set_yscale("log")
        if not report.relative:
            axes.axvline(report.threshold, color="k", linestyle=":", linewidth=1)
            axes.axhline(
                report.threshold,
                color="k",
                linestyle=":",
                linewidth=1,
                label=f"threshold {report.threshold:g}",
            )
        axes.legend(fontsize=8)
    axes.set_xlabel(f"|gamma| (zeros drawn at {LOG_FLOOR:g})")
    axes.set_ylabel("|beta|")
    axes.set_title("BN parameters per channel", fontsize=10)
    return save_figure(figure, path)


def plot_dead_sample_histogram(report: DiagnosisReport, path: Path) -> Path:
    """Histogram over all channels of the fraction of samples whose map is entirely <= 0."""
    values = [layer.dead_sample_fraction for layer in report.layers if layer.has_activations]
    figure = new_figure(6.0, 4.0)
    axes = figure.add_subplot()
    if values:
        axes.hist(np.concatenate(values), bins=np.linspace(0, 1, 21), color="tab:gray")
        axes.set_yscale("log")
    axes.set_xlabel("fraction of samples with the whole map <= 0")
    axes.set_ylabel("channels")
    axes.set_title(f"Dead feature maps per channel ({report.activations_origin})", fontsize=10)
    return save_figure(figure, path)


def plot_comparison(comparison: ReportComparison, path: Path) -> Path:
    """Per-layer abnormal-channel ratio (and, with data, dead-channel ratio) of two reports."""
    before, after = comparison.before, comparison.after
    with_activations = before.has_activations and after.has_activations
    positions = np.arange(len(before.layers))
    figure = new_figure(max(6.0, 0.45 * len(positions) + 2), 4.5 * (2 if with_activations else 1))
    panels = [("abnormal |gamma|, |beta| ratio", lambda layer: layer.abnormal_ratio or 0.0)]
    if with_activations:
        panels.append(
            ("channels dead on (almost) all samples", lambda layer: layer.dead_channel_ratio or 0.0)
        )
    for index, (title, value) in enumerate(panels):
        axes = figure.add_subplot(len(panels), 1, index + 1)
        for shift, report, label, colour in (
            (-0.2, before, comparison.labels[0], "tab:red"),
            (0.2, after, comparison.labels[1], "tab:green"),
        ):
            axes.bar(
                positions + shift,
                [value(layer) for layer in report.layers],
                0.4,
                color=colour,
                label=label,
            )
        axes.set_xticks(positions, _layer_labels(before), rotation=60, ha="right", fontsize=8)
        axes.set_ylim(0, 1)
        axes.set_ylabel("fraction of channels")
        axes.set_title(title, fontsize=10)
        axes.legend(fontsize=8)
    return save_figure(figure, path)
