"""The LM head: a 4-bit chain's bf16 head must not change which token wins."""

from __future__ import annotations

import torch

from runtime.blocks import RESCORE_TOP, HeadBlock
from runtime.model_config import ModelConfig


def _head(vocab: int, hidden: int, seed: int) -> tuple[HeadBlock, torch.Tensor]:
    config = ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        }
    )
    gen = torch.Generator().manual_seed(seed)
    lm_head = torch.randn(vocab, hidden, generator=gen) * 0.05
    norm = torch.ones(hidden)
    return HeadBlock({"norm.weight": norm, "lm_head.weight": lm_head}, config), lm_head


def test_bf16_head_keeps_the_exact_argmax_where_bf16_output_ties() -> None:
    head, lm_head = _head(vocab=512, hidden=64, seed=0)
    hidden = torch.ones(1, 64)
    # Two candidates 0.06 apart near 23: bf16 output (steps of 1/8 there) makes them equal, and the
    # lower id would win; the exact logits say the higher one.
    lm_head[7] = 23.00 / 64
    lm_head[9] = 23.06 / 64
    exact = head.forward(hidden)
    fast = head.forward(hidden, bf16_head=True)
    assert int(exact.argmax()) == 9 and int(fast.argmax()) == 9
    top = exact.topk(RESCORE_TOP).indices
    assert torch.equal(fast[0, top[0]], exact[0, top[0]])
    # The tail is bf16-accurate, not exact.
    assert torch.allclose(fast, exact, atol=0.1)
