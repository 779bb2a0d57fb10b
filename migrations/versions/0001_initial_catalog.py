"""Initial catalog: tenants and keys, models and their chains, blocks, deltas, jobs, audit, usage.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Frozen: it does not import the ORM models, so later edits to them cannot change what this creates.
Constraint names come from the naming convention of the target metadata (see `migrations/env.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = (
    "base_models",
    "blocks",
    "tenants",
    "api_keys",
    "audit_log",
    "deltas",
    "models",
    "chain_entries",
    "registration_jobs",
    "usage",
    "chain_entry_deltas",
)


def _ts(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _json(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=nullable)


def _enum(column: str, name: str, *values: str) -> sa.Column[object]:
    kind = sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)
    return sa.Column(column, kind, nullable=False)


def _digest(name: str, nullable: bool = False, primary_key: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.String(64), nullable=nullable, primary_key=primary_key)


def _fk(columns: list[str], refs: list[str], table: str, ondelete: str) -> sa.ForeignKeyConstraint:
    name = op.f(f"fk_{table}_{columns[0]}_{refs[0].split('.')[0]}")
    return sa.ForeignKeyConstraint(columns, refs, name=name, ondelete=ondelete)


def _index(table: str, *columns: str, name: str | None = None) -> None:
    op.create_index(name or op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns))


def upgrade() -> None:
    op.create_table(
        "base_models",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        _digest("shape_digest"),
        sa.Column("architecture", sa.String(100), nullable=False),
        _json("config_json", nullable=False),
        _ts("created_at"),
        sa.UniqueConstraint("name", name=op.f("uq_base_models_name")),
    )
    _index("base_models", "shape_digest")

    op.create_table(
        "blocks",
        _digest("id", primary_key=True),
        _enum("kind", "block_kind", "embed", "layer", "head"),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.Column("ref_count", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.String(32), nullable=False),
        sa.Column("quantization", sa.String(32), nullable=True),
        _digest("source_block_id", nullable=True),
        _ts("created_at"),
        sa.CheckConstraint("nbytes >= 0", name=op.f("ck_blocks_nbytes_nonnegative")),
        sa.CheckConstraint("ref_count >= 0", name=op.f("ck_blocks_ref_count_nonnegative")),
        _fk(["source_block_id"], ["blocks.id"], "blocks", "SET NULL"),
    )
    _index("blocks", "source_block_id")

    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False),
        _ts("created_at"),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("requests_per_minute", sa.Integer(), nullable=True),
        sa.Column("tokens_per_minute", sa.Integer(), nullable=True),
        sa.Column("max_concurrent", sa.Integer(), nullable=True),
        sa.Column("max_models", sa.Integer(), nullable=True),
        sa.Column("max_storage_bytes", sa.BigInteger(), nullable=True),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )

    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("key_prefix", sa.String(16), nullable=False),
        _digest("key_hash"),
        sa.Column("name", sa.String(100), nullable=True),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        _ts("last_used_at", nullable=True),
        _fk(["tenant_id"], ["tenants.id"], "api_keys", "CASCADE"),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    _index("api_keys", "key_prefix")
    _index("api_keys", "tenant_id")

    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), primary_key=True),
        _ts("ts"),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        _json("detail_json"),
        _fk(["tenant_id"], ["tenants.id"], "audit_log", "SET NULL"),
    )
    _index("audit_log", "action")
    _index("audit_log", "ts")
    _index("audit_log", "tenant_id", "ts", name="ix_audit_log_tenant_id_ts")

    op.create_table(
        "deltas",
        _digest("id", primary_key=True),
        _enum("kind", "delta_kind", "lora", "svd"),
        _digest("target_block_id", nullable=True),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.Column("ref_count", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=True),
        sa.Column("scaling", sa.Float(), nullable=False),
        _json("meta_json"),
        _ts("created_at"),
        sa.CheckConstraint("nbytes >= 0", name=op.f("ck_deltas_nbytes_nonnegative")),
        sa.CheckConstraint("rank > 0", name=op.f("ck_deltas_rank_positive")),
        sa.CheckConstraint("ref_count >= 0", name=op.f("ck_deltas_ref_count_nonnegative")),
        _fk(["target_block_id"], ["blocks.id"], "deltas", "RESTRICT"),
    )
    _index("deltas", "target_block_id")

    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(200), nullable=False),
        _enum("kind", "model_kind", "base", "full", "lora"),
        _enum("status", "model_status", "registering", "ready", "failed", "deleting"),
        sa.Column("base_model_id", sa.Integer(), nullable=True),
        _json("config_json"),
        _digest("tokenizer_id", nullable=True),
        _digest("chain_digest", nullable=True),
        sa.Column("naive_bytes", sa.BigInteger(), nullable=False),
        sa.Column("stored_bytes_new", sa.BigInteger(), nullable=False),
        _ts("created_at"),
        sa.CheckConstraint(
            "naive_bytes >= 0 AND stored_bytes_new >= 0", name=op.f("ck_models_bytes_nonnegative")
        ),
        _fk(["base_model_id"], ["base_models.id"], "models", "RESTRICT"),
        _fk(["tenant_id"], ["tenants.id"], "models", "RESTRICT"),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_models_tenant_id_name")),
    )
    _index("models", "base_model_id")
    _index("models", "chain_digest")
    _index("models", "status")
    op.create_index(
        "uq_models_shared_name",
        "models",
        ["name"],
        unique=True,
        sqlite_where=sa.text("tenant_id IS NULL"),
        postgresql_where=sa.text("tenant_id IS NULL"),
    )

    op.create_table(
        "chain_entries",
        sa.Column("model_id", sa.Integer(), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        _digest("block_id"),
        sa.CheckConstraint("position >= 0", name=op.f("ck_chain_entries_position_nonnegative")),
        _fk(["block_id"], ["blocks.id"], "chain_entries", "RESTRICT"),
        _fk(["model_id"], ["models.id"], "chain_entries", "CASCADE"),
    )
    _index("chain_entries", "block_id")

    op.create_table(
        "registration_jobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("model_name", sa.String(200), nullable=False),
        _enum("status", "job_status", "queued", "running", "succeeded", "failed"),
        sa.Column("progress", sa.Float(), nullable=False),
        _json("detail_json"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "progress >= 0 AND progress <= 1", name=op.f("ck_registration_jobs_progress_range")
        ),
        _fk(["model_id"], ["models.id"], "registration_jobs", "SET NULL"),
        _fk(["tenant_id"], ["tenants.id"], "registration_jobs", "CASCADE"),
    )
    _index("registration_jobs", "model_id")
    _index("registration_jobs", "status")
    _index("registration_jobs", "tenant_id", "created_at", name="ix_registration_jobs_tenant_id_created_at")

    op.create_table(
        "usage",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        _ts("hour"),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "prompt_tokens >= 0 AND completion_tokens >= 0 AND requests >= 0",
            name=op.f("ck_usage_counts_nonnegative"),
        ),
        _fk(["model_id"], ["models.id"], "usage", "CASCADE"),
        _fk(["tenant_id"], ["tenants.id"], "usage", "CASCADE"),
        sa.UniqueConstraint("tenant_id", "model_id", "hour", name=op.f("uq_usage_tenant_id_model_id_hour")),
    )
    _index("usage", "hour", name="ix_usage_hour")
    _index("usage", "model_id")

    op.create_table(
        "chain_entry_deltas",
        sa.Column("model_id", sa.Integer(), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("order", sa.Integer(), primary_key=True),
        _digest("delta_id"),
        sa.CheckConstraint('"order" >= 0', name=op.f("ck_chain_entry_deltas_order_nonnegative")),
        _fk(["delta_id"], ["deltas.id"], "chain_entry_deltas", "RESTRICT"),
        _fk(
            ["model_id", "position"],
            ["chain_entries.model_id", "chain_entries.position"],
            "chain_entry_deltas",
            "CASCADE",
        ),
    )
    _index("chain_entry_deltas", "delta_id")


def downgrade() -> None:
    # Children before parents; a table's indexes go with it.
    for table in reversed(TABLES):
        op.drop_table(table)
