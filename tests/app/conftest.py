"""Fixtures shared by the application tests (plain builders live in tests/app/data_fixtures.py
and tests/app/training_fixtures.py)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def clips_manifest(tmp_path_factory):
    """The manifest of 8 tiny on-disk clips (6 train, 2 test, 2 classes), once per module."""
    pytest.importorskip("PIL")
    from tests.app.data_fixtures import write_clips_manifest

    return write_clips_manifest(tmp_path_factory.mktemp("clips"))


@pytest.fixture(scope="session")
def av_digits_cache(tmp_path_factory):
    """AV-Digits builds once per test session: in $AVKERNELS_CACHE when set, else a tmp dir."""
    saved = os.environ.get("AVKERNELS_CACHE")
    if not saved:
        os.environ["AVKERNELS_CACHE"] = str(tmp_path_factory.mktemp("avkernels-cache"))
    yield os.environ["AVKERNELS_CACHE"]
    if saved is None:
        del os.environ["AVKERNELS_CACHE"]
