"""Recording a model's chain in the catalog, and releasing it, with consistent reference counts.

A block's `ref_count` is the number of chain entries (over all models) that use it, and a
delta's the number of chain-entry deltas. Both change only inside the transaction that adds or
removes those entries, so they cannot drift from the chains they count.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from zoo.blocks import BlockData, DeltaData
from zoo.catalog.models import Block, ChainEntryDelta, Delta, Model
from zoo.catalog.models import ChainEntry as ChainEntryRow
from zoo.catalog.types import BlockKind, DeltaKind, ModelKind, ModelStatus
from zoo.chain_loader import ChainEntry, chain_digests
from zoo.errors import RegistrationError


class BlockMeta(NamedTuple):
    """What the catalog records about a block file."""

    kind: str
    nbytes: int
    dtype: str
    quantization: str | None = None
    source_block_id: str | None = None


class DeltaMeta(NamedTuple):
    """What the catalog records about a delta file."""

    kind: str
    nbytes: int
    rank: int
    scaling: float
    target_block_id: str | None
    meta: dict[str, Any] | None = None


class NewModel(NamedTuple):
    """Everything needed to add one model row and its chain."""

    tenant_id: int | None
    name: str
    kind: ModelKind
    base_model_id: int | None
    raw_config: dict[str, Any]
    tokenizer_id: str
    chain_digest: str
    entries: list[ChainEntry]
    blocks: dict[str, BlockMeta]
    deltas: dict[str, DeltaMeta]
    naive_bytes: int
    stored_bytes_new: int


_DELTA_KINDS = {"lora": DeltaKind.LORA, "lowrank": DeltaKind.SVD}


def _insert_ignore(session: Session, table: Any, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    # Two registrations may add the same block at once; the content is identical, so either wins.
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(table).values(rows).on_conflict_do_nothing(index_elements=["id"]))


def record_model(session: Session, new: NewModel) -> Model:
    """Add the model, its chain and the rows of blocks/deltas it uses; bump their reference counts."""
    _insert_ignore(
        session,
        Block.__table__,
        [
            {
                "id": bid,
                "kind": BlockKind(m.kind),
                "nbytes": m.nbytes,
                "ref_count": 0,
                "dtype": m.dtype,
                "quantization": m.quantization,
                "source_block_id": m.source_block_id,
            }
            for bid, m in new.blocks.items()
        ],
    )
    _insert_ignore(
        session,
        Delta.__table__,
        [
            {
                "id": did,
                "kind": _DELTA_KINDS[m.kind],
                "nbytes": m.nbytes,
                "ref_count": 0,
                "rank": m.rank,
                "scaling": m.scaling,
                "target_block_id": m.target_block_id,
                "meta_json": m.meta,
            }
            for did, m in new.deltas.items()
        ],
    )
    model = Model(
        tenant_id=new.tenant_id,
        name=new.name,
        kind=new.kind,
        status=ModelStatus.READY,
        base_model_id=new.base_model_id,
        config_json=new.raw_config,
        tokenizer_id=new.tokenizer_id,
        chain_digest=new.chain_digest,
        naive_bytes=new.naive_bytes,
        stored_bytes_new=new.stored_bytes_new,
    )
    session.add(model)
    session.flush()
    for position, entry in enumerate(new.entries):
        session.add(ChainEntryRow(model_id=model.id, position=position, block_id=entry.block_id))
        for order, delta_id in enumerate(entry.delta_ids):
            session.add(ChainEntryDelta(model_id=model.id, position=position, order=order, delta_id=delta_id))
    session.flush()
    _bump(session, new.entries, +1)
    return model


def _bump(session: Session, entries: list[ChainEntry], sign: int) -> None:
    block_uses = Counter(e.block_id for e in entries)
    delta_uses = Counter(d for e in entries for d in e.delta_ids)
    for bid, n in block_uses.items():
        session.execute(update(Block).where(Block.id == bid).values(ref_count=Block.ref_count + sign * n))
    for did, n in delta_uses.items():
        session.execute(update(Delta).where(Delta.id == did).values(ref_count=Delta.ref_count + sign * n))


def model_entries(session: Session, model_id: int) -> list[ChainEntry]:
    """The model's chain, in position order, with each entry's deltas in order."""
    rows = session.execute(
        select(ChainEntryRow.position, ChainEntryRow.block_id)
        .where(ChainEntryRow.model_id == model_id)
        .order_by(ChainEntryRow.position)
    ).all()
    deltas: dict[int, list[str]] = {}
    for position, delta_id in session.execute(
        select(ChainEntryDelta.position, ChainEntryDelta.delta_id)
        .where(ChainEntryDelta.model_id == model_id)
        .order_by(ChainEntryDelta.position, ChainEntryDelta.order)
    ):
        deltas.setdefault(position, []).append(delta_id)
    return [ChainEntry(block_id, tuple(deltas.get(position, ()))) for position, block_id in rows]


def release_model(session: Session, model: Model) -> None:
    """Delete the model and its chain; blocks/deltas no chain uses any more lose their rows too.

    Their files stay until `gc`, which removes files the catalog no longer names.
    """
    entries = model_entries(session, model.id)
    session.execute(delete(ChainEntryDelta).where(ChainEntryDelta.model_id == model.id))
    session.execute(delete(ChainEntryRow).where(ChainEntryRow.model_id == model.id))
    _bump(session, entries, -1)
    session.delete(model)
    session.flush()
    session.execute(delete(Delta).where(Delta.ref_count <= 0))
    session.execute(
        delete(Block).where(
            Block.ref_count <= 0,
            ~Block.id.in_(select(Delta.target_block_id).where(Delta.target_block_id.is_not(None))),
            ~Block.id.in_(select(Block.source_block_id).where(Block.source_block_id.is_not(None))),
        )
    )


def build_new_model(
    sessions: sessionmaker[Session],
    tenant_id: int | None,
    name: str,
    kind: ModelKind,
    base_id: int | None,
    raw_config: dict[str, Any],
    tokenizer_id: str,
    entries: list[ChainEntry],
    blocks: list[BlockData],
    deltas: list[DeltaData],
) -> NewModel:
    metas = {b.block_id: block_meta(b) for b in blocks}
    for entry in entries:
        if entry.block_id not in metas:
            metas[entry.block_id] = BlockMeta(*_existing_block(sessions, entry.block_id))
    delta_meta = {
        d.delta_id: _delta_meta(d, e.block_id) for e in entries for d in deltas if d.delta_id in e.delta_ids
    }
    naive = sum(metas[e.block_id].nbytes for e in entries)
    naive += sum(delta_meta[d].nbytes for e in entries for d in e.delta_ids)
    return NewModel(
        tenant_id=tenant_id,
        name=name,
        kind=kind,
        base_model_id=base_id,
        raw_config=raw_config,
        tokenizer_id=tokenizer_id,
        chain_digest=chain_digests(entries)[-1].hex(),
        entries=entries,
        blocks=metas,
        deltas=delta_meta,
        naive_bytes=naive,
        stored_bytes_new=0,
    )


def _existing_block(sessions: sessionmaker[Session], block_id: str) -> tuple[str, int, str]:
    with sessions() as session:
        row = session.get(Block, block_id)
        if row is None:
            raise RegistrationError(f"block {block_id} is referenced but not in the catalog")
        return row.kind.value, row.nbytes, row.dtype


def block_meta(block: BlockData) -> BlockMeta:
    """What the catalog records about `block`, its quantization label included (no source)."""
    floats = [t for t in block.tensors.values() if t.is_floating_point()]
    dtype = str(floats[0].dtype).removeprefix("torch.") if floats else "int32"
    quant = block.fields.get("quantization")
    label = str(quant["label"]) if isinstance(quant, dict) and "label" in quant else None
    return BlockMeta(block.kind, block.tensor_bytes(), dtype, label)


def _delta_meta(delta: DeltaData, target: str) -> DeltaMeta:
    ranks = [t.shape[0] for n, t in delta.tensors.items() if n.endswith(".lora_a")]
    scalings = list(delta.fields.get("scaling", {}).values())
    return DeltaMeta(
        kind=delta.kind,
        nbytes=delta.tensor_bytes(),
        rank=max(ranks) if ranks else 1,
        scaling=float(scalings[0]) if scalings else 1.0,
        target_block_id=target,
        meta={"projections": sorted(delta.fields.get("scaling", {}))},
    )
