"""PyTorch's own nn.BatchNorm2d test material for the ported upstream suites
(tests/nn/test_upstream_modules.py, tests/nn/test_upstream_nn.py).

The inputs are the ``nn.BatchNorm2d`` entry of ``torch.testing._internal.common_modules.module_db``
(it ships in the torch wheel): the constructor arguments and forward inputs PyTorch's
``test/test_modules.py`` drives every module with. The checks themselves are re-expressed in the
test modules, with TrackedBN built from the same arguments as the subject and nn.BatchNorm2d as
the reference.

The ``kernel_path`` fixture (tests/nn/conftest.py) runs each ported test once through the C++
kernels and once through the Triton kernels (the interpreter on CPU tensors under
``TRITON_INTERPRET=1``, else a CUDA GPU, else skipped).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing._internal.common_modules import module_db

from avkernels import TrackedBN

BATCH_NORM_2D = next(info for info in module_db if info.module_cls is nn.BatchNorm2d)
DTYPES = BATCH_NORM_2D.dtypes  # float32 and float64, as upstream runs it on CPU
TRAINING = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=str)
# For the checks that run many forward/backward passes: the Triton interpreter takes about a
# second a pass on a small shared machine, so its run of these is a slow case.
TRITON_SLOW = pytest.mark.parametrize(
    "kernel_path", ["cpp", pytest.param("triton", marks=pytest.mark.slow)], indirect=True
)


def samples(device, dtype, training: bool, requires_grad: bool = False) -> list:
    """The ModuleInput samples of nn.BatchNorm2d (fresh random inputs on every call)."""
    return BATCH_NORM_2D.module_inputs_func(
        BATCH_NORM_2D, device=device, dtype=dtype, requires_grad=requires_grad, training=training
    )


def error_samples(device, dtype, training: bool) -> list:
    return BATCH_NORM_2D.module_error_inputs_func(
        BATCH_NORM_2D, device=device, dtype=dtype, requires_grad=False, training=training
    )


def build(module_cls: type, sample, device, dtype, training: bool) -> nn.Module:
    """``module_cls`` from the sample's constructor arguments, as upstream builds it."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    return module_cls(*args, **kwargs).to(device).to(dtype).train(training)


def build_pair(sample, device, dtype, training: bool) -> tuple[nn.BatchNorm2d, TrackedBN]:
    """nn.BatchNorm2d and TrackedBN from the same arguments, in the same state."""
    return tuple(build(cls, sample, device, dtype, training) for cls in (nn.BatchNorm2d, TrackedBN))


def forward_input(sample):
    (x,) = sample.forward_input.args
    return x


def assert_same_state(tracked: nn.Module, reference: nn.Module) -> None:
    """The same state_dict (keys and values): parameters, running statistics, batch count."""
    expected = reference.state_dict()
    actual = tracked.state_dict()
    assert list(actual) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, msg=name)
