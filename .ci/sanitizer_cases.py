"""A few calls of every avkernels CUDA kernel, small enough for compute-sanitizer (.ci/gpu runs
it under memcheck and initcheck): the batch-norm op pair and its synchronised parts in each mode,
in NCHW, channels_last and a strided view, with maps split across programs and not, and the
masking ops."""

import functools

import torch

from avkernels.ops.batch_norm import triton_launch as batch_norm
from avkernels.ops.masking import triton_launch as masking


def _vector(channels: int, device: str, value: float = 1.0, dtype=torch.float32):
    return torch.full((channels,), value, dtype=dtype, device=device)


def _batch_norm_cases(device: str) -> None:
    for shape in ((2, 5, 7, 9), (9, 3, 4, 4)):  # split maps; whole samples per program
        for layout in ("nchw", "channels_last", "strided"):
            x = torch.randn(shape, device=device)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            elif layout == "strided":
                x = torch.randn(*shape[:3], 2 * shape[3], device=device)[..., ::2]
            vector = functools.partial(_vector, shape[1], device)

            for train, abri, relu in (
                (True, False, False),
                (True, True, True),
                (False, True, False),
                (False, False, True),
            ):
                params = (
                    vector(),
                    vector(0.1),
                    vector(0.9) if abri else None,
                    vector(0.2) if abri else None,
                    torch.full((1,), 0.3, device=device) if abri else None,
                )
                running = (
                    vector(0.0),
                    vector(),
                    vector(0.0) if abri else None,
                    vector() if abri else None,
                )
                dead = (
                    vector(0, torch.int64),
                    vector(0, torch.int64),
                    torch.zeros(2, dtype=torch.int64, device=device),
                )
                y, mean, invstd = batch_norm.forward(
                    x, *params, *running, *dead, train, 0.1, 1e-5, relu
                )
                grad_y = torch.randn_like(y)
                batch_norm.backward(grad_y, x, *params, mean, invstd, train, relu)
                if train:  # the synchronised parts
                    batch_mean, var = batch_norm.stats(x)
                    saved = (batch_mean[None], torch.rsqrt(var + 1e-5)[None])
                    sums, *_ = batch_norm.backward_reduce(grad_y, x, *params, *saved, relu)
                    count = x.numel() // x.shape[1]
                    batch_norm.backward_elemt(grad_y, x, *params, *saved, sums / count, relu)


def _masking_cases(device: str) -> None:
    ratios = torch.full((3,), 0.5, dtype=torch.float64, device=device)
    seeds = torch.arange(6, dtype=torch.int64, device=device).reshape(3, 2)
    x = torch.randn(3, 2, 2, 20, 12, device=device)
    masking.zero_masked_patches(x, ratios, seeds, 4, 4)
    a, v = torch.randn(3, 40, device=device), torch.randn(3, 24, device=device)
    out = masking.masked_concat(a, v, ratios, ratios, seeds, 8, 8)
    masking.masked_concat_backward(out, ratios, None, seeds, 40, 8, 8)


if __name__ == "__main__":
    _batch_norm_cases("cuda")
    _masking_cases("cuda")
    torch.cuda.synchronize()
    print("sanitizer cases: done")
