"""GPTQ and AWQ checkpoint folders registered into the zoo become 4-bit blocks that compute what
transformers computes on the same (dequantized) weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from blockzoo.tiny_models import TinyModelCache
from kernels.w4a16_format import PackedW4, dequantize, quantize_rtn, unpack_codes
from kernels.w4a16_import import AWQ_ORDER
from runtime.errors import CorruptCheckpointError
from runtime.linear import Int4Linear
from runtime.lora import PROJECTIONS
from runtime.trace import trace
from tests.kernels.test_w4a16_import import pack_words
from tests.runtime.engine_helpers import random_prompts
from tests.zoo.zoo_helpers import open_zoo, store_files
from zoo.catalog.models import Block
from zoo.gptq import HessianAccumulator, gptq_quantize

GROUP = 32
SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_layers": 2, "init_std": 0.05}


def _quantize(weight: torch.Tensor, act_order: bool, seed: int) -> PackedW4:
    if not act_order:
        return quantize_rtn(weight, GROUP)
    acc = HessianAccumulator(weight.shape[1])
    acc.add(
        torch.randn(256, weight.shape[1], generator=torch.Generator().manual_seed(seed))
        * torch.rand(weight.shape[1])
    )
    return gptq_quantize(weight, acc.hessian(), GROUP, act_order=True)


def _write_quantized(dense: Path, out: Path, method: str, act_order: bool = False) -> dict[str, torch.Tensor]:
    """`dense` re-saved the way GPTQ (v1 zeros) or AWQ (GEMM) tools save it; returns the dequantized weights."""
    shutil.copytree(dense, out)
    tensors = load_file(str(out / "model.safetensors"))
    reference: dict[str, torch.Tensor] = {}
    for name in list(tensors):
        prefix = name.removesuffix(".weight")
        if not any(prefix.endswith(p) for p in PROJECTIONS) or not name.endswith(".weight"):
            continue
        packed = _quantize(tensors.pop(name), act_order, seed=len(reference))
        scales = packed.scales.to(torch.float16)
        reference[name] = dequantize(packed._replace(scales=scales))
        codes = unpack_codes(packed.qweight)  # [K, N]
        zeros = packed.zero_points()
        if method == "gptq":
            tensors[f"{prefix}.qweight"] = pack_words(codes, along_rows=True)
            tensors[f"{prefix}.qzeros"] = pack_words((zeros - 1) % 16, along_rows=False)
            tensors[f"{prefix}.g_idx"] = packed.groups().to(torch.int32)
            # AutoGPTQ writes a bias for every linear, zeros where the model has none.
            tensors[f"{prefix}.bias"] = torch.zeros(codes.shape[1], dtype=torch.float16)
        else:
            tensors[f"{prefix}.qweight"] = pack_words(codes, along_rows=False, order=AWQ_ORDER)
            tensors[f"{prefix}.qzeros"] = pack_words(zeros, along_rows=False, order=AWQ_ORDER)
        tensors[f"{prefix}.scales"] = scales
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": act_order, "sym": False}
        if method == "gptq"
        else {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm", "zero_point": True}
    )
    (out / "config.json").write_text(json.dumps(config))
    return reference


@pytest.mark.parametrize(("method", "act_order"), [("gptq", False), ("gptq", True), ("awq", False)])
def test_imported_checkpoint_matches_transformers_on_dequantized_weights(
    tmp_path: Path, tiny_model_factory: TinyModelCache, method: str, act_order: bool
) -> None:
    dense = tiny_model_factory("llama", **SHAPE)
    folder = tmp_path / method
    reference = _write_quantized(dense, folder, method, act_order)
    zoo = open_zoo(tmp_path / "zoo")
    zoo.add_base("q", folder)
    chain = zoo.load_chain(zoo.resolve(None, "q"), torch.float32)
    assert all(isinstance(p, Int4Linear) for layer in chain.layers for p in layer.projections().values())
    label = f"w4a16-g{GROUP}-{method}-import"
    with zoo.sessions() as session:
        for entry in zoo.resolve(None, "q").entries[1:-1]:
            row = session.get(Block, entry.block_id)
            assert row is not None and row.quantization == label and row.source_block_id is None

    hf = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, weight in reference.items():
            hf.get_submodule(name.removesuffix(".weight")).weight.copy_(weight)
    prompt = random_prompts(1, seed=5, min_len=20, max_len=21)[0]
    ours = trace(chain, prompt).logits
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0].float()
    # int4 kernels compute with bf16 activations: agreement to bf16 rounding.
    assert float((ours - theirs).abs().max()) < 0.05 * float(theirs.std())
    assert float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()) >= 0.9


def test_broken_quantized_checkpoints_are_refused_and_leave_nothing(
    tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    dense = tiny_model_factory("llama", **SHAPE)
    zoo = open_zoo(tmp_path / "zoo")
    before = store_files(zoo)

    folder = tmp_path / "missing"
    _write_quantized(dense, folder, "gptq")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CorruptCheckpointError, match=r"layer 1.*up_proj\.qzeros"):
        zoo.add_base("missing", folder)

    folder = tmp_path / "bits"
    _write_quantized(dense, folder, "gptq")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="only 4-bit"):
        zoo.add_base("bits", folder)

    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match="bitsandbytes"):
        zoo.add_base("bnb", folder)
    assert store_files(zoo) == before
