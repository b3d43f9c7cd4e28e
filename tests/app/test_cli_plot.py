"""``avkernels plot``: learning curves of a tiny run and of a fust pipeline's stages, and the
errors for a missing folder or file, a damaged metrics.jsonl and an unwritable --out."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from avkernels.app.cli import main  # noqa: E402
from avkernels.app.commands.plot import curves  # noqa: E402
from tests.app.training_fixtures import run, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plot") / "run"
    run(tiny_config(stage="joint"), folder)
    return folder


def image_shape(path):
    from matplotlib.image import imread

    return imread(path).shape


def test_plot_writes_a_png_of_the_run(run_dir, capsys):
    assert main(["plot", str(run_dir)]) == 0
    height, width, channels = image_shape(run_dir / "curves.png")
    assert height > 300 and width > 300 and channels in (3, 4)
    assert f"wrote {run_dir / 'curves.png'}" in capsys.readouterr().out
    assert not list(run_dir.glob(".*.partial"))


def test_curves_follow_the_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    panels = curves(rows)
    assert set(panels) == {"loss", "accuracy", "dead fraction (mean over BN layers)"}
    assert panels["loss"]["joint eval loss"] == ([1, 2], [r["loss"] for r in rows[1::2]])
    dead = rows[2]["dead_fraction"]
    xs, ys = panels["dead fraction (mean over BN layers)"]["joint train dead fraction"]
    assert xs == [1, 2] and ys[1] == pytest.approx(sum(dead.values()) / len(dead))


def test_fust_stages_follow_one_another(tmp_path):
    rows = {
        "stage1": [{"epoch": e, "stage": "stage1", "split": "train", "loss": 1.0} for e in (1, 2)],
        "stage2": [{"epoch": e, "stage": "stage2", "split": "train", "loss": 0.5} for e in (1, 2)],
    }
    for stage, stage_rows in rows.items():
        (tmp_path / stage).mkdir()
        text = "".join(json.dumps(r) + "\n" for r in stage_rows)
        (tmp_path / stage / "metrics.jsonl").write_text(text)
    out = tmp_path / "pictures" / "fust.png"
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 0
    assert image_shape(out)[0] > 0
    panels = curves(rows["stage1"] + rows["stage2"])
    assert panels["loss"]["stage2 train loss"] == ([3, 4], [0.5, 0.5])


@pytest.mark.parametrize(
    "content, code, message",
    [
        (None, 2, "no such folder"),
        ("", 2, "holds no metrics.jsonl"),
        ("\n", 1, "metrics.jsonl, line 1: not a metrics row"),
        ('{"epoch": 1, "split": "train"}\n{"epoch": 2, "spl', 1, "metrics.jsonl, line 2"),
        ("empty", 1, "metrics.jsonl is empty"),
    ],
)
def test_errors_name_the_folder_file_and_line(tmp_path, capsys, content, code, message):
    folder = tmp_path / "run"
    if content is not None:
        folder.mkdir()
    if content == "empty":
        (folder / "metrics.jsonl").write_text("")
    elif content:
        (folder / "metrics.jsonl").write_text(content)
    assert main(["plot", str(folder)]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (folder / "curves.png").exists()


def test_unwritable_out_is_a_usage_error(run_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["plot", str(run_dir), "--out", str(blocker / "curves.png")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "Traceback" not in err
