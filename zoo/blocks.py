"""Blocks and deltas in memory, and their content-addressed ids.

A block is one piece of a chain (`embed`, `layer` or `head`); a delta is a small addition on top of a
block (LoRA A/B matrices, a low-rank compression of a fine-tune). Both are the same three things: a
kind, tensors with block-local names, and JSON-able fields. Their ids are sha256 over a canonical
serialization that also names the domain ("block" / "delta"), so a block and a delta never share an id.

Identity deliberately ignores where the content came from: no file names, shard layout, tensor order
or layer index enter the hash, so a layer that is byte-identical in two checkpoints gets one id.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Literal

import torch

from runtime.model_config import ModelConfig, RopeConfig

BlockKind = Literal["embed", "layer", "head"]
DeltaKind = Literal["lora", "lowrank"]
BLOCK_KINDS: tuple[BlockKind, ...] = ("embed", "layer", "head")
DELTA_KINDS: tuple[DeltaKind, ...] = ("lora", "lowrank")

_ID = re.compile(r"^[0-9a-f]{64}$")
# Bump when the serialization below changes: old and new ids must never collide.
_FORMAT = "blockzoo-content-v1"
# Each kind names the tensors without which it is not that kind; the runtime checks the rest.
_REQUIRED: dict[str, tuple[str, ...]] = {"embed": ("embed_tokens.weight",), "head": ("norm.weight",)}
# Which rotary parameters change the rotation for each rope type; the others must not split ids.
_ROPE_PARAMS: dict[str, tuple[str, ...]] = {
    "default": ("theta",),
    "linear": ("theta", "factor"),
    "llama3": ("theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


class InvalidContentError(ValueError):
    """A block or delta is malformed: unknown kind, non-JSON fields, missing tensors, bad id."""


def is_content_id(value: str) -> bool:
    """Whether `value` is a well-formed id (64 lowercase hex digits)."""
    return bool(_ID.match(value))


def check_content_id(value: str) -> str:
    """`value` if it is a well-formed id; ids become file names, so anything else is refused."""
    if not isinstance(value, str) or not is_content_id(value):
        raise InvalidContentError(f"not a content id (64 lowercase hex digits): {value!r}")
    return value


def canonical_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` as they read back from JSON (tuples become lists), so stored and fresh ids agree."""
    try:
        return dict(json.loads(json.dumps(dict(fields), sort_keys=True, allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise InvalidContentError(f"fields must be JSON-serializable with finite numbers: {exc}") from exc


def canonical_id(
    domain: str, kind: str, fields: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> str:
    """sha256 hex over domain, kind, fields, sorted tensor names, and each tensor's dtype, shape and bytes.

    Every variable-length piece is length-prefixed so no two different contents serialize alike.
    Tensors are hashed one by one from their own memory (no concatenated buffer).
    """
    h = hashlib.sha256()

    def put(text: str) -> None:
        data = text.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    put(_FORMAT)
    put(domain)
    put(kind)
    put(json.dumps(canonical_fields(fields), sort_keys=True, separators=(",", ":"), allow_nan=False))
    h.update(len(tensors).to_bytes(8, "little"))
    for name in sorted(tensors):
        t = tensors[name]
        put(name)
        put(str(t.dtype))
        put(json.dumps(list(t.shape)))
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        h.update(raw.numel().to_bytes(8, "little"))
        if raw.numel():
            h.update(raw.numpy().data)
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class ContentData:
    """Kind, tensors and fields of something the store keeps; subclasses fix the domain and kinds."""

    kind: str
    tensors: dict[str, torch.Tensor]
    fields: dict[str, Any]

    DOMAIN: ClassVar[str] = ""
    KINDS: ClassVar[tuple[str, ...]] = ()
    NAMESPACE: ClassVar[str] = ""
    ID_KEY: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise InvalidContentError(f"{self.DOMAIN} kind must be one of {self.KINDS}, got {self.kind!r}")
        if not self.tensors:
            raise InvalidContentError(f"a {self.kind} {self.DOMAIN} needs at least one tensor")
        for name, t in self.tensors.items():
            if not isinstance(name, str) or not name or not isinstance(t, torch.Tensor):
                raise InvalidContentError(f"{self.kind} {self.DOMAIN}: bad tensor entry {name!r}")
        object.__setattr__(self, "fields", canonical_fields(self.fields))

    @cached_property
    def content_id(self) -> str:
        return canonical_id(self.DOMAIN, self.kind, self.fields, self.tensors)

    def tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True, eq=False)
class BlockData(ContentData):
    """One embed, layer or head block: block-local tensor names plus the architecture fields of its kind.

    A tied head holds only `norm.weight` and has `fields["tied"] = True`; its lm_head is the embed
    block's weight at load time. An untied head holds `lm_head.weight`.
    """

    kind: BlockKind

    DOMAIN: ClassVar[str] = "block"
    KINDS: ClassVar[tuple[str, ...]] = BLOCK_KINDS
    NAMESPACE: ClassVar[str] = "blocks"
    ID_KEY: ClassVar[str] = "block_id"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in _REQUIRED.get(self.kind, ()):
            if name not in self.tensors:
                raise InvalidContentError(f"{self.kind} block is missing tensor {name!r}")
        if self.kind == "head":
            tied = self.fields.get("tied")
            if not isinstance(tied, bool):
                raise InvalidContentError("head block fields need a boolean 'tied'")
            if tied == ("lm_head.weight" in self.tensors):
                state = "holds" if tied else "lacks"
                raise InvalidContentError(f"head block has tied={tied} but {state} lm_head.weight")

    @property
    def block_id(self) -> str:
        return self.content_id


@dataclass(frozen=True, eq=False)
class DeltaData(ContentData):
    """An addition to a block, e.g. LoRA A/B per projection with its scaling in `fields`.

    The delta kinds' own modules decide which tensors and fields they need; here only identity matters.
    """

    kind: DeltaKind

    DOMAIN: ClassVar[str] = "delta"
    KINDS: ClassVar[tuple[str, ...]] = DELTA_KINDS
    NAMESPACE: ClassVar[str] = "deltas"
    ID_KEY: ClassVar[str] = "delta_id"

    @property
    def delta_id(self) -> str:
        return self.content_id


def rope_fields(rope: RopeConfig) -> dict[str, Any]:
    """The rotary parameters that matter for `rope.rope_type` (others are defaults nobody reads)."""
    params = _ROPE_PARAMS.get(rope.rope_type)
    if params is None:
        raise InvalidContentError(f"no identity rule for rope type {rope.rope_type!r}")
    return {"rope_type": rope.rope_type, **{p: getattr(rope, p) for p in params}}


def fields_for(
    kind: BlockKind, config: ModelConfig, layer_index: int | None = None, *, tied: bool | None = None
) -> dict[str, Any]:
    """The architecture fields that enter a `kind` block's id; `layer_index` picks a layer's window.

    `tied` (heads only) defaults to the config's `tie_word_embeddings`.
    """
    c = config
    if kind == "embed":
        return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size}
    if kind == "head":
        return {
            "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size,
            "rms_norm_eps": c.rms_norm_eps,
            "tied": c.tie_word_embeddings if tied is None else tied,
        }
    if kind != "layer":
        raise InvalidContentError(f"block kind must be one of {BLOCK_KINDS}, got {kind!r}")
    if layer_index is None or not 0 <= layer_index < c.num_layers:
        raise InvalidContentError(f"layer_index must be in [0, {c.num_layers}), got {layer_index!r}")
    return {
        "family": c.family,
        "hidden_size": c.hidden_size,
        "num_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.intermediate_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope": rope_fields(c.rope),
        "qkv_bias": c.qkv_bias,
        "o_bias": c.o_bias,
        "mlp_bias": c.mlp_bias,
        "qk_norm": c.qk_norm,
        "sliding_window": c.sliding_windows[layer_index],
    }
