"""Fixtures shared by the op and module tests: the backends of the tracked-BN ops
(tests/helpers/batch_norm.py)."""

from __future__ import annotations

import pytest

from tests.helpers.batch_norm import Backend, get_backend

BACKENDS = ("reference", "cpp", "triton", "cuda")


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    return get_backend(request.param)


@pytest.fixture
def triton_backend() -> Backend:
    """The Triton kernels, made the kernels of the two ops for the test (module-level tests)."""
    chosen = get_backend("triton")
    with chosen.active():
        yield chosen
