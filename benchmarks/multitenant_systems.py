"""The three systems of benchmarks/multitenant.py, each serving the same requests over 21 models.

- BlockZoo (`run_blockzoo`): one engine for the base; every request runs on its own model's chain
  from the zoo, with per-block batching on (a) or off (c). Weights are loaded into one
  `BlockResidency`, so a block shared by several chains is resident once.
- transformers + peft (`run_hf_peft`), as a user would serve these models without BlockZoo: one
  `PeftModel` over the base holding all 16 adapters (`load_adapter`), each adapter's requests in one
  padded `generate` batch after `set_adapter`, the base's through `disable_adapter()`, and each full
  fine-tune loaded as its own model with its requests in one batch. Batches run one after another.

Every request arrives at t=0; its latency is when its last token is known (for transformers, when
its batch's `generate` returns).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from benchmarks.hf_baseline import generate_batch
from benchmarks.workload import BenchRequest
from blockzoo.settings import Settings
from router.inference import prefix_cache_salt
from runtime.chain import Chain
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.kv_segments import KVSegments
from runtime.residency import BlockResidency
from runtime.sampling_params import SamplingParams
from zoo.registry import Zoo

Log = Callable[[str], None]


@dataclass(frozen=True)
class ModelRequest:
    """A request for one of the models, sent by `tenant` (None: the model's owner)."""

    model: str
    request: BenchRequest
    tenant: str | None = None


@dataclass
class SystemResult:
    """What one system did: wall time, each request's latency and tokens, and its weights' peak bytes."""

    name: str
    seconds: float
    latencies: list[float]
    tokens: list[list[int]]
    peak_weight_bytes: int
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def _tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _delta_tensors(chains: Sequence[Chain]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for chain in chains:
        for delta in chain.layer_deltas:
            if delta is not None:
                for p in delta.projections.values():
                    out += [p.a, p.b]
    return out


def run_blockzoo(
    zoo: Zoo,
    owners: dict[str, str | None],
    base_name: str,
    base_dir: Path,
    requests: Sequence[ModelRequest],
    settings: Settings,
    cuts: list[int],
    name: str,
    log: Log,
) -> SystemResult:
    """Serve every request on one engine over the zoo's chains (all submitted at t=0)."""
    residency = BlockResidency(None)
    dtype = torch.float32 if settings.dtype == "float32" else torch.bfloat16
    models = sorted({r.model for r in requests})
    chains = {m: zoo.load_chain(zoo.resolve(owners[m], m), dtype, residency=residency) for m in models}
    tokenizer = load_tokenizer(base_dir)
    segments = KVSegments.cut_at(chains[base_name].config.num_layers, cuts)
    engine = LLMEngine(chains[base_name], tokenizer, settings, kv_segments=segments)
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    for i, m in enumerate(models):  # loads every block, so that load time is not in the timing
        engine.add_request([5, 6, 7], warm, request_id=f"warm-{i}", chain=chains[m])
    while engine.has_unfinished_requests():
        engine.step()
    latencies = [0.0] * len(requests)
    tokens: list[list[int]] = [[] for _ in requests]
    start = time.perf_counter()
    for i, r in enumerate(requests):
        params = SamplingParams(temperature=0.0, max_tokens=r.request.output_len, ignore_eos=True)
        # Salted as the server would salt it (settings.prefix_cache_sharing).
        tenant = r.tenant or owners[r.model] or ""
        salt = prefix_cache_salt(settings.prefix_cache_sharing, tenant, owners[r.model] is None)
        engine.add_request(
            r.request.prompt, params, request_id=str(i), chain=chains[r.model], cache_salt=salt
        )
    steps, last_log = 0, start
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                latencies[int(out.request_id)] = time.perf_counter() - start
                tokens[int(out.request_id)] = out.token_ids
        steps += 1
        if time.perf_counter() - last_log > 10:
            last_log = time.perf_counter()
            log(f"{name}: {sum(1 for t in tokens if t)}/{len(requests)} requests done, {steps} steps")
    seconds = time.perf_counter() - start
    weights = residency.stats.peak_resident_bytes + _tensor_bytes(_delta_tensors(list(chains.values())))
    sharing = engine.kv_manager.sharing
    notes: dict[str, object] = {
        "steps": steps,
        "kv_segments": segments.bounds,
        "segment_hit_tokens": list(sharing.hits),
        "segment_shared_beyond_start": list(sharing.shared_beyond_start),
    }
    residency.shutdown()
    return SystemResult(name, seconds, latencies, tokens, weights, notes)


def _hf_model(folder: Path) -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # ignore_eos, as the requests ask
    return model


def run_hf_peft(
    base_dir: Path,
    adapters: dict[str, Path],
    full: dict[str, Path],
    base_name: str,
    requests: Sequence[ModelRequest],
    log: Log,
) -> SystemResult:
    """Adapters in one PeftModel switched with set_adapter; full fine-tunes as their own models."""
    log("transformers+peft: loading the base with every adapter, and each full fine-tune")
    base = _hf_model(base_dir)
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft_model.load_adapter(str(adapters[n]), adapter_name=n)
    peft_model.eval()
    full_models = {n: _hf_model(p) for n, p in full.items()}
    weights = _tensor_bytes(
        [p for p in peft_model.parameters()] + [p for m in full_models.values() for p in m.parameters()]
    )
    by_model: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        by_model[r.model].append(i)
    pad = 0
    generate_batch(full_models[next(iter(full_models))], [BenchRequest([5, 6, 7], 2)], pad)  # warm-up
    latencies = [0.0] * len(requests)
    tokens: list[list[int]] = [[] for _ in requests]
    start = time.perf_counter()
    for k, (model, rows) in enumerate(sorted(by_model.items())):
        batch = [requests[i].request for i in rows]
        if model in full_models:
            outs = generate_batch(full_models[model], batch, pad)
        elif model == base_name:
            with peft_model.disable_adapter():
                outs = generate_batch(peft_model, batch, pad)  # type: ignore[arg-type]
        else:
            peft_model.set_adapter(model)
            outs = generate_batch(peft_model, batch, pad)  # type: ignore[arg-type]
        done = time.perf_counter() - start
        for i, out in zip(rows, outs, strict=True):
            latencies[i], tokens[i] = done, out
        log(
            f"transformers+peft: model {k + 1}/{len(by_model)} ({model}, {len(rows)} requests) done at {done:.0f}s"
        )
    seconds = time.perf_counter() - start
    return SystemResult("transformers + peft", seconds, latencies, tokens, weights)
