"""The benchmark model: a random ~100M-parameter Llama, built once into a cache folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from blockzoo.tiny_models import build_llama_100m

MODEL_NAME = "llama-100m"


def ensure_bench_model(cache_dir: Path) -> Path:
    """`cache_dir/llama-100m`, building it (into a temporary sibling, then renamed) if missing."""
    target = cache_dir / MODEL_NAME
    if (target / "config.json").exists():
        return target
    print(f"building the ~100M-parameter Llama into {target} (once)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{MODEL_NAME}-"))
    try:
        build_llama_100m(staging, tokenizer_dir=cache_dir / "tokenizers")
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
