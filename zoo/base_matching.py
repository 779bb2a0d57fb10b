"""Which registered base a fine-tune or adapter belongs to: by name first, then by shapes."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from runtime.errors import CorruptCheckpointError
from runtime.model_config import ModelConfig
from zoo.catalog.models import BaseModel, Model
from zoo.catalog.models import ChainEntry as ChainEntryRow
from zoo.catalog.types import ModelKind
from zoo.errors import ShapeMismatchError, UnknownBaseError
from zoo.names import shape_digest
from zoo.peft_adapter import PeftAdapter, read_adapter_config, read_peft_adapter
from zoo.splitter import SplitCheckpoint


def base_for_checkpoint(
    sessions: sessionmaker[Session], split: SplitCheckpoint, base_name: str | None
) -> BaseModel:
    digest = shape_digest(split.config)
    with sessions() as session:
        if base_name is not None:
            base = session.scalar(select(BaseModel).where(BaseModel.name == base_name))
            if base is None:
                raise UnknownBaseError(f"unknown base model {base_name!r}")
            if base.shape_digest != digest:
                raise ShapeMismatchError(_shape_difference(split.config, base))
            return base
        candidates = list(session.scalars(select(BaseModel).where(BaseModel.shape_digest == digest)))
        if not candidates:
            raise UnknownBaseError(
                "the checkpoint's shapes match no registered base model; register its base first"
            )
        # Prefer the base the fine-tune shares the most blocks with (its true parent).
        ids = set(split.block_ids)
        return max(candidates, key=lambda b: len(ids & set(_base_block_ids(session, b.id))))


def _base_block_ids(session: Session, base_id: int) -> list[str]:
    model_id = session.scalar(
        select(Model.id).where(Model.base_model_id == base_id, Model.kind == ModelKind.BASE)
    )
    return list(session.scalars(select(ChainEntryRow.block_id).where(ChainEntryRow.model_id == model_id)))


def base_for_adapter(
    sessions: sessionmaker[Session], folder: Path, base_name: str | None
) -> tuple[BaseModel, PeftAdapter]:

    raw = read_adapter_config(folder)
    with sessions() as session:
        bases = list(session.scalars(select(BaseModel)))
    named = base_name or str(raw.get("base_model_name_or_path") or "")
    by_name = [b for b in bases if b.name in (named, Path(named).name)]
    if base_name is not None and not by_name:
        raise UnknownBaseError(f"unknown base model {base_name!r}")
    errors: list[str] = []
    for candidate in by_name or bases:
        try:
            return candidate, read_peft_adapter(folder, ModelConfig.from_hf_dict(candidate.config_json))
        except CorruptCheckpointError as exc:  # shapes do not fit this candidate: try the next one
            if by_name:
                raise ShapeMismatchError(f"adapter does not fit base {candidate.name!r}: {exc}") from exc
            errors.append(f"{candidate.name}: {exc}")
    raise UnknownBaseError(
        f"the adapter's base {named!r} is not registered and its shapes fit no registered base"
        + (f" ({'; '.join(errors[:3])})" if errors else "")
    )


def _shape_difference(config: ModelConfig, base: BaseModel) -> str:
    base_config = ModelConfig.from_hf_dict(base.config_json)
    diffs = [
        f"{field}: checkpoint {getattr(config, field)}, base {getattr(base_config, field)}"
        for field in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        )
        if getattr(config, field) != getattr(base_config, field)
    ]
    return f"checkpoint shapes do not match base {base.name!r}: " + (
        "; ".join(diffs) or "architecture differs"
    )
