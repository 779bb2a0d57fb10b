"""The zoo-deduplication workload: a Llama-shaped base, 16 LoRA adapters and 5 full fine-tunes, on disk.

Every checkpoint is written the way a tenant would hand it over: full fine-tunes as Hugging Face
folders (safetensors plus config and tokenizer), adapters by peft's `save_pretrained`. All weights
are bf16, adapters included (peft keeps them in the base's dtype with `autocast_adapter_dtype=False`).
Also here: byte accounting read straight from the safetensors files (independent of the zoo), the
zoos the benchmark registers into, and the registrations it tries on the slightly changed fine-tune.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from blockzoo.tiny_models import build_tiny_model
from zoo.block_store import BlockStore
from zoo.catalog.database import open_catalog
from zoo.catalog.tenants import create_tenant
from zoo.finetune_plan import FineTuneOptions
from zoo.registry import Zoo

Log = Callable[[str], None]
Kind = Literal["lora", "full-top", "full-slight"]

BASE_NAME = "llama-base"
TENANTS = ("acme", "globex", "initech", "umbrella")
LORA_RANKS = (8, 16, 32, 64)
LORA_TARGETS: dict[str, str | list[str]] = {
    "qv": ["q_proj", "v_proj"],
    "qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": "all-linear",  # peft's own shorthand: every linear layer but the output head
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
NUM_FULL_TOP = 4
SUBSTITUTE_TOLS = (0.005, 0.03, 0.05)
ENERGIES = (0.99, 0.9)


@dataclass(frozen=True)
class WorkloadSpec:
    """Shapes of the base and how the slightly changed fine-tune is made (see `slight_description`)."""

    num_layers: int = 12
    hidden_size: int = 768
    intermediate_size: int = 2048
    vocab_size: int = 32000
    num_heads: int = 12
    num_kv_heads: int = 4
    top_layers: int = 3
    top_noise: float = 0.05  # top-layer fine-tunes: N(0, (top_noise · std W)²) on every tensor of the layer
    slight_rank: int = 8
    slight_decay: float = 0.7  # singular value k of the low-rank update is decay**k times the first
    slight_rel: float = 0.03  # ‖ΔW‖_F / ‖W‖_F of every projection in an ordinary layer
    slight_light_factor: float = 0.05  # the light layers change this much less
    slight_noise: float = 0.05  # full-rank noise, ‖N‖_F / ‖low-rank update‖_F
    dtype: torch.dtype = torch.bfloat16

    @property
    def light_layers(self) -> list[int]:
        """Every fourth layer from layer 1: a quarter of the layers, whatever the depth."""
        return list(range(1, self.num_layers, 4))

    def slight_description(self) -> str:
        light = ", ".join(map(str, self.light_layers))
        return (
            f"each projection W of each layer got ΔW = B·A (rank {self.slight_rank}, singular values decaying "
            f"by {self.slight_decay} per rank, ‖ΔW‖/‖W‖ = {self.slight_rel}) plus Gaussian noise of "
            f"{self.slight_noise:.0%} of ‖B·A‖, then rounding to bf16; layers {light} changed "
            f"{1 / self.slight_light_factor:.0f}x less; norms, embedding and head unchanged"
        )


@dataclass(frozen=True)
class WorkloadModel:
    """One model to register: which tenant, what kind, and the folder it is registered from."""

    name: str
    kind: Kind
    tenant: str
    folder: Path


@dataclass(frozen=True)
class Workload:
    """The built folders: the base and the 21 models, in registration order."""

    base: Path
    models: list[WorkloadModel]
    build_seconds: float


def make_adapters_and_top_fine_tunes(
    base: Path, root: Path, spec: WorkloadSpec, log: Log
) -> list[WorkloadModel]:
    """The 16 LoRA adapters (ranks x target sets) and the top-layer full fine-tunes of `base`, under `root`."""
    models: list[WorkloadModel] = []
    i = 0
    for targets_name, targets in LORA_TARGETS.items():
        for rank in LORA_RANKS:
            name = f"lora-{targets_name}-r{rank}"
            log(f"adapter {len(models) + 1}/16: {name}")
            make_lora_adapter(base, root / name, rank, targets, seed=100 + i, dtype=spec.dtype)
            models.append(WorkloadModel(name, "lora", TENANTS[i % len(TENANTS)], root / name))
            i += 1
    top = list(range(spec.num_layers - spec.top_layers, spec.num_layers))
    for k in range(NUM_FULL_TOP):
        name = f"full-top{spec.top_layers}-{k}"
        log(f"full fine-tune {k + 1}/{NUM_FULL_TOP}: {name} (layers {top} changed)")
        make_top_layer_fine_tune(base, root / name, top, seed=200 + k, noise=spec.top_noise)
        models.append(WorkloadModel(name, "full-top", TENANTS[(i + k) % len(TENANTS)], root / name))
    return models


def build_workload(root: Path, spec: WorkloadSpec, log: Log, include_slight: bool = True) -> Workload:
    """Write the base, the 16 adapters and the 5 full fine-tunes under `root` (4 without
    `include_slight`: only the top-layer ones)."""
    start = time.perf_counter()
    base = root / BASE_NAME
    log(f"building base: {spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}")
    build_tiny_model(
        base,
        "llama",
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads,
        intermediate_size=spec.intermediate_size,
        vocab_size=spec.vocab_size,
        tie_embeddings=False,
        dtype=spec.dtype,
        init_std=0.05,  # as build_llama_100m: peaked logits at width 768
        tokenizer_dir=root / "tokenizers",
    )
    models = make_adapters_and_top_fine_tunes(base, root, spec, log)
    if include_slight:
        log("full fine-tune 5/5: full-slight (every layer changed slightly)")
        make_slight_fine_tune(base, root / "full-slight", spec, seed=300)
        models.append(WorkloadModel("full-slight", "full-slight", TENANTS[0], root / "full-slight"))
    return Workload(base, models, time.perf_counter() - start)


def make_lora_adapter(
    base: Path, out: Path, rank: int, targets: str | list[str], seed: int, dtype: torch.dtype
) -> Path:
    """A peft LoRA adapter with random A and B (peft starts B at zero, which would be a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[1]))
            elif "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
    peft_model.save_pretrained(str(out))
    return out


def _copy_with_weights(base: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _in_layers(name: str, layers: list[int]) -> bool:
    return any(name.startswith(f"model.layers.{i}.") for i in layers)


def make_top_layer_fine_tune(base: Path, out: Path, layers: list[int], seed: int, noise: float) -> Path:
    """A copy of `base` whose listed layers (every tensor, norms too) got a random change."""
    tensors = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if _in_layers(name, layers):
            w = t.float()
            std = float(w.std()) if t.ndim > 1 else 1.0
            tensors[name] = (w + torch.randn(w.shape, generator=gen) * noise * std).to(t.dtype)
    return _copy_with_weights(base, out, tensors)


def slight_update(w: torch.Tensor, rel: float, spec: WorkloadSpec, gen: torch.Generator) -> torch.Tensor:
    """A rank-`slight_rank` update with decaying singular values plus small full-rank noise, for `w`."""
    out_dim, in_dim = w.shape
    u = torch.linalg.qr(torch.randn(out_dim, spec.slight_rank, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(in_dim, spec.slight_rank, generator=gen)).Q
    s = torch.pow(spec.slight_decay, torch.arange(spec.slight_rank, dtype=torch.float32))
    low_rank: torch.Tensor = (u * s) @ v.T
    low_rank *= rel * float(torch.linalg.matrix_norm(w)) / float(torch.linalg.matrix_norm(low_rank))
    noise = torch.randn(w.shape, generator=gen)
    noise *= (
        spec.slight_noise * float(torch.linalg.matrix_norm(low_rank)) / float(torch.linalg.matrix_norm(noise))
    )
    return low_rank + noise


def make_slight_fine_tune(base: Path, out: Path, spec: WorkloadSpec, seed: int) -> Path:
    """A copy of `base` with every layer's projections slightly changed (see `slight_description`)."""
    tensors = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    light = set(spec.light_layers)
    for i in range(spec.num_layers):
        rel = spec.slight_rel * (spec.slight_light_factor if i in light else 1.0)
        for proj in PROJECTIONS:
            name = f"model.layers.{i}.{proj}.weight"
            w = tensors[name].float()
            tensors[name] = (w + slight_update(w, rel, spec, gen)).to(tensors[name].dtype)
    return _copy_with_weights(base, out, tensors)


# -- independent byte accounting (reads safetensors headers itself, not through the zoo) ----------


def safetensors_ranges(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """name -> (dtype, shape, start, end) of each tensor's bytes in the file, from its JSON header."""
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    data_start = 8 + header_len
    return {
        name: (
            v["dtype"],
            list(v["shape"]),
            data_start + v["data_offsets"][0],
            data_start + v["data_offsets"][1],
        )
        for name, v in header.items()
        if name != "__metadata__"
    }


def tensor_bytes(path: Path) -> int:
    return sum(end - start for _, _, start, end in safetensors_ranges(path).values())


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def checkpoint_bytes(folder: Path) -> int:
    """What a checkpoint folder's weights take on disk (every safetensors file, headers included)."""
    return sum(p.stat().st_size for p in weight_files(folder))


def adapter_file(folder: Path) -> Path:
    return folder / "adapter_model.safetensors"


def naive_bytes(workload: Workload) -> int:
    """Every model stored whole: the base, each full checkpoint, and each adapter as base + adapter."""
    base = checkpoint_bytes(workload.base)
    total = base
    for m in workload.models:
        if m.kind == "lora":
            total += base + adapter_file(m.folder).stat().st_size
        else:
            total += checkpoint_bytes(m.folder)
    return total


def ideal_bytes(workload: Workload) -> tuple[int, int]:
    """(bytes of each distinct tensor of the full checkpoints counted once, adapters' tensor bytes).

    A tensor's identity is its dtype, shape and raw bytes, hashed with sha256.
    """
    seen: dict[bytes, int] = {}
    folders = [workload.base, *(m.folder for m in workload.models if m.kind != "lora")]
    for folder in folders:
        for path in weight_files(folder):
            ranges = safetensors_ranges(path)
            with path.open("rb") as fh:
                for dtype, shape, start, end in ranges.values():
                    fh.seek(start)
                    h = hashlib.sha256(f"{dtype}{shape}".encode())
                    h.update(fh.read(end - start))
                    seen[h.digest()] = end - start
    adapters = sum(tensor_bytes(adapter_file(m.folder)) for m in workload.models if m.kind == "lora")
    return sum(seen.values()), adapters


# -- zoos and the registrations tried on the slight fine-tune -------------------------------------


def open_zoo(root: Path) -> Zoo:
    """A zoo with its own SQLite catalog under `root`, ignoring any BLOCKZOO_* settings."""
    root.mkdir(parents=True, exist_ok=True)
    sessions = open_catalog(f"sqlite:///{root / 'catalog.db'}", auto_migrate=True)
    zoo = Zoo(sessions, BlockStore(root / "store"))
    for tenant in TENANTS:
        with zoo.sessions() as session, session.begin():
            create_tenant(session, tenant)
    return zoo


@dataclass(frozen=True)
class Variant:
    """One way of registering the slight fine-tune: a label (as CLI flags) and its options."""

    label: str
    options: FineTuneOptions


def variants() -> list[Variant]:
    """Plain, a sweep of substitution tolerances and compression energies, and both combined."""
    # The KL bound is lifted so every setting is measured rather than refused; rows say what the
    # default bound would have done.
    lifted = math.inf
    out = [Variant("plain registration", FineTuneOptions())]
    out += [
        Variant(f"--substitute-within {tol}", FineTuneOptions(substitute_within=tol, max_kl=lifted))
        for tol in SUBSTITUTE_TOLS
    ]
    out += [
        Variant(
            f"--compress-delta --delta-energy {e}",
            FineTuneOptions(compress_delta=True, delta_energy=e, max_kl=lifted),
        )
        for e in ENERGIES
    ]
    tol = SUBSTITUTE_TOLS[0]
    out.append(
        Variant(
            f"--substitute-within {tol} --compress-delta --delta-energy {ENERGIES[0]}",
            FineTuneOptions(
                substitute_within=tol, compress_delta=True, delta_energy=ENERGIES[0], max_kl=lifted
            ),
        )
    )
    return out
