"""Helpers for zoo tests: an isolated zoo, fine-tunes made from tiny models, and store snapshots."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zoo.block_store import BlockStore
from zoo.catalog.database import open_catalog
from zoo.catalog.tenants import create_tenant
from zoo.registry import Zoo


def open_zoo(root: Path, url: str | None = None) -> Zoo:
    sessions = open_catalog(url or f"sqlite:///{root / 'catalog.db'}", auto_migrate=True)
    return Zoo(sessions, BlockStore(root / "store"))


def add_tenant(zoo: Zoo, name: str) -> str:
    with zoo.sessions() as session, session.begin():
        _, key = create_tenant(session, name)
    return key


def fine_tune_top_layers(base: Path, out: Path, layers: list[int], seed: int, scale: float = 0.05) -> Path:
    """A copy of `base` whose listed layers' weights got a random change (a 'partial fine-tune')."""
    shutil.copytree(base, out)
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if any(name.startswith(f"model.layers.{i}.") for i in layers) and t.ndim == 2:
            tensors[name] = t + torch.randn(t.shape, generator=gen) * scale
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out


def store_files(zoo: Zoo) -> set[str]:
    root = zoo.store.root
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
