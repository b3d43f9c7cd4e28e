"""The report's findings, worded from the measured numbers: each comparison says better,
worse or "within noise" (two binomial standard errors of the difference on the test set)."""

from __future__ import annotations

import math


def percent(value) -> str:
    """``value`` (a fraction) as a percentage with one decimal; empty for None."""
    return "" if value is None else f"{100 * value:.1f}%"


def _noise(accuracy: float, samples: int) -> float:
    """Two binomial standard errors of the difference of two accuracies on ``samples``."""
    return 2 * math.sqrt(2 * max(accuracy * (1 - accuracy), 1e-4) / samples)


def _versus(name: str, new: float, old: float, samples: int, baseline: str) -> str:
    diff = new - old
    margin = _noise((new + old) / 2, samples)
    verdict = "within noise" if abs(diff) < margin else "better" if diff > 0 else "worse"
    return (
        f"{name}: {100 * new:.1f}% vs {100 * old:.1f}% for {baseline} "
        f"({100 * diff:+.1f} points, {verdict}; noise margin +-{100 * margin:.1f} on "
        f"{samples} test clips)"
    )


def transfer_findings(section: dict) -> list:
    results, diagnoses, samples = section["finetune"], section["diagnosis"], section["test_samples"]
    acc = {name: r["eval_acc_audio"] for name, r in results.items()}
    first = {name: r["curve"][0] for name, r in results.items()}
    init, random = diagnoses["initialised_from_visual"], diagnoses["random_init_untrained"]
    lines = [
        f"Initialised from the visual source, {init['dead_relu_fed_channels']} of "
        f"{init['relu_fed_channels']} ReLU-fed BN channels of the audio encoder are dead on "
        f"audio inputs (<= 0 on >= 99% of the test samples; "
        f"{random['dead_relu_fed_channels']} in a randomly initialised one); "
        f"{percent(init['nonpositive_output_fraction'])} of their outputs are <= 0 "
        f"({percent(random['nonpositive_output_fraction'])} at random init)."
    ]
    for name in ("pretrained", "pretrained_abri"):
        key = f"finetuned_{name}"
        if key in diagnoses:
            lines.append(
                f"After fine-tuning ({name}): {diagnoses[key]['dead_relu_fed_channels']} dead."
            )
    lines.append(
        _versus("Pre-trained", acc["pretrained"], acc["random_init"], samples, "random init")
    )
    lines.append(
        _versus(
            "Pre-trained + ABRi",
            acc["pretrained_abri"],
            acc["pretrained"],
            samples,
            "pre-trained without ABRi",
        )
    )
    lines.append(
        _versus(
            "After one epoch, pre-trained",
            first["pretrained"],
            first["random_init"],
            samples,
            "random init",
        )
    )
    lines.append(
        _versus(
            "After one epoch, pre-trained + ABRi",
            first["pretrained_abri"],
            first["pretrained"],
            samples,
            "pre-trained without ABRi",
        )
    )
    return lines


def fust_findings(section: dict) -> list:
    runs, samples = section["runs"], section["test_samples"]
    fust, joint = runs["fust_stage2"], runs["joint_naive"]
    lines = [
        _versus(
            "FusT joint accuracy",
            fust["eval_acc_joint"],
            joint["eval_acc_joint"],
            samples,
            "naive joint training",
        )
    ]
    for modality in ("audio", "visual"):
        if modality in fust["probe_acc"] and modality in joint["probe_acc"]:
            lines.append(
                _versus(
                    f"{modality.capitalize()} encoder linear probe",
                    fust["probe_acc"][modality],
                    joint["probe_acc"][modality],
                    samples,
                    "naive joint training",
                )
            )
    return lines
