"""What a tenant's model costs its owner: the bytes it references beyond the public base.

The zoo stores each block once, so the bytes a registration adds to the store depend on what other
tenants uploaded before: charging or reporting those would tell a tenant that someone else holds the
same weights. Instead a model is charged for every block and delta its chain references that its base's
chain does not, whoever stored them first. The figure is kept in `Model.stored_bytes_new`, which the
storage quota sums.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from zoo.catalog.models import Block, Delta, Model
from zoo.chain_loader import ChainEntry
from zoo.reports import RegistrationReport


def charge_beyond_base(
    sessions: sessionmaker[Session],
    report: RegistrationReport,
    tenant_id: int,
    entries: list[ChainEntry],
    base_entries: list[ChainEntry],
) -> None:
    """Fill the report's base-relative figures and record the model's charge."""
    base_blocks = {e.block_id for e in base_entries}
    delta_ids = [d for e in entries for d in e.delta_ids]
    with sessions() as session, session.begin():
        block_ids = {e.block_id for e in entries}
        block_bytes = {
            bid: n
            for bid, n in session.execute(select(Block.id, Block.nbytes).where(Block.id.in_(block_ids)))
        }
        delta_bytes = {
            did: n
            for did, n in session.execute(select(Delta.id, Delta.nbytes).where(Delta.id.in_(delta_ids)))
        }
        shared = [e for e in entries if e.block_id in base_blocks]
        report.blocks_shared_with_base = len(shared)
        report.bytes_shared_with_base = sum(block_bytes[e.block_id] for e in shared)
        report.deltas_total = len(delta_ids)
        report.bytes_beyond_base = sum(
            block_bytes[e.block_id] for e in entries if e.block_id not in base_blocks
        ) + sum(delta_bytes[d] for d in delta_ids)
        session.execute(
            update(Model)
            .where(Model.tenant_id == tenant_id, Model.name == report.model)
            .values(stored_bytes_new=report.bytes_beyond_base)
        )
