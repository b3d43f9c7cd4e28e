"""The processes of a run: the device of this process and the ``torchrun`` process group."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def training_device(device=None) -> torch.device:
    """``device`` (default: cuda if available, else cpu); a CUDA device without an index is
    this process's GPU: ``cuda:LOCAL_RANK`` under torchrun, else the current one."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        local_rank = os.environ.get("LOCAL_RANK")
        device = torch.device(
            "cuda", int(local_rank) if local_rank is not None else torch.cuda.current_device()
        )
    return device


@contextlib.contextmanager
def torchrun_process_group(device=None) -> Iterator[torch.device]:
    """Join the processes started by ``torchrun --nproc_per_node N`` for the block; yields this
    process's :func:`training_device`.

    With ``WORLD_SIZE`` > 1 in the environment and no process group yet, initialises the
    default group from torchrun's variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...):
    NCCL on CUDA, each process on ``cuda:LOCAL_RANK``, gloo on the CPU; it is destroyed at the
    end. One process, or a group the caller already initialised, is left as it is.
    """
    device = training_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield device
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()
