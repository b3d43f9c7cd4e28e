"""TrackedBN against nn.BatchNorm2d where the two are easiest to tell apart: the cumulative
average in float64, empty batches, non-positive eps, the exception classes of bad arguments and
dtype mixes, and dead counters recreated in another dtype. Every case runs on each backend
(``backend`` fixture: the reference, the C++ kernels, the Triton kernels)."""

from __future__ import annotations

import torch
from torch import nn

from avkernels import TrackedBN

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = (F16, BF16, F32, F64)


def _pair(backend, **kwargs) -> tuple[nn.BatchNorm2d, TrackedBN]:
    """An nn.BatchNorm2d and a TrackedBN with the same arguments and the same random affine."""
    plain = nn.BatchNorm2d(3, device=backend.device, **kwargs)
    tracked = TrackedBN(3, device=backend.device, **kwargs)
    if plain.affine:
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5)
            plain.bias.uniform_(-0.5, 0.5)
        tracked.load_state_dict(plain.state_dict())
    return plain, tracked


def test_cumulative_average_in_float64_matches_batchnorm2d(backend):
    """momentum=None: the 1/num_batches_tracked weight must not be rounded to float32."""
    plain, tracked = (layer.double() for layer in _pair(backend, momentum=None))
    generator = torch.Generator().manual_seed(0)
    with backend.active():
        for _ in range(5):
            x = torch.randn(4, 3, 5, 5, generator=generator, dtype=F64) * 3 + 1
            x = x.to(backend.device)
            plain(x)
            tracked(x)
    assert tracked.num_batches_tracked == plain.num_batches_tracked == 5
    # A float32 weight is off by ~1e-9 relative here; float64 rounding by ~1e-16.
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(
            getattr(tracked, name), getattr(plain, name), rtol=1e-14, atol=1e-14
        )
