"""Shared test helpers: the TFDS mock fixture and result comparison without wall-clock fields."""

import pytest


@pytest.fixture
def tfds_mock(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.testing import mocking

    # tfds 4.9.x's mock installs `__getitems__` as a plain instance attribute
    # (MagicMock does not treat it as a magic method), so it is called without
    # `self` and fails; accept either calling convention.
    def _getitems(*args, generator, serialized=False):
        return [generator[k] for k in args[-1]]

    monkeypatch.setattr(mocking, "_getitems", _getitems)
    return tfds


def without_seconds(obj):
    """Results with the wall-clock fields removed (time is never reproducible)."""
    if isinstance(obj, dict):
        return {k: without_seconds(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [without_seconds(v) for v in obj]
    return obj
