"""Where one decode step's time goes on SmolLM2, in process: ms per step at batch 1 and 16.

    .venv/bin/python -m benchmarks.decode_step [--quick] [--threads N] [--workdir DIR] [--profile]

SmolLM2-135M-Instruct (30 layers, hidden 576, 9 heads / 3 KV heads, vocab 49152, tied head) from
`smollm2_hf_dir()` is registered as a base and `Zoo.quantize` makes its RTN group-32 twin (the 4-bit
chain the server runs with BLOCKZOO_WEIGHTS_QUANTIZATION=w4a16-g32-rtn; activations fp32, as the
server's default dtype). The GGUF file itself is registered too (`q4_1`: its Q4_1 layer blocks kept as
4-bit with a float offset per group, its Q8_0 embedding dequantized). For each chain and batch size, one `LLMEngine` (no HTTP) holds B requests
with 32-token prompts; after they are prefilled, decode steps are timed one by one.

Per step it reports the wall time (median) and the process's CPU time (median), and splits the step
into: scheduling, input preparation, the 30 layers, the LM head, sampling and output processing
(timing wrappers on the engine instance; nothing in runtime/ is changed). With `--profile`, torch's
profiler also groups the layers' own ops: matmuls, attention (KV writes, gathers, SDPA), and the rest
(norms, RoPE, casts, views), as ms per step. The machine is shared: compare figures of one run.

Prints, last: `headline: fp32_b1_ms=… int4_b1_ms=… fp32_b16_ms=… int4_b16_ms=…` (median ms per step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import table
from blockzoo.settings import Settings
from blockzoo.smollm2 import smollm2_gguf, smollm2_hf_dir
from runtime.chain import Chain
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.sampling_params import SamplingParams
from zoo.block_store import BlockStore
from zoo.catalog.database import open_catalog
from zoo.errors import NotFoundError
from zoo.quantize import QuantizeOptions
from zoo.registry import Zoo

BASE = "smollm2"
GGUF_BASE = "smollm2-q4-1"
QUANT = QuantizeOptions(group_size=32)
PROMPT_TOKENS = 32
PARTS = ("schedule", "prepare", "embed", "layers", "head", "sample", "outputs")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::_weight_int4pack_mm_for_cpu", "aten::bmm")
ATTENTION_OPS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::index_select",
    "aten::index_copy_",
)


def open_smollm2_zoo(root: Path) -> Zoo:
    """SmolLM2 and its g32 RTN twin in a zoo under `root` (built once, reused by later runs)."""
    fresh = not (root / "catalog.db").exists()
    root.mkdir(parents=True, exist_ok=True)
    zoo = Zoo(open_catalog(f"sqlite:///{root / 'catalog.db'}", auto_migrate=True), BlockStore(root / "store"))
    if fresh:
        zoo.add_base(BASE, smollm2_hf_dir())
        zoo.quantize(None, BASE, QUANT)
    try:
        zoo.resolve(None, GGUF_BASE)
    except NotFoundError:
        zoo.add_base(GGUF_BASE, smollm2_gguf())
    return zoo


class StepClock:
    """Seconds per part of each step, from wrappers on one engine's parts."""

    def __init__(self, engine: LLMEngine) -> None:
        self.parts: dict[str, float] = defaultdict(float)
        ex, chain = engine.executor, engine.chain
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(ex, "prepare", "prepare")
        self._wrap(ex, "execute", "execute")
        self._wrap(chain.embed, "forward", "embed")
        self._wrap(chain.head, "forward", "head")
        self._wrap(engine, "sampler", "sample")
        self._wrap(engine.outputs, "process", "outputs")

    def _wrap(self, owner: Any, attr: str, part: str) -> None:
        inner: Callable[..., Any] = getattr(owner, attr)
        parts = self.parts

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                parts[part] += time.perf_counter() - start

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        p = dict(self.parts)
        self.parts.clear()
        known = p.get("prepare", 0.0) + p.get("embed", 0.0) + p.get("head", 0.0)
        p["layers"] = p.pop("execute", 0.0) - known
        return p


def _engine(chain: Chain, batch: int, steps: int) -> LLMEngine:
    tokenizer = load_tokenizer(smollm2_hf_dir())
    settings = Settings(kv_cache_memory=128 << 20, page_size=16, max_num_seqs=max(batch, 1))
    engine = LLMEngine(chain, tokenizer, settings)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(list(range(1000 + 7 * i, 1000 + 7 * i + PROMPT_TOKENS)), params, request_id=str(i))
    while (
        any(r.num_computed_tokens < PROMPT_TOKENS for r in engine.scheduler.running)
        or engine.scheduler.waiting
    ):
        engine.step()
    for _ in range(3):  # warm the decode path
        engine.step()
    return engine


def measure(chain: Chain, batch: int, steps: int, profile: bool) -> dict[str, float]:
    """ms per decode step: 'wall', 'cpu', each of PARTS, and (with `profile`) op groups."""
    engine = _engine(chain, batch, steps)
    clock = StepClock(engine)
    walls, cpus = [], []
    per_part: dict[str, list[float]] = defaultdict(list)
    for _ in range(steps):
        c0, w0 = time.process_time(), time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        for k, v in clock.take().items():
            per_part[k].append(v)
    out = {"wall": statistics.median(walls) * 1e3, "cpu": statistics.median(cpus) * 1e3}
    out |= {k: statistics.median(v) * 1e3 for k, v in per_part.items()}
    if profile:
        out |= op_groups(engine, min(steps, 10))
    return out


def op_groups(engine: LLMEngine, steps: int) -> dict[str, float]:
    """Self CPU ms per step of the matmul ops, the attention ops, and every other op."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            engine.step()
    groups: dict[str, float] = defaultdict(float)
    count = 0
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / steps
        name = event.key
        group = (
            "ops: matmul"
            if name in MATMUL_OPS
            else "ops: attention"
            if name in ATTENTION_OPS
            else "ops: other"
        )
        groups[group] += ms
        if name.startswith("aten::"):
            count += event.count
    groups["aten ops per step"] = count / steps
    return dict(groups)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--workdir", type=Path, default=Path(".blockzoo/bench/decode_step"))
    ap.add_argument("--profile", action="store_true", help="also group the step's ops with torch's profiler")
    ap.add_argument("--chains", default="fp32,int4,q4_1", help="which chains, comma-separated")
    ap.add_argument("--batches", default="1,16", help="batch sizes, comma-separated")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 20 if args.quick else 60
    print(
        f"# benchmarks/decode_step.py{' --quick' if args.quick else ''}: torch {torch.__version__},"
        f" {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}"
    )
    zoo = open_smollm2_zoo(args.workdir)
    ref = zoo.resolve(None, BASE)
    chains = {
        "fp32": lambda: zoo.load_chain(ref, torch.float32),
        "int4": lambda: zoo.load_chain(ref, torch.float32, quantization=QUANT.label),
        "q4_1": lambda: zoo.load_chain(zoo.resolve(None, GGUF_BASE), torch.float32),
    }
    rows: list[list[object]] = []
    headline: dict[str, float] = {}
    extra = ["ops: matmul", "ops: attention", "ops: other", "aten ops per step"] if args.profile else []
    for name in args.chains.split(","):
        chain = chains[name]()
        for batch in (int(b) for b in args.batches.split(",")):
            r = measure(chain, batch, steps, args.profile)
            headline[f"{name}_b{batch}_ms"] = r["wall"]
            rows.append(
                [name, batch, f"{r['wall']:.1f}", f"{r['cpu']:.1f}", f"{batch / r['wall'] * 1e3:.1f}"]
                + [f"{r.get(p, 0.0):.2f}" for p in PARTS]
                + [f"{r.get(p, 0.0):.1f}" for p in extra]
            )
    headers = ["chain", "batch", "wall ms/step", "cpu ms/step", "tok/s", *PARTS, *extra]
    print(f"\n## One decode step, {PROMPT_TOKENS}-token prompts, median of {steps} steps (parts: wall ms)")
    print(table(headers, rows))
    print("headline: " + " ".join(f"{k}={v:.1f}" for k, v in headline.items()))


if __name__ == "__main__":
    main()
