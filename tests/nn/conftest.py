"""Fixtures of the module tests (the op backends' fixtures are in tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.helpers.batch_norm import Backend, get_backend


@pytest.fixture(params=["cpp", "triton"])
def kernel_path(request) -> Backend:
    """TrackedBN runs the C++ kernels, then the Triton kernels (the interpreter on CPU tensors
    under TRITON_INTERPRET=1, else a CUDA GPU, else skipped), on ``kernel_path.device``."""
    backend = get_backend(request.param)
    with backend.active():
        yield backend
