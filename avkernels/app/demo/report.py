"""The report files: ``report.json`` (every number), ``report.md`` (figures as relative
links) and ``report.html`` (the same Markdown rendered by the ``markdown`` package, figures
inline as base64 PNG)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import markdown

from avkernels.app.demo.findings import percent
from avkernels.files import atomic_write_text

REPORT_VERSION = 2  # 2: several seeds, "claims" and "measurements"
HTML_STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:auto;padding:1em}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
    "img{max-width:100%}"
)


def _three_ways(tr: dict) -> list:
    """Per-layer dead channels three ways, before and after fine-tuning (Fig. 2a and 2b)."""
    diagnoses = {name: d for name, d in tr["diagnosis"].items() if "per_layer" in d}
    first = next(iter(diagnoses.values()))
    lines = [
        "Dead channels three ways, per layer: abnormal parameters (|gamma|, |beta| below "
        f"1e-10, or below {first['relative_threshold']:g} x the layer's median |gamma|), "
        "dead on the audio inputs, and the overlap of the absolute criterion (the paper's) "
        "with the activation one (share of the layer's channels; columns are abnormal absolute / "
        "abnormal relative / dead / overlap):",
        "",
    ]
    rows = [
        [layer]
        + [
            " / ".join(
                percent(d["per_layer"][layer][key])
                for key in (
                    "abnormal_absolute",
                    "abnormal_relative",
                    "activation_dead",
                    "overlap_absolute",
                )
            )
            for d in diagnoses.values()
        ]
        for layer in first["per_layer"]
    ]
    lines += _table(["layer", *diagnoses], rows) + [""]
    return lines


def _table(headers: list, rows: list) -> list:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ]


STEP_NAMES = ("pretrain", "transfer", "fust", "kernels")


def _interval(row: dict, scale: float, digits: int) -> list:
    values = [f"{scale * v:.{digits}f}" for v in row["per_seed"]]
    lo, hi = (f"{scale * v:.{digits}f}" for v in row["ci95"])
    return [" / ".join(values), f"{scale * row['mean']:.{digits}f}", f"[{lo}, {hi}]"]


def _across_seeds(report: dict) -> list:
    """The claims (paired differences, in points) and every headline number over the seeds."""
    seeds = ", ".join(map(str, report["seeds"]))
    lines = [
        f"## Claims over seeds {seeds}",
        "",
        "Each claim is the difference new - baseline of one seed's two runs, paired by seed; "
        'its 95% t-interval over the seeds gives the verdict ("better" or "worse" when '
        'the interval excludes 0, else "no difference shown"). Percentage points; for dead '
        "channels fewer is better.",
        "",
    ]
    lines += _table(
        ["claim", "per seed", "mean", "95% interval", "verdict"],
        [[c["name"], *_interval(c, 100, 1), f"**{c['verdict']}**"] for c in report["claims"]],
    )
    lines += [
        "",
        "## Numbers over the seeds",
        "",
        "Accuracies and ratios in %; time ratios as is.",
        "",
    ]
    # (scale, decimals): fractions as percentages, time ratios as they are.
    shown_as = {True: (1, 2), False: (100, 1)}
    lines += _table(
        ["number", "per seed", "mean", "95% interval"],
        [
            [m["name"], *_interval(m, *shown_as["time" in m["name"]])]
            for m in report["measurements"]
        ],
    )
    return lines + [""]


def _by_speaker(report: dict) -> list:
    """Per seed and held-out speaker, the test accuracy of each audio fine-tuning run."""
    runs = list(report["per_seed"][str(report["seeds"][0])]["transfer"]["finetune"])
    rows = []
    for seed in report["seeds"]:
        finetune = report["per_seed"][str(seed)]["transfer"]["finetune"]
        for speaker in report["per_seed"][str(seed)]["data"]["test_speakers"]:
            rows.append(
                [seed, speaker]
                + [percent(finetune[run]["eval_acc_audio_by_speaker"][speaker]) for run in runs]
            )
    return _table(["seed", "test speaker", *runs], rows) + [""]


def report_markdown(report: dict, figure_source: Callable[[str], str]) -> str:
    """The report as Markdown; ``figure_source(file)`` is the address of a figure's image."""

    env, data, s = report["environment"], report["data"], report["settings"]
    seeds = report["seeds"]
    shown = seeds[0]  # the seed whose details and figures the report shows
    pre, tr, fu, ke = (report["per_seed"][str(shown)][k] for k in STEP_NAMES)

    def image(file: str, caption: str) -> str:
        # The caption under the image too (two trailing spaces: a line break in Markdown).
        return f"![{caption}]({figure_source(f'seed-{shown}/figures/{file}')})  \n*{caption}*"

    lines = [
        "# avkernels demo: revisiting pre-training in audio-visual learning, on AV-Digits",
        "",
        f"Mode `{report['mode']}`, seeds {', '.join(map(str, seeds))}. Every number below was "
        "measured by the run that wrote this report.",
        "",
        f"Versions: avkernels {env['avkernels']}, torch {env['torch']}, numpy {env['numpy']}, "
        f"Python {env['python']}. Hardware: {env['cpu']}, {env['cpu_cores']} cores, "
        f"{env['torch_threads']} torch thread, device {env['device']}, C++ kernels "
        f"{'on' if env['cpp_extension'] else 'off'}.",
        "",
        "## Data",
        "",
        "AV-Digits: a real handwritten digit (MNIST) paired with a spoken digit of the same class; "
        f"{data['clips']['train']} training and {data['clips']['test']} test clips, audio input "
        f"{data['audio_input']}, visual input {data['visual_input']}; speaker-disjoint splits: "
        f"{data['speaker_disjoint']}. Models: ResNet-18 layout of width {s['width']} "
        f"({s['width']}..{8 * s['width']} channels), SGD lr {s['optimizer']['lr']}, momentum "
        f"{s['optimizer']['momentum']}, weight decay {s['optimizer']['weight_decay']}, cosine "
        f"schedule, batch {s['batch_size']}.",
        "",
    ]
    voices = {
        split: ", ".join(f"`{source}`" for source in sources)
        for split, sources in data["speakers"].items()
    }
    lines += [
        f"Voices of seed {shown} (package:folder): training audio {voices['train']}; test audio "
        f"{voices['test']}.",
        "",
    ]
    if data["speaker_disjoint"]:
        lines += [
            "Each seed holds out other test speakers, never heard in training (the intervals "
            "below span seeds and speakers); audio accuracy per held-out speaker:",
            "",
            *_by_speaker(report),
        ]
    if not data["speaker_disjoint"]:
        lines += [
            "Only one real voice is installed (`spokennumbers`), so training and test audio "
            "share it and the audio task is much easier than a real one; install the Debian "
            "`asterisk-core-sounds-*-wav` packages (or `espeak-ng`) for several speakers "
            "and speaker-disjoint splits.",
            "",
        ]
    lines += [
        *_across_seeds(report),
        f"## Details of seed {shown}",
        "",
        "The sections below show one seed's runs, figures and tables; the numbers of every "
        "seed, with means and intervals, are in the tables above.",
        "",
        "## 1. Source model: visual pre-training",
        "",
        f"A ResNet-18 trained {pre['epochs']} epochs on the visual modality alone (SGD, "
        f"learning rate {pre['lr']:g} held for {pre['lr_step']} epochs, then a tenth of it) "
        f"reaches **{percent(pre['eval_acc_visual'])}** test accuracy. Its BatchNorm "
        f"parameters decay by {pre['bn_weight_decay']:g} per unit of learning rate: on the "
        "plateau this shrinks the gamma and beta of channels whose ReLU never fires as a long "
        "training run's plateau does (docs/DESIGN.md, the demo's source).",
        "",
        "## 2. Cross-modal initialisation of the audio encoder",
        "",
        "The visual encoder initialises the audio encoder (RGB stem weights summed to one "
        "channel). Dead channels, measured inside the TrackedBN kernels on audio test inputs "
        "(a ReLU-fed channel is dead when its map is <= 0 on >= 99% of samples; "
        f"parameter criterion |gamma|, |beta| < "
        f"{tr['diagnosis']['initialised_from_visual']['threshold']:g}):",
        "",
    ]
    rows = [
        [
            name,
            d["dead_relu_fed_channels"],
            d["relu_fed_channels"],
            percent(d["dead_relu_fed_ratio"]),
            percent(d["nonpositive_output_fraction"]),
            d["abnormal_channels"],
        ]
        for name, d in tr["diagnosis"].items()
    ]
    lines += _table(
        [
            "audio encoder",
            "dead ReLU-fed channels",
            "of",
            "ratio",
            "outputs <= 0",
            "abnormal (parameters)",
        ],
        rows,
    ) + [""]
    lines += _three_ways(tr)
    for name, file in tr["figures"].items():
        if name.startswith("dead_channels"):
            lines += [image(file, f"Dead channels per layer, {name[len('dead_channels_') :]}"), ""]
    lines += [image(tr["figures"]["outputs_nonpositive"], "BN outputs <= 0 per layer"), ""]
    lines += [
        image(tr["figures"]["dead_three_ways"], "Dead channels three ways per layer (Fig. 2a)"),
        "",
        image(tr["figures"]["dead_maps"], "Dead feature maps of one audio clip (Fig. 2b)"),
        "",
    ]
    lines += [f"Audio fine-tuning, {tr['epochs']} epochs, {tr['test_samples']} test clips:", ""]
    lines += _table(
        ["initialisation", "test accuracy", "after epoch 1", "train accuracy"],
        [
            [
                name,
                percent(r["eval_acc_audio"]),
                percent(r["curve"][0]),
                percent(r["train_acc_audio"]),
            ]
            for name, r in tr["finetune"].items()
        ],
    ) + [""]
    lines += [image(tr["figures"]["audio_finetuning"], "Audio test accuracy per epoch"), ""]
    policy = fu["mask_policy"]
    lines += [
        "## 3. FusT: two-stage fusion tuning",
        "",
        f"Stage 1 ({fu['stage1']['epochs']} epochs, visual encoder from the source, audio from "
        f"random init): test accuracy audio {percent(fu['stage1']['eval_acc_audio'])}, visual "
        f"{percent(fu['stage1']['eval_acc_visual'])}; mean confidence audio "
        f"{fu['stage1']['mean_confidence_audio']:.3f}, visual "
        f"{fu['stage1']['mean_confidence_visual']:.3f}.",
        "",
        image(fu["figures"]["confidences"], "Stage-1 per-sample confidences"),
        "",
        f"Mask ratios (rule {policy['rule']}, mode {policy['mode']}, tau {policy['threshold']}, "
        f"eta {policy['eta']}, rho {policy['rho']}, on the {policy['target']}): audio masked in "
        f"{policy['audio_masked']}/{policy['samples']} samples (mean ratio where masked "
        f"{policy['audio_mean_ratio_masked']:.3f}), visual in {policy['visual_masked']}/"
        f"{policy['samples']} ({policy['visual_mean_ratio_masked']:.3f}).",
        "",
        image(fu["figures"]["mask_ratios"], "FusT mask ratio distribution"),
        "",
        "Stage 2 (from the stage-1 encoders, with masking) against naive joint training from the "
        "same initial encoders for as many epochs as stage 1 + stage 2:",
        "",
    ]
    lines += _table(
        [
            "run",
            "epochs",
            "joint test acc",
            "audio half",
            "visual half",
            "audio probe",
            "visual probe",
        ],
        [
            [
                name,
                r["epochs"],
                percent(r["eval_acc_joint"]),
                percent(r["eval_acc_audio_half"]),
                percent(r["eval_acc_visual_half"]),
                percent(r["probe_acc"].get("audio")),
                percent(r["probe_acc"].get("visual")),
            ]
            for name, r in fu["runs"].items()
        ],
    )
    lines += [
        "",
        "(probe: linear classifier on each frozen encoder's pooled features, trained "
        f"{s['probe_epochs']} epochs on the training set, test accuracy)",
        "",
    ]
    lines += [
        "## 4. Kernel speed",
        "",
        f"Training step (forward + backward) time of TrackedBN (dead-channel statistics on, "
        f"{ke['backend']}) over nn.BatchNorm2d, measured in this run (< 1 is faster; the "
        f"machine may be shared: median of {ke['rounds']} back-to-back rounds, their range in "
        "brackets):",
        "",
    ]
    lines += _table(
        ["shape (N, C, H, W)", "TrackedBN / BatchNorm2d", "TrackedBN+ReLU / BatchNorm2d,ReLU"],
        [
            [tuple(r["shape"])]
            + [
                f"{r[key]:.2f}x ({r[key + '_range'][0]:.2f}-{r[key + '_range'][1]:.2f})"
                for key in ("tracked_over_batchnorm", "tracked_relu_over_batchnorm_relu")
            ]
            for r in ke["rows"]
        ],
    )
    steps = report["timings"]["steps"]
    lines += [
        "",
        "## Timings",
        "",
        "Seconds per step when it ran: "
        + ", ".join(f"{k} {v:.0f}" for k, v in steps.items())
        + f"; total {sum(steps.values()):.0f} s.",
        "",
    ]
    return "\n".join(lines)


def report_html(markdown_text: str) -> str:
    """The report's Markdown as a standalone HTML page (Python-Markdown, with tables)."""
    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>avkernels demo</title>'
        f"<style>{HTML_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def write_report(out: Path, report: dict) -> None:
    """report.json, report.md (figures as links relative to ``out``), report.html (inline)."""
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "report.md", report_markdown(report, lambda file: file))

    def inline(file: str) -> str:
        data = base64.b64encode((out / file).read_bytes()).decode("ascii")
        return f"data:image/png;base64,{data}"

    atomic_write_text(out / "report.html", report_html(report_markdown(report, inline)))
