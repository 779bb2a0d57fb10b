"""Loading checkpoint folders: zero-copy mmap, dtype, and errors that name what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blockzoo.tiny_models import build_tiny_model
from runtime.checkpoint_loader import load_checkpoint, load_tokenizer
from runtime.errors import CorruptCheckpointError, MissingFileError, UnsupportedArchitectureError
from runtime.safetensors_mmap import SafetensorsFile


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    return build_tiny_model(root / "llama", "llama", tokenizer_dir=root / "tok")


def test_mmap_tensors_equal_safetensors_reference(model_dir: Path) -> None:
    path = model_dir / "model.safetensors"
    ours = SafetensorsFile(path).tensors()
    ref = load_file(str(path))
    assert ours.keys() == ref.keys()
    for name, tensor in ref.items():
        assert torch.equal(ours[name], tensor), name


def test_same_dtype_weights_are_views_of_one_mapping(model_dir: Path) -> None:
    chain = load_checkpoint(model_dir, torch.float32)
    st = SafetensorsFile(model_dir / "model.safetensors")
    names = {
        "model.embed_tokens.weight": chain.embed.weight,
        "model.layers.0.self_attn.o_proj.weight": chain.layers[0].o_proj.weight,
        "model.layers.1.mlp.down_proj.weight": chain.layers[1].down_proj.weight,
    }
    # Views of one mapping sit exactly as far apart in memory as their data sits in the file;
    # copies would be independent allocations.
    offsets = {n: st._entries[n][2] for n in names}
    base = "model.embed_tokens.weight"
    for name, tensor in names.items():
        assert tensor.data_ptr() - names[base].data_ptr() == offsets[name] - offsets[base], name


def test_fused_projections_hold_their_weights_once(model_dir: Path) -> None:
    # q/k/v (and gate/up) are copied once into one fused weight; each projection is a view of its rows.
    layer = load_checkpoint(model_dir, torch.float32).layers[0]
    fused = layer.qkv
    assert fused is not None and fused.weight is not None
    start = fused.weight.data_ptr()
    row = fused.weight.stride(0) * fused.weight.element_size()
    rows = 0
    for proj in (layer.q_proj, layer.k_proj, layer.v_proj):
        assert proj.weight.data_ptr() == start + rows * row
        rows += proj.weight.shape[0]
    assert rows == fused.weight.shape[0]


def test_bf16_setting_converts_weights(model_dir: Path) -> None:
    chain = load_checkpoint(model_dir, torch.bfloat16)
    assert chain.layers[0].q_proj.weight.dtype == torch.bfloat16
    assert chain.head.lm_head.dtype == torch.bfloat16


def test_sharded_checkpoint_loads_same_weights(tmp_path: Path, model_dir: Path) -> None:
    sharded = build_tiny_model(
        tmp_path / "sharded", "llama", tokenizer_dir=tmp_path / "tok", max_shard_size="40KB"
    )
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = load_checkpoint(model_dir)
    b = load_checkpoint(sharded)
    assert torch.equal(a.layers[1].up_proj.weight, b.layers[1].up_proj.weight)
    assert torch.equal(a.head.lm_head, b.head.lm_head)


def test_unknown_architecture_is_named(tmp_path: Path, model_dir: Path) -> None:
    bad = tmp_path / "gpt"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="GPTNeoXForCausalLM"):
        load_checkpoint(bad)


def test_truncated_safetensors_is_named(tmp_path: Path, model_dir: Path) -> None:
    bad = tmp_path / "trunc"
    shutil.copytree(model_dir, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*truncated"):
        load_checkpoint(bad)


def test_garbage_header_is_rejected(tmp_path: Path, model_dir: Path) -> None:
    bad = tmp_path / "garbage"
    shutil.copytree(model_dir, bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        load_checkpoint(bad)


def test_missing_files_are_named(tmp_path: Path, model_dir: Path) -> None:
    no_weights = tmp_path / "noweights"
    shutil.copytree(model_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="safetensors"):
        load_checkpoint(no_weights)
    no_config = tmp_path / "noconfig"
    shutil.copytree(model_dir, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(MissingFileError, match=r"config\.json"):
        load_checkpoint(no_config)
    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    with pytest.raises(MissingFileError, match="tokenizer"):
        load_tokenizer(no_tok)


def test_wrong_shape_is_named(tmp_path: Path, model_dir: Path) -> None:
    bad = tmp_path / "shape"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptCheckpointError, match=r"mlp\.gate_proj\.weight"):
        load_checkpoint(bad)
