"""Model names: what a tenant may call a model, and the shape digest that matches fine-tunes to bases."""

from __future__ import annotations

import hashlib
import json
import re

from sqlalchemy import select
from sqlalchemy.orm import Session

from runtime.model_config import ModelConfig
from zoo.catalog.models import Model
from zoo.errors import DuplicateNameError, InvalidNameError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_model_name(name: str) -> str:
    """Names become URL segments and log fields, never paths: no slashes, no `..`, no control chars."""
    if not _NAME.match(name) or ".." in name:
        raise InvalidNameError(
            f"invalid model name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, and no '..'"
        )
    return name


def check_not_a_base_name(session: Session, name: str) -> None:
    """A tenant's model may not take a shared model's name: `/v1/models` would list the id twice and
    requests for it would be ambiguous. DuplicateNameError (a 409) otherwise."""
    shared = session.scalar(select(Model.id).where(Model.tenant_id.is_(None), Model.name == name))
    if shared is not None:
        raise DuplicateNameError(f"{name!r} is the name of a shared base model; choose another name")


def shape_digest(config: ModelConfig) -> str:
    """Digest of every field that fixes tensor shapes; fine-tunes of a base share it."""
    fields = {
        "family": config.family,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "qkv_bias": config.qkv_bias,
        "o_bias": config.o_bias,
        "mlp_bias": config.mlp_bias,
        "qk_norm": config.qk_norm,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
