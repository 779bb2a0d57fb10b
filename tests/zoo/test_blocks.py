"""Block identity: equal content gives equal ids, and every part of the content changes the id."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import torch

from runtime.model_config import ModelConfig
from zoo.blocks import BlockData, DeltaData, InvalidContentError, check_content_id, fields_for

RAW_LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 3,
    "intermediate_size": 128,
    "vocab_size": 512,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
}


def layer_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "self_attn.q_proj.weight": torch.randn(64, 64, generator=g),
        "mlp.up_proj.weight": torch.randn(128, 64, generator=g),
        "input_layernorm.weight": torch.ones(64),
    }


def layer(tensors: dict[str, torch.Tensor], **fields: Any) -> BlockData:
    return BlockData(
        kind="layer", tensors=tensors, fields={"family": "llama", "sliding_window": None, **fields}
    )


def test_id_is_a_sha256_hex_digest() -> None:
    block_id = layer(layer_tensors()).block_id
    assert check_content_id(block_id) == block_id
    assert len(bytes.fromhex(block_id)) == hashlib.sha256().digest_size


def test_equal_content_in_other_memory_and_order_has_equal_id() -> None:
    a = layer_tensors()
    b = {k: a[k].clone() for k in reversed(list(a))}
    assert [*b] != [*a]
    assert layer(a).block_id == layer(b).block_id
    assert layer(a, x=1, y=2).block_id == layer(a, y=2, x=1).block_id


def test_non_contiguous_tensor_hashes_like_its_contiguous_copy() -> None:
    t = layer_tensors()
    transposed = torch.randn(64, 128).t()
    assert not transposed.is_contiguous()
    a = layer({**t, "mlp.up_proj.weight": transposed})
    b = layer({**t, "mlp.up_proj.weight": transposed.contiguous()})
    assert a.block_id == b.block_id


def test_every_part_of_the_content_changes_the_id() -> None:
    t = layer_tensors()
    base = layer(t).block_id
    flipped = {k: v.clone() for k, v in t.items()}
    flipped["mlp.up_proj.weight"][3, 5] += 1e-3
    variants = {
        "one value": layer(flipped),
        "dtype": layer({k: v.to(torch.float64) for k, v in t.items()}),
        "shape, same bytes": layer({**t, "mlp.up_proj.weight": t["mlp.up_proj.weight"].reshape(64, 128)}),
        "tensor name": layer(
            {
                **{k: v for k, v in t.items() if k != "input_layernorm.weight"},
                "x": t["input_layernorm.weight"],
            }
        ),
        "extra tensor": layer({**t, "mlp.up_proj.bias": torch.zeros(128)}),
        "field value": layer(t, sliding_window=4096),
        "extra field": layer(t, qk_norm=True),
    }
    ids = {name: v.block_id for name, v in variants.items()}
    for name, block_id in ids.items():
        assert block_id != base, name
    assert len(set(ids.values())) == len(ids)


def test_kind_and_domain_separate_ids() -> None:
    t = {"embed_tokens.weight": torch.randn(8, 4), "norm.weight": torch.ones(4)}
    embed = BlockData(kind="embed", tensors=t, fields={})
    head = BlockData(kind="head", tensors=t, fields={"tied": True})
    delta = DeltaData(kind="lora", tensors=t, fields={})
    delta_tied = DeltaData(kind="lora", tensors=t, fields={"tied": True})
    assert len({embed.block_id, head.block_id, delta.delta_id, delta_tied.delta_id}) == 4


def test_fields_are_stored_in_their_json_form() -> None:
    block = layer(layer_tensors(), window=(1, 2))
    assert block.fields["window"] == [1, 2]
    assert block.block_id == layer(layer_tensors(), window=[1, 2]).block_id


@pytest.mark.parametrize(
    ("kind", "tensors", "fields", "match"),
    [
        ("mlp", {"w": torch.ones(1)}, {}, "kind"),
        ("layer", {}, {}, "at least one tensor"),
        ("layer", {"w": torch.ones(1)}, {"bad": object()}, "JSON"),
        ("layer", {"w": torch.ones(1)}, {"eps": float("nan")}, "finite"),
        ("embed", {"w": torch.ones(1)}, {}, "embed_tokens.weight"),
        ("head", {"w": torch.ones(1)}, {"tied": True}, "norm.weight"),
        ("head", {"norm.weight": torch.ones(1)}, {}, "boolean 'tied'"),
        ("head", {"norm.weight": torch.ones(1), "lm_head.weight": torch.ones(1)}, {"tied": True}, "holds"),
        ("head", {"norm.weight": torch.ones(1)}, {"tied": False}, "lacks"),
    ],
)
def test_malformed_blocks_are_refused(kind: Any, tensors: Any, fields: Any, match: str) -> None:
    with pytest.raises(InvalidContentError, match=match):
        BlockData(kind=kind, tensors=tensors, fields=fields)


@pytest.mark.parametrize("value", ["", "abc", "../" + "0" * 61, "A" * 64, "g" * 64])
def test_malformed_ids_are_refused(value: str) -> None:
    with pytest.raises(InvalidContentError):
        check_content_id(value)


def test_fields_for_each_kind() -> None:
    config = ModelConfig.from_hf_dict({**RAW_LLAMA, "tie_word_embeddings": True})
    assert fields_for("embed", config) == {"vocab_size": 512, "hidden_size": 64}
    assert fields_for("head", config) == {
        "hidden_size": 64,
        "vocab_size": 512,
        "rms_norm_eps": 1e-6,
        "tied": True,
    }
    assert fields_for("head", config, tied=False)["tied"] is False
    lf = fields_for("layer", config, 1)
    assert lf["family"] == "llama" and lf["num_kv_heads"] == 2 and lf["head_dim"] == 16
    assert lf["rope"] == {"rope_type": "default", "theta": 10000.0}
    assert lf["sliding_window"] is None
    for bad in (None, -1, 3):
        with pytest.raises(InvalidContentError, match="layer_index"):
            fields_for("layer", config, bad)


def test_layer_fields_follow_the_layers_own_sliding_window() -> None:
    raw = {
        **RAW_LLAMA,
        "architectures": ["Qwen2ForCausalLM"],
        "use_sliding_window": True,
        "sliding_window": 32,
        "layer_types": ["full_attention", "sliding_attention", "full_attention"],
    }
    config = ModelConfig.from_hf_dict(raw)
    windows = [fields_for("layer", config, i)["sliding_window"] for i in range(3)]
    assert windows == [None, 32, None]
    assert fields_for("layer", config, 0)["qkv_bias"] is True


def test_rope_fields_ignore_parameters_the_rope_type_does_not_use() -> None:
    short = ModelConfig.from_hf_dict({**RAW_LLAMA, "max_position_embeddings": 512})
    long = ModelConfig.from_hf_dict(RAW_LLAMA)
    assert short.rope != long.rope  # original_max_position_embeddings follows max_position_embeddings
    assert fields_for("layer", short, 0) == fields_for("layer", long, 0)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}
    a = ModelConfig.from_hf_dict({**RAW_LLAMA, "rope_scaling": llama3})
    b = ModelConfig.from_hf_dict(
        {**RAW_LLAMA, "rope_scaling": {**llama3, "original_max_position_embeddings": 64}}
    )
    assert fields_for("layer", a, 0)["rope"]["factor"] == 8.0
    assert fields_for("layer", a, 0) != fields_for("layer", b, 0)
