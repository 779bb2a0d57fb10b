"""Process settings, read from `BLOCKZOO_*` environment variables.

Callers construct `Settings()` where they need it and pass the object on; there is no shared instance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1 << 30


class Settings(BaseSettings):
    """Every knob of a BlockZoo process; each field `x` is set by the environment variable `BLOCKZOO_X`."""

    model_config = SettingsConfigDict(env_prefix="BLOCKZOO_", extra="ignore")

    # Storage and services.
    data_dir: Path = Field(
        default=Path("./.blockzoo"), description="Root for the block store, the SQLite catalog and caches."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the catalog; None means SQLite under data_dir."
    )
    redis_url: str | None = Field(
        default=None, description="Redis for quotas shared by several API processes; None means in-process."
    )
    admin_key: str | None = Field(default=None, description="Bearer key for the admin API and UI.")

    # HTTP server.
    host: str = Field(default="127.0.0.1", description="Interface the API server binds to.")
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port of the API server.")

    # Engine.
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="Compute and storage dtype of weights and KV cache."
    )
    page_size: int = Field(default=16, gt=0, description="Tokens per KV-cache page.")
    num_kv_pages: int | None = Field(
        default=None, gt=0, description="KV-cache pages; None means as many as fit in kv_cache_memory."
    )
    kv_cache_memory: int = Field(default=GiB, gt=0, description="Bytes given to the KV cache.")
    max_num_seqs: int = Field(default=64, gt=0, description="Most requests running in one step.")
    max_num_batched_tokens: int = Field(default=512, gt=0, description="Token budget of one forward pass.")
    max_model_len: int | None = Field(
        default=None,
        gt=0,
        description="Cap on prompt plus output for every model; each model's own limit (its config's"
        " max_position_embeddings) applies below it. None: only the model's own limit.",
    )
    scheduler_policy: Literal["splitfuse", "prefill_first"] = Field(
        default="splitfuse",
        description="splitfuse: fixed token budget mixing prompt chunks with decodes; "
        "prefill_first: whole prompts before decodes.",
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse KV pages of shared prompt prefixes.")
    prefix_cache_sharing: Literal["tenant", "public_bases", "global"] = Field(
        default="tenant",
        description="Who shares prefix-cache KV pages (a hit is visible in latency): 'tenant' only within one"
        " tenant (its models still share the lower layers' KV); 'public_bases' also requests on shared base"
        " models across tenants; 'global' every request whose model chain agrees.",
    )
    weights_memory: int | None = Field(
        default=None, gt=0, description="Bytes of resident block weights; None means no limit."
    )
    weights_quantization: str | None = Field(
        default=None,
        max_length=32,
        description="Serve every block that has a quantized variant of this label (e.g. w4a16-g128-gptq, "
        "made by `blockzoo zoo quantize`) on that variant; LoRA deltas stay 16-bit on top. None: as registered.",
    )
    num_threads: int | None = Field(
        default=None, gt=0, description="torch intra-op threads; None leaves torch's default."
    )

    per_block_batching: bool = Field(
        default=True,
        description="Run each distinct block once on all rows that use it (BlockLLM); off: one sub-batch per model.",
    )
    max_block_rows: int | None = Field(
        default=None, gt=0, description="Most rows in one block execution (BlockLLM's per-block batch size)."
    )

    residency_max_wait_s: float = Field(
        default=2.0,
        ge=0.0,
        description="A waiting request whose blocks are not resident may be passed over for this long, no longer.",
    )

    # Registration through the API.
    register_paths: list[Path] = Field(
        default_factory=list,
        description="Server folders that registrations by path may read from (JSON list); empty means none.",
    )
    max_upload_bytes: int = Field(default=16 * GiB, gt=0, description="Largest multipart upload body.")
    max_upload_file_bytes: int = Field(default=16 * GiB, gt=0, description="Largest single uploaded file.")
    max_loaded_models: int = Field(default=32, gt=0, description="Chains kept loaded for serving (LRU).")
    max_kv_segments: int = Field(
        default=4,
        ge=1,
        description="KV segments per base: its layers are cut where most of its fine-tunes diverge from it,"
        " so a base and a partial fine-tune share the lower layers' KV pages. 1 turns this off.",
    )
    catalog_cache_ttl_s: float = Field(
        default=2.0,
        ge=0.0,
        description="How long API keys and model lookups are reused on the request path; changes made"
        " through this server apply at once, through other processes within this time. 0 disables it.",
    )
    usage_flush_interval_s: float = Field(
        default=1.0,
        gt=0.0,
        description="Usage is summed in memory and written to the catalog this often (and at shutdown).",
    )

    # Untrusted input on the inference routes: body size, fan-out, chat templates, prompt preparation.
    max_request_body_bytes: int = Field(
        default=4 << 20,
        gt=0,
        description="Largest request body of the JSON routes; larger ones get 413 (multipart uploads have"
        " max_upload_bytes instead).",
    )
    max_sequences_per_request: int = Field(
        default=64, gt=0, description="Most sequences one completion request may ask for: prompts × n."
    )
    chat_template_timeout_s: float = Field(
        default=1.0, gt=0.0, le=60.0, description="Longest a chat template may take to render one prompt."
    )
    chat_template_max_chars: int = Field(
        default=1_000_000,
        gt=0,
        description="Most characters a chat template may output, and the largest value it may build.",
    )
    prompt_workers: int = Field(
        default=2,
        gt=0,
        le=64,
        description="Threads that render chat templates and tokenize prompts, off the event loop.",
    )

    # Faults: what the server does when Redis or the catalog database goes away, and on SIGTERM.
    quota_redis_failure: Literal["local", "closed"] = Field(
        default="local",
        description="While Redis is unreachable: 'local' enforces each tenant's limits in this process"
        " (each API process then grants the full limit), 'closed' refuses limited requests with 503.",
    )
    quota_redis_timeout_s: float = Field(
        default=2.0,
        gt=0.0,
        le=60.0,
        description="A Redis quota call that takes longer counts as Redis unreachable (a busy server's event"
        " loop can be slow to read the answer, so not much lower than this).",
    )
    quota_redis_retry_s: float = Field(
        default=1.0,
        gt=0.0,
        le=3600.0,
        description="After Redis failed, requests skip it for this long before it is tried again.",
    )
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0.0,
        le=86_400.0,
        description="On SIGTERM, in-flight requests get this long to finish while new ones get 503;"
        " then the process exits.",
    )

    # Logging.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Lowest level that is logged."
    )
    log_json: bool = Field(default=False, description="Log JSON lines instead of human-readable text.")

    def resolved_database_url(self) -> str:
        """The catalog URL: `database_url`, or a SQLite file under `data_dir` when none is set."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'catalog.db').resolve()}"

    def resolved_num_kv_pages(self, bytes_per_page: int) -> int:
        """`num_kv_pages`, or how many pages of `bytes_per_page` bytes fit in `kv_cache_memory`."""
        if bytes_per_page <= 0:
            raise ValueError(f"bytes_per_page must be positive, got {bytes_per_page}")
        if self.num_kv_pages is not None:
            return self.num_kv_pages
        pages = self.kv_cache_memory // bytes_per_page
        if pages == 0:
            raise ValueError(
                f"kv_cache_memory={self.kv_cache_memory} bytes holds no page of {bytes_per_page} bytes"
            )
        return pages
