"""Tenant models are charged what they reference beyond their public base, not what they added to the store.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03

`models.stored_bytes_new` used to hold the bytes a registration wrote to the block store, which is 0
when another tenant had already stored the same weights: the storage quota and the tenant's own
listing told it so. From this revision the zoo records the bytes of every block and delta a tenant's
model references that its base's chain does not (zoo/tenant_charge.py); this recomputes that figure
for the models registered before. Data only: the downgrade keeps the new figures (the old ones leaked).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The base's own model row: the shared model (no tenant) of kind 'base' on the same base.
RECHARGE = """
UPDATE models SET stored_bytes_new = (
    SELECT COALESCE(SUM(b.nbytes), 0)
    FROM chain_entries ce JOIN blocks b ON b.id = ce.block_id
    WHERE ce.model_id = models.id AND ce.block_id NOT IN (
        SELECT ce2.block_id FROM chain_entries ce2 JOIN models base ON base.id = ce2.model_id
        WHERE base.tenant_id IS NULL AND base.kind = 'base' AND base.base_model_id = models.base_model_id
    )
) + (
    SELECT COALESCE(SUM(d.nbytes), 0)
    FROM chain_entry_deltas ced JOIN deltas d ON d.id = ced.delta_id
    WHERE ced.model_id = models.id
)
WHERE models.tenant_id IS NOT NULL
"""


def upgrade() -> None:
    op.execute(sa.text(RECHARGE))


def downgrade() -> None:
    pass
