"""The architecture of a Llama-family checkpoint, parsed from its Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.errors import CorruptCheckpointError, MissingFileError, UnsupportedArchitectureError

# The four families share one layer shape; they differ only in the switches below.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_SUPPORTED_ROPE = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalised from `rope_scaling` (v4) or `rope_parameters` (v5)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Everything the runtime needs to know about a model's shape and numerics."""

    family: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        path = folder / "config.json"
        if not path.is_file():
            raise MissingFileError(f"{folder}: config.json is missing")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise CorruptCheckpointError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(raw)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(raw.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise UnsupportedArchitectureError(f"unsupported architecture {arch!r}; supported: {supported}")
        family = SUPPORTED_ARCHITECTURES[arch]
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitectureError(
                f"unsupported activation {act!r}: only SwiGLU (silu) is implemented"
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            layers = int(raw["num_hidden_layers"])
            kv_heads = int(raw.get("num_key_value_heads") or heads)
            head_dim = int(raw.get("head_dim") or hidden // heads)
            config = cls(
                family=family,
                architecture=arch,
                hidden_size=hidden,
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                intermediate_size=int(raw["intermediate_size"]),
                vocab_size=int(raw["vocab_size"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope=_parse_rope(raw),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
                o_bias=family != "qwen2" and bool(raw.get("attention_bias", False)),
                mlp_bias=bool(raw.get("mlp_bias", False)),
                qk_norm=family == "qwen3",
                sliding_windows=_parse_windows(raw, family, layers),
                bos_token_id=_optional_int(raw.get("bos_token_id")),
                eos_token_ids=_eos_ids(raw.get("eos_token_id")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"config.json is missing or has a bad field: {exc}") from exc
        if heads % kv_heads != 0:
            raise CorruptCheckpointError(
                f"num_attention_heads {heads} is not a multiple of kv heads {kv_heads}"
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _arch_from_model_type(model_type: object) -> str:
    for arch, family in SUPPORTED_ARCHITECTURES.items():
        if family == model_type:
            return arch
    return str(model_type)


def _optional_int(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _eos_ids(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)  # type: ignore[call-overload]


def _parse_rope(raw: dict[str, Any]) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params.update({k: v for k, v in scaling.items() if v is not None})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = str(params.get("rope_type", params.get("type", "default")))
    if rope_type not in _SUPPORTED_ROPE:
        raise UnsupportedArchitectureError(
            f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(_SUPPORTED_ROPE)}"
        )
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


def _parse_windows(raw: dict[str, Any], family: str, layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    layer_types = raw.get("layer_types")
    if family in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window", False) or window is None:
            return (None,) * layers
        if isinstance(layer_types, list) and len(layer_types) == layers:
            return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
        first_full = int(raw.get("max_window_layers", layers))
        return tuple(int(window) if i >= first_full else None for i in range(layers))
    if window is None:
        return (None,) * layers
    return (int(window),) * layers
