"""The diagnosis report: per-layer dead-channel statistics (:class:`LayerDiagnosis`), the
whole model's (:class:`DiagnosisReport`: Markdown, JSON, plots) and two reports side by side
(:class:`ReportComparison`). :func:`avkernels.diagnosis.diagnose` fills them in."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from avkernels.files import atomic_write_text

ABSOLUTE_THRESHOLD = 1e-10
RELATIVE_THRESHOLD = 1e-3
ACTIVATION_THRESHOLD = 0.99
REPORT_VERSION = 1


@dataclasses.dataclass
class LayerDiagnosis:
    """Diagnosis of one BatchNorm2d layer; per-channel values are float64 numpy arrays.

    ``gamma``/``beta``/``status``/``threshold`` are ``None`` for a layer without affine
    parameters; ``dead_fraction``/``dead_sample_fraction`` are ``None`` without data.
    ``feeds_relu`` is ``None`` when the model could not be traced to find out.
    """

    name: str
    channels: int
    feeds_relu: bool | None
    abri: bool
    threshold: float | None = None
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    status: list[str] | None = None  # per channel: "ok", "closed" or "constant"
    dead_fraction: np.ndarray | None = None
    dead_sample_fraction: np.ndarray | None = None
    samples: int = 0
    activation_threshold: float = ACTIVATION_THRESHOLD

    @property
    def closed(self) -> int:
        """Abnormal channels with ``beta <= 0``: always 0 after a ReLU."""
        return 0 if self.status is None else self.status.count("closed")

    @property
    def constant(self) -> int:
        """Abnormal channels with ``beta > 0``: a constant output."""
        return 0 if self.status is None else self.status.count("constant")

    @property
    def abnormal(self) -> int:
        """Channels flagged by the parameter criterion (closed + constant)."""
        return self.closed + self.constant

    @property
    def abnormal_ratio(self) -> float | None:
        """Share of the layer's channels that are abnormal; None without parameters."""
        return None if self.status is None else self.abnormal / self.channels

    @property
    def has_activations(self) -> bool:
        """Whether activation statistics were collected for this layer."""
        return self.dead_sample_fraction is not None

    @property
    def dead_on_all_samples(self) -> int | None:
        """Channels whose map is ``<= 0`` for at least ``activation_threshold`` of the samples."""
        if not self.has_activations:
            return None
        return int((self.dead_sample_fraction >= self.activation_threshold).sum())

    @property
    def dead_channel_ratio(self) -> float | None:
        """Share of channels dead on (nearly) every sample; None without activations."""
        count = self.dead_on_all_samples
        return None if count is None else count / self.channels

    @property
    def abnormal_and_dead(self) -> int | None:
        """Channels flagged by both criteria (abnormal parameters and dead on nearly every
        sample); None without parameters or activations."""
        if self.status is None or not self.has_activations:
            return None
        abnormal = np.array([status != "ok" for status in self.status])
        return int((abnormal & (self.dead_sample_fraction >= self.activation_threshold)).sum())

    @property
    def mean_dead_fraction(self) -> float | None:
        """Mean over channels of the fraction of outputs <= 0; None without activations."""
        return None if self.dead_fraction is None else float(np.mean(self.dead_fraction))

    @property
    def flagged(self) -> bool:
        """Whether either criterion finds a dead channel (what ``abri.apply(only_dead=True)``
        converts)."""
        return self.abnormal > 0 or bool(self.dead_on_all_samples)

    def row(self) -> dict[str, Any]:
        """The per-layer table row."""
        return {
            "layer": self.name,
            "channels": self.channels,
            "feeds_relu": self.feeds_relu,
            "abri": self.abri,
            "closed": self.closed if self.status is not None else None,
            "constant": self.constant if self.status is not None else None,
            "abnormal_ratio": self.abnormal_ratio,
            "mean_dead_fraction": self.mean_dead_fraction,
            "dead_channels": self.dead_on_all_samples,
            "dead_channel_ratio": self.dead_channel_ratio,
        }

    def channel_rows(self) -> list[dict[str, Any]]:
        """The per-channel table rows of this layer."""
        rows = []
        for index in range(self.channels):
            rows.append(
                {
                    "layer": self.name,
                    "channel": index,
                    "gamma": _item(self.gamma, index),
                    "beta": _item(self.beta, index),
                    "status": None if self.status is None else self.status[index],
                    "dead_fraction": _item(self.dead_fraction, index),
                    "dead_sample_fraction": _item(self.dead_sample_fraction, index),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (arrays as lists); :meth:`from_dict` reads them back."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, np.ndarray):
                data[key] = [_json_float(v) for v in value.tolist()]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerDiagnosis:
        """The layer :meth:`to_dict` wrote (lists back to arrays)."""
        values = dict(data)
        for key in ("gamma", "beta", "dead_fraction", "dead_sample_fraction"):
            if values.get(key) is not None:
                values[key] = np.array([math.nan if v is None else v for v in values[key]])
        return cls(**values)


def _item(values: np.ndarray | None, index: int) -> float | None:
    return None if values is None else float(values[index])


def _json_float(value: float) -> float | None:
    """JSON has no NaN/inf: a diverged model's non-finite values become null."""
    return value if math.isfinite(value) else None


@dataclasses.dataclass(repr=False)
class DiagnosisReport:
    """Per-layer and per-channel dead-channel diagnosis of a model (see :func:`diagnose`)."""

    layers: list[LayerDiagnosis]
    threshold: float
    relative: bool
    activation_threshold: float
    batches: int = 0
    title: str = ""
    from_counters: bool = False  # activations read from TrackedBN's counters, not an eval pass

    # -- tables -----------------------------------------------------------------------------

    @property
    def channels(self) -> int:
        """Channels of every diagnosed layer."""
        return sum(layer.channels for layer in self.layers)

    @property
    def abnormal(self) -> int:
        """Abnormal channels (closed + constant) of every layer."""
        return sum(layer.abnormal for layer in self.layers)

    @property
    def has_activations(self) -> bool:
        """Whether any layer has activation statistics."""
        return any(layer.has_activations for layer in self.layers)

    def layer_table(self) -> list[dict[str, Any]]:
        """One row per layer: the columns of the report's per-layer table."""
        return [layer.row() for layer in self.layers]

    def channel_table(self) -> list[dict[str, Any]]:
        """One row per channel of every layer (layer, channel, gamma, beta, status, activations)."""
        return [row for layer in self.layers for row in layer.channel_rows()]

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [
            f"{len(self.layers)} BN layers, {self.channels} channels: {self.abnormal} abnormal "
            f"({_percent(self.abnormal / max(self.channels, 1))}) by the parameter criterion "
            f"({self._criterion()})"
        ]
        ranked = [layer for layer in self.layers if layer.abnormal]
        if ranked:
            worst = max(ranked, key=lambda layer: layer.abnormal_ratio)
            lines.append(f"worst layer: {worst.name} {_percent(worst.abnormal_ratio)} abnormal")
        if self.has_activations:
            dead = sum(layer.dead_on_all_samples or 0 for layer in self.layers)
            lines.append(
                f"activations ({self.activations_origin}): {dead} channels <= 0 on "
                f">= {_percent(self.activation_threshold)} of samples"
            )
        return "\n".join(lines)

    @property
    def activations_origin(self) -> str:
        """Where the activation statistics come from, for titles and summaries."""
        if self.from_counters:
            return "TrackedBN counters collected while the model ran"
        return f"{self.batches} batches, eval"

    def __repr__(self) -> str:
        # One line: the per-channel arrays are in to_json(), save() and the tables.
        title = f"{self.title!r}, " if self.title else ""
        return (
            f"DiagnosisReport({title}{len(self.layers)} layers, {self.channels} channels, "
            f"{self.abnormal} abnormal, activations: "
            + (f"{self.activations_origin})" if self.has_activations else "none)")
        )

    def _criterion(self) -> str:
        if self.relative:
            return f"|gamma|, |beta| < {self.threshold:g} x median |gamma| of the layer"
        return f"|gamma|, |beta| < {self.threshold:g}"

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, with its format version."""
        return {
            "version": REPORT_VERSION,
            "title": self.title,
            "threshold": self.threshold,
            "relative": self.relative,
            "activation_threshold": self.activation_threshold,
            "batches": self.batches,
            "from_counters": self.from_counters,
            "summary": {"channels": self.channels, "abnormal": self.abnormal},
            "layer_table": self.layer_table(),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (strict: no NaN); :meth:`from_json` reads it back."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> DiagnosisReport:
        """The report :meth:`to_json` wrote; ValueError for another format version."""
        data = json.loads(text)
        if data.get("version") != REPORT_VERSION:
            raise ValueError(
                f"not an avkernels diagnosis report of version {REPORT_VERSION} "
                f"(found version {data.get('version')!r})"
            )
        return cls(
            layers=[LayerDiagnosis.from_dict(layer) for layer in data["layers"]],
            threshold=data["threshold"],
            relative=data["relative"],
            activation_threshold=data["activation_threshold"],
            batches=data["batches"],
            from_counters=data.get("from_counters", False),
            title=data["title"],
        )

    def to_markdown(self, max_channels_per_layer: int = 16) -> str:
        """Summary, per-layer table, and the flagged channels of each layer (at most
        ``max_channels_per_layer`` each; the JSON holds every channel)."""
        lines = [f"# Dead-channel diagnosis{': ' + self.title if self.title else ''}", ""]
        lines += [f"- {line}" for line in self.summary().splitlines()]
        lines.append(
            "- closed: |gamma| and |beta| small, beta <= 0 (0 after ReLU); constant: beta > 0. "
            "feeds ReLU: the BN output goes straight into a ReLU (else, e.g., into a residual sum)."
        )
        lines += ["", "## Layers", ""]
        headers = ["layer", "channels", "feeds ReLU", "ABRi", "closed", "constant", "abnormal"]
        if self.has_activations:
            dead_header = f"channels dead on >= {_percent(self.activation_threshold)} samples"
            headers += ["mean outputs <= 0", dead_header]
        lines += _markdown_table(headers, [self._markdown_row(layer) for layer in self.layers])
        flagged = [layer for layer in self.layers if layer.flagged]
        if flagged:
            lines += ["", "## Flagged channels", ""]
            for layer in flagged:
                rows = [
                    row
                    for row in layer.channel_rows()
                    if row["status"] not in (None, "ok")
                    or (row["dead_sample_fraction"] or 0) >= self.activation_threshold
                ]
                lines.append(f"### {layer.name} ({len(rows)} of {layer.channels})")
                lines.append("")
                shown = rows[:max_channels_per_layer]
                lines += _markdown_table(
                    ["channel", "gamma", "beta", "status", "outputs <= 0", "dead samples"],
                    [
                        [
                            row["channel"],
                            _number(row["gamma"]),
                            _number(row["beta"]),
                            row["status"] or "",
                            _fraction(row["dead_fraction"]),
                            _fraction(row["dead_sample_fraction"]),
                        ]
                        for row in shown
                    ],
                )
                if len(rows) > len(shown):
                    lines.append(f"\n({len(rows) - len(shown)} more in report.json)")
                lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def _markdown_row(self, layer: LayerDiagnosis) -> list[str]:
        row = [
            layer.name,
            str(layer.channels),
            {True: "yes", False: "no", None: "?"}[layer.feeds_relu],
            "yes" if layer.abri else "",
            _count(layer.closed if layer.status is not None else None),
            _count(layer.constant if layer.status is not None else None),
            _fraction(layer.abnormal_ratio),
        ]
        if self.has_activations:
            row += [_fraction(layer.mean_dead_fraction), _count(layer.dead_on_all_samples)]
        return row

    # -- plots ------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``report.json`` (every channel) and ``report.md`` into ``directory``, each
        atomically; return their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return [
            atomic_write_text(directory / "report.json", self.to_json() + "\n"),
            atomic_write_text(directory / "report.md", self.to_markdown()),
        ]

    def plot(self, directory: str | Path) -> list[Path]:
        """Write the report's plots (PNG) into ``directory``; return their paths."""
        from avkernels.diagnosis import plots

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = [
            plots.plot_layer_ratios(self, directory / "layer_dead_ratio.png"),
            plots.plot_gamma_beta(self, directory / "gamma_beta.png"),
        ]
        if self.has_activations:
            paths.append(plots.plot_dead_sample_histogram(self, directory / "dead_samples.png"))
        return paths


@dataclasses.dataclass
class ReportComparison:
    """Per-layer change between two reports of the same model (e.g. before/after ABRi)."""

    before: DiagnosisReport
    after: DiagnosisReport
    labels: tuple[str, str] = ("before", "after")

    def __post_init__(self) -> None:
        names = [layer.name for layer in self.before.layers]
        if names != [layer.name for layer in self.after.layers]:
            raise ValueError(
                "cannot compare diagnoses of different models: the BN layer names differ"
            )

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer: abnormal and dead counts before and after, and their change."""
        rows = []
        for old, new in zip(self.before.layers, self.after.layers):
            rows.append(
                {
                    "layer": old.name,
                    "channels": old.channels,
                    f"abnormal_ratio_{self.labels[0]}": old.abnormal_ratio,
                    f"abnormal_ratio_{self.labels[1]}": new.abnormal_ratio,
                    f"dead_channel_ratio_{self.labels[0]}": old.dead_channel_ratio,
                    f"dead_channel_ratio_{self.labels[1]}": new.dead_channel_ratio,
                }
            )
        return rows

    def to_json(self, indent: int | None = 2) -> str:
        """The labels and :meth:`rows` as JSON."""
        return json.dumps({"labels": list(self.labels), "layers": self.rows()}, indent=indent)

    def to_markdown(self) -> str:
        """The comparison as a Markdown table, one row per layer."""
        first, second = self.labels
        with_activations = self.before.has_activations and self.after.has_activations
        headers = ["layer", f"abnormal {first}", f"abnormal {second}"]
        if with_activations:
            headers += [f"dead {first}", f"dead {second}"]
        rows = []
        for old, new in zip(self.before.layers, self.after.layers):
            row = [old.name, _fraction(old.abnormal_ratio), _fraction(new.abnormal_ratio)]
            if with_activations:
                row += [_fraction(old.dead_channel_ratio), _fraction(new.dead_channel_ratio)]
            rows.append(row)
        total = [
            "all",
            _fraction(self.before.abnormal / max(self.before.channels, 1)),
            _fraction(self.after.abnormal / max(self.after.channels, 1)),
        ]
        if with_activations:
            total += ["", ""]
        return (
            "\n".join(
                [f"# Dead channels: {first} vs {second}", ""]
                + _markdown_table(headers, rows + [total])
            )
            + "\n"
        )

    def plot(self, path: str | Path) -> Path:
        """Draw the per-layer before/after chart as a PNG at ``path``; return it."""
        from avkernels.diagnosis import plots

        return plots.plot_comparison(self, Path(path))


def compare(
    before: DiagnosisReport, after: DiagnosisReport, labels: tuple[str, str] = ("before", "after")
) -> ReportComparison:
    """Per-layer comparison of two diagnoses of the same model."""
    return ReportComparison(before, after, labels)


# --- formatting ---------------------------------------------------------------------------------


def _markdown_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _fraction(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else _percent(value)


def _count(value: int | None) -> str:
    return "" if value is None else str(value)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"
