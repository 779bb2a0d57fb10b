"""Many models in one batch: BlockZoo against transformers + peft, and against itself unshared.

    .venv/bin/python -m benchmarks.multitenant [--model random|smollm2] [--quick] [--num-requests N]
        [--workdir DIR] [--prefix-cache-sharing tenant|public_bases|global]

The zoo of benchmarks/zoo_dedup.py (a Llama-shaped base, 16 LoRA adapters of ranks 8-64 on four
sets of targets, 4 full fine-tunes of the top layers), registered through `Zoo.register` by four
tenants. With `--model smollm2` the base is the real SmolLM2-135M-Instruct (30 layers, hidden 576,
fp32 weights from `smollm2_hf_dir()`), with the same 16 adapters and 4 top-layer fine-tunes made on it
(random but realistic deltas: adapters with A ~ N(0, 1/K) and B ~ N(0, 0.01²), top layers with 5%
noise); `--quick` then keeps all 30 layers and serves fewer, shorter requests. 256 requests spread uniformly at random over the 21 models, lognormal (ShareGPT-shaped)
prompt and output lengths, random token ids, greedy, every request at t=0. A request for a tenant's
model comes from its owner; one for the base from the four tenants in turn, and BlockZoo salts its
prefix-cache pages as the server's `prefix_cache_sharing` setting says (default: per tenant). Served by:

  (a) BlockZoo: one engine, per-block batching (each distinct block once per step, LoRA deltas by
      segmented gather-matmul), KV segments at the fine-tunes' divergence layer;
  (b) transformers + peft as a user would run them (benchmarks/multitenant_systems.py);
  (c) BlockZoo with per-block batching off: each model's rows run as their own sub-batch.

(a) and (c) run twice each in the order a c c a and report their faster run (background load only
ever slows a run down); (b) runs once. Weights are
fp32 in every system. Then (a) once more on prompts that share a 32-token prefix, for how often KV
pages are shared across models. The compute floor (benchmarks/multitenant_floor.py: the workload's
matmul, LoRA and attention FLOPs at this machine's best measured fp32 matmul rate per shape, measured
in the same run) is printed with each system's time as a multiple of it. Prints, last:
`headline: vs_hf_peft=<tok/s a over b> mem_vs_hf_peft=<peak weights a over b> vs_unshared=<tok/s a over c>
floor_multiple=<wall s of a over the floor>`.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.multitenant_floor import Floor, compute_floor
from benchmarks.multitenant_systems import ModelRequest, SystemResult, run_blockzoo, run_hf_peft
from benchmarks.report import table
from benchmarks.workload import BenchRequest, ShareGPTShape
from benchmarks.zoo_workload import (
    BASE_NAME,
    TENANTS,
    Workload,
    WorkloadSpec,
    build_workload,
    make_adapters_and_top_fine_tunes,
    open_zoo,
)
from blockzoo.settings import Settings
from zoo.kv_layout import kv_cuts
from zoo.registry import Zoo

MiB = 1 << 20
SHARED_PREFIX = 32


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# SmolLM2-135M-Instruct's shapes (its config.json), for the floor and the workload's description.
SMOLLM2_SPEC = WorkloadSpec(
    num_layers=30,
    hidden_size=576,
    intermediate_size=1536,
    vocab_size=49152,
    num_heads=9,
    num_kv_heads=3,
    top_layers=3,
    dtype=torch.float32,
)


def build_smollm2_workload(root: Path, spec: WorkloadSpec) -> Workload:
    """The 16 adapters and the top-layer fine-tunes of zoo_workload, made on SmolLM2's fp32 weights."""
    from blockzoo.smollm2 import smollm2_hf_dir

    start = time.perf_counter()
    base = smollm2_hf_dir()
    models = make_adapters_and_top_fine_tunes(base, root, spec, log)
    return Workload(base, models, time.perf_counter() - start)


def build(root: Path, spec: WorkloadSpec, model: str) -> tuple[Workload, Zoo]:
    if model == "smollm2":
        workload = build_smollm2_workload(root / "checkpoints", spec)
    else:
        workload = build_workload(root / "checkpoints", spec, log, include_slight=False)
    zoo = open_zoo(root / "zoo")
    log(f"registering the base and {len(workload.models)} models")
    zoo.add_base(BASE_NAME, workload.base)
    for m in workload.models:
        zoo.register(m.tenant, m.name, m.folder)
    return workload, zoo


def make_requests(
    owners: dict[str, str | None], n: int, shape: ShareGPTShape, vocab: int, seed: int, prefix: list[int]
) -> list[ModelRequest]:
    rng = random.Random(seed)
    models = list(owners)
    out = []
    for i in range(n):
        prompt = [rng.randrange(5, vocab) for _ in range(shape.prompt.sample(rng))]
        model = rng.choice(models)
        tenant = owners[model] or TENANTS[i % len(TENANTS)]
        out.append(ModelRequest(model, BenchRequest(prefix + prompt, shape.output.sample(rng)), tenant))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def best_result(runs: list[SystemResult]) -> SystemResult:
    return max(runs, key=lambda r: r.output_tokens / r.seconds)


def row(r: SystemResult) -> list[object]:
    return [
        r.name,
        f"{r.output_tokens / r.seconds:,.1f}",
        f"{percentile(r.latencies, 0.5):.2f}",
        f"{percentile(r.latencies, 0.99):.2f}",
        f"{r.peak_weight_bytes / MiB:,.1f}",
        f"{r.seconds:.1f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["random", "smollm2"], default="random", help="the base model")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="random: 4 layers (top 1 fine-tuned), shorter requests; smollm2: 96 shorter requests",
    )
    ap.add_argument("--num-requests", type=int, default=None, help="default 256 (smollm2 --quick: 96)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for every system and the floor (default: torch's choice). On a machine"
        " shared with other jobs, 1 avoids OpenMP waiting on a descheduled second thread at every op",
    )
    ap.add_argument(
        "--prefix-cache-sharing",
        choices=["tenant", "public_bases", "global"],
        default=Settings.model_fields["prefix_cache_sharing"].default,
        help="who shares prefix-cache pages (the server setting of that name; default: per tenant)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        spec = SMOLLM2_SPEC
        num_requests = args.num_requests or (96 if args.quick else 256)
    else:
        spec = WorkloadSpec(num_layers=4, top_layers=1) if args.quick else WorkloadSpec()
        num_requests = args.num_requests or 256
    shape = ShareGPTShape(scale=16 if args.quick else 8)
    started = time.perf_counter()
    print(
        f"# benchmarks/multitenant.py --model {args.model}{' --quick' if args.quick else ''}"
        f" --num-requests {num_requests} --prefix-cache-sharing {args.prefix_cache_sharing}"
        f"{f' --threads {args.threads}' if args.threads else ''}\n"
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f};"
        f" torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    root = Path(tempfile.mkdtemp(prefix="multitenant-", dir=args.workdir))
    try:
        workload, zoo = build(root, spec, args.model)
        owners: dict[str, str | None] = {BASE_NAME: None} | {m.name: m.tenant for m in workload.models}
        requests = make_requests(owners, num_requests, shape, spec.vocab_size, args.seed, [])
        # vLLM's default batch size (256 sequences): every request can be in one batch.
        settings = Settings(
            dtype="float32",
            kv_cache_memory=(1536 if args.model == "smollm2" else 512) * MiB,  # SmolLM2: 46 KiB of KV a token
            max_num_seqs=256,
            max_num_batched_tokens=1024,
            prefix_cache_sharing=args.prefix_cache_sharing,
        )
        cuts = kv_cuts(zoo, BASE_NAME, settings.max_kv_segments)
        unshared = settings.model_copy(update={"per_block_batching": False})
        runs: dict[str, list[SystemResult]] = {"a": [], "c": []}
        for system in ("a", "c", "c", "a"):
            name = "BlockZoo" if system == "a" else "BlockZoo, per-block batching off"
            log(f"running {name}")
            s = settings if system == "a" else unshared
            runs[system].append(
                run_blockzoo(zoo, owners, BASE_NAME, workload.base, requests, s, cuts, name, log)
            )
        a, c = best_result(runs["a"]), best_result(runs["c"])
        adapters = {m.name: m.folder for m in workload.models if m.kind == "lora"}
        full = {m.name: m.folder for m in workload.models if m.kind != "lora"}
        b = run_hf_peft(workload.base, adapters, full, BASE_NAME, requests, log)
        log("running BlockZoo on prompts with a shared prefix")
        prefix = [random.Random(args.seed + 1).randrange(5, spec.vocab_size) for _ in range(SHARED_PREFIX)]
        shared = make_requests(owners, num_requests, shape, spec.vocab_size, args.seed, prefix)
        sharing = run_blockzoo(zoo, owners, BASE_NAME, workload.base, shared, settings, cuts, "shared", log)
        log("measuring the compute floor")
        floor = compute_floor(spec, requests, adapters)
        report(args, spec, shape, requests, a, b, c, runs, sharing, floor)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f}s")
    tput = {k: r.output_tokens / r.seconds for k, r in (("a", a), ("b", b), ("c", c))}
    print(
        f"headline: vs_hf_peft={tput['a'] / tput['b']:.2f}"
        f" mem_vs_hf_peft={a.peak_weight_bytes / b.peak_weight_bytes:.3f}"
        f" vs_unshared={tput['a'] / tput['c']:.2f}"
        f" floor_multiple={a.seconds / floor.seconds:.2f}"
    )


def report(
    args: argparse.Namespace,
    spec: WorkloadSpec,
    shape: ShareGPTShape,
    requests: list[ModelRequest],
    a: SystemResult,
    b: SystemResult,
    c: SystemResult,
    runs: dict[str, list[SystemResult]],
    sharing: SystemResult,
    floor: Floor,
) -> None:
    prompt = [len(r.request.prompt) for r in requests]
    output = [r.request.output_len for r in requests]
    print(
        f"\n## Workload: base {args.model} (hidden {spec.hidden_size}, {spec.num_layers} layers, vocab {spec.vocab_size}),"
        f" 16 LoRA adapters, 4 fine-tunes of the top {spec.top_layers} layer(s); {len(requests)} requests over"
        f" {len({r.model for r in requests})} models, all at t=0"
    )
    print(
        f"prompt tokens mean {statistics.fmean(prompt):.1f} (max {max(prompt)}), output tokens mean"
        f" {statistics.fmean(output):.1f} (max {max(output)}); ShareGPT shape / {shape.scale:g}; greedy, fp32"
    )
    print("\n## Results (BlockZoo rows: the faster of each one's two runs)")
    headers = ["system", "output tok/s", "latency p50 s", "latency p99 s", "peak weights MiB", "wall s"]
    print(table(headers, [row(a), row(b), row(c)]))
    each = [f"{r.output_tokens / r.seconds:,.1f}" for r in runs["a"]]
    each_c = [f"{r.output_tokens / r.seconds:,.1f}" for r in runs["c"]]
    print(f"every BlockZoo run, tok/s: per-block batching on {each}, off {each_c}")
    same = sum(1 for x, y in zip(a.tokens, b.tokens, strict=True) if x == y)
    print(
        f"outputs: BlockZoo and transformers+peft agree on {same}/{len(requests)} requests token for token"
        f" (padded fp32 batches can flip a near-tie); with and without per-block batching on"
        f" {sum(1 for x, y in zip(a.tokens, c.tokens, strict=True) if x == y)}/{len(requests)}"
    )
    print(f"BlockZoo engine: {a.notes}")
    print(floor.describe())
    print(
        f"floor multiples (wall s / floor): BlockZoo {a.seconds / floor.seconds:.2f}x, transformers+peft"
        f" {b.seconds / floor.seconds:.2f}x, BlockZoo per-block batching off {c.seconds / floor.seconds:.2f}x"
    )
    hits = sharing.notes["segment_hit_tokens"]
    beyond = sharing.notes["segment_shared_beyond_start"]
    print(
        f"\n## KV sharing, same requests with a common {SHARED_PREFIX}-token prefix"
        f" (KV segments {sharing.notes['kv_segments']}, prefix_cache_sharing={args.prefix_cache_sharing})"
    )
    total = sum(len(r.request.prompt) for r in requests) + SHARED_PREFIX * len(requests)
    print(
        f"prompt tokens {total}; found in the cache per segment {hits}; of which beyond where the request's"
        f" computation started (pages of another model's request, shared below the divergence) {beyond};"
        f" throughput {sharing.output_tokens / sharing.seconds:,.1f} tok/s"
    )


if __name__ == "__main__":
    main()
