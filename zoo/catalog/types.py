"""Column types and enums shared by the catalog models and its migrations."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Dialect, Enum
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.types import TypeDecorator, TypeEngine


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, whatever the backend stores.

    SQLite has no time zones and hands back naive values; PostgreSQL's `timestamptz` hands back the
    session's zone. Both are normalised to UTC, and naive input is refused so no local time slips in.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: catalog timestamps must be timezone-aware")
        value = value.astimezone(UTC)
        # SQLite would drop the offset anyway; storing naive UTC keeps string comparisons ordered.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def json_type() -> TypeEngine[Any]:
    """JSON everywhere, stored as JSONB on PostgreSQL (indexable, compact)."""
    return JSON().with_variant(JSONB(), "postgresql")


class ModelKind(enum.StrEnum):
    """What a registered model is: a base, a whole fine-tuned checkpoint, or a LoRA adapter."""

    BASE = "base"
    FULL = "full"
    LORA = "lora"


class ModelStatus(enum.StrEnum):
    """Lifecycle of a model row; only `ready` models are served."""

    REGISTERING = "registering"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"


class BlockKind(enum.StrEnum):
    """The three kinds of block a chain is made of."""

    EMBED = "embed"
    LAYER = "layer"
    HEAD = "head"


class DeltaKind(enum.StrEnum):
    """How a delta modifies its block: PEFT LoRA matrices or an SVD-compressed full fine-tune."""

    LORA = "lora"
    SVD = "svd"


class JobStatus(enum.StrEnum):
    """State of a registration job."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def str_enum(cls: type[enum.StrEnum], name: str) -> Enum:
    """A portable enum column: VARCHAR plus a named CHECK, no native PostgreSQL type to create or drop.

    Values (not member names) are stored so the database reads the same as the API.
    """
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [m.value for m in members],
    )
