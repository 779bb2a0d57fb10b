"""A tiny random-weight zoo shaped like the demo's: a small base, LoRA adapters and a partial fine-tune,
spread over two tenants. Tests and the load benchmarks use it where the real demo model
(`blockzoo.demo_zoo`, SmolLM2) would cost minutes; the weights are random, the product is real."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blockzoo.settings import Settings
from blockzoo.tiny_models import build_tiny_model
from zoo.catalog.tenants import create_tenant
from zoo.registry import Zoo

log = logging.getLogger(__name__)

BASE = "demo-base"
KEYS_FILE = "demo_keys.json"
# (tenant, model, rank, targets)
ADAPTERS = [
    ("demo-alice", "alice-support", 8, ["q_proj", "v_proj"]),
    ("demo-alice", "alice-sql", 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("demo-bob", "bob-legal", 8, ["gate_proj", "up_proj", "down_proj"]),
]


def write_lora_adapter(base: Path, out: Path, rank: int, targets: list[str], seed: int) -> Path:
    """A PEFT-format LoRA adapter with random A and B for the base at `base`."""
    config = json.loads((base / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {
        "q_proj": ("self_attn", heads * head_dim, hidden),
        "k_proj": ("self_attn", kv_heads * head_dim, hidden),
        "v_proj": ("self_attn", kv_heads * head_dim, hidden),
        "o_proj": ("self_attn", hidden, heads * head_dim),
        "gate_proj": ("mlp", inter, hidden),
        "up_proj": ("mlp", inter, hidden),
        "down_proj": ("mlp", hidden, inter),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for t in targets:
            group, out_dim, in_dim = shapes[t]
            prefix = f"base_model.model.model.layers.{i}.{group}.{t}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.1
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "base_model_name_or_path": BASE,
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": targets,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out


def demo_keys(settings: Settings) -> dict[str, str]:
    path = settings.data_dir / KEYS_FILE
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def ensure_demo_zoo(settings: Settings, zoo: Zoo) -> dict[str, str]:
    """Build the demo zoo unless this data dir already has it; returns the demo tenants' keys.

    The demo keys are kept in plain text in `demo_keys.json` (mode 0600) so `make serve` can print
    a working curl line on every start; real tenants' keys are only ever stored hashed.
    """
    keys = demo_keys(settings)
    if keys:
        return keys
    work = Path(tempfile.mkdtemp(prefix="bz-demo-"))
    try:
        log.info("building the demo zoo", extra={"data_dir": str(settings.data_dir)})
        base = build_tiny_model(
            work / "base",
            "llama",
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=256,
        )
        zoo.add_base(BASE, base)
        with zoo.sessions() as session, session.begin():
            for tenant in ("demo-alice", "demo-bob"):
                _, keys[tenant] = create_tenant(session, tenant)
        for i, (tenant, name, rank, targets) in enumerate(ADAPTERS):
            zoo.register(tenant, name, write_lora_adapter(base, work / name, rank, targets, seed=i))
        partial = work / "bob-partial"
        shutil.copytree(base, partial)
        tensors = load_file(str(partial / "model.safetensors"))
        gen = torch.Generator().manual_seed(99)
        for key, tensor in tensors.items():
            if key.startswith("model.layers.3.") and tensor.ndim == 2:
                tensors[key] = tensor + torch.randn(tensor.shape, generator=gen) * 0.05
        save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
        zoo.register("demo-bob", "bob-partial", partial)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = settings.data_dir / KEYS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(keys, fh)
    return keys
