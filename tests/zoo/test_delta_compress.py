"""Delta compression recovers low-rank fine-tunes exactly, serves them, and refuses what it cannot carry."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockzoo.tiny_models import TinyModelCache
from runtime.checkpoint_loader import load_checkpoint
from runtime.lora import PROJECTIONS, LayerLora
from runtime.trace import trace
from zoo.block_store import BlockStore
from zoo.chain_loader import ChainEntry, load_chain_entries
from zoo.delta_compress import compress_layer
from zoo.deltas import make_delta
from zoo.splitter import SplitCheckpoint, split_checkpoint

PROMPT = [1, 17, 99, 254, 31, 8, 77, 400, 12, 5, 300, 41, 42, 43, 7, 19, 260]
LAYER = 1


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("qwen2")  # has q/k/v biases: non-projection tensors beside the norms


@pytest.fixture(scope="module")
def base_split(base_dir: Path) -> SplitCheckpoint:
    return split_checkpoint(base_dir)


def layer_dict(split: SplitCheckpoint, index: int) -> dict[str, torch.Tensor]:
    return dict(split.blocks[index + 1].tensors)


def rank_delta(shape: torch.Size, rank: int, gen: torch.Generator, scale: float = 0.05) -> torch.Tensor:
    return scale * torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen)


def with_deltas(base: dict[str, torch.Tensor], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """`base` with a random delta of exactly `rank` added to every projection weight."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(base)
    for p in PROJECTIONS:
        w = base[f"{p}.weight"]
        out[f"{p}.weight"] = w + rank_delta(w.shape, rank, gen)
    return out


def save_fine_tune(base_dir: Path, out: Path, layer: int, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of `base_dir` whose layer `layer` holds `tensors` (block-local names)."""
    shutil.copytree(base_dir, out)
    (f,) = sorted(out.glob("*.safetensors"))
    all_tensors = load_file(f)
    for name, t in tensors.items():
        all_tensors[f"model.layers.{layer}.{name}"] = t.contiguous()
    save_file(all_tensors, f, metadata={"format": "pt"})
    return out


def test_exact_rank_two_delta_is_recovered(base_split: SplitCheckpoint) -> None:
    base = layer_dict(base_split, LAYER)
    tuned = with_deltas(base, rank=2, seed=1)
    result = compress_layer(base, tuned, energy=0.999)
    assert result.compressible, result.reason
    assert result.reason == ""
    assert set(result.projections) == set(PROJECTIONS) == set(result.reports)
    for name, report in result.reports.items():
        w = tuned[f"{name}.weight"]
        p = result.projections[name]
        assert report.rank == p.rank == 2
        assert p.a.shape == (2, w.shape[1]) and p.b.shape == (w.shape[0], 2)
        assert p.a.dtype == p.b.dtype == w.dtype and p.scaling == 1.0
        assert report.retained_energy > 0.999999
        assert report.rel_error < 1e-5
        # The factors rebuild the tuned weight.
        torch.testing.assert_close(base[f"{name}.weight"] + p.b @ p.a, w, atol=1e-5, rtol=1e-5)
        assert report.dense_bytes == w.numel() * w.element_size()
        assert report.delta_bytes == 2 * (w.shape[0] + w.shape[1]) * w.element_size()
    assert result.delta_bytes == sum(r.delta_bytes for r in result.reports.values()) < result.dense_bytes


def test_served_compressed_chain_matches_the_fine_tune(
    base_dir: Path, base_split: SplitCheckpoint, tmp_path: Path
) -> None:
    tuned_layer = with_deltas(layer_dict(base_split, LAYER), rank=2, seed=2)
    tuned_chain = load_checkpoint(save_fine_tune(base_dir, tmp_path / "ft", LAYER, tuned_layer))
    result = compress_layer(layer_dict(base_split, LAYER), tuned_layer, energy=0.999)
    assert result.compressible, result.reason

    store = BlockStore(tmp_path / "store")
    for block in base_split.blocks:
        store.put(block)
    delta = make_delta("lowrank", result.projections)
    store.put(delta)
    entries = [ChainEntry(b) for b in base_split.block_ids]
    entries[LAYER + 1] = ChainEntry(entries[LAYER + 1].block_id, (delta.delta_id,))
    served = load_chain_entries(store, entries, base_split.raw_config, torch.float32)

    expected = trace(tuned_chain, PROMPT).logits
    torch.testing.assert_close(trace(served, PROMPT).logits, expected, atol=1e-4, rtol=1e-4)
    # The same delta attached directly to the base chain, as the runtime form, agrees too.
    direct = load_checkpoint(base_dir)
    direct.layer_deltas = [None] * LAYER + [LayerLora(result.projections)]
    torch.testing.assert_close(trace(direct, PROMPT).logits, expected, atol=1e-4, rtol=1e-4)
    # And the base alone does not: the delta carries the fine-tune.
    assert not torch.allclose(trace(load_checkpoint(base_dir), PROMPT).logits, expected, atol=1e-2)


@pytest.mark.parametrize(
    "name", ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.bias"]
)
def test_changed_non_projection_tensor_is_not_compressible(base_split: SplitCheckpoint, name: str) -> None:
    base = layer_dict(base_split, LAYER)
    tuned = with_deltas(base, rank=1, seed=3)
    tuned[name] = base[name] * 1.01
    result = compress_layer(base, tuned, energy=0.99)
    assert not result.compressible
    assert name in result.reason and "differs" in result.reason
    assert result.projections == {}


def test_full_rank_delta_is_larger_than_dense(base_split: SplitCheckpoint) -> None:
    base = layer_dict(base_split, LAYER)
    gen = torch.Generator().manual_seed(4)
    tuned = dict(base)
    for p in ("self_attn.q_proj", "mlp.gate_proj"):
        w = base[f"{p}.weight"]
        tuned[f"{p}.weight"] = w + 0.05 * torch.randn(w.shape, generator=gen)
    result = compress_layer(base, tuned, energy=0.99)
    assert not result.compressible
    assert "not smaller" in result.reason
    assert set(result.reports) == {"self_attn.q_proj", "mlp.gate_proj"}
    assert result.delta_bytes >= result.dense_bytes
    assert result.projections == {}


def test_max_rank_and_energy_limits(base_split: SplitCheckpoint) -> None:
    base = layer_dict(base_split, LAYER)
    tuned = with_deltas(base, rank=3, seed=5)
    capped = compress_layer(base, tuned, energy=0.999, max_rank=2)
    assert not capped.compressible
    assert "max_rank 2" in capped.reason and "needs rank 3" in capped.reason
    assert compress_layer(base, tuned, energy=0.999, max_rank=3).compressible
    # A lower energy keeps fewer singular values and says how much it kept.
    loose = compress_layer(base, tuned, energy=0.5)
    assert loose.compressible
    for report in loose.reports.values():
        assert 1 <= report.rank <= 3
        assert report.retained_energy >= 0.5
        assert report.rel_error > 0 if report.rank < 3 else report.rel_error < 1e-5
    assert any(r.rank < 3 for r in loose.reports.values())
    with pytest.raises(ValueError, match="energy"):
        compress_layer(base, tuned, energy=0.0)
    with pytest.raises(ValueError, match="energy"):
        compress_layer(base, tuned, energy=1.5)
    with pytest.raises(ValueError, match="max_rank"):
        compress_layer(base, tuned, energy=0.9, max_rank=0)


def test_only_changed_projections_are_factored(base_split: SplitCheckpoint) -> None:
    base = layer_dict(base_split, LAYER)
    gen = torch.Generator().manual_seed(6)
    tuned = dict(base)
    w = base["mlp.down_proj.weight"]
    tuned["mlp.down_proj.weight"] = w + rank_delta(w.shape, 1, gen)
    result = compress_layer(base, tuned, energy=0.999)
    assert result.compressible
    assert set(result.projections) == {"mlp.down_proj"}
    assert result.reports["mlp.down_proj"].rank == 1


def test_identical_or_mismatched_layers(base_split: SplitCheckpoint) -> None:
    base = layer_dict(base_split, LAYER)
    same = compress_layer(base, dict(base), energy=0.99)
    assert not same.compressible and "identical" in same.reason
    # Another layer of the same model: its random q/k/v biases differ, so no delta can carry it.
    other = compress_layer(base, layer_dict(base_split, 0), energy=0.99)
    assert not other.compressible and "_proj.bias" in other.reason
    missing = dict(base)
    del missing["mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="different tensors"):
        compress_layer(base, missing, energy=0.99)
    halved = {k: (v.to(torch.float16) if k == "mlp.up_proj.weight" else v) for k, v in base.items()}
    result = compress_layer(base, halved, energy=0.99)
    assert not result.compressible and "dtype" in result.reason
