"""End-to-end decode with a 4-bit chain from the zoo against the same model's bf16 and fp32 chains.

A random Llama (hidden 1024, 16 heads / 4 KV heads, intermediate 2816, vocab 4096; `--quick` 4 layers,
full 8) is registered as a base, `Zoo.quantize` makes its RTN group-128 twin, and one `LLMEngine`
per chain generates greedily for a batch of short prompts. Decode dominates (16-token prompts,
64 new tokens), so each step reads every weight once: the 4-bit layers should win at small batches.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import table
from blockzoo.settings import Settings
from blockzoo.tiny_models import build_tiny_model
from runtime.chain import Chain
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.sampling_params import SamplingParams
from zoo.block_store import BlockStore
from zoo.catalog.database import open_catalog
from zoo.quantize import QuantizeOptions
from zoo.registry import Zoo

PROMPT_TOKENS = 16
NEW_TOKENS = 64


def _generate(chain: Chain, tokenizer_dir: Path, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    """Seconds to generate NEW_TOKENS for every prompt in one batch, and the tokens."""
    settings = Settings(kv_cache_memory=64 << 20, page_size=16, max_num_seqs=len(prompts))
    engine = LLMEngine(chain, load_tokenizer(tokenizer_dir), settings)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=str(i))
    out: dict[str, list[int]] = {}
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o.token_ids
    return time.perf_counter() - start, [out[str(i)] for i in range(len(prompts))]


def decode_table(quick: bool, rounds: int = 3) -> tuple[list[str], list[list[object]], str]:
    """(headers, rows, notes) of decode tokens/s for fp32, bf16 and int4 chains at batch 1 and 8."""
    layers = 4 if quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_tiny_model(
            root / "base",
            "llama",
            hidden_size=1024,
            num_layers=layers,
            num_heads=16,
            num_kv_heads=4,
            intermediate_size=2816,
            vocab_size=4096,
            init_std=0.02,
            dtype=torch.bfloat16,
        )
        zoo = Zoo(
            open_catalog(f"sqlite:///{root / 'catalog.db'}", auto_migrate=True), BlockStore(root / "store")
        )
        zoo.add_base("base", base)
        report = zoo.quantize(None, "base", QuantizeOptions(group_size=128))
        chains = {
            "fp32 dense": zoo.load_chain(zoo.resolve(None, "base"), torch.float32),
            "bf16 dense": zoo.load_chain(zoo.resolve(None, "base"), torch.bfloat16),
            "int4 (w4a16-g128-rtn)": zoo.load_chain(zoo.resolve(None, report.model), torch.bfloat16),
        }
        gen = torch.Generator().manual_seed(0)
        rows: list[list[object]] = []
        agreement: list[str] = []
        for batch in (1, 8):
            prompts = [torch.randint(0, 4096, (PROMPT_TOKENS,), generator=gen).tolist() for _ in range(batch)]
            rates: dict[str, float] = {}
            tokens: dict[str, list[list[int]]] = {}
            for name, chain in chains.items():
                times = []
                for _ in range(rounds):
                    seconds, tokens[name] = _generate(chain, base, prompts)
                    times.append(seconds)
                rates[name] = batch * NEW_TOKENS / statistics.median(times)
            for name in chains:
                rows.append(
                    [
                        batch,
                        name,
                        f"{rates[name]:.1f}",
                        f"{rates[name] / rates['bf16 dense']:.2f}",
                        f"{rates[name] / rates['fp32 dense']:.2f}",
                    ]
                )
            same = sum(
                a == b
                for x, y in zip(tokens["bf16 dense"], tokens["int4 (w4a16-g128-rtn)"], strict=True)
                for a, b in zip(x, y, strict=True)
            )
            agreement.append(f"batch {batch}: {same}/{batch * NEW_TOKENS}")
        notes = (
            f"model: {layers} layers, hidden 1024, intermediate 2816, vocab 4096; layer bytes bf16 "
            f"{report.source_layer_bytes / 2**20:.0f} MiB -> int4 {report.quantized_layer_bytes / 2**20:.0f} MiB "
            f"(embed and head stay bf16); quantization KL vs source {report.mean_kl:.3g}, top-1 "
            f"{report.top1_agreement:.3f}\ngreedy tokens equal between bf16 and int4 chains, same position: "
            + ", ".join(agreement)
        )
    headers = ["batch", "chain", "decode tok/s", "vs bf16", "vs fp32"]
    return headers, rows, notes


def print_decode_table(quick: bool) -> None:
    headers, rows, notes = decode_table(quick)
    print(
        f"\n## End-to-end greedy decode, {PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens (median of 3)"
    )
    print(table(headers, rows))
    print(notes)
