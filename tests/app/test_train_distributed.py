"""The trainer and the CLI under several processes (DDP, gloo on the CPU): two processes train
what one process trains (synced BN), resume exactly, record every sample once, and only rank 0
writes. The trainer's two ranks are spawned once for the module (file:// rendezvous, no ports)
and run every scenario, the tests check what they left behind; the CLI runs under torchrun."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from avkernels.app.training import CHECKPOINT, Trainer
from avkernels.app.training.sampling import EpochSampler, RankBatchSampler
from avkernels.distributed import Ranks
from avkernels.fust import ConfidenceTracker
from tests.app.training_fixtures import (
    SyntheticAV,
    assert_same_state,
    final_state,
    run,
    tiny_config,
)

pytest.importorskip("torchvision")
pytest.importorskip("PIL")

from avkernels.app.data import AudioConfig, AVDataset, VisualConfig  # noqa: E402
from tests.app.data_fixtures import TINY_TRAINING_OPTIONS, write_clips_manifest  # noqa: E402

WORLD_SIZE = 2
SPAWN_DEADLINE_S = 300  # the ranks are killed after this (a hung collective must not hang pytest)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
# 10 samples, batch 4: batches of 4, 4, 2, split 2+2, 2+2, 1+1. SGD, whose steps scale with the
# gradient (Adam's would hide a wrongly weighted loss). In float64 (float64_defaults): BN over a
# few values amplifies float32's rounding differences to ~1e-4 in two epochs.
STAGE1 = dict(stage="stage1", sync_bn=True, optimizer="sgd", lr=0.01)
# `avkernels train` with a tiny front end and model, BN synchronised across the processes.
CLI_OPTIONS = [*TINY_TRAINING_OPTIONS, "--sync-bn"]


@contextlib.contextmanager
def float64_defaults():
    """Models and SyntheticAV data built inside are float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class Float64Clips(AVDataset):
    """On-disk clips with training augmentation (random frames, crops, flips), in float64 like
    the models built under float64_defaults; the inputs of SyntheticAV's shapes."""

    def __init__(self, manifest: Path):
        audio = AudioConfig(num_mel_bins=32, target_length=64)
        super().__init__(manifest, "train", audio, VisualConfig(frames_per_clip=2, size=32))

    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in item.items()}


def augmented_manifest(root: Path) -> Path:
    return root / "clips" / "manifest.csv"


# --- what every rank runs -----------------------------------------------------------------------


def _record_writes(log: list) -> None:
    """Log every file the trainer and the confidence trackers write (atomically)."""
    import avkernels.app.training.run_files as run_files_module
    import avkernels.fust.confidence as confidence_module

    for module, name in (
        (run_files_module, "atomic_write"),
        (run_files_module, "atomic_write_text"),
        (confidence_module, "atomic_write"),
    ):

        def logged(path, *args, _write=getattr(module, name)):  # noqa: B008 - bound now
            log.append(Path(path).name)
            return _write(path, *args)

        setattr(module, name, logged)


def _scenarios(rank: int, root: Path) -> dict:
    from avkernels.app.training import TrainingInterrupted

    report, log = {"writes": {}}, []
    _record_writes(log)

    with float64_defaults():
        run(tiny_config(**STAGE1), root / "straight", data=SyntheticAV())
    report["writes"]["straight"], log[:] = list(log), []

    with float64_defaults():
        run(tiny_config(**STAGE1), root / "augmented", data=Float64Clips(augmented_manifest(root)))
    log[:] = []

    def stop_on_rank_1(trainer, global_step):  # the other rank must stop with it
        if trainer.ranks.rank == 1 and global_step == 2:
            trainer.request_stop()

    with float64_defaults():
        try:
            run(tiny_config(**STAGE1), root / "resumed", data=SyntheticAV(), on_step=stop_on_rank_1)
            report["stopped"] = False
        except TrainingInterrupted:
            report["stopped"] = True
        run(tiny_config(**STAGE1), root / "resumed", data=SyntheticAV(), resume=True)
    report["writes"]["resumed"], log[:] = list(log), []

    # 9 samples: the last batch holds one, rank 1 gets a padding sample that must not count.
    counts = {}

    def count_epoch_1(trainer, global_step):
        if global_step == 3:
            counts.update(
                {m: trainer.trackers[m].state_dict()["count"].tolist() for m in trainer.trackers}
            )

    trainer = Trainer(
        tiny_config(stage="stage1", epochs=1),
        SyntheticAV(9),
        root / "padded",
        progress=False,
        on_step=count_epoch_1,
    )
    history = trainer.fit()
    report["padded"] = {
        "counts": counts,
        "ids": list(trainer.trackers["audio"].ids),
        "history": history,
    }

    # Stage 2 from the stage-1 run, masking inputs and fused features.
    with float64_defaults():
        report["stage2"] = run(
            tiny_config(
                stage="stage2",
                init_from=str(root / "straight"),
                mask_target="both",
                mask_threshold=0.0,
                mask_rho=(0.9, 0.9),
                epochs=1,
                probe_epochs=2,
            ),
            root / "stage2",
            data=SyntheticAV(),
        ).history
    return report


def _worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)  # two ranks on a small machine
    root = Path(root)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{root / 'rendezvous'}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        report = _scenarios(rank, root)
        (root / f"report{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def spawn_ranks(root: Path) -> None:
    context = mp.start_processes(
        _worker, args=(str(root),), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD_SIZE} ranks did not finish in {SPAWN_DEADLINE_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_clips_manifest(augmented_manifest(root).parent, textured=True, frame_count=4)
    spawn_ranks(root)
    reports = [json.loads((root / f"report{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    return root, reports


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    with float64_defaults():
        run(tiny_config(**STAGE1), run_dir, data=SyntheticAV())
    return run_dir


@pytest.fixture(scope="module")
def one_process_augmented_run(ranks_run, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one-augmented") / "run"
    with float64_defaults():
        run(tiny_config(**STAGE1), run_dir, data=Float64Clips(augmented_manifest(ranks_run[0])))
    return run_dir


# --- the tests ----------------------------------------------------------------------------------


def test_two_processes_train_as_one_does(ranks_run, one_process_run):
    """Synced BN and the global batch split over the ranks: the same confidences per sample
    (in the same first-seen order), model and metrics as one process, up to float64 rounding
    (per-rank BN or a wrongly weighted loss would differ by far more)."""
    root, _ = ranks_run
    two, one = root / "straight", one_process_run
    for modality in ("audio", "visual"):
        files = [ConfidenceTracker.load(d / f"confidence_{modality}.pt") for d in (two, one)]
        assert files[0].ids == files[1].ids and files[0].num_epochs == files[1].num_epochs == 2
        torch.testing.assert_close(files[0].per_epoch(), files[1].per_epoch(), rtol=0, atol=1e-10)
    states = [torch.load(d / CHECKPOINT, weights_only=True) for d in (two, one)]
    for key, value in states[1]["model"].items():
        torch.testing.assert_close(
            states[0]["model"][key], value, rtol=1e-9, atol=1e-10, msg=lambda m: f"{key}: {m}"
        )
    for row_two, row_one in zip(states[0]["history"], states[1]["history"]):
        assert row_two.keys() == row_one.keys()
        for key in row_one:
            assert row_two[key] == pytest.approx(row_one[key], abs=1e-10), key
    assert len(states[0]["rng_other_ranks"]) == 1 and states[1]["rng_other_ranks"] == []


def test_two_processes_augment_as_one_does(ranks_run, one_process_augmented_run):
    """With random frames, crops and flips on, each sample's augmentation is a function of
    (seed, epoch, sample), not of the rank's RNG: the same confidences as one process."""
    two, one = ranks_run[0] / "augmented", one_process_augmented_run
    for modality in ("audio", "visual"):
        files = [ConfidenceTracker.load(d / f"confidence_{modality}.pt") for d in (two, one)]
        assert files[0].ids == files[1].ids and files[0].num_epochs == files[1].num_epochs == 2
        torch.testing.assert_close(files[0].per_epoch(), files[1].per_epoch(), rtol=0, atol=1e-10)


def test_only_rank_0_writes(ranks_run):
    root, reports = ranks_run
    assert reports[1]["writes"] == {"straight": [], "resumed": []}
    written = reports[0]["writes"]["straight"]
    # config.json, checkpoint.pt and the two metrics files at each of the 2 epoch ends and at
    # the end; model.pt and the confidence files once.
    assert sorted(set(written)) == [
        "checkpoint.pt",
        "confidence_audio.pt",
        "confidence_visual.pt",
        "config.json",
        "metrics.csv",
        "metrics.jsonl",
        "model.pt",
    ]
    assert written.count("checkpoint.pt") == 3 and written.count("model.pt") == 1
    assert written.count("confidence_audio.pt") == written.count("confidence_visual.pt") == 1
    assert not list(root.glob("**/*.partial"))


def test_a_stop_on_one_rank_stops_all_and_resumes_exactly(ranks_run):
    root, reports = ranks_run
    assert reports[0]["stopped"] and reports[1]["stopped"]
    assert_same_state(final_state(root / "straight"), final_state(root / "resumed"))
    for name in ("metrics.jsonl", "metrics.csv", "confidence_audio.pt"):
        assert (root / "straight" / name).read_bytes() == (root / "resumed" / name).read_bytes()


def test_padding_of_a_short_last_batch_is_not_recorded(ranks_run):
    """9 samples, batches of 4, 4 and 1: the last batch pads rank 1, and still every sample is
    recorded exactly once in the epoch, in the batches' order, on both ranks."""
    _, reports = ranks_run
    padded = [report["padded"] for report in reports]
    assert padded[0] == padded[1]  # the ranks agree on trackers and metrics
    for counts in padded[0]["counts"].values():
        assert counts == [1] * 9
    sampler = EpochSampler(9, 4, tiny_config().seed)
    assert padded[0]["ids"] == [f"clip{i:03d}" for i in sampler]


def test_stage2_and_probes_run_and_every_rank_agrees(ranks_run):
    """Stage 2 (masks drawn from each rank's own stream) with sharded evaluation and probes."""
    _, reports = ranks_run
    history = reports[0]["stage2"]
    assert history == reports[1]["stage2"]
    assert [row["split"] for row in history] == ["train", "eval", "probe_audio", "probe_visual"]
    assert all(
        value == value for row in history for value in row.values() if isinstance(value, float)
    )


def test_rank_batches_split_every_batch_into_contiguous_shares():
    """11 samples, batches of 4, 4 and 3 over 3 ranks: in every step the shares in rank order
    are the batch; resuming at a batch starts every rank there."""
    sampler = EpochSampler(11, 4, seed=0)
    order = list(sampler)
    shares = [list(RankBatchSampler(sampler, Ranks(rank, 3))) for rank in range(3)]
    assert [[len(share) for share in rank_shares] for rank_shares in shares] == [
        [2, 2, 1],
        [1, 1, 1],
        [1, 1, 1],
    ]
    for step, start in enumerate(range(0, 11, 4)):
        assert [i for rank in range(3) for i in shares[rank][step]] == order[start : start + 4]
    sampler.set_epoch(0, start_batch=1)
    assert list(RankBatchSampler(sampler, Ranks(2, 3))) == shares[2][1:]


def test_a_batch_smaller_than_the_ranks_pads_the_ranks_without_a_share():
    """9 samples, batch 4, 3 ranks: the last batch has one sample; ranks 1 and 2 get it as
    padding (Ranks.shard, which the trainer reads, gives them nothing)."""
    sampler = EpochSampler(9, 4, seed=0)
    last = [list(RankBatchSampler(sampler, Ranks(rank, 3)))[-1] for rank in range(3)]
    assert last == [[list(sampler)[8]]] * 3
    assert [len(Ranks(rank, 3).shard(1)) for rank in range(3)] == [1, 0, 0]


def test_one_process_rank_helpers_are_local():
    ranks = Ranks.current()
    assert ranks == Ranks(0, 1) and ranks.is_main
    assert ranks.gather({"a": 1}) == [{"a": 1}] and ranks.any(True) and not ranks.any(False)
    assert list(ranks.shard(5)) == [0, 1, 2, 3, 4]


TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.mark.skipif(not os.path.isfile(TORCHRUN), reason="needs torchrun beside the interpreter")
def test_torchrun_launches_the_cli(tmp_path, clips_manifest):
    """The real launcher, `torchrun --standalone --nproc_per_node 2 -m avkernels train ...`
    (on 6 clips, batches of 4 and 2): both ranks join through torchrun's variables and leave;
    rank 0 alone prints, and every clip gets a confidence."""
    command = [
        TORCHRUN,
        "--standalone",
        "--nproc_per_node",
        str(WORLD_SIZE),
        "-m",
        "avkernels.app",
        "train",
        "stage1",
        str(clips_manifest),
        "--out",
        str(tmp_path / "run"),
        *CLI_OPTIONS,
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=SPAWN_DEADLINE_S,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("stage1: epoch 1 eval: acc_audio") == 1
    assert result.stdout.count("wrote") == 1
    for modality in ("audio", "visual"):
        tracker = ConfidenceTracker.load(tmp_path / "run" / f"confidence_{modality}.pt")
        assert sorted(tracker.mean().ids) == [f"clip{i}" for i in range(6)]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["sync_bn"] is True
