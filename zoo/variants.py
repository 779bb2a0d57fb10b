"""Quantized variants: making a model's 4-bit twin, and serving any chain on its blocks' 4-bit twins.

`quantize_model` quantizes a model's layer blocks (see `zoo.quantize`), measures the result
against the source on calibration prompts, and registers it as a model of its own (same owner,
same deltas, `quantization_config` in its config) whose new blocks name their source blocks.

`variant_entries` is the serve-time choice: with a quantization label, each chain entry whose block
has a variant of that label runs on it instead, deltas unchanged. A tenant's LoRA adapter on a
quantized base is then QLoRA-style serving (4-bit base projection, 16-bit low-rank delta on top)
without registering anything again, and chains whose blocks have no variant run as before.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from runtime.chain import Chain
from runtime.checkpoint_loader import build_chain, load_tokenizer
from zoo.blocks import BlockData, DeltaData
from zoo.calibration import calibration_token_ids
from zoo.catalog.models import BaseModel, Block, Model, Tenant
from zoo.catalog.types import ModelKind
from zoo.catalog_writer import NewModel, block_meta, build_new_model, record_model
from zoo.chain_loader import ChainEntry
from zoo.equivalence import ModelEffect, model_effect, perplexity
from zoo.errors import DuplicateNameError, NotFoundError
from zoo.model_writer import write_model
from zoo.names import validate_model_name
from zoo.quantize import QuantizeOptions, quantize_layers
from zoo.reports import RegistrationReport

if TYPE_CHECKING:  # the registry imports this module to offer Zoo.quantize
    from zoo.registry import Zoo

Progress = Callable[[str, float], None]
CALIBRATION_TOKENS = 128


@dataclass
class QuantizeReport:
    """What `blockzoo zoo quantize` made and how close it stays to its source."""

    model: str
    source: str
    quantization: str
    layers: int
    blocks_new: int
    source_layer_bytes: int
    quantized_layer_bytes: int
    source_perplexity: float
    quantized_perplexity: float
    mean_kl: float
    top1_agreement: float
    positions: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def table(self) -> str:
        ratio = self.quantized_layer_bytes / max(self.source_layer_bytes, 1)
        rows = [
            ("model", self.model),
            ("source", self.source),
            ("quantization", self.quantization),
            ("layer blocks quantized", str(self.layers)),
            ("blocks new", str(self.blocks_new)),
            ("layer bytes", f"{self.source_layer_bytes:,} -> {self.quantized_layer_bytes:,} ({ratio:.3f}x)"),
            ("perplexity", f"{self.source_perplexity:.4g} -> {self.quantized_perplexity:.4g}"),
            ("mean KL vs source", f"{self.mean_kl:.4g}"),
            ("top-1 agreement", f"{self.top1_agreement:.4f} over {self.positions} positions"),
            ("seconds", f"{self.seconds:.2f}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def variant_entries(session: Session, entries: Sequence[ChainEntry], label: str) -> list[ChainEntry]:
    """`entries` with every block that has a `label` variant replaced by it (the newest, if several)."""
    ids = {e.block_id for e in entries}
    rows = session.execute(
        select(Block.source_block_id, Block.id)
        .where(Block.quantization == label, Block.source_block_id.in_(ids))
        .order_by(Block.created_at, Block.id)
    ).all()
    variant = {str(src): str(bid) for src, bid in rows}
    return [ChainEntry(variant.get(e.block_id, e.block_id), e.delta_ids) for e in entries]


def quantized_chain(source: Chain, blocks: list[BlockData], embed: BlockData, head: BlockData) -> Chain:
    """`source` with its layers replaced by `blocks` (held in memory), deltas kept: for measuring."""
    chain = build_chain(
        source.config,
        dict(embed.tensors),
        [dict(b.tensors) for b in blocks],
        dict(head.tensors),
        source.dtype,
        source.digest,
    )
    chain.layer_deltas = source.layer_deltas
    return chain


def _owner(session: Session, tenant: str | None) -> int | None:
    if tenant is None:
        return None
    tid = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
    if tid is None:
        raise NotFoundError(f"unknown tenant {tenant!r}")
    return tid


def check_new_name(sessions: sessionmaker[Session], tenant: str | None, name: str) -> int | None:
    """The owner's tenant id; raises unless `name` is free in the owner's namespace."""
    validate_model_name(name)
    with sessions() as session:
        tenant_id = _owner(session, tenant)
        taken = session.scalar(
            select(Model.id).where(
                Model.name == name,
                Model.tenant_id == tenant_id if tenant_id is not None else Model.tenant_id.is_(None),
            )
        )
    if taken is not None:
        owner = f"tenant {tenant!r}" if tenant else "the shared models"
        raise DuplicateNameError(f"{owner} already has a model named {name!r}")
    return tenant_id


@dataclass
class QuantizedModel:
    """A quantized twin ready to be written: its blocks, its chain, and what to record."""

    blocks: list[BlockData]
    deltas: list[DeltaData]
    entries: list[ChainEntry]
    report: QuantizeReport
    record: Callable[[Session, str], Model]


def prepare_quantized_model(
    zoo: Zoo,
    tenant: str | None,
    name: str,
    options: QuantizeOptions,
    new_name: str | None = None,
    calibration_texts: Sequence[str] | None = None,
    progress: Progress | None = None,
    measure: bool = True,
) -> QuantizedModel:
    """Quantize `name` (as `tenant` sees it) and measure it; nothing is written yet.

    With `measure` False the quality fields of the report are NaN: for callers that measure the
    twin themselves on other text (the source and the twin each cost a pass over the prompts).
    """
    ref = zoo.resolve(tenant, name)
    owner = ref.tenant
    target = new_name or f"{name}-{options.label}"
    tenant_id = check_new_name(zoo.sessions, owner, target)
    source = zoo.load_chain(ref, torch.float32)
    tokenizer = load_tokenizer(zoo.tokenizer_path(ref))
    calibration = calibration_token_ids(tokenizer, calibration_texts, max_len=CALIBRATION_TOKENS)
    sources = [zoo.store.load(e.block_id) for e in ref.entries[1:-1]]
    if progress is not None:
        progress("quantizing layers", 0.0)

    def tick(done: int, total: int) -> None:
        if progress is not None:
            progress("quantizing layers", done / max(total, 1))

    blocks = quantize_layers(source, sources, options, calibration, tick)
    embed, head = zoo.store.load(ref.entries[0].block_id), zoo.store.load(ref.entries[-1].block_id)
    candidate = quantized_chain(source, blocks, embed, head)
    if progress is not None and measure:
        progress("measuring quality", 0.0)
    effect = model_effect(source, candidate, calibration) if measure else ModelEffect(math.nan, math.nan, 0)
    report = QuantizeReport(
        model=target,
        source=name,
        quantization=options.label,
        layers=len(blocks),
        blocks_new=0,
        source_layer_bytes=sum(b.tensor_bytes() for b in sources),
        quantized_layer_bytes=sum(b.tensor_bytes() for b in blocks),
        source_perplexity=perplexity(source, calibration) if measure else math.nan,
        quantized_perplexity=perplexity(candidate, calibration) if measure else math.nan,
        mean_kl=effect.mean_kl,
        top1_agreement=effect.top1_agreement,
        positions=effect.num_positions,
        seconds=0.0,
    )
    entries = [ref.entries[0]]
    entries += [ChainEntry(b.block_id, e.delta_ids) for b, e in zip(blocks, ref.entries[1:-1], strict=True)]
    entries.append(ref.entries[-1])
    deltas = [zoo.store.load_delta(d) for e in entries for d in e.delta_ids]
    meta = {
        b.block_id: block_meta(b)._replace(source_block_id=s.block_id)
        for b, s in zip(blocks, sources, strict=True)
    }
    raw_config = {
        **ref.raw_config,
        "quantization_config": {**options.fields(), "quant_method": options.method, "source_model": name},
    }
    # A base's twin is a shared model built on that base, not a second base.
    kind = ModelKind.FULL if ref.kind == ModelKind.BASE.value else ModelKind(ref.kind)

    def record(session: Session, _tokenizer_id: str) -> Model:
        base_id = None
        if ref.base is not None:
            base_id = session.scalar(select(BaseModel.id).where(BaseModel.name == ref.base))
        new: NewModel = build_new_model(
            zoo.sessions,
            tenant_id,
            target,
            kind,
            base_id,
            raw_config,
            ref.tokenizer_id,
            entries,
            blocks,
            deltas,
        )
        return record_model(session, new._replace(blocks={**new.blocks, **meta}))

    return QuantizedModel(blocks, deltas, entries, report, record)


def quantize_model(
    zoo: Zoo,
    tenant: str | None,
    name: str,
    options: QuantizeOptions,
    new_name: str | None = None,
    calibration_texts: Sequence[str] | None = None,
    progress: Progress | None = None,
    measure: bool = True,
) -> QuantizeReport:
    """Quantize model `name` and register its 4-bit twin (see the module docstring)."""
    started = time.perf_counter()
    made = prepare_quantized_model(zoo, tenant, name, options, new_name, calibration_texts, progress, measure)
    written = RegistrationReport(model=made.report.model, kind="quantized", base=None)
    write_model(
        zoo.sessions, zoo.store, written, made.blocks, made.deltas, None, made.record, progress, made.entries
    )
    made.report.blocks_new = written.blocks_new
    made.report.seconds = time.perf_counter() - started
    return made.report
