"""The report's claims and numbers over the seeds: every comparison is a paired difference
(same seed, new - baseline) with its 95% t-interval and verdict (:mod:`.statistics`), so a
claim carries seed-to-seed variation rather than the noise of one test set."""

from __future__ import annotations

from avkernels.app.demo.statistics import measurement, paired_claim


def percent(value) -> str:
    """``value`` (a fraction) as a percentage with one decimal; empty for None."""
    return "" if value is None else f"{100 * value:.1f}%"


def _finetune(section: dict, name: str, key: str) -> float:
    run = section["transfer"]["finetune"][name]
    return run["eval_acc_audio"] if key == "final" else run["curve"][0]


def _fust_run(section: dict, run: str) -> dict:
    return section["fust"]["runs"][run]


def _dead(section: dict, diagnosis: str, key: str = "dead_relu_fed_ratio") -> float:
    return section["transfer"]["diagnosis"][diagnosis][key]


# The whole-model dead-channel ratios compared after fine-tuning, with their labels.
DEAD_RATIOS = (
    ("dead_relu_fed_ratio", "dead ratio"),
    ("abnormal_absolute_ratio", "abnormal ratio (absolute)"),
    ("abnormal_relative_ratio", "abnormal ratio (relative)"),
)


def claims(per_seed: list) -> list:
    """The comparisons of the story, one claim each, from the seeds' report sections."""

    def over_seeds(read) -> list:
        return [read(section) for section in per_seed]

    def compare(name, new, baseline, higher_is_better=True) -> dict:
        return paired_claim(name, over_seeds(new), over_seeds(baseline), higher_is_better)

    first = per_seed[0]
    finetune = first["transfer"]["finetune"]
    # Every ABRi variant (e.g. layer and channel alpha) against plain pre-trained.
    repaired = [name for name in finetune if name.startswith("pretrained_")]
    found = [
        compare(
            "dead ReLU-fed channel ratio: initialised from visual vs random init",
            lambda s: _dead(s, "initialised_from_visual"),
            lambda s: _dead(s, "random_init_untrained"),
            higher_is_better=False,
        )
    ]
    for key, when in (("final", "final"), ("first", "after epoch 1")):
        found.append(
            compare(
                f"audio accuracy {when}: pre-trained vs random init",
                lambda s, k=key: _finetune(s, "pretrained", k),
                lambda s, k=key: _finetune(s, "random_init", k),
            )
        )
        for name in repaired:
            found.append(
                compare(
                    f"audio accuracy {when}: {name} vs pre-trained",
                    lambda s, k=key, n=name: _finetune(s, n, k),
                    lambda s, k=key: _finetune(s, "pretrained", k),
                )
            )
    for name in repaired:
        for key, label in DEAD_RATIOS:
            if key in first["transfer"]["diagnosis"].get(f"finetuned_{name}", {}):
                found.append(
                    compare(
                        f"{label} after fine-tuning: {name} vs pre-trained",
                        lambda s, n=name, k=key: _dead(s, f"finetuned_{n}", k),
                        lambda s, k=key: _dead(s, "finetuned_pretrained", k),
                        higher_is_better=False,
                    )
                )
    found.append(
        compare(
            "joint accuracy: FusT vs naive joint training",
            lambda s: _fust_run(s, "fust_stage2")["eval_acc_joint"],
            lambda s: _fust_run(s, "joint_naive")["eval_acc_joint"],
        )
    )
    for modality in ("audio", "visual"):
        probed = (run["probe_acc"] for s in per_seed for run in s["fust"]["runs"].values())
        if all(modality in probes for probes in probed):
            found.append(
                compare(
                    f"{modality} encoder linear probe: FusT vs naive joint training",
                    lambda s, m=modality: _fust_run(s, "fust_stage2")["probe_acc"][m],
                    lambda s, m=modality: _fust_run(s, "joint_naive")["probe_acc"][m],
                )
            )
    return found


def measurements(per_seed: list) -> list:
    """Every headline number of the story over the seeds (per seed, mean, 95% interval)."""

    def over_seeds(name, read) -> dict:
        return measurement(name, [read(section) for section in per_seed])

    first = per_seed[0]
    rows = [over_seeds("visual source accuracy", lambda s: s["pretrain"]["eval_acc_visual"])]
    for diagnosis, summary in first["transfer"]["diagnosis"].items():
        rows.append(
            over_seeds(f"dead ReLU-fed ratio, {diagnosis}", lambda s, d=diagnosis: _dead(s, d))
        )
        for key, label in DEAD_RATIOS[1:]:
            if key in summary:
                rows.append(
                    over_seeds(
                        f"{label}, {diagnosis}", lambda s, d=diagnosis, k=key: _dead(s, d, k)
                    )
                )
    for name in first["transfer"]["finetune"]:
        for key, when in (("final", "final"), ("first", "after epoch 1")):
            rows.append(
                over_seeds(
                    f"audio accuracy {when}, {name}",
                    lambda s, n=name, k=key: _finetune(s, n, k),
                )
            )
    stage1 = lambda s: s["fust"]["stage1"]  # noqa: E731
    for modality in ("audio", "visual"):
        rows.append(
            over_seeds(
                f"FusT stage 1 accuracy, {modality}",
                lambda s, m=modality: stage1(s)[f"eval_acc_{m}"],
            )
        )
    for run in first["fust"]["runs"]:
        for key, label in (
            ("eval_acc_joint", "joint accuracy"),
            ("eval_acc_audio_half", "audio half"),
            ("eval_acc_visual_half", "visual half"),
        ):
            rows.append(over_seeds(f"{run} {label}", lambda s, r=run, k=key: _fust_run(s, r)[k]))
        for modality in first["fust"]["runs"][run]["probe_acc"]:
            rows.append(
                over_seeds(
                    f"{run} {modality} probe",
                    lambda s, r=run, m=modality: _fust_run(s, r)["probe_acc"][m],
                )
            )
    for index, shape in enumerate(first["kernels"]["rows"]):
        rows.append(
            over_seeds(
                f"TrackedBN / BatchNorm2d step time, shape {tuple(shape['shape'])}",
                lambda s, i=index: s["kernels"]["rows"][i]["tracked_over_batchnorm"],
            )
        )
    return rows
