"""Request and response bodies of the admin API and the tenant model API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class _Body(BaseModel):
    # Unknown fields are refused so that a typo in a quota name is an error, not a silent no-op.
    model_config = ConfigDict(extra="forbid")


# Integer columns are 32-bit on PostgreSQL; ids and counts beyond them are refused as input (a 422),
# not passed on to the database (a 500).
MAX_INT32 = 2**31 - 1
# Byte counts stay exact in JSON clients (doubles) up to 2^53.
MAX_BYTES = 2**53
# A relative output error bound: far past 1 every layer "fits"; the KL guard still applies below this.
MAX_SUBSTITUTE_WITHIN = 10.0

JobId = Annotated[int, Path(ge=1, le=MAX_INT32, description="a registration job's id")]
# POST /v1/fine-tunes, /v1/fine-tunes/from-path and /admin/v1/base-models answer a job: follow it.
JOB_LINKS = {
    "GetJob": {"operationId": "get_job_v1_jobs__job_id__get", "parameters": {"job_id": "$response.body#/id"}}
}
ADMIN_JOB_LINKS = {
    "GetJob": {
        "operationId": "get_job_admin_v1_jobs__job_id__get",
        "parameters": {"job_id": "$response.body#/id"},
    }
}


class Quotas(_Body):
    """Per-tenant limits; null means unlimited."""

    requests_per_minute: int | None = Field(default=None, ge=0, le=MAX_INT32)
    tokens_per_minute: int | None = Field(default=None, ge=0, le=MAX_INT32)
    max_concurrent: int | None = Field(default=None, ge=0, le=MAX_INT32)
    max_models: int | None = Field(default=None, ge=0, le=MAX_INT32)
    max_storage_bytes: int | None = Field(default=None, ge=0, le=MAX_BYTES)


class TenantCreate(Quotas):
    """POST /admin/v1/tenants."""

    name: str = Field(min_length=1, max_length=63)


class TenantPatch(Quotas):
    """PATCH /admin/v1/tenants/{name}: only the fields sent change; null sets a quota to unlimited."""

    disabled: bool | None = None


class TenantOut(BaseModel):
    """A tenant as the admin sees it."""

    name: str
    created_at: datetime
    disabled: bool
    quotas: Quotas
    models: int
    storage_bytes: int
    active_keys: int


class TenantCreated(BaseModel):
    """A new tenant with its first key; the key's plaintext is shown only here."""

    tenant: TenantOut
    api_key: str
    quotas: Quotas


class KeyCreate(_Body):
    """POST /admin/v1/tenants/{name}/keys."""

    name: str | None = Field(default=None, max_length=100)


class KeyCreated(BaseModel):
    """A new key; its plaintext is shown only here."""

    api_key: str
    prefix: str
    name: str | None
    created_at: datetime


class KeyOut(BaseModel):
    """A key as listed: never its hash or plaintext."""

    prefix: str
    name: str | None
    created_at: datetime
    last_used_at: datetime | None


class Deleted(BaseModel):
    """The answer of every DELETE."""

    id: str
    object: str
    deleted: bool = True


class PathRegistration(_Body):
    """Registration from a folder on the server (under the allowed roots)."""

    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1, max_length=4096)


class FineTuneFromPath(PathRegistration):
    """POST /v1/fine-tunes/from-path."""

    base: str | None = Field(default=None, min_length=1, max_length=128)
    substitute_within: float | None = Field(default=None, gt=0, le=MAX_SUBSTITUTE_WITHIN, allow_inf_nan=False)
    compress_delta: bool = False
    dequantize: bool = Field(
        default=False, description="GGUF only: store every tensor dense in fp32 instead of 4-bit blocks."
    )


class JobOut(BaseModel):
    """A registration job: `report` is the registration report once it succeeded."""

    id: int
    object: str = "registration_job"
    status: str
    progress: float
    stage: str | None
    model: str
    error: str | None
    report: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime


class DeltaOut(BaseModel):
    """A delta applied on top of a chain entry's block."""

    order: int
    delta_id: str
    kind: str
    bytes: int
    rank: int


class ChainEntryOut(BaseModel):
    """One position of a model's chain."""

    position: int
    block_id: str
    kind: str
    bytes: int
    shared_with_base: bool
    deltas: list[DeltaOut]


class ModelOut(BaseModel):
    """A registered model; `tenant` is null for shared bases."""

    name: str
    object: str = "model"
    tenant: str | None
    kind: str
    status: str
    base: str | None
    created_at: datetime
    naive_bytes: int
    bytes_beyond_base: int = Field(
        description="bytes of the blocks and deltas the model references that its base does not: what "
        "counts against max_storage_bytes, whatever else the zoo holds"
    )


class Dedup(BaseModel):
    """The model against its public base: blocks the base has are shared, the rest is the model's own.

    Nothing here depends on other tenants' models (zoo-wide figures are for admins: /admin/v1/stats)."""

    naive_bytes: int
    bytes_shared_with_base: int
    bytes_beyond_base: int
    blocks_total: int
    blocks_shared: int
    blocks_new: int
    deltas: int


class ModelDetail(ModelOut):
    """A model with its chain and dedup figures."""

    chain: list[ChainEntryOut]
    dedup: Dedup


class BaseModelOut(BaseModel):
    """A shared base model."""

    name: str
    architecture: str
    status: str
    created_at: datetime
    naive_bytes: int
    fine_tunes: int


class UsageOut(BaseModel):
    """Tokens and requests of one tenant on one model in one UTC hour."""

    tenant: str
    model: str
    hour: datetime
    prompt_tokens: int
    completion_tokens: int
    requests: int


class AuditOut(BaseModel):
    """One audit-log row."""

    id: int
    ts: datetime
    tenant: str | None
    actor: str
    action: str
    model: str | None
    status: str
    detail: dict[str, Any] | None


class GcOut(BaseModel):
    """What one garbage collection removed from the block store."""

    removed_blocks: int
    removed_deltas: int
    removed_tokenizers: int
    removed_temp_files: int
    freed_bytes: int


class ListOf(BaseModel, Generic[T]):
    """`{"object": "list", "data": [...]}`, as OpenAI lists are shaped."""

    object: str = "list"
    data: list[T]


# The multipart form of POST /v1/fine-tunes, for the OpenAPI document (FastAPI cannot derive it:
# the route parses the body itself, streaming).
UPLOAD_DOC: dict[str, object] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "files"],
                    "properties": {
                        "name": {"type": "string"},
                        "base": {"type": "string"},
                        "substitute_within": {
                            "type": "number",
                            "exclusiveMinimum": 0,
                            "maximum": MAX_SUBSTITUTE_WITHIN,
                        },
                        "compress_delta": {"type": "boolean"},
                        "dequantize": {"type": "boolean"},
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    },
                }
            }
        },
    }
}
