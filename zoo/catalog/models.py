"""The catalog's tables as typed SQLAlchemy 2.0 models.

Migration `0001` creates exactly this schema; `tests/zoo/test_migrations.py` checks they do not drift.
Foreign keys say what deleting a row does: a tenant's keys and usage go with it, but its models must be
deleted first (through the zoo, which also drops block reference counts); blocks and deltas referenced
by a chain cannot be deleted.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from zoo.catalog.types import (
    BlockKind,
    DeltaKind,
    JobStatus,
    ModelKind,
    ModelStatus,
    UtcDateTime,
    json_type,
    str_enum,
    utcnow,
)

# Named constraints let Alembic alter them later (SQLite batch mode needs names to find them).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

DIGEST_LEN = 64  # sha256 hex


class Base(DeclarativeBase):
    """Declarative base of every catalog table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    """A customer: owns models, API keys and quotas. A NULL quota means unlimited."""

    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    disabled: Mapped[bool] = mapped_column(default=False)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_concurrent: Mapped[int | None] = mapped_column(Integer)
    max_models: Mapped[int | None] = mapped_column(Integer)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)

    api_keys: Mapped[list[ApiKey]] = relationship(
        back_populates="tenant", cascade="all, delete-orphan", passive_deletes=True
    )
    # "all": never NULL out models.tenant_id (that would turn them into shared models); the FK refuses.
    models: Mapped[list[Model]] = relationship(back_populates="tenant", passive_deletes="all")


class ApiKey(Base):
    """A tenant's bearer key, stored only as a hash plus a short display/lookup prefix."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(DIGEST_LEN), unique=True)
    name: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    tenant: Mapped[Tenant] = relationship(back_populates="api_keys")


class BaseModel(Base):
    """A shared base architecture; `shape_digest` matches adapters and fine-tunes to it by shape."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    shape_digest: Mapped[str] = mapped_column(String(DIGEST_LEN), index=True)
    architecture: Mapped[str] = mapped_column(String(100))
    config_json: Mapped[dict[str, Any]] = mapped_column(json_type())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Model(Base):
    """A servable model: its chain of blocks plus config and tokenizer. Bases have no tenant."""

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        # NULLs are distinct in a unique constraint, so shared (tenant-less) names need their own index.
        Index(
            "uq_models_shared_name",
            "name",
            unique=True,
            sqlite_where="tenant_id IS NULL",
            postgresql_where="tenant_id IS NULL",
        ),
        CheckConstraint("naive_bytes >= 0 AND stored_bytes_new >= 0", name="bytes_nonnegative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[ModelKind] = mapped_column(str_enum(ModelKind, "model_kind"))
    status: Mapped[ModelStatus] = mapped_column(
        str_enum(ModelStatus, "model_status"), default=ModelStatus.REGISTERING, index=True
    )
    base_model_id: Mapped[int | None] = mapped_column(
        ForeignKey("base_models.id", ondelete="RESTRICT"), index=True
    )
    config_json: Mapped[dict[str, Any] | None] = mapped_column(json_type())
    tokenizer_id: Mapped[str | None] = mapped_column(String(DIGEST_LEN))
    chain_digest: Mapped[str | None] = mapped_column(String(DIGEST_LEN), index=True)
    naive_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    stored_bytes_new: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    tenant: Mapped[Tenant | None] = relationship(back_populates="models")
    base_model: Mapped[BaseModel | None] = relationship()
    chain: Mapped[list[ChainEntry]] = relationship(
        back_populates="model",
        order_by="ChainEntry.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Block(Base):
    """One immutable, content-addressed block of weights; its file in the block store is named by `id`."""

    __tablename__ = "blocks"
    __table_args__ = (
        CheckConstraint("nbytes >= 0", name="nbytes_nonnegative"),
        CheckConstraint("ref_count >= 0", name="ref_count_nonnegative"),
    )

    id: Mapped[str] = mapped_column(String(DIGEST_LEN), primary_key=True)
    kind: Mapped[BlockKind] = mapped_column(str_enum(BlockKind, "block_kind"))
    nbytes: Mapped[int] = mapped_column(BigInteger)
    ref_count: Mapped[int] = mapped_column(Integer, default=0)
    dtype: Mapped[str] = mapped_column(String(32))
    quantization: Mapped[str | None] = mapped_column(String(32))
    source_block_id: Mapped[str | None] = mapped_column(
        ForeignKey("blocks.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    source_block: Mapped[Block | None] = relationship(remote_side=[id])


class Delta(Base):
    """A content-addressed addition to a block (LoRA A/B or a low-rank SVD of a fine-tune's change)."""

    __tablename__ = "deltas"
    __table_args__ = (
        CheckConstraint("nbytes >= 0", name="nbytes_nonnegative"),
        CheckConstraint("ref_count >= 0", name="ref_count_nonnegative"),
        CheckConstraint("rank > 0", name="rank_positive"),
    )

    id: Mapped[str] = mapped_column(String(DIGEST_LEN), primary_key=True)
    kind: Mapped[DeltaKind] = mapped_column(str_enum(DeltaKind, "delta_kind"))
    target_block_id: Mapped[str | None] = mapped_column(
        ForeignKey("blocks.id", ondelete="RESTRICT"), index=True
    )
    nbytes: Mapped[int] = mapped_column(BigInteger)
    ref_count: Mapped[int] = mapped_column(Integer, default=0)
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float | None] = mapped_column(Float)
    scaling: Mapped[float] = mapped_column(Float, default=1.0)
    meta_json: Mapped[dict[str, Any] | None] = mapped_column(json_type())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    target_block: Mapped[Block | None] = relationship()


class ChainEntry(Base):
    """Position `position` of a model's chain: 0 is the embed, then the layers, then the head."""

    __tablename__ = "chain_entries"
    __table_args__ = (CheckConstraint("position >= 0", name="position_nonnegative"),)

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    block_id: Mapped[str] = mapped_column(ForeignKey("blocks.id", ondelete="RESTRICT"), index=True)

    model: Mapped[Model] = relationship(back_populates="chain")
    block: Mapped[Block] = relationship()
    deltas: Mapped[list[ChainEntryDelta]] = relationship(
        back_populates="entry",
        order_by="ChainEntryDelta.order",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )


class ChainEntryDelta(Base):
    """The `order`-th delta applied on top of a chain entry's block."""

    __tablename__ = "chain_entry_deltas"
    __table_args__ = (
        ForeignKeyConstraint(
            ["model_id", "position"],
            ["chain_entries.model_id", "chain_entries.position"],
            ondelete="CASCADE",
        ),
        CheckConstraint('"order" >= 0', name="order_nonnegative"),
    )

    model_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    order: Mapped[int] = mapped_column(Integer, primary_key=True)
    delta_id: Mapped[str] = mapped_column(ForeignKey("deltas.id", ondelete="RESTRICT"), index=True)

    entry: Mapped[ChainEntry] = relationship(back_populates="deltas")
    delta: Mapped[Delta] = relationship()


class RegistrationJob(Base):
    """Progress of one model registration (split, dedup, store), polled by the API and the UI."""

    __tablename__ = "registration_jobs"
    __table_args__ = (
        Index("ix_registration_jobs_tenant_id_created_at", "tenant_id", "created_at"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), index=True)
    actor: Mapped[str] = mapped_column(String(100))
    model_name: Mapped[str] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(
        str_enum(JobStatus, "job_status"), default=JobStatus.QUEUED, index=True
    )
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    detail_json: Mapped[dict[str, Any] | None] = mapped_column(json_type())
    error: Mapped[str | None] = mapped_column(Text)


class AuditLog(Base):
    """An append-only record of who did what; it outlives the tenant it mentions."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_tenant_id_ts", "tenant_id", "ts"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, index=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="SET NULL"))
    actor: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(64), index=True)
    model_name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(32))
    detail_json: Mapped[dict[str, Any] | None] = mapped_column(json_type())


class Usage(Base):
    """Tokens and requests of one tenant on one model in one UTC hour (`hour` is the hour's start)."""

    __tablename__ = "usage"
    __table_args__ = (
        UniqueConstraint("tenant_id", "model_id", "hour"),
        Index("ix_usage_hour", "hour"),
        CheckConstraint(
            "prompt_tokens >= 0 AND completion_tokens >= 0 AND requests >= 0", name="counts_nonnegative"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    hour: Mapped[datetime] = mapped_column(UtcDateTime())
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
