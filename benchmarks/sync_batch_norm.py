"""Synchronised TrackedBN on 2 CPU processes (gloo): one training step against the baselines
measured in the same run.

``python benchmarks/sync_batch_norm.py [--out FILE.json]`` spawns 2 ranks, each holding half of
a ResNet-18-shaped batch, and times per shape (median of 20 steps, each step started by a
barrier):

* ``synced``: ``TrackedBN(activation="relu", sync=True)`` forward + backward, dead counts on;
* ``local``: ``nn.BatchNorm2d`` -> ReLU on the same half batch, no communication (the floor:
  ``nn.SyncBatchNorm`` itself runs on GPUs only);
* ``collectives``: the two collectives a synced layer makes per step, alone (an all-gather of
  ``2C + 1`` and an all-reduce of ``4C + 2`` float64 values).

It prints ``synced / local`` and ``(synced - collectives) / local``, the cost of the layer's own
work. Before timing, each rank checks its synced output, input gradient and dead counts against
one process that normalises the whole batch (docs/DESIGN.md, "PyTorch conventions").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

if __package__ in (None, ""):  # run as a script (and in the spawned ranks): this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.package_under_test import import_avkernels  # noqa: E402
from benchmarks.report import cpu_model  # noqa: E402

TrackedBN = import_avkernels().TrackedBN

WORLD_SIZE = 2
SHAPES = ((32, 64, 56, 56), (32, 128, 28, 28), (32, 512, 7, 7))  # the global batch
STEPS, WARMUP = 20, 3


def _median_step(step) -> float:
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(STEPS):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _check(layer, x: torch.Tensor, grad: torch.Tensor, rank: int) -> None:
    """The synced step on this rank's half equals one process on the whole batch."""
    whole = TrackedBN(x.shape[1], activation="relu")
    half = slice(rank * x.shape[0] // WORLD_SIZE, (rank + 1) * x.shape[0] // WORLD_SIZE)
    x_whole, x_half = x.clone().requires_grad_(), x[half].clone().requires_grad_()
    y_whole = whole(x_whole)
    y_whole.backward(grad)
    y = layer(x_half)
    y.backward(grad[half])
    torch.testing.assert_close(y, y_whole[half], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x_half.grad, x_whole.grad[half], rtol=1e-4, atol=1e-5)
    assert torch.equal(layer.dead_count, whole.dead_count), "dead counts differ"


def _time_shape(shape: tuple, rank: int) -> dict:
    """Checks, then times, the three steps on this rank's half of a batch of ``shape``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    grad = torch.randn(shape, generator=generator)
    channels = shape[1]
    _check(TrackedBN(channels, activation="relu", sync=True), x, grad, rank)

    half = x[rank * shape[0] // WORLD_SIZE : (rank + 1) * shape[0] // WORLD_SIZE]
    half = half.clone().requires_grad_()
    half_grad = torch.randn(half.shape, generator=generator)
    synced = TrackedBN(channels, activation="relu", sync=True)
    local = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())
    gathered = [torch.empty(2 * channels + 1, dtype=torch.float64) for _ in range(WORLD_SIZE)]
    reduced = torch.zeros(4 * channels + 2, dtype=torch.float64)

    def collectives():
        dist.all_gather(gathered, gathered[rank])
        dist.all_reduce(reduced)

    return {
        "synced": _median_step(lambda: synced(half).backward(half_grad)),
        "local": _median_step(lambda: local(half).backward(half_grad)),
        "collectives": _median_step(collectives),
    }


def _rank(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE)  # fmt: skip
    rows = [{"shape": list(shape), "seconds": _time_shape(shape, rank)} for shape in SHAPES]
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        raw = Path(scratch) / "rows.json"
        mp.start_processes(_rank, args=(str(Path(scratch) / "init"), str(raw)),
                           nprocs=WORLD_SIZE, start_method="spawn")  # fmt: skip
        rows = json.loads(raw.read_text())
    for row in rows:
        t = row["seconds"]
        row["synced_over_local"] = t["synced"] / t["local"]
        row["synced_without_collectives_over_local"] = (t["synced"] - t["collectives"]) / t["local"]
        print(
            f"global batch {tuple(row['shape'])}, {WORLD_SIZE} ranks: synced TrackedBN+ReLU "
            f"{row['synced_over_local']:.2f}x local BatchNorm2d+ReLU "
            f"({row['synced_without_collectives_over_local']:.2f}x without its 2 collectives; "
            f"synced {t['synced'] * 1e3:.2f} ms, local {t['local'] * 1e3:.2f} ms, "
            f"collectives {t['collectives'] * 1e3:.2f} ms per step)"
        )
    if args.out:
        meta = {
            "date": datetime.date.today().isoformat(),
            "torch": torch.__version__,
            "machine": f"{cpu_model()}, {os.cpu_count()} cores, 1 torch thread per rank",
            "backend": "gloo",
        }
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
