"""The zoo's front door: register bases, full fine-tunes and LoRA adapters; resolve and delete models.

Every registration validates all input before it writes anything, then writes content files
(atomic, deduplicated), then records the model in one catalog transaction. A failure removes the
files it created; a crash leaves at most unreferenced files, which `gc` removes. So the catalog
never names a file that is missing, and no failed registration leaves a row behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from runtime.chain import Chain
from runtime.checkpoint_loader import load_tokenizer
from runtime.model_config import ModelConfig
from runtime.residency import BlockResidency
from zoo.adapter_chain import adapter_chain
from zoo.base_matching import base_for_adapter, base_for_checkpoint
from zoo.block_store import BlockStore, GcReport
from zoo.catalog.models import BaseModel, Block, ChainEntryDelta, Delta, Model, Tenant
from zoo.catalog.models import ChainEntry as ChainEntryRow
from zoo.catalog.types import ModelKind, ModelStatus
from zoo.catalog_writer import build_new_model, model_entries, record_model, release_model
from zoo.chain_loader import ChainEntry, load_chain_entries
from zoo.errors import (
    DuplicateNameError,
    NotFoundError,
    RegistrationError,
)
from zoo.finetune_plan import FineTuneOptions, plan_fine_tune
from zoo.gguf_file import is_gguf
from zoo.model_source import Progress as Progress
from zoo.model_source import check_folder, checkpoint_source, has_tokenizer
from zoo.model_writer import write_model
from zoo.names import check_not_a_base_name, shape_digest, validate_model_name
from zoo.peft_adapter import is_peft_adapter
from zoo.quantize import QuantizeOptions
from zoo.reports import RegistrationReport
from zoo.splitter import SplitCheckpoint
from zoo.tenant_charge import charge_beyond_base
from zoo.variants import QuantizeReport, quantize_model, variant_entries

log = logging.getLogger(__name__)


class ModelRef(NamedTuple):
    """A resolved model: what the runtime needs to load and serve it."""

    id: int
    name: str
    tenant: str | None
    kind: str
    raw_config: dict[str, Any]
    tokenizer_id: str
    chain_digest: str
    entries: list[ChainEntry]
    base: str | None


class Zoo:
    """Catalog plus block store; the only place that changes either."""

    def __init__(self, sessions: sessionmaker[Session], store: BlockStore) -> None:
        self.sessions = sessions
        self.store = store

    # -- registration ------------------------------------------------------------------------

    def add_base(
        self, name: str, folder: Path, progress: Progress | None = None, dequantize: bool = False
    ) -> RegistrationReport:
        """Register a shared base model from a checkpoint folder or a GGUF file.

        `dequantize` (GGUF only) stores every tensor dense in fp32 instead of 4-bit blocks.
        """
        start = time.perf_counter()
        validate_model_name(name)
        with self.sessions() as session:
            if session.scalar(select(BaseModel.id).where(BaseModel.name == name)) is not None:
                raise DuplicateNameError(f"a base model named {name!r} already exists")
            if session.scalar(select(Model.id).where(Model.name == name)) is not None:
                raise DuplicateNameError(
                    f"a tenant's model is named {name!r}; a base needs a name of its own"
                )
        with checkpoint_source(Path(folder), progress, dequantize) as (split, tokenizer_dir):
            return self._add_base(name, split, tokenizer_dir, progress, start)

    def _add_base(
        self, name: str, split: SplitCheckpoint, tokenizer_dir: Path, progress: Progress | None, start: float
    ) -> RegistrationReport:
        entries = [ChainEntry(b.block_id) for b in split.blocks]
        report = RegistrationReport(model=name, kind="base", base=None)

        def record(session: Session, tokenizer_id: str) -> Model:
            base = BaseModel(
                name=name,
                shape_digest=shape_digest(split.config),
                architecture=split.config.architecture,
                config_json=split.raw_config,
            )
            session.add(base)
            session.flush()
            return record_model(
                session,
                build_new_model(
                    self.sessions,
                    None,
                    name,
                    ModelKind.BASE,
                    base.id,
                    split.raw_config,
                    tokenizer_id,
                    entries,
                    split.blocks,
                    [],
                ),
            )

        write_model(self.sessions, self.store, report, split.blocks, [], tokenizer_dir, record, progress)
        report.seconds = time.perf_counter() - start
        return report

    def register(
        self,
        tenant: str,
        name: str,
        folder: Path,
        base: str | None = None,
        progress: Progress | None = None,
        options: FineTuneOptions | None = None,
        dequantize: bool = False,
    ) -> RegistrationReport:
        """Register a tenant's fine-tune: a PEFT LoRA adapter folder, a full checkpoint folder or a
        GGUF file.

        `options` (full fine-tunes only) asks for equivalence substitution and delta compression;
        `dequantize` (GGUF only) stores every tensor dense in fp32 instead of 4-bit blocks.
        """
        start = time.perf_counter()
        folder = Path(folder)
        validate_model_name(name)
        tenant_id = self._tenant_id(tenant)
        with self.sessions() as session:
            taken = session.scalar(select(Model.id).where(Model.tenant_id == tenant_id, Model.name == name))
            if taken is not None:
                raise DuplicateNameError(f"tenant {tenant!r} already has a model named {name!r}")
            check_not_a_base_name(session, name)
        gguf = is_gguf(folder)
        if not gguf:
            check_folder(folder)
        if not gguf and is_peft_adapter(folder):
            report = self._register_adapter(tenant_id, name, folder, base, progress)
        else:
            with checkpoint_source(folder, progress, dequantize) as (split, tokenizer_dir):
                report = self._register_full(
                    tenant_id, name, split, tokenizer_dir, base, progress, options or FineTuneOptions()
                )
        report.seconds = time.perf_counter() - start
        log.info(
            "registered",
            extra={
                "tenant": tenant,
                "model": name,
                "kind": report.kind,
                "blocks_new": report.blocks_new,
                "bytes_new": report.bytes_new,
            },
        )
        return report

    def _register_full(
        self,
        tenant_id: int,
        name: str,
        split: SplitCheckpoint,
        folder: Path,
        base_name: str | None,
        progress: Progress | None,
        options: FineTuneOptions,
    ) -> RegistrationReport:
        base = base_for_checkpoint(self.sessions, split, base_name)
        report = RegistrationReport(model=name, kind="full", base=base.name)
        base_ref = self.resolve(None, base.name)
        tokenizer_dir = folder if has_tokenizer(folder) else self.store.tokenizer_path(base_ref.tokenizer_id)
        plan = plan_fine_tune(
            split,
            base_ref.entries,
            base_ref.raw_config,
            self.store,
            load_tokenizer(tokenizer_dir),
            options,
            progress,
        )
        report.substituted_layers = plan.substituted
        report.compressed_layers = plan.compressed
        report.layers = plan.layers
        report.effect = plan.effect

        def record(session: Session, tokenizer_id: str) -> Model:
            return record_model(
                session,
                build_new_model(
                    self.sessions,
                    tenant_id,
                    name,
                    ModelKind.FULL,
                    base.id,
                    split.raw_config,
                    tokenizer_id,
                    plan.entries,
                    plan.blocks,
                    plan.deltas,
                ),
            )

        write_model(
            self.sessions,
            self.store,
            report,
            plan.blocks,
            plan.deltas,
            tokenizer_dir,
            record,
            progress,
            plan.entries,
        )
        charge_beyond_base(self.sessions, report, tenant_id, plan.entries, base_ref.entries)
        return report

    def _register_adapter(
        self, tenant_id: int, name: str, folder: Path, base_name: str | None, progress: Progress | None
    ) -> RegistrationReport:
        base, adapter = base_for_adapter(self.sessions, folder, base_name)
        base_ref = self.resolve(None, base.name)
        config = ModelConfig.from_hf_dict(base_ref.raw_config)
        built = adapter_chain(adapter, base_ref.entries, config, self.store)
        report = RegistrationReport(model=name, kind="lora", base=base.name)

        def record(session: Session, _tokenizer_id: str) -> Model:
            return record_model(
                session,
                build_new_model(
                    self.sessions,
                    tenant_id,
                    name,
                    ModelKind.LORA,
                    base.id,
                    base_ref.raw_config,
                    base_ref.tokenizer_id,
                    built.entries,
                    built.new_blocks,
                    built.deltas,
                ),
            )

        write_model(
            self.sessions,
            self.store,
            report,
            built.new_blocks,
            built.deltas,
            None,
            record,
            progress,
            built.entries,
        )
        charge_beyond_base(self.sessions, report, tenant_id, built.entries, base_ref.entries)
        return report

    # -- helpers -----------------------------------------------------------------------------

    def _tenant_id(self, tenant: str) -> int:
        with self.sessions() as session:
            tid = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
        if tid is None:
            raise NotFoundError(f"unknown tenant {tenant!r}")
        return tid

    # -- reading and deleting ----------------------------------------------------------------

    def resolve(self, tenant: str | None, name: str) -> ModelRef:
        """The model `name` as `tenant` sees it: its own models first, then the shared bases."""
        with self.sessions() as session:
            model = None
            if tenant is not None:
                model = session.scalar(
                    select(Model)
                    .join(Tenant, Model.tenant_id == Tenant.id)
                    .where(Tenant.name == tenant, Model.name == name)
                )
            if model is None:
                model = session.scalar(select(Model).where(Model.tenant_id.is_(None), Model.name == name))
            if model is None or model.status != ModelStatus.READY:
                raise NotFoundError(f"model {name!r} not found")
            base = session.get(BaseModel, model.base_model_id) if model.base_model_id is not None else None
            return ModelRef(
                id=model.id,
                name=model.name,
                tenant=tenant if model.tenant_id is not None else None,
                kind=model.kind.value,
                raw_config=dict(model.config_json or {}),
                tokenizer_id=model.tokenizer_id or "",
                chain_digest=model.chain_digest or "",
                entries=model_entries(session, model.id),
                base=base.name if base is not None else None,
            )

    def load_chain(
        self,
        ref: ModelRef,
        dtype: torch.dtype,
        verify: bool = False,
        residency: BlockResidency | None = None,
        quantization: str | None = None,
    ) -> Chain:
        """The model's chain; with `residency`, its blocks load on demand into that weights budget.

        With `quantization` (a label such as "w4a16-g128-rtn"), blocks that have a variant of that
        label run on it instead (see `zoo.variants`).
        """
        entries = ref.entries
        if quantization is not None:
            with self.sessions() as session:
                entries = variant_entries(session, entries, quantization)
        return load_chain_entries(
            self.store, entries, ref.raw_config, dtype, verify=verify, residency=residency
        )

    def quantize(
        self,
        tenant: str | None,
        name: str,
        options: QuantizeOptions,
        new_name: str | None = None,
        calibration_texts: Sequence[str] | None = None,
        progress: Progress | None = None,
    ) -> QuantizeReport:
        """Register a 4-bit twin of model `name` (see `zoo.variants`); its blocks link to their sources."""
        report = quantize_model(self, tenant, name, options, new_name, calibration_texts, progress)
        log.info("quantized", extra={"model": report.model, "source": name, "method": options.label})
        return report

    def tokenizer_path(self, ref: ModelRef) -> Path:
        return self.store.tokenizer_path(ref.tokenizer_id)

    def delete_model(self, tenant: str | None, name: str) -> None:
        """Delete a tenant's model (or, with tenant None, a base that no fine-tune uses)."""
        with self.sessions() as session, session.begin():
            if tenant is None:
                model = session.scalar(select(Model).where(Model.tenant_id.is_(None), Model.name == name))
            else:
                model = session.scalar(
                    select(Model)
                    .join(Tenant, Model.tenant_id == Tenant.id)
                    .where(Tenant.name == tenant, Model.name == name)
                )
            if model is None:
                raise NotFoundError(f"model {name!r} not found")
            if model.kind == ModelKind.BASE:
                users = session.scalar(
                    select(Model.id).where(Model.base_model_id == model.base_model_id, Model.id != model.id)
                )
                if users is not None:
                    raise RegistrationError(f"base {name!r} still has fine-tunes registered on it")
            base_id = model.base_model_id if model.kind == ModelKind.BASE else None
            release_model(session, model)
            if base_id is not None:
                base_row = session.get(BaseModel, base_id)
                if base_row is not None:
                    session.delete(base_row)

    def gc(self) -> GcReport:
        """Remove store files the catalog does not name (failed or crashed registrations, deletions)."""
        with self.sessions() as session:
            blocks = set(session.scalars(select(ChainEntryRow.block_id)))
            blocks |= set(session.scalars(select(Block.id)))
            deltas = set(session.scalars(select(ChainEntryDelta.delta_id))) | set(
                session.scalars(select(Delta.id))
            )
            tokenizers = {t for t in session.scalars(select(Model.tokenizer_id)) if t}
        return self.store.gc(blocks, referenced_deltas=deltas, referenced_tokenizers=tokenizers)
