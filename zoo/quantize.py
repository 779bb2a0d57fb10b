"""Quantizing a chain's layer blocks to 4 bits (RTN or GPTQ), as new blocks linked to their sources.

The embed and head blocks stay as they are: they are a small share of a model's bytes and the
share of its quality most sensitive to rounding, which is also what GPTQ/AWQ checkpoints do.
A quantized layer block holds, for each of the seven projections, the canonical packed tensors
(`<proj>.qweight`, `<proj>.scales`, and `<proj>.qzeros` / `<proj>.g_idx` where used) in place of
`<proj>.weight`; norms and biases are kept. Its fields are the source's plus a `quantization`
entry, so its id differs from the source's and from any other method's or group size's. A source
that is itself 4-bit (a GGUF Q4_1 import, offsets and all) is requantized from the weights it
computes with, which for GGUF are exactly the dequantized model's.

GPTQ runs layer by layer, as in the paper: each layer's Hessians are taken from the hidden states
that the already-quantized layers below it produce on the calibration prompts, so every layer
corrects for the error that reaches it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kernels.w4a16_format import quantize_rtn
from runtime.blocks import LayerBlock
from runtime.chain import Chain
from runtime.errors import CorruptCheckpointError
from runtime.linear import Linear, cast_floating, dense_tensors, packed_tensors
from runtime.lora import PROJECTIONS
from runtime.trace import PrefillContext, prefill_context, run_layer
from zoo.blocks import BlockData
from zoo.gptq import HessianAccumulator, gptq_quantize

Method = Literal["rtn", "gptq"]
METHODS: tuple[Method, ...] = ("rtn", "gptq")
SUPPORTED_BITS = (4,)
# Projections that read the same input share one Hessian.
_INPUT_OF = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "mlp_act",
}

Progress = Callable[[int, int], None]


class QuantizeError(ValueError):
    """The requested quantization cannot be made (bits, group size, method or shapes)."""


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize: bits (4 only), group size, method, and GPTQ's knobs."""

    bits: int = 4
    group_size: int = 128
    method: Method = "rtn"
    symmetric: bool = False
    act_order: bool = False
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantizeError(f"only {SUPPORTED_BITS} bits are supported, got {self.bits}")
        if self.method not in METHODS:
            raise QuantizeError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.group_size < 8 or self.group_size % 8:
            raise QuantizeError(f"group size must be a positive multiple of 8, got {self.group_size}")
        if self.act_order and self.method != "gptq":
            raise QuantizeError("act-order is a GPTQ option")
        if not 0 < self.damp < 1:
            raise QuantizeError(f"damp must be in (0, 1), got {self.damp}")

    @property
    def label(self) -> str:
        """The catalog's name for this quantization, e.g. "w4a16-g128-gptq" (≤ 32 characters)."""
        suffix = ("-sym" if self.symmetric else "") + ("-act" if self.act_order else "")
        return f"w{self.bits}a16-g{self.group_size}-{self.method}{suffix}"

    def fields(self) -> dict[str, Any]:
        """What enters the quantized block's fields (and so its id)."""
        return {
            "format": "w4a16",
            "bits": self.bits,
            "group_size": self.group_size,
            "method": self.method,
            "symmetric": self.symmetric,
            "act_order": self.act_order,
            "label": self.label,
        }


def check_shapes(block: BlockData, options: QuantizeOptions) -> None:
    """Raise QuantizeError unless every projection's input width is a multiple of the group size."""
    tensors = _dense_view(block)
    for proj in PROJECTIONS:
        w = tensors.get(f"{proj}.weight")
        if w is None:
            raise QuantizeError(f"layer block {block.block_id} has no {proj}")
        if w.shape[1] % options.group_size:
            raise QuantizeError(
                f"{proj} has {w.shape[1]} inputs, not a multiple of the group size {options.group_size}"
            )


def quantized_block(
    source: BlockData, options: QuantizeOptions, hessians: dict[str, torch.Tensor] | None = None
) -> BlockData:
    """`source` (a dense layer block) with its projections in 4 bits; GPTQ needs `hessians` by input."""
    if source.kind != "layer":
        raise QuantizeError(f"only layer blocks are quantized, not {source.kind!r}")
    check_shapes(source, options)
    dense = _dense_view(source)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in dense.items():
        if not any(name == f"{p}.weight" for p in PROJECTIONS):
            tensors[name] = t
    for proj in PROJECTIONS:
        weight = dense[f"{proj}.weight"]
        if options.method == "gptq":
            if hessians is None:
                raise QuantizeError("GPTQ needs calibration Hessians")
            packed = gptq_quantize(
                weight,
                hessians[_INPUT_OF[proj]],
                options.group_size,
                symmetric=options.symmetric,
                act_order=options.act_order,
                damp=options.damp,
            )
        else:
            packed = quantize_rtn(weight, options.group_size, symmetric=options.symmetric)
        tensors.update(packed_tensors(proj, packed))
    return BlockData("layer", tensors, {**source.fields, "quantization": options.fields()})


def _dense_view(block: BlockData) -> dict[str, torch.Tensor]:
    try:
        return dense_tensors(block.tensors, f"layer block {block.block_id}")
    except CorruptCheckpointError as exc:
        raise QuantizeError(str(exc)) from exc


class _Recording:
    """A projection that also adds its input to a Hessian accumulator (GPTQ's calibration pass)."""

    def __init__(self, inner: Linear, accumulator: HessianAccumulator) -> None:
        self.inner = inner
        self.accumulator = accumulator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.accumulator.add(x)
        return self.inner(x)


def _layer_hessians(
    chain: Chain, index: int, layer: LayerBlock, inputs: list[torch.Tensor], contexts: list[PrefillContext]
) -> dict[str, torch.Tensor]:
    c = chain.config
    widths = {
        "attn_in": c.hidden_size,
        "attn_out": c.q_size,
        "mlp_in": c.hidden_size,
        "mlp_act": c.intermediate_size,
    }
    accumulators = {key: HessianAccumulator(width) for key, width in widths.items()}
    saved = {proj: getattr(layer, proj.split(".")[1]) for proj in PROJECTIONS}
    try:
        for proj, inner in saved.items():
            setattr(layer, proj.split(".")[1], _Recording(inner, accumulators[_INPUT_OF[proj]]))
        for hidden, context in zip(inputs, contexts, strict=True):
            run_layer(chain, index, layer, chain.delta_for(index), hidden, context)
    finally:
        for proj, inner in saved.items():
            setattr(layer, proj.split(".")[1], inner)
    return {key: acc.hessian() for key, acc in accumulators.items()}


def quantize_layers(
    chain: Chain,
    sources: list[BlockData],
    options: QuantizeOptions,
    calibration: list[list[int]],
    progress: Progress | None = None,
) -> list[BlockData]:
    """Quantized versions of `sources` (the chain's layer blocks, in order).

    RTN looks only at the weights. GPTQ runs `calibration` through the chain, replacing each layer
    by its quantized version before the next layer's inputs are taken.
    """
    if len(sources) != chain.num_layers:
        raise QuantizeError(f"expected {chain.num_layers} layer blocks, got {len(sources)}")
    out: list[BlockData] = []
    if options.method == "rtn":
        done: dict[str, BlockData] = {}
        for i, source in enumerate(sources):
            if source.block_id not in done:  # a block used at two positions is quantized once
                done[source.block_id] = quantized_block(source, options)
            out.append(done[source.block_id])
            if progress is not None:
                progress(i + 1, len(sources))
        return out
    if not calibration:
        raise QuantizeError("GPTQ needs at least one calibration prompt")
    with torch.inference_mode():
        inputs = [chain.embed.forward(torch.tensor(ids)).float() for ids in calibration]
        contexts = [prefill_context(chain, len(ids)) for ids in calibration]
        for i, source in enumerate(sources):
            hessians = _layer_hessians(chain, i, chain.layers[i], inputs, contexts)
            block = quantized_block(source, options, hessians)
            out.append(block)
            tensors = cast_floating(block.tensors, chain.dtype)
            qlayer = LayerBlock(tensors, chain.config, where=f"quantized layer {i}")
            inputs = [
                run_layer(chain, i, qlayer, chain.delta_for(i), h, ctx).float()
                for h, ctx in zip(inputs, contexts, strict=True)
            ]
            if progress is not None:
                progress(i + 1, len(sources))
    return out
