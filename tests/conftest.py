"""Shared fixtures: tiny random-weight checkpoints, built once per test session.

Without a GPU, Triton kernels run in Triton's interpreter. TRITON_INTERPRET has to be set before
triton itself is imported (its standard library is built for one mode or the other), and importing
torch can import triton, so it is set here, before anything else is imported.
"""

from __future__ import annotations

import os
import shutil

if "TRITON_INTERPRET" not in os.environ and not (
    os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")
):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

from blockzoo.tiny_models import TinyModelCache


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> TinyModelCache:
    """Call as `tiny_model_factory("llama", tie_embeddings=True)`; equal arguments give the same folder."""
    return TinyModelCache(tmp_path_factory.mktemp("tiny_models"))
