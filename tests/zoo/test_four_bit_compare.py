"""Comparing blocks when one side is 4-bit with per-group offsets (GGUF Q4_1): by what it computes.

Equivalence and delta compression read a 4-bit projection through its dequantized fp32 weight, so a
dense fine-tune of a Q4_1 base (trained on the dequantized model) is a low-rank delta on that base.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from blockzoo.tiny_models import TinyModelCache
from kernels.w4a16_format import dequantize
from kernels.w4a16_gguf import packed_from_gguf_q4
from runtime.blocks import LayerBlock
from runtime.linear import QOFFSETS, dense_tensors, packed_tensors, read_packed
from runtime.lora import PROJECTIONS
from runtime.trace import trace
from zoo.block_store import BlockStore
from zoo.blocks import BlockData
from zoo.chain_loader import ChainEntry, load_chain_entries
from zoo.delta_compress import compress_layer
from zoo.deltas import make_delta
from zoo.equivalence import rel_frobenius
from zoo.quantize import QuantizeOptions, quantized_block
from zoo.splitter import SplitCheckpoint, split_checkpoint

LAYER = 1
PROMPT = [1, 17, 99, 254, 31, 8, 77, 400, 12, 5, 300, 41]
Q4_1 = GGMLQuantizationType.Q4_1


@pytest.fixture(scope="module")
def split(tiny_model_factory: TinyModelCache) -> SplitCheckpoint:
    return split_checkpoint(tiny_model_factory("llama"))


def q4_1_layer(dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer with every projection in GGUF Q4_1 (zero points 0, fp16 scales and offsets)."""
    out = {k: t for k, t in dense.items() if not any(k == f"{p}.weight" for p in PROJECTIONS)}
    for p in PROJECTIONS:
        w = dense[f"{p}.weight"]
        raw = gguf_quantize(w.float().numpy(), Q4_1)
        out.update(packed_tensors(p, packed_from_gguf_q4(raw, Q4_1, (w.shape[0], w.shape[1]))))
    return out


def dense_of(layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dense_tensors(layer, "test layer")


def test_dense_view_dequantizes_with_offsets(split: SplitCheckpoint) -> None:
    dense = dict(split.blocks[LAYER + 1].tensors)
    four = q4_1_layer(dense)
    view = dense_of(four)
    assert view.keys() == dense.keys()
    for p in PROJECTIONS:
        w = dense[f"{p}.weight"]
        assert f"{p}.{QOFFSETS}" in four
        expected = dequantize(read_packed(four, p, w.shape[0], w.shape[1], "test"))
        assert torch.equal(view[f"{p}.weight"], expected)
        # Offsets are half of Q4_1: the view is close to the source weights only with them.
        assert float((view[f"{p}.weight"] - w).abs().max()) < 0.1 * float(w.abs().max())
    assert torch.equal(view["input_layernorm.weight"], dense["input_layernorm.weight"])


def test_rel_frobenius_between_q4_1_and_its_dequantized_twin(split: SplitCheckpoint) -> None:
    four = q4_1_layer(dict(split.blocks[LAYER + 1].tensors))
    config = split.config
    assert rel_frobenius(LayerBlock(four, config), None, LayerBlock(dense_of(four), config), None) == 0.0
    nudged = dense_of(four)
    nudged["mlp.up_proj.weight"] = nudged["mlp.up_proj.weight"] * 1.01
    assert 0 < rel_frobenius(LayerBlock(four, config), None, LayerBlock(nudged, config), None) < 0.01


def test_dense_fine_tune_of_a_q4_1_base_is_a_delta_on_it(split: SplitCheckpoint, tmp_path: Path) -> None:
    base_layer = q4_1_layer(dict(split.blocks[LAYER + 1].tensors))
    gen = torch.Generator().manual_seed(0)
    tuned = dense_of(base_layer)
    for p in PROJECTIONS:
        w = tuned[f"{p}.weight"]
        tuned[f"{p}.weight"] = w + 0.05 * torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(
            2, w.shape[1], generator=gen
        )
    result = compress_layer(base_layer, tuned, energy=0.999)
    assert result.compressible, result.reason
    assert {r.rank for r in result.reports.values()} == {2}
    base_dense = dense_of(base_layer)
    for p, proj in result.projections.items():
        torch.testing.assert_close(base_dense[f"{p}.weight"] + proj.b @ proj.a, tuned[f"{p}.weight"])

    # Served: the Q4_1 block plus the delta computes the dense fine-tune (within the CPU int4
    # kernel's bf16 activations), and the Q4_1 block alone does not.
    store = BlockStore(tmp_path / "store")
    blocks = list(split.blocks)
    blocks[LAYER + 1] = BlockData("layer", base_layer, dict(split.blocks[LAYER + 1].fields))
    tuned_blocks = list(split.blocks)
    tuned_blocks[LAYER + 1] = BlockData("layer", tuned, dict(split.blocks[LAYER + 1].fields))
    for block in {b.block_id: b for b in blocks + tuned_blocks}.values():
        store.put(block)
    delta = make_delta("lowrank", result.projections)
    store.put(delta)
    entries = [ChainEntry(b.block_id) for b in blocks]
    reference = load_chain_entries(
        store, [ChainEntry(b.block_id) for b in tuned_blocks], split.raw_config, torch.float32
    )
    expected = trace(reference, PROMPT).logits
    alone = trace(load_chain_entries(store, entries, split.raw_config, torch.float32), PROMPT).logits
    entries[LAYER + 1] = ChainEntry(entries[LAYER + 1].block_id, (delta.delta_id,))
    served = trace(load_chain_entries(store, entries, split.raw_config, torch.float32), PROMPT).logits
    scale = float(expected.abs().max())
    served_gap = float((served - expected).abs().max())
    assert served_gap < 2e-2 * scale
    assert float((alone - expected).abs().max()) > 5 * served_gap


def test_a_q4_1_fine_tune_is_weighed_by_its_stored_bytes(split: SplitCheckpoint) -> None:
    dense = dict(split.blocks[LAYER + 1].tensors)
    base_layer = q4_1_layer(dense)
    nudged = dict(dense)
    nudged["mlp.up_proj.weight"] = dense["mlp.up_proj.weight"] + 0.3
    tuned = q4_1_layer(nudged)
    result = compress_layer(base_layer, tuned, energy=0.999)
    report = result.reports["mlp.up_proj"]
    stored = sum(t.nbytes for k, t in tuned.items() if k.startswith("mlp.up_proj."))
    assert set(result.reports) == {"mlp.up_proj"} and report.dense_bytes == stored
    assert np.isfinite(report.rel_error)


def test_a_q4_1_layer_is_requantized_from_what_it_computes(split: SplitCheckpoint) -> None:
    source = split.blocks[LAYER + 1]
    four = BlockData("layer", q4_1_layer(dict(source.tensors)), dict(source.fields))
    twin = quantized_block(four, QuantizeOptions(group_size=32, method="rtn"))
    dense = dense_of(four.tensors)
    assert not any(k.endswith(f".{QOFFSETS}") for k in twin.tensors)
    for p in PROJECTIONS:
        w = dense[f"{p}.weight"]
        packed = read_packed(twin.tensors, p, w.shape[0], w.shape[1], "twin")
        step = packed.scales.float().index_select(0, packed.groups()).t()
        assert bool(((dequantize(packed) - w).abs() <= step / 2 + 1e-6).all())
    assert twin.fields["quantization"]["label"] == "w4a16-g32-rtn"
