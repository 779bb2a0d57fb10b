"""BlockLLM's equivalence step for a full fine-tune: which layers to substitute or store as deltas.

Given a fine-tune already split into blocks and its base's chain, it measures each layer
against the base on calibration hidden states, swaps layers within the tolerance for the base
block, optionally stores other changed layers as base block plus a low-rank delta, and then
measures what the whole model lost (KL, top-1 agreement) against the original fine-tune. It
refuses past the bound. Nothing here writes: the registry writes what the plan says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from runtime.chain import Chain
from runtime.checkpoint_loader import build_chain
from runtime.lora import LayerLora
from zoo.block_store import BlockStore
from zoo.blocks import BlockData, DeltaData
from zoo.calibration import calibration_token_ids
from zoo.chain_loader import ChainEntry, load_chain_entries
from zoo.delta_compress import compress_layer
from zoo.deltas import make_delta
from zoo.equivalence import layer_reports, model_effect, substitution_plan
from zoo.errors import EquivalenceRefusedError
from zoo.splitter import SplitCheckpoint

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class FineTuneOptions:
    """What the user asked for; without substitution or compression the layers are only measured."""

    substitute_within: float | None = None
    compress_delta: bool = False
    delta_energy: float = 0.99
    max_kl: float = 0.05
    min_top1: float = 0.0
    calibration_texts: tuple[str, ...] | None = None
    evaluate: bool = False

    @property
    def active(self) -> bool:
        return self.evaluate or self.compress_delta or self.substitute_within is not None


class FineTunePlan(NamedTuple):
    """The chain to record, the content it needs, and the measurements behind it."""

    entries: list[ChainEntry]
    blocks: list[BlockData]
    deltas: list[DeltaData]
    substituted: list[int]
    compressed: list[int]
    layers: list[dict[str, Any]]
    effect: dict[str, float] | None


def plan_fine_tune(
    split: SplitCheckpoint,
    base_entries: list[ChainEntry],
    base_raw_config: dict[str, Any],
    store: BlockStore,
    tokenizer: PreTrainedTokenizerBase,
    options: FineTuneOptions,
    progress: Progress | None = None,
) -> FineTunePlan:
    entries = [ChainEntry(b.block_id) for b in split.blocks]
    if not options.active:
        return FineTunePlan(entries, list(split.blocks), [], [], [], [], None)
    tuned = _chain_from_split(split)
    base = load_chain_entries(store, base_entries, base_raw_config, torch.float32)
    calib = calibration_token_ids(tokenizer, options.calibration_texts)
    reports = layer_reports(base, tuned, calib, progress=_stage(progress, "comparing layers"))
    substituted = (
        substitution_plan(reports, options.substitute_within) if options.substitute_within is not None else []
    )
    blocks = {b.block_id: b for b in split.blocks}
    deltas: list[DeltaData] = []
    compressed: list[int] = []
    layer_rows: list[dict[str, Any]] = [r._asdict() for r in reports]
    for i in substituted:
        entries[i + 1] = base_entries[i + 1]
        layer_rows[i]["action"] = "substituted"
    if options.compress_delta:
        for report in reports:
            i = report.layer
            if progress is not None:
                progress("compressing layers", i / max(len(reports), 1))
            if report.identical or i in substituted:
                continue
            base_tensors = store.load(base_entries[i + 1].block_id).tensors
            result = compress_layer(base_tensors, split.blocks[i + 1].tensors, options.delta_energy)
            layer_rows[i]["compression"] = {
                "compressible": result.compressible,
                "reason": result.reason,
                "delta_bytes": result.delta_bytes,
                "dense_bytes": result.dense_bytes,
                "ranks": {k: v.rank for k, v in result.reports.items()},
                "rel_errors": {k: v.rel_error for k, v in result.reports.items()},
            }
            if result.compressible:
                delta = make_delta("lowrank", result.projections)
                deltas.append(delta)
                entries[i + 1] = ChainEntry(base_entries[i + 1].block_id, (delta.delta_id,))
                compressed.append(i)
                layer_rows[i]["action"] = "compressed"
    effect_dict: dict[str, float] | None = None
    if substituted or compressed:
        candidate = _candidate_chain(
            tuned, base, substituted, {i: d for i, d in zip(compressed, deltas, strict=True)}
        )
        effect = model_effect(tuned, candidate, calib, progress=_stage(progress, "measuring effect"))
        effect_dict = {"mean_kl": effect.mean_kl, "top1_agreement": effect.top1_agreement}
        if effect.mean_kl > options.max_kl or effect.top1_agreement < options.min_top1:
            raise EquivalenceRefusedError(
                f"substitution/compression changes the model too much: mean KL {effect.mean_kl:.4g} "
                f"(bound {options.max_kl}), top-1 agreement {effect.top1_agreement:.4f}; per layer: "
                + ", ".join(
                    f"layer {r['layer']}: rel_output_error={r['rel_output_error']:.3g}" for r in layer_rows
                )
            )
    used = {e.block_id for e in entries}
    return FineTunePlan(
        entries,
        [b for bid, b in blocks.items() if bid in used],
        deltas,
        substituted,
        compressed,
        layer_rows,
        effect_dict,
    )


def _chain_from_split(split: SplitCheckpoint) -> Chain:
    blocks = split.blocks
    return build_chain(
        split.config,
        blocks[0].tensors,
        [b.tensors for b in blocks[1:-1]],
        blocks[-1].tensors,
        torch.float32,
        b"",
    )


def _candidate_chain(
    tuned: Chain, base: Chain, substituted: list[int], compressed: dict[int, DeltaData]
) -> Chain:
    """The tuned chain with substituted layers taken from the base and compressed ones as base + delta."""
    from zoo.deltas import layer_lora

    layers = list(tuned.layers)
    deltas: list[LayerLora | None] = [None] * len(layers)
    for i in substituted:
        layers[i] = base.layers[i]
    for i, delta in compressed.items():
        layers[i] = base.layers[i]
        deltas[i] = layer_lora([delta], torch.float32)
    return Chain(
        config=tuned.config,
        embed=tuned.embed,
        layers=layers,
        head=tuned.head,
        rotary=tuned.rotary,
        dtype=tuned.dtype,
        digest=b"candidate",
        layer_deltas=deltas,
    )


def _stage(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    report = progress

    def tick(done: int, total: int) -> None:
        report(stage, done / max(total, 1))

    return tick
