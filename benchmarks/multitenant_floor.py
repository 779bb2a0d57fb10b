"""The compute floor of benchmarks/multitenant.py: the least time any system could take on this CPU.

The floor is the workload's floating-point work divided by this machine's dense matmul rate,
measured in the same run:

- **FLOPs.** Every token a system must run through its model's chain: each prompt token and each
  generated token but the last goes through every layer (its last token's KV is never read), and
  each generated token costs one LM-head row. Per layer and token: 2 · N · K for each of the seven
  projections [N, K]; LoRA: 2 · r · (K + N) per adapted projection of that request's adapter, read from
  the adapter's own tensors (2 FLOPs per adapter parameter); attention: 4 · context · heads · head_dim
  (QKᵀ and PV) with the token's full causal context. Norms, RoPE, SiLU and sampling are left out.
- **Rate.** For each distinct projection shape [N, K] of the model (and the LM head), the best of
  several rounds of an fp32 `x @ Wᵀ` at 64 and at 256 rows, whichever is faster. Background load only
  ever slows a round down, so the best round is the machine's rate. LoRA and attention FLOPs are
  counted at the fastest rate of any shape, which flatters no system: the floor stays a lower bound.

`floor_multiple` = a system's wall time / the floor. A system at 1.0 would run every matmul at the
machine's best rate for its shape and spend nothing on anything else.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from benchmarks.multitenant_systems import ModelRequest
from benchmarks.zoo_workload import WorkloadSpec, adapter_file

FLOOR_ROWS = (64, 256)


@dataclass(frozen=True)
class Floor:
    """The floor's parts: FLOPs by kind, the rates used, and the seconds they give."""

    layer_flops: float
    head_flops: float
    lora_flops: float
    attention_flops: float
    seconds: float
    rates: dict[str, float]

    @property
    def total_flops(self) -> float:
        return self.layer_flops + self.head_flops + self.lora_flops + self.attention_flops

    def describe(self) -> str:
        rates = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in self.rates.items())
        return (
            f"compute floor: {self.total_flops / 1e9:,.0f} GFLOP (layers {self.layer_flops / 1e9:,.0f}, LM head"
            f" {self.head_flops / 1e9:,.0f}, LoRA {self.lora_flops / 1e9:,.1f}, attention"
            f" {self.attention_flops / 1e9:,.1f}) at this machine's best fp32 matmul rates per shape, GFLOP/s"
            f" ({rates}) = {self.seconds:.2f} s"
        )


def projection_shapes(spec: WorkloadSpec) -> dict[str, tuple[int, int]]:
    """[N, K] of each projection of one layer, and of the LM head."""
    h, i = spec.hidden_size, spec.intermediate_size
    head_dim = h // spec.num_heads
    q, kv = spec.num_heads * head_dim, spec.num_kv_heads * head_dim
    return {
        "q": (q, h),
        "k": (kv, h),
        "v": (kv, h),
        "o": (h, q),
        "gate": (i, h),
        "up": (i, h),
        "down": (h, i),
        "head": (spec.vocab_size, h),
    }


def matmul_rate(n: int, k: int, rows: int, rounds: int = 15, min_seconds: float = 0.05) -> float:
    """Best-of-`rounds` FLOP/s of an fp32 [rows, k] x [k, n] product on this machine."""
    x, w = torch.randn(rows, k), torch.randn(n, k)
    for _ in range(3):
        x @ w.t()
    calls = max(1, int(min_seconds * 2e10 / (2 * rows * n * k)))
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            x @ w.t()
        best = max(best, 2 * rows * n * k * calls / (time.perf_counter() - start))
        time.sleep(0.05)
    return best


def adapter_flops_per_token(folder: Path) -> float:
    """2 FLOPs per parameter of a LoRA adapter: h Aᵀ is 2·r·K and (h Aᵀ) Bᵀ is 2·r·N per projection."""
    total = 0
    with safe_open(str(adapter_file(folder)), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if "lora_A" in name or "lora_B" in name:
                shape = f.get_slice(name).get_shape()
                total += shape[0] * shape[1]
    return 2.0 * total


def compute_floor(spec: WorkloadSpec, requests: Sequence[ModelRequest], adapters: dict[str, Path]) -> Floor:
    """The floor of serving `requests` (see the module docstring)."""
    shapes = projection_shapes(spec)
    rates = {name: max(matmul_rate(n, k, rows) for rows in FLOOR_ROWS) for name, (n, k) in shapes.items()}
    best = max(rates.values())
    lora_per_token = {name: adapter_flops_per_token(folder) for name, folder in adapters.items()}
    head_dim = spec.hidden_size // spec.num_heads
    layer_tokens = head_tokens = lora_flops = attention_flops = 0.0
    for r in requests:
        prompt, out = len(r.request.prompt), r.request.output_len
        tokens = prompt + max(out - 1, 0)
        layer_tokens += tokens
        head_tokens += out
        lora_flops += lora_per_token.get(r.model, 0.0) * tokens  # the adapter's tensors span every layer
        # Token at position p attends to p + 1 keys, in every layer.
        contexts = tokens * (tokens + 1) / 2
        attention_flops += 4 * contexts * spec.num_heads * head_dim * spec.num_layers
    layer_seconds = sum(
        2 * n * k * layer_tokens * spec.num_layers / rates[name]
        for name, (n, k) in shapes.items()
        if name != "head"
    )
    n, k = shapes["head"]
    head_flops = 2 * n * k * head_tokens
    layer_flops = (
        sum(2 * n * k for name, (n, k) in shapes.items() if name != "head") * layer_tokens * spec.num_layers
    )
    seconds = layer_seconds + head_flops / rates["head"] + (lora_flops + attention_flops) / best
    return Floor(layer_flops, head_flops, lora_flops, attention_flops, seconds, rates)
