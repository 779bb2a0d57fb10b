"""Engine throughput against transformers, SplitFuse latency, and per-step Python overhead.

    .venv/bin/python -m benchmarks.throughput [--quick] [--dtype bfloat16] [--model-dir DIR]

Three phases on a random ~100M-parameter Llama: (1) tokens/s of `LLM.generate` against
transformers `generate` in padded static batches, on ShareGPT-shaped requests; (2) inter-token
latency under "splitfuse" and "prefill_first" while long prompts arrive during decoding; (3) a
profile of one decode step at batch `--max-num-seqs`. Prints, last, exactly one line:
`headline: vs_hf=<ratio> itl_p99_gain=<ratio>`.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.engine_runs import StreamResult, run_offline_llm, run_stream
from benchmarks.hf_baseline import load_hf_model, run_hf
from benchmarks.model import ensure_bench_model
from benchmarks.overhead import MODEL_PHASES, PHASES, OverheadProfile, profile_decode
from benchmarks.report import table
from benchmarks.workload import BenchRequest, MixedStreamSpec, ShareGPTShape, sharegpt_requests
from blockzoo.settings import Settings
from runtime.engine import DTYPES, LLMEngine
from runtime.llm import LLM
from runtime.model_config import ModelConfig


@dataclass(frozen=True)
class Plan:
    """Sizes of every phase; `--quick` shrinks lengths (not the request count) to fit a few minutes."""

    num_requests: int
    scale: float
    stream: MixedStreamSpec
    profile_steps: int


FULL = Plan(
    num_requests=128,
    scale=4.0,
    stream=MixedStreamSpec(
        num_decoders=32,
        decoder_prompt_len=64,
        decoder_output_len=192,
        num_long=6,
        long_prompt_len=1024,
        long_output_len=16,
        first_long_s=2.0,
        long_every_s=3.0,
    ),
    profile_steps=20,
)
QUICK = Plan(
    num_requests=128,
    scale=8.0,
    stream=MixedStreamSpec(
        num_decoders=32,
        decoder_prompt_len=32,
        decoder_output_len=96,
        num_long=4,
        long_prompt_len=1024,
        long_output_len=8,
        first_long_s=1.0,
        long_every_s=2.0,
    ),
    profile_steps=10,
)


PHASE_NAMES = ("throughput", "itl", "overhead")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter lengths and streams (a few minutes)")
    ap.add_argument("--model-dir", type=Path, default=Path(".blockzoo/bench"), help="model cache folder")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of both systems")
    ap.add_argument(
        "--threads",
        default="auto",
        help="torch intra-op threads for both systems; auto: the CPUs not already busy (CPUs minus the"
        " 1-minute load average, at least 1), since OpenMP threads that share a core with other work"
        " stall at every barrier",
    )
    ap.add_argument("--num-requests", type=int, help="override the number of throughput requests")
    ap.add_argument("--max-num-seqs", type=int, default=64, help="our batch size and HF's batch size")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="token budget (throughput)")
    ap.add_argument("--splitfuse-budget", type=int, default=256, help="token budget in the ITL test")
    ap.add_argument("--kv-cache-memory", type=int, default=1 << 30, help="KV cache bytes per engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--phases", default=",".join(PHASE_NAMES), help=f"comma-separated subset of {','.join(PHASE_NAMES)}"
    )
    return ap.parse_args()


def resolve_threads(value: str) -> int:
    cpus = os.cpu_count() or 1
    if value == "auto":
        return max(1, min(cpus, cpus - round(os.getloadavg()[0])))
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"--threads must be a positive integer or auto, got {value!r}")
    return int(value)


def engine_settings(args: argparse.Namespace, **overrides: object) -> Settings:
    base: dict[str, object] = {
        "dtype": args.dtype,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_memory": args.kv_cache_memory,
        "num_threads": args.threads,
    }
    return Settings(**(base | overrides))  # type: ignore[arg-type]


def load_note() -> str:
    return f"(1-min load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)"


def length_table(requests: list[BenchRequest]) -> str:
    rows: list[list[object]] = []
    for name, values in (
        ("prompt", [len(r.prompt) for r in requests]),
        ("output", [r.output_len for r in requests]),
    ):
        rows.append([name, statistics.mean(values), statistics.median(values), max(values), sum(values)])
    return table(["tokens per request", "mean", "p50", "max", "total"], rows)


def throughput_phase(args: argparse.Namespace, plan: Plan, model_path: Path, vocab: int) -> float:
    num = args.num_requests or plan.num_requests
    requests = sharegpt_requests(num, ShareGPTShape(scale=plan.scale), vocab, seed=args.seed)
    print(f"\n## Throughput: {num} requests, ShareGPT-shaped lengths / {plan.scale:g}, greedy, ignore_eos")
    print(length_table(requests))
    print(f"blockzoo LLM.generate {load_note()}")
    llm = LLM(model_path, settings=engine_settings(args))
    ours = run_offline_llm(llm, requests)
    del llm
    gc.collect()
    print(f"transformers generate {load_note()}")
    model = load_hf_model(model_path, DTYPES[args.dtype])
    pad_id = model.generation_config.pad_token_id
    hf = run_hf(model, requests, args.max_num_seqs, int(pad_id) if pad_id is not None else 0)
    del model
    gc.collect()
    ours_tps, hf_tps = ours.tokens / ours.seconds, hf.useful_tokens / hf.seconds
    n = args.max_num_seqs
    rows: list[list[object]] = [
        ["blockzoo LLM.generate", f"continuous, max_num_seqs={n}", ours.tokens, ours.tokens, ours.seconds,
         ours_tps],
        ["transformers generate", f"static padded, batch {n}", hf.useful_tokens, hf.generated_tokens,
         hf.seconds, hf_tps],
    ]  # fmt: skip
    print(
        table(["system", "batching", "useful tokens", "tokens decoded", "seconds", "useful tokens/s"], rows)
    )
    same = sum(a == b for a, b in zip(ours.token_ids, hf.token_ids, strict=True))
    print(f"requests whose greedy tokens are identical in both systems: {same}/{num}")
    ratio = ours_tps / hf_tps
    print(f"vs_hf (useful tokens/s, ours / transformers) = {ratio:.2f}")
    return ratio


def stream_phase(args: argparse.Namespace, plan: Plan, model_path: Path, vocab: int) -> float:
    spec = plan.stream
    requests = spec.requests(vocab, seed=args.seed + 1)
    max_model_len = max(2048, spec.long_prompt_len + spec.long_output_len)
    print(
        f"\n## Inter-token latency, splitfuse vs prefill_first: {spec.num_decoders} requests"
        f" ({spec.decoder_prompt_len}-token prompts, {spec.decoder_output_len} tokens out) arrive at t=0;"
        f" {spec.num_long} prompts of {spec.long_prompt_len} tokens ({spec.long_output_len} out) arrive"
        f" every {spec.long_every_s:g}s from t={spec.first_long_s:g}s"
    )
    # prefill_first never splits a prompt, so its budget is the longest a prompt can be.
    budgets = {"splitfuse": args.splitfuse_budget, "prefill_first": max_model_len}
    warmup = [BenchRequest(list(range(10, 42)), 4), BenchRequest(list(range(10, 300)), 4)]
    results: list[StreamResult] = []
    for policy, budget in budgets.items():
        settings = engine_settings(
            args, scheduler_policy=policy, max_num_batched_tokens=budget, max_model_len=max_model_len
        )
        engine = LLMEngine.from_path(model_path, settings)
        run_stream(engine, warmup, f"{policy} warm-up", spec.long_prompt_len)
        print(f"{policy} {load_note()}")
        results.append(run_stream(engine, requests, policy, spec.long_prompt_len))
        del engine
        gc.collect()
    rows = [
        [r.policy, budgets[r.policy], len(r.itls), 1000 * r.itl_p50, 1000 * r.itl_p99, 1000 * max(r.itls),
         1000 * statistics.median(r.long_ttfts), r.tokens / r.seconds]
        for r in results
    ]  # fmt: skip
    headers = ["policy", "token budget", "ITL samples", "ITL p50 ms", "ITL p99 ms", "ITL max ms",
               "long-prompt TTFT p50 ms", "tokens/s"]  # fmt: skip
    print(table(headers, rows))
    gain = results[1].itl_p99 / results[0].itl_p99
    print(f"itl_p99_gain (p99 ITL prefill_first / splitfuse) = {gain:.2f}")
    return gain


def overhead_phase(args: argparse.Namespace, plan: Plan, model_path: Path, vocab: int) -> OverheadProfile:
    batch = args.max_num_seqs
    print(f"\n## One decode step at batch {batch}: median of {plan.profile_steps} steps {load_note()}")
    prompts = sharegpt_requests(batch, ShareGPTShape(scale=plan.scale), vocab, seed=args.seed)
    engine = LLMEngine.from_path(model_path, engine_settings(args))
    prof = profile_decode(engine, prompts, batch, plan.profile_steps)
    rows: list[list[object]] = []
    for phase in PHASES:
        kind = "model forward (torch ops)" if phase in MODEL_PHASES else "python overhead"
        ms = prof.phase_ms[phase]
        rows.append([phase, kind, f"{ms:.2f}", f"{100 * ms / prof.step_ms:.1f}"])
    rows.append(["whole engine.step", "", f"{prof.step_ms:.2f}", "100.0"])
    print(table(["phase", "kind", "median ms", "% of step"], rows))
    print(f"python overhead = {100 * prof.overhead_fraction:.1f}% of step time (target < 10%)")
    return prof


def main() -> None:
    args = parse_args()
    plan = QUICK if args.quick else FULL
    args.threads_arg = args.threads
    args.threads = resolve_threads(args.threads)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    mode = " --quick: prompt/output lengths and latency streams shortened" if args.quick else ""
    print(f"# benchmarks/throughput.py{mode}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__},"
        f" torch threads={args.threads} ({args.threads_arg}); dtype {args.dtype} for both systems {load_note()}"
    )
    model_path = ensure_bench_model(args.model_dir)
    vocab = ModelConfig.from_folder(model_path).vocab_size
    phases = set(args.phases.split(","))
    if not phases <= set(PHASE_NAMES):
        raise SystemExit(f"--phases: unknown phase(s) {sorted(phases - set(PHASE_NAMES))}")
    nan = float("nan")
    vs_hf = throughput_phase(args, plan, model_path, vocab) if "throughput" in phases else nan
    gain = stream_phase(args, plan, model_path, vocab) if "itl" in phases else nan
    if "overhead" in phases:
        overhead_phase(args, plan, model_path, vocab)
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f}s {load_note()}")
    print(f"headline: vs_hf={vs_hf:.2f} itl_p99_gain={gain:.2f}")


if __name__ == "__main__":
    main()
