"""Running one prompt through a chain outside the engine, keeping what enters every layer.

Equivalence checks and delta compression need more than the engine's sampled logits: the hidden
state entering each layer, and the logits of every position. `trace` runs the exact computation the
executor runs (the same metadata from `ModelExecutor.prepare`, the same layer loop with the chain's
deltas), just keeping those intermediates. `run_layer` then runs any layer block, possibly of another
model, on captured hidden states with the same positions and causal attention over its own fresh
keys and values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from runtime.attention import AttentionMetadata, LayerKV
from runtime.blocks import LayerBlock
from runtime.chain import Chain
from runtime.executor import BatchInputs, ModelExecutor
from runtime.kv_tensors import KVTensors
from runtime.lora import LayerLora
from runtime.request import Request
from runtime.sampling_params import SamplingParams
from runtime.scheduler_output import ScheduledChunk, SchedulerOutput

PAGE_SIZE = 16


class PrefillContext(NamedTuple):
    """What every layer of a one-chunk prefill of `length` tokens shares: rotary rows and attention metadata."""

    length: int
    cos: torch.Tensor
    sin: torch.Tensor
    meta: AttentionMetadata
    num_slots: int


class Trace(NamedTuple):
    """One prompt through a chain: `layer_inputs[i]` [T, H] enters layer i; `logits` [T, V] fp32 for every position."""

    layer_inputs: list[torch.Tensor]
    final_hidden: torch.Tensor
    logits: torch.Tensor
    context: PrefillContext

    def layer_output(self, index: int) -> torch.Tensor:
        """The hidden state leaving layer `index` (the next layer's input, or the final hidden state)."""
        if index + 1 < len(self.layer_inputs):
            return self.layer_inputs[index + 1]
        return self.final_hidden


def _check_tokens(chain: Chain, token_ids: list[int]) -> None:
    if not token_ids:
        raise ValueError("cannot trace an empty prompt")
    vocab = chain.config.vocab_size
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")


def _prepare(chain: Chain, token_ids: list[int]) -> tuple[BatchInputs, KVTensors, PrefillContext]:
    """The executor's own step inputs for one prompt scheduled as a single prefill chunk."""
    n = len(token_ids)
    pages = -(-n // PAGE_SIZE)
    kv = KVTensors(chain.config, pages, PAGE_SIZE, chain.dtype)
    request = Request("trace", token_ids, SamplingParams(temperature=0.0))
    request.page_table = list(range(pages))
    step = SchedulerOutput([ScheduledChunk(request, n, True)], [], n)
    batch = ModelExecutor(chain, kv).prepare(step)
    cos, sin = chain.rotary.lookup(batch.positions)
    return batch, kv, PrefillContext(n, cos, sin, batch.meta, pages * PAGE_SIZE)


def prefill_context(chain: Chain, length: int) -> PrefillContext:
    """The shared inputs of a `length`-token prefill; positions and attention depend on nothing else."""
    if length < 1:
        raise ValueError(f"length must be at least 1, got {length}")
    # Token ids do not enter the metadata, so any valid id stands in for them.
    return _prepare(chain, [0] * length)[2]


@torch.inference_mode()
def trace(chain: Chain, token_ids: list[int]) -> Trace:
    """Run `token_ids` through `chain` as the executor would, keeping every layer's input and all logits."""
    _check_tokens(chain, token_ids)
    batch, kv, context = _prepare(chain, list(token_ids))
    windows = chain.config.sliding_windows
    hidden = chain.embed.forward(batch.token_ids)
    inputs: list[torch.Tensor] = []
    for i, layer in enumerate(chain.layers):
        inputs.append(hidden)
        hidden = layer.forward(
            hidden, context.cos, context.sin, context.meta, kv.layers[i], windows[i], chain.delta_for(i)
        )
    return Trace(inputs, hidden, chain.head.forward(hidden), context)


@torch.inference_mode()
def run_layer(
    chain: Chain,
    index: int,
    layer: LayerBlock,
    lora: LayerLora | None,
    hidden: torch.Tensor,
    context: PrefillContext | None = None,
) -> torch.Tensor:
    """Run `layer` (with `lora`) at position `index` of `chain` on `hidden` [T, H], as a fresh prefill.

    `layer` need not be `chain`'s own block: any layer of the same architecture runs here, attending
    causally over the keys and values it computes itself (with the window of position `index`).
    `context` (e.g. a Trace's) saves rebuilding the metadata; `hidden` is cast to the layer's dtype.
    """
    if not 0 <= index < chain.num_layers:
        raise IndexError(f"layer index {index} is outside [0, {chain.num_layers})")
    c = chain.config
    if hidden.dim() != 2 or hidden.shape[1] != c.hidden_size or hidden.shape[0] < 1:
        raise ValueError(f"hidden must have shape [T >= 1, {c.hidden_size}], got {list(hidden.shape)}")
    if context is None:
        context = prefill_context(chain, hidden.shape[0])
    elif context.length != hidden.shape[0]:
        raise ValueError(f"context is for {context.length} tokens but hidden has {hidden.shape[0]} rows")
    dtype = layer.dtype
    kv = LayerKV(
        torch.zeros(context.num_slots, c.num_kv_heads, c.head_dim, dtype=dtype),
        torch.zeros(context.num_slots, c.num_kv_heads, c.head_dim, dtype=dtype),
    )
    return layer.forward(
        hidden.to(dtype),
        context.cos.to(dtype),
        context.sin.to(dtype),
        context.meta,
        kv,
        c.sliding_windows[index],
        lora,
    )
