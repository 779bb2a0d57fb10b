"""GPTQ and AWQ checkpoints as zoo blocks: their layers converted once to the canonical 4-bit layout.

A Hugging Face folder whose `config.json` has a `quantization_config` with `quant_method` "gptq"
or "awq" stores each projection as `qweight` / `qzeros` / `scales` (and GPTQ's `g_idx`) instead of
`weight`. `convert_layer` turns one layer's tensors into the block-local names `runtime.linear`
reads, so an imported model is served by the same kernels as one quantized in the zoo, and its
layer blocks carry the same kind of `quantization` fields.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from kernels.w4a16_format import PER_WORD
from kernels.w4a16_import import QuantizedImportError, from_awq, from_gptq
from runtime.errors import CorruptCheckpointError
from runtime.linear import packed_tensors
from runtime.lora import PROJECTIONS

IMPORTED_METHODS = ("gptq", "awq")


class CheckpointQuantization(NamedTuple):
    """What a checkpoint's `quantization_config` says about its 4-bit layers."""

    method: str
    group_size: int
    symmetric: bool
    act_order: bool
    gptq_version: int

    def fields(self) -> dict[str, Any]:
        return {
            "format": "w4a16",
            "bits": 4,
            "group_size": self.group_size,
            "method": f"{self.method}-import",
            "symmetric": self.symmetric,
            "act_order": self.act_order,
            "label": self.label,
        }

    @property
    def label(self) -> str:
        return f"w4a16-g{self.group_size}-{self.method}-import"


def checkpoint_quantization(raw_config: dict[str, Any], in_features: int) -> CheckpointQuantization | None:
    """The checkpoint's quantization, None for a dense one; unsupported schemes are refused by name."""
    q = raw_config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise CorruptCheckpointError("config.json: quantization_config must be an object")
    method = str(q.get("quant_method", "")).lower()
    if method not in IMPORTED_METHODS:
        raise CorruptCheckpointError(
            f"config.json: quantization method {method!r} is not supported (only {', '.join(IMPORTED_METHODS)})"
        )
    bits = q.get("bits", q.get("w_bit"))
    if bits != 4:
        raise CorruptCheckpointError(
            f"config.json: only 4-bit {method} checkpoints are supported, not {bits!r} bits"
        )
    group = q.get("group_size", q.get("q_group_size", 128))
    if not isinstance(group, int) or group == 0 or group < -1:
        raise CorruptCheckpointError(f"config.json: bad group_size {group!r}")
    group = in_features if group == -1 else group
    if method == "awq" and str(q.get("version", "gemm")).lower() != "gemm":
        raise CorruptCheckpointError(
            f"config.json: AWQ version {q.get('version')!r} is not supported (only gemm)"
        )
    if method == "awq" and q.get("zero_point", True) is False:
        raise CorruptCheckpointError("config.json: AWQ without zero points is not supported")
    version = 2 if str(q.get("checkpoint_format", "gptq")).lower() == "gptq_v2" else 1
    return CheckpointQuantization(
        method=method,
        group_size=group,
        symmetric=bool(q.get("sym", False)) if method == "gptq" else False,
        act_order=bool(q.get("desc_act", False)) if method == "gptq" else False,
        gptq_version=version,
    )


def convert_layer(
    tensors: dict[str, torch.Tensor], quant: CheckpointQuantization, has_bias: dict[str, bool], where: str
) -> dict[str, torch.Tensor]:
    """One layer's checkpoint tensors with every 4-bit projection in the canonical layout.

    Quantizers write a `bias` for every linear; a bias the architecture does not have must be all
    zeros and is dropped, so the block matches a dense one of the same architecture.
    """
    out = {k: t for k, t in tensors.items() if not any(k.startswith(p + ".") for p in PROJECTIONS)}
    for proj in PROJECTIONS:

        def get(suffix: str, proj: str = proj) -> torch.Tensor:
            name = f"{proj}.{suffix}"
            if name not in tensors:
                raise CorruptCheckpointError(f"{where}: tensor {name!r} is missing")
            return tensors[name]

        try:
            if quant.method == "gptq":
                qweight = get("qweight")
                g_idx = tensors.get(f"{proj}.g_idx")
                packed = from_gptq(
                    qweight,
                    get("qzeros"),
                    get("scales"),
                    g_idx,
                    quant.group_size,
                    version=quant.gptq_version,
                    symmetric=quant.symmetric,
                )
            else:
                qweight = get("qweight")
                if qweight.shape[0] % PER_WORD:
                    raise QuantizedImportError(
                        f"AWQ qweight has {qweight.shape[0]} inputs, not a multiple of 8"
                    )
                packed = from_awq(qweight, get("qzeros"), get("scales"), quant.group_size)
        except QuantizedImportError as exc:
            raise CorruptCheckpointError(f"{where}: {proj}: {exc}") from exc
        out.update(packed_tensors(proj, packed))
        bias = tensors.get(f"{proj}.bias")
        if bias is not None:
            if has_bias[proj]:
                out[f"{proj}.bias"] = bias
            elif bool(bias.any()):
                raise CorruptCheckpointError(
                    f"{where}: {proj}.bias is non-zero but the architecture has no bias"
                )
    return out


def bias_flags(qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> dict[str, bool]:
    """Which projections of the architecture carry a bias."""
    return {
        p: (qkv_bias if p in PROJECTIONS[:3] else o_bias if p == "self_attn.o_proj" else mlp_bias)
        for p in PROJECTIONS
    }
