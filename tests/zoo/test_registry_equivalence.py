"""Equivalence substitution and delta compression during registration of full fine-tunes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockzoo.tiny_models import TinyModelCache
from runtime.checkpoint_loader import load_checkpoint
from tests.zoo.test_registry import logits_of
from tests.zoo.zoo_helpers import add_tenant, open_zoo, store_files
from zoo.errors import EquivalenceRefusedError
from zoo.finetune_plan import FineTuneOptions
from zoo.registry import Zoo


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama", num_layers=3)


@pytest.fixture
def zoo(tmp_path: Path, base_dir: Path) -> Zoo:
    z = open_zoo(tmp_path / "zoo")
    z.add_base("base", base_dir)
    add_tenant(z, "acme")
    return z


def edit(base: Path, out: Path, changes: dict[int, str], seed: int = 0) -> Path:
    """Copy `base`, changing layer i by 'tiny' (1e-6 relative noise), 'big' noise, or an exact 'rank2' delta."""
    shutil.copytree(base, out)
    tensors = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for i, how in changes.items():
        for proj in ("self_attn.q_proj", "mlp.up_proj"):
            name = f"model.layers.{i}.{proj}.weight"
            w = tensors[name]
            if how == "tiny":
                tensors[name] = w + torch.randn(w.shape, generator=gen) * 1e-6 * w.abs().mean()
            elif how == "big":
                tensors[name] = w + torch.randn(w.shape, generator=gen) * 0.3
            else:
                a = torch.randn(w.shape[0], 2, generator=gen) * 0.2
                b = torch.randn(2, w.shape[1], generator=gen) * 0.2
                tensors[name] = w + a @ b
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


PROMPT = [1, 40, 7, 300, 22, 9, 150]


def test_substitution_replaces_near_identical_layers(zoo: Zoo, base_dir: Path, tmp_path: Path) -> None:
    ft = edit(base_dir, tmp_path / "ft", {0: "tiny", 2: "big"})
    report = zoo.register("acme", "sub", ft, options=FineTuneOptions(substitute_within=1e-3))
    assert report.substituted_layers == [0]
    assert report.blocks_new == 1  # only layer 2 is new; layer 0 became the base block
    assert report.effect is not None and report.effect["mean_kl"] < 1e-6
    assert report.effect["top1_agreement"] == 1.0
    layers = {row["layer"]: row for row in report.layers}
    assert layers[1]["identical"] and not layers[2]["identical"]
    assert layers[2]["rel_output_error"] > 1e-2 > layers[0]["rel_output_error"]
    direct = logits_of_folder(ft)
    assert torch.allclose(logits_of(zoo, "acme", "sub", PROMPT), direct, atol=1e-4)


def test_compression_stores_low_rank_change_as_delta(zoo: Zoo, base_dir: Path, tmp_path: Path) -> None:
    ft = edit(base_dir, tmp_path / "ft", {1: "rank2"})
    report = zoo.register(
        "acme", "lowrank", ft, options=FineTuneOptions(compress_delta=True, delta_energy=0.9999)
    )
    assert report.compressed_layers == [1]
    assert report.blocks_new == 0 and report.deltas_new == 1
    assert report.bytes_new < 0.5 * zoo.store.nbytes(zoo.resolve(None, "base").entries[2].block_id)
    compression = report.layers[1]["compression"]
    assert compression["compressible"] and max(compression["ranks"].values()) == 2
    assert max(compression["rel_errors"].values()) < 1e-4
    assert torch.allclose(logits_of(zoo, "acme", "lowrank", PROMPT), logits_of_folder(ft), atol=1e-4)


def test_refuses_when_outputs_change_too_much(zoo: Zoo, base_dir: Path, tmp_path: Path) -> None:
    ft = edit(base_dir, tmp_path / "ft", {2: "big"})
    before = store_files(zoo)
    with pytest.raises(EquivalenceRefusedError, match="mean KL"):
        zoo.register("acme", "reckless", ft, options=FineTuneOptions(substitute_within=10.0, max_kl=1e-3))
    assert store_files(zoo) == before


def logits_of_folder(folder: Path) -> torch.Tensor:
    from runtime.trace import trace

    return trace(load_checkpoint(folder), PROMPT).logits[-1]
