"""The LM head's matmul, cut along the vocabulary on the CPU.

`F.linear(h, W)` with W [vocab, hidden] and a vocabulary of tens of thousands runs far below the
CPU's matmul rate: measured on a 2-core AMD EPYC, fp32, hidden 768, vocab 32000, MKL reached
24-110 GFLOP/s (12-256 rows) where the layers' projections reach 150-180. Computing the logits
in column blocks of `VOCAB_CHUNK` (each block's output stays in L2) reached 44-143 GFLOP/s on the
same shapes. Each logit is still one dot product over hidden; there the results were
bit-identical to `F.linear`, so greedy tokens do not depend on which path ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Vocabulary columns per matmul: 256 and 512 measured alike, 2048 noticeably slower.
VOCAB_CHUNK = 512


def vocab_linear(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`h @ weight.T` for 2-D `h` [rows, hidden] and `weight` [vocab, hidden]."""
    vocab = weight.shape[0]
    if h.device.type != "cpu" or h.dtype != torch.float32 or h.dim() != 2 or vocab <= VOCAB_CHUNK:
        return F.linear(h, weight)
    out = h.new_empty(h.shape[0], vocab)
    for start in range(0, vocab, VOCAB_CHUNK):
        end = min(start + VOCAB_CHUNK, vocab)
        torch.mm(h, weight[start:end].t(), out=out[:, start:end])
    return out
