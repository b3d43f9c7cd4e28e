"""Synchronized TrackedBN across processes (gloo, 2 CPU processes) and the DDP helpers.

One group of 2 spawned processes runs every distributed check (process start-up dominates the
cost) and saves its results per rank; the tests below assert on them.
The oracle is a single-process TrackedBN fed the whole batch: a synced layer on the ranks'
slices must give the same outputs, input gradients, summed parameter gradients, running
statistics and dead counts.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import datetime
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import avkernels
from avkernels import TrackedBN
from avkernels.distributed import (
    DEAD_COUNTERS,
    all_reduce_dead_stats,
    dead_counter_names,
    wrap_ddp,
)

WORLD_SIZE = 2
CHANNELS, HEIGHT, WIDTH = 4, 3, 5
GROUP_TIMEOUT_S = 120  # the whole spawned group; a collective gives up after COLLECTIVE_TIMEOUT
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


@dataclasses.dataclass(frozen=True)
class Case:
    split: tuple[int, ...] = (3, 3)  # samples per rank
    dtype: torch.dtype = torch.float64
    relu: bool = False
    abri: str | None = None  # ABRi granularity
    momentum: float | None = 0.1
    channels_last: bool = False
    affine: bool = True
    track_running_stats: bool = True
    track_dead: bool = True
    steps: int = 2


CASES = {
    "plain": Case(),
    "relu": Case(relu=True),
    "abri_layer_relu": Case(abri="layer", relu=True),
    "abri_channel": Case(abri="channel"),
    "momentum_none": Case(momentum=None, abri="layer", steps=3),
    "no_affine_no_running_stats": Case(affine=False, track_running_stats=False, relu=True),
    "no_dead_counting": Case(track_dead=False, abri="channel"),
    "unequal_batches": Case(split=(1, 5), relu=True),
    "empty_rank": Case(split=(0, 4), abri="layer"),
    "channels_last": Case(channels_last=True, relu=True, abri="channel"),
    "float32": Case(dtype=torch.float32, relu=True, abri="layer"),
    "bfloat16": Case(dtype=torch.bfloat16, relu=True, abri="layer"),  # fp32 parameters
}
LOW_PRECISION = (torch.bfloat16, torch.float16)


# --- spawned processes ---------------------------------------------------------------------------


def _randomise(layer: TrackedBN, generator: torch.Generator) -> None:
    """Parameters and running statistics away from their defaults, with some channels' shift
    negative enough to be mostly dead."""
    with torch.no_grad():
        for name, tensor in list(layer.named_parameters()) + list(layer.named_buffers()):
            if tensor.is_floating_point():
                fresh = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                if name.endswith("running_var"):
                    fresh = fresh.abs() + 0.5
                elif name.endswith("bias"):
                    fresh = fresh * 2 - 1
                tensor.copy_(fresh)


def _forward_backward(layer: TrackedBN, x: torch.Tensor, grad: torch.Tensor, channels_last=False):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    x.requires_grad_()
    y = layer(x)
    (y * grad).sum().backward()
    return y, x.grad


def _check_case(case: Case, rank: int) -> list:
    """``(label, synced, single-process full batch, float64 oracle or None)`` for one case."""
    generator = torch.Generator().manual_seed(1234)
    reference = TrackedBN(
        CHANNELS,
        momentum=case.momentum,
        affine=case.affine,
        track_running_stats=case.track_running_stats,
        activation="relu" if case.relu else None,
        track_dead=case.track_dead,
        dtype=torch.float64 if case.dtype == torch.float64 else torch.float32,
    )
    if case.abri:
        reference.enable_abri(granularity=case.abri)
    _randomise(reference, generator)
    synced = copy.deepcopy(reference)
    synced.sync = True
    # Low precision is judged against float64 (within 2x the single-process layer's error).
    oracle = copy.deepcopy(reference).double() if case.dtype in LOW_PRECISION else None
    start, stop = sum(case.split[:rank]), sum(case.split[: rank + 1])
    results = []
    for step in range(case.steps):
        x = torch.randn(sum(case.split), CHANNELS, HEIGHT, WIDTH, generator=generator) * 3 + 1
        grad = torch.randn(x.shape, generator=generator)
        x, grad = x.to(case.dtype), grad.to(case.dtype)
        y_full, grad_x_full = _forward_backward(reference, x.clone(), grad)
        y, grad_x = _forward_backward(
            synced, x[start:stop].clone(), grad[start:stop], case.channels_last
        )
        y_oracle = grad_x_oracle = None
        if oracle is not None:
            y_oracle, grad_x_oracle = _forward_backward(oracle, x.double(), grad.double())
            y_oracle, grad_x_oracle = y_oracle[start:stop], grad_x_oracle[start:stop]
        results += [
            (f"step {step} output", y, y_full[start:stop], y_oracle),
            (f"step {step} grad input", grad_x, grad_x_full[start:stop], grad_x_oracle),
        ]
        if case.channels_last and stop > start:
            channels_last = torch.channels_last
            results.append(
                (
                    f"step {step} output and grad stay channels_last",
                    (
                        y.is_contiguous(memory_format=channels_last),
                        grad_x.is_contiguous(memory_format=channels_last),
                    ),
                    (True, True),
                    None,
                )
            )
    for name, parameter in synced.named_parameters():
        # Each rank holds the gradient of its own slice; DDP would average them.
        dist.all_reduce(parameter.grad)
        results.append(
            (
                f"grad {name}",
                parameter.grad,
                getattr(reference, name).grad,
                None if oracle is None else getattr(oracle, name).grad,
            )
        )
    for name, buffer in synced.named_buffers():
        results.append(
            (
                f"buffer {name}",
                buffer,
                getattr(reference, name),
                None if oracle is None or not buffer.is_floating_point() else getattr(oracle, name),
            )
        )
    return [tuple(_detached(value) for value in result) for result in results]


def _detached(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _conv_bn(sync: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, CHANNELS, 1), TrackedBN(CHANNELS, sync=sync))
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([-2.0, -0.5, 0.0, 1.0]))
    return model


def _rank_batch(rank: int, step: int) -> torch.Tensor:
    """A different batch (size and values) on each rank."""
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(2 + 2 * rank, 3, HEIGHT, WIDTH, generator=generator) * (1 + rank)


def _counters(layer: TrackedBN) -> tuple:
    return tuple(getattr(layer, name).clone() for name in DEAD_COUNTERS)


def _train_steps(model: nn.Module, rank: int, steps: int = 2) -> None:
    for step in range(steps):
        model(_rank_batch(rank, step)).square().mean().backward()


def _check_ddp(rank: int) -> dict:
    """Per-rank counters under DDP with and without :func:`wrap_ddp`, and synced DDP layers."""
    results = {}
    local = _conv_bn(sync=False)
    _train_steps(local, rank)  # no DDP at all: this rank's own counts
    results["local counts"] = _counters(local[1])

    wrapped = wrap_ddp(_conv_bn(sync=False))
    _train_steps(wrapped, rank)
    results["wrap_ddp counts"] = _counters(wrapped.module[1])
    all_reduce_dead_stats(wrapped)
    results["all-reduced counts"] = _counters(wrapped.module[1])

    plain = nn.parallel.DistributedDataParallel(_conv_bn(sync=False))
    _train_steps(plain, rank)
    results["plain DDP counts"] = _counters(plain.module[1])

    synced = wrap_ddp(_conv_bn(sync=True))
    _train_steps(synced, rank)
    all_reduce_dead_stats(synced)  # leaves synced layers alone: their counts are global already
    reference = _conv_bn(sync=False)  # the whole global batch in one process
    for step in range(2):
        batch = torch.cat([_rank_batch(r, step) for r in range(WORLD_SIZE)])
        reference(batch)
    results["synced dead_fraction"] = (
        synced.module[1].dead_fraction(),
        reference[1].dead_fraction(),
    )
    results["synced counts"] = (_counters(synced.module[1]), _counters(reference[1]))
    results["synced running_var"] = (
        synced.module[1].running_var.detach().clone(),
        reference[1].running_var.detach().clone(),
    )
    return results


def _check_tiny_batches(rank: int) -> dict:
    """One value per channel on each rank is a valid global batch of two; one in all is not."""
    torch.manual_seed(0)
    reference = TrackedBN(CHANNELS, dtype=torch.float64)
    synced = TrackedBN(CHANNELS, dtype=torch.float64, sync=True)
    x = torch.randn(WORLD_SIZE, CHANNELS, 1, 1, dtype=torch.float64)
    results = {"one value per rank": (synced(x[rank : rank + 1]), reference(x)[rank : rank + 1])}
    try:
        synced(x[:1] if rank == 0 else x[:0])
        results["one value in all"] = None
    except ValueError as error:
        results["one value in all"] = str(error)
    running = (synced.running_mean.clone(), synced.running_var.clone())
    empty = x[:0].requires_grad_()
    y = synced(empty)
    y.sum().backward()
    results["no value in all"] = (
        (tuple(y.shape), tuple(empty.grad.shape), synced.running_mean, synced.running_var),
        ((0, CHANNELS, 1, 1), (0, CHANNELS, 1, 1), *running),
    )
    return results


HOST_SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__")


@contextlib.contextmanager
def _watched_communication(calls: collections.Counter):
    """Counts the collectives by name and makes every host read of a tensor value fail."""
    patched = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}
    host_reads = {name: getattr(torch.Tensor, name) for name in HOST_SYNCS}

    def counted(name):
        def collective(*args, **kwargs):
            calls[name] += 1
            return patched[name](*args, **kwargs)

        return collective

    def refused(self, *args, **kwargs):
        raise AssertionError("a synced layer read a tensor value on the host")

    try:
        for name in patched:
            setattr(dist, name, counted(name))
        for name in HOST_SYNCS:
            setattr(torch.Tensor, name, refused)
        yield
    finally:
        for name, original in patched.items():
            setattr(dist, name, original)
        for name, original in host_reads.items():
            setattr(torch.Tensor, name, original)


def _check_communication(rank: int) -> dict:
    """Collectives per synced layer and direction, with no host read of a tensor value; a
    forward without autograd all-reduces its dead counts itself."""
    layers = 3
    torch.manual_seed(0)
    model = nn.Sequential(
        *(TrackedBN(CHANNELS, activation="relu", sync=True) for _ in range(layers))
    )
    x = _rank_batch(rank, 0)[:, :1].expand(-1, CHANNELS, -1, -1).contiguous()
    x.requires_grad_()
    forward, backward, no_grad = collections.Counter(), collections.Counter(), collections.Counter()
    with _watched_communication(forward):
        y = model(x)
    with _watched_communication(backward):
        y.square().mean().backward()
    after_backward = _counters(model[0])
    with torch.no_grad(), _watched_communication(no_grad):
        model(x.detach())
    reference = nn.Sequential(*(TrackedBN(CHANNELS, activation="relu") for _ in range(layers)))
    batch = torch.cat([_rank_batch(r, 0)[:, :1].expand(-1, CHANNELS, -1, -1) for r in range(2)])
    reference(batch)
    reference_once = _counters(reference[0])
    reference(batch)
    return {
        "per layer": {
            "forward": {name: n / layers for name, n in forward.items()},
            "backward": {name: n / layers for name, n in backward.items()},
            "no_grad forward": {name: n / layers for name, n in no_grad.items()},
        },
        "counts after backward": (after_backward, reference_once),
        "counts after no_grad forward": (_counters(model[0]), _counters(reference[0])),
    }


def _run_group(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        results = {
            "cases": {name: _check_case(case, rank) for name, case in CASES.items()},
            "ddp": _check_ddp(rank),
            "tiny": _check_tiny_batches(rank),
            "communication": _check_communication(rank),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def group_results(tmp_path_factory) -> list[dict]:
    """Run every distributed check once in a group of 2 processes; per-rank results."""
    directory = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        _run_group,
        args=(str(directory / "init"), str(directory)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    while not context.join(timeout=1):  # raises if a process failed, ending the others
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the distributed group did not finish within {GROUP_TIMEOUT_S} s")
    return [
        torch.load(directory / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)
    ]


# --- assertions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_synced_half_batches_match_one_full_batch(group_results, name):
    tolerance = {} if CASES[name].dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    for rank, results in enumerate(group_results):
        for label, actual, expected, oracle in results["cases"][name]:
            where = f"rank {rank}, {label}"
            if oracle is not None:
                error = (actual.double() - oracle).abs().max()
                single_process_error = (expected.double() - oracle).abs().max()
                assert error <= 2 * single_process_error + 1e-5, (
                    f"{where}: error {error:.3g} vs single-process {single_process_error:.3g}"
                )
            elif isinstance(actual, torch.Tensor) and actual.is_floating_point():
                torch.testing.assert_close(
                    actual, expected, **tolerance, msg=lambda message: f"{where}: {message}"
                )
            elif isinstance(actual, torch.Tensor):
                assert torch.equal(actual, expected), f"{where}: {actual} != {expected}"
            else:
                assert actual == expected, where


def test_wrap_ddp_keeps_per_rank_dead_counters(group_results):
    local = [results["ddp"]["local counts"] for results in group_results]
    assert not torch.equal(local[0][0], local[1][0])  # the ranks did see different batches
    for rank, results in enumerate(group_results):
        ddp = results["ddp"]
        for wrapped, own in zip(ddp["wrap_ddp counts"], local[rank]):
            torch.testing.assert_close(wrapped, own)
    # Without wrap_ddp, DDP's broadcast hands rank 1 rank 0's counters before each forward.
    assert not torch.equal(group_results[1]["ddp"]["plain DDP counts"][2], local[1][2])


def test_all_reduce_dead_stats_gives_global_counts(group_results):
    totals = [sum(results["ddp"]["local counts"][i] for results in group_results) for i in range(3)]
    for results in group_results:
        for reduced, total in zip(results["ddp"]["all-reduced counts"], totals):
            torch.testing.assert_close(reduced, total)


def test_synced_layer_under_ddp_has_global_dead_fraction(group_results):
    for results in group_results:
        for key in ("synced dead_fraction", "synced running_var"):
            actual, expected = results["ddp"][key]
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
        for actual, expected in zip(*results["ddp"]["synced counts"]):
            torch.testing.assert_close(actual, expected)


def test_synced_batch_size_check_is_global(group_results):
    for results in group_results:
        actual, expected = results["tiny"]["one value per rank"]
        torch.testing.assert_close(actual.detach(), expected.detach())
        message = results["tiny"]["one value in all"]
        assert message and "Expected more than 1 value per channel when training" in message
        # As nn.BatchNorm2d: an empty global batch gives an empty output and keeps the running
        # statistics.
        (shape, grad_shape, *running), (expected_shape, expected_grad_shape, *kept) = results[
            "tiny"
        ]["no value in all"]
        assert (shape, grad_shape) == (expected_shape, expected_grad_shape)
        for actual, expected in zip(running, kept):
            assert torch.equal(actual, expected)


def test_one_collective_per_layer_and_direction_without_host_sync(group_results):
    for results in group_results:
        communication = results["communication"]
        assert communication["per layer"] == {
            "forward": {"all_gather": 1},
            "backward": {"all_reduce": 1},
            "no_grad forward": {"all_gather": 1, "all_reduce": 1},
        }
        for key in ("counts after backward", "counts after no_grad forward"):
            for actual, expected in zip(*communication[key]):
                assert torch.equal(actual, expected), key


# --- single process ------------------------------------------------------------------------------


def test_sync_without_process_group_runs_locally():
    torch.manual_seed(0)
    plain = TrackedBN(CHANNELS, activation="relu")
    synced = TrackedBN(CHANNELS, activation="relu", sync=True)
    assert "sync=True" in repr(synced) and "sync" not in repr(plain)
    x = torch.randn(2, CHANNELS, HEIGHT, WIDTH)
    torch.testing.assert_close(synced(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(synced.dead_count, plain.dead_count)


def test_bad_process_group_is_refused():
    with pytest.raises(TypeError, match="process_group must be None"):
        TrackedBN(CHANNELS, process_group="gloo")
    with pytest.raises(TypeError, match="process_group must be None"):
        avkernels.convert(nn.Sequential(nn.BatchNorm2d(CHANNELS)), process_group=0)


def test_convert_sets_sync_on_new_and_existing_layers():
    abri_layer = TrackedBN(CHANNELS).enable_abri()
    model = nn.Sequential(nn.BatchNorm2d(CHANNELS), abri_layer)
    model = avkernels.convert(model, sync=True)
    assert model[1] is abri_layer
    assert all(isinstance(m, TrackedBN) and m.sync and m.process_group is None for m in model)


def test_dead_counter_names_are_fully_qualified():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(TrackedBN(4)))
    assert dead_counter_names(model) == ["1.0.dead_count", "1.0.dead_sample_count", "1.0.seen"]
    assert dead_counter_names(TrackedBN(4)) == ["dead_count", "dead_sample_count", "seen"]
