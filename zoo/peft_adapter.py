"""Read a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).

Only plain LoRA is supported: DoRA, LoRA biases, and other PEFT types are refused by name,
because serving them as plain LoRA would silently give different outputs than peft does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime.errors import CorruptCheckpointError, MissingFileError, ModelLoadError
from runtime.lora import PROJECTIONS, LoraProjection
from runtime.model_config import ModelConfig
from runtime.safetensors_mmap import SafetensorsFile
from zoo.bounded_json import read_json_object

MAX_RANK = 256
# Bounds on what a LoRA config may say: real adapters use alpha of a few times r (scaling ~1-4).
MAX_ALPHA = 1e5
MAX_SCALING = 1024.0
MAX_PATTERNS = 4096
_PATTERN_KEY = re.compile(r"[A-Za-z0-9_.]{1,256}")
_SHORT_TO_PROJECTION = {p.split(".")[-1]: p for p in PROJECTIONS}
_SAVE_TARGETS = {"embed_tokens": "embed_tokens.weight", "lm_head": "lm_head.weight"}
_LORA_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$"
)
_SAVED_KEY = re.compile(
    r"^base_model\.model\.(?:model\.)?(embed_tokens|lm_head)(?:\.modules_to_save\.\w+)?\.weight$"
)


class UnsupportedAdapterError(ModelLoadError):
    """The adapter uses a PEFT feature BlockZoo does not serve."""


class AdapterConfigError(CorruptCheckpointError):
    """A number in adapter_config.json is missing its type or its bounds; `field` names it."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class PeftAdapter:
    """A parsed LoRA adapter: per-layer projections plus any fully saved modules."""

    base_name: str | None
    rank: int
    layers: list[dict[str, LoraProjection]]
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    raw_config: dict[str, Any] = field(default_factory=dict)

    @property
    def target_projections(self) -> set[str]:
        return {name for layer in self.layers for name in layer}

    def nbytes(self) -> int:
        total = sum(t.nbytes for t in self.modules_to_save.values())
        for layer in self.layers:
            total += sum(p.a.nbytes + p.b.nbytes for p in layer.values())
        return total


def is_peft_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise MissingFileError("adapter_config.json is missing")
    raw = read_json_object(path)
    _check_supported(raw)
    check_lora_numbers(raw)
    return raw


def _number(key: str, value: Any, limit: float, where: str = "") -> float:
    # bool is an int to Python, but `"lora_alpha": true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AdapterConfigError(f"adapter_config.json: {key}{where} must be a number, got {value!r}", key)
    if not math.isfinite(value) or not 0 < abs(value) <= limit:
        raise AdapterConfigError(
            f"adapter_config.json: {key}{where} must be finite, non-zero and at most {limit:g} in size, "
            f"got {value!r}",
            key,
        )
    return float(value)


def _rank(key: str, value: Any, where: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
        raise AdapterConfigError(
            f"adapter_config.json: {key}{where} must be an integer from 1 to {MAX_RANK}, got {value!r}", key
        )
    return value


def check_lora_numbers(raw: dict[str, Any]) -> None:
    """Refuse ranks, alphas and scalings that are not finite and sane (a huge alpha gives NaN logits);
    the error names the field."""
    r = _rank("r", raw.get("r", 8))
    alpha = _number("lora_alpha", raw.get("lora_alpha", r), MAX_ALPHA)
    if not isinstance(raw.get("use_rslora", False), bool):
        raise AdapterConfigError("adapter_config.json: use_rslora must be true or false", "use_rslora")
    ranks = [r]
    alphas = [alpha]
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = raw.get(key) or {}
        if not isinstance(pattern, dict) or len(pattern) > MAX_PATTERNS:
            raise AdapterConfigError(
                f"adapter_config.json: {key} must be an object of at most {MAX_PATTERNS} entries", key
            )
        for module, value in pattern.items():
            where = f"[{module[:64]!r}]"
            # peft reads these keys as regular expressions; plain module names only, so no key can
            # make matching backtrack for ever.
            if not _PATTERN_KEY.fullmatch(module):
                raise AdapterConfigError(
                    f"adapter_config.json: {key} key {module[:64]!r} must be a module name "
                    "(letters, digits, '_' and '.')",
                    key,
                )
            if key == "rank_pattern":
                ranks.append(_rank(key, value, where))
            else:
                alphas.append(_number(key, value, MAX_ALPHA, where))
    rs = bool(raw.get("use_rslora", False))
    worst = max(abs(a) for a in alphas) / (math.sqrt(min(ranks)) if rs else min(ranks))
    if worst > MAX_SCALING:
        raise AdapterConfigError(
            f"adapter_config.json: lora_alpha / r gives a scaling of {worst:g}; at most {MAX_SCALING:g} "
            "is served",
            "lora_alpha",
        )


def _check_supported(raw: dict[str, Any]) -> None:
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"PEFT type {peft_type or '?'} is not supported; only LORA adapters are"
        )
    unsupported = {
        "use_dora": "DoRA",
        "use_qalora": "QA-LoRA",
        "layer_replication": "layer replication",
        "target_parameters": "LoRA on parameters",
        "trainable_token_indices": "trainable token indices",
    }
    for key, what in unsupported.items():
        if raw.get(key):
            raise UnsupportedAdapterError(f"{what} ({key}) is not supported; only plain LoRA adapters are")
    if raw.get("lora_bias"):
        raise UnsupportedAdapterError("LoRA bias (lora_bias) is not supported")
    if str(raw.get("bias", "none")) != "none":
        raise UnsupportedAdapterError(f"adapter bias={raw.get('bias')!r} is not supported; only 'none'")
    if raw.get("fan_in_fan_out"):
        raise UnsupportedAdapterError("fan_in_fan_out adapters (Conv1D layers) are not supported")
    for module in raw.get("modules_to_save") or []:
        if module not in _SAVE_TARGETS:
            raise UnsupportedAdapterError(
                f"modules_to_save entry {module!r} is not supported; only embed_tokens and lm_head"
            )


def _pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    # peft matches a pattern key against the end of the module's dotted name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return default


def read_peft_adapter(folder: Path, config: ModelConfig) -> PeftAdapter:
    """Parse and validate an adapter against the base's shapes; errors name the offending tensor."""
    folder = Path(folder)
    raw = read_adapter_config(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise MissingFileError("adapter_model.safetensors is missing")
    st = SafetensorsFile(weights)
    r_default = int(raw.get("r", 8))
    alpha_default = float(raw.get("lora_alpha", r_default))
    rs = bool(raw.get("use_rslora", False))
    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key in st.keys():  # noqa: SIM118 (SafetensorsFile is not a dict)
        m = _LORA_KEY.match(key)
        if m:
            layer, group, short, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            proj = f"{group}.{short}"
            if proj not in PROJECTIONS:
                raise UnsupportedAdapterError(f"LoRA target {short!r} is not supported (tensor {key})")
            if layer >= config.num_layers:
                raise CorruptCheckpointError(
                    f"{key}: layer {layer} but the base has {config.num_layers} layers"
                )
            pairs.setdefault((layer, proj), {})[ab] = st.tensor(key)
            continue
        s = _SAVED_KEY.match(key)
        if s:
            saved[_SAVE_TARGETS[s.group(1)]] = st.tensor(key)
            continue
        raise UnsupportedAdapterError(f"unexpected adapter tensor {key!r}")
    if not pairs and not saved:
        raise CorruptCheckpointError("adapter_model.safetensors holds no LoRA weights")
    layers: list[dict[str, LoraProjection]] = [{} for _ in range(config.num_layers)]
    max_rank = 0
    for (layer, proj), ab in sorted(pairs.items()):
        where = f"layer {layer} {proj}"
        if set(ab) != {"A", "B"}:
            raise CorruptCheckpointError(f"{where}: needs both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        out_dim, in_dim = _projection_shape(config, proj)
        rank = int(a.shape[0])
        module = f"model.layers.{layer}.{proj}"
        expected_rank = int(_pattern_value(rank_pattern, module, r_default))
        if tuple(a.shape) != (rank, in_dim) or tuple(b.shape) != (out_dim, rank):
            raise CorruptCheckpointError(
                f"{where}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the base projection "
                f"[{out_dim}, {in_dim}]"
            )
        if rank != expected_rank:
            raise CorruptCheckpointError(f"{where}: rank {rank} but adapter_config says r={expected_rank}")
        if rank > MAX_RANK:
            raise UnsupportedAdapterError(f"{where}: rank {rank} exceeds the supported maximum {MAX_RANK}")
        alpha = _pattern_value(alpha_pattern, module, alpha_default)
        scaling = alpha / math.sqrt(rank) if rs else alpha / rank
        if not math.isfinite(scaling) or abs(scaling) > MAX_SCALING:
            raise AdapterConfigError(f"{where}: LoRA scaling {scaling:g} is out of range", "lora_alpha")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise CorruptCheckpointError(f"{where}: the LoRA weights hold NaN or infinite values")
        layers[layer][proj] = LoraProjection(a, b, scaling)
        max_rank = max(max_rank, rank)
    for name, tensor in saved.items():
        if not torch.isfinite(tensor).all():
            raise CorruptCheckpointError(f"saved module {name} holds NaN or infinite values")
        if tuple(tensor.shape) != (config.vocab_size, config.hidden_size):
            raise CorruptCheckpointError(
                f"saved module {name} has shape {list(tensor.shape)}, the base needs "
                f"[{config.vocab_size}, {config.hidden_size}]"
            )
    return PeftAdapter(
        base_name=raw.get("base_model_name_or_path"),
        rank=max_rank,
        layers=layers,
        modules_to_save=saved,
        raw_config=raw,
    )


def _projection_shape(config: ModelConfig, proj: str) -> tuple[int, int]:
    h, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    return {
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }[proj]
