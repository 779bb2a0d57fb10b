"""Shared fixtures: tiny random-weight checkpoints, built once per test session."""

from __future__ import annotations

import pytest

from blockzoo.tiny_models import TinyModelCache


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> TinyModelCache:
    """Call as `tiny_model_factory("llama", tie_embeddings=True)`; equal arguments give the same folder."""
    return TinyModelCache(tmp_path_factory.mktemp("tiny_models"))
