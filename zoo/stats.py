"""Zoo-wide figures: what is stored against what storing every model whole would cost."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from zoo.catalog.models import Block, Delta, Model
from zoo.registry import Zoo


def zoo_stats(zoo: Zoo) -> dict[str, Any]:
    """`stored_bytes` is block and delta bytes on disk; `naive_bytes` sums each model's full size."""
    with zoo.sessions() as session:
        naive = int(session.scalar(select(func.coalesce(func.sum(Model.naive_bytes), 0))) or 0)
        models = int(session.scalar(select(func.count()).select_from(Model)) or 0)
        by_kind = {
            k: v for k, v in session.execute(select(Model.kind, func.count()).group_by(Model.kind)).all()
        }
        blocks = int(session.scalar(select(func.count()).select_from(Block)) or 0)
        deltas = int(session.scalar(select(func.count()).select_from(Delta)) or 0)
    stored = zoo.store.stored_bytes("blocks") + zoo.store.stored_bytes("deltas")
    return {
        "models": models,
        "models_by_kind": {str(k.value if hasattr(k, "value") else k): int(v) for k, v in by_kind.items()},
        "blocks": blocks,
        "deltas": deltas,
        "stored_bytes": stored,
        "naive_bytes": naive,
        "dedup_ratio": (naive / stored) if stored else 0.0,
    }
