"""Online serving: latency, throughput and goodput over HTTP, and what the API costs vs the engine.

    .venv/bin/python -m benchmarks.serving [--quick] [--rate R] [--num-requests N] [--repeats K]
    .venv/bin/python -m benchmarks.serving --base-url http://host:8000/v1 --models m1=KEY1 m2=KEY2 ...

By default it builds the demo zoo (`blockzoo serve --demo`) in a temporary folder, serves it on
uvicorn in this process, and runs the same Poisson schedule (same seed, prompts, lengths, arrival
times) alternately through the HTTP API (streamed /v1/completions from a client process) and
straight into the same server's engine (`AsyncLLMEngine.generate`, in this process), `--repeats`
times. With `--base-url` it only load-tests that server (any OpenAI-compatible one).

Prints, last, one line: `headline: api_overhead=<1 - tput_http / tput_direct>`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.loadgen import ClientKind, run_http
from benchmarks.report import table
from benchmarks.serving_direct import run_direct
from benchmarks.serving_metrics import SLO, SUMMARY_HEADERS, RunResult, Summary, summarize, summary_row
from benchmarks.serving_micro import print_micro
from benchmarks.serving_profile import Snapshot, StepTimer, Times, snapshot, step_stats, times_by_group
from benchmarks.serving_report import Measured, print_profile, print_workload
from benchmarks.serving_server import DemoServer, demo_server, uvicorn_impl
from benchmarks.serving_workload import Schedule, Target, WorkloadSpec, build_schedule, lognormal

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Plan:
    """Defaults of one mode; every field can be overridden on the command line."""

    num_requests: int
    rate: float
    prompt_mean: float
    output_mean: float
    repeats: int


# Arrivals outpace what the demo engine serves on 2 cores (about 1,000-1,700 output tokens/s), so a
# queue builds and throughput is each system's capacity, not the offered load; many short repeats
# beat few long ones on a machine whose background load drifts.
FULL = Plan(num_requests=256, rate=48.0, prompt_mean=64, output_mean=96, repeats=6)
QUICK = Plan(num_requests=128, rate=48.0, prompt_mean=48, output_mean=64, repeats=8)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller workload (a few minutes)")
    ap.add_argument("--base-url", help="load-test this OpenAI-compatible server instead of a demo server")
    ap.add_argument("--models", nargs="+", default=[], help="with --base-url: MODEL or MODEL=API_KEY ...")
    ap.add_argument("--api-key", default="", help="with --base-url: key for models given without one")
    ap.add_argument("--rate", type=float, help="Poisson arrival rate, requests/s (inf: all at t=0)")
    ap.add_argument("--num-requests", type=int)
    ap.add_argument("--prompt-mean", type=float, help="mean prompt length, tokens (lognormal)")
    ap.add_argument("--output-mean", type=float, help="mean output length, tokens (lognormal)")
    ap.add_argument("--prompt-sigma", type=float, default=1.0, help="log-space sigma of prompt lengths")
    ap.add_argument("--output-sigma", type=float, default=0.8, help="log-space sigma of output lengths")
    ap.add_argument("--text-prompts", action="store_true", help="send text prompts, not token ids")
    ap.add_argument("--vocab-size", type=int, default=512, help="token ids are drawn below this")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--slo-ttft", type=float, default=1.0, help="TTFT objective for goodput, seconds")
    ap.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT objective for goodput, seconds")
    ap.add_argument("--repeats", type=int, help="runs of each system, alternating")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="HTTP client: minimal asyncio one (default; plain http only) or httpx (https too)",
    )
    ap.add_argument(
        "--inline-client",
        action="store_true",
        help="run the HTTP client in this process's main thread instead of a child process",
    )
    ap.add_argument("--max-num-seqs", type=int, default=64, help="demo server: engine batch size")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512, help="demo server: token budget")
    ap.add_argument("--threads", type=int, help="demo server: torch intra-op threads (default: torch's)")
    ap.add_argument(
        "--switch-interval", type=float, help="demo server: sys.setswitchinterval, seconds (default 0.005)"
    )
    return ap.parse_args()


def workload(args: argparse.Namespace, plan: Plan, targets: list[Target]) -> Schedule:
    spec = WorkloadSpec(
        num_requests=args.num_requests or plan.num_requests,
        rate=args.rate if args.rate is not None else plan.rate,
        prompt=lognormal(args.prompt_mean or plan.prompt_mean, args.prompt_sigma, 6.0),
        output=lognormal(args.output_mean or plan.output_mean, args.output_sigma, 4.0),
        seed=args.seed,
        vocab_size=args.vocab_size,
        text_prompts=args.text_prompts,
    )
    return build_schedule(spec, targets)


def client_where(args: argparse.Namespace) -> str:
    return "this process's main thread" if args.inline_client else "a child process"


def external_targets(args: argparse.Namespace) -> list[Target]:
    if not args.models:
        raise SystemExit("--base-url needs --models MODEL[=API_KEY] ...")
    targets = []
    for entry in args.models:
        model, _, key = entry.partition("=")
        if not (key or args.api_key):
            raise SystemExit(f"no API key for {model!r}: give MODEL=KEY or --api-key")
        targets.append(Target(model, key or args.api_key))
    return targets


def http_run(args: argparse.Namespace, base_url: str, schedule: Schedule, work: Path) -> RunResult:
    if args.inline_client:
        return asyncio.run(run_http(base_url, schedule, args.temperature, args.client))
    sched, out = work / "schedule.json", work / "records.json"
    schedule.save(sched)
    cmd = [sys.executable, "-m", "benchmarks.loadgen", "--base-url", base_url, "--client", args.client]
    cmd += ["--schedule", str(sched), "--out", str(out), "--temperature", str(args.temperature)]
    subprocess.run(cmd, cwd=REPO, check=True)
    return RunResult.load(out)


def measure(
    name: str,
    run: RunResult,
    slo: SLO,
    before: Snapshot,
    timer: StepTimer,
    mark: int,
    client_process: bool,
) -> Measured:
    threads = times_by_group(before, snapshot())
    # An inline client's CPU is already in the main thread's row.
    threads["client process"] = Times(run.client_cpu_s if client_process else 0.0, 0.0)
    summary = summarize(name, run.records, run.duration_s, slo)
    return Measured(summary, threads, step_stats(timer, mark, run.duration_s))


def compare(args: argparse.Namespace, plan: Plan, server: DemoServer, work: Path) -> float:
    schedule = workload(args, plan, server.targets)
    print_workload(schedule, args, server.targets)
    slo = SLO(args.slo_ttft, args.slo_tpot)
    # Warm up both paths (chains loaded, engine thread started, connections, torch) on a short schedule.
    warm = Schedule(schedule.targets, schedule.requests[: 2 * len(schedule.targets)])
    asyncio.run(run_direct(server.inference, warm, "warmup"))
    http_run(args, server.base_url, warm, work)
    engine = server.inference.engine_for(
        server.inference.load(server.inference.resolve(server.targets[0].tenant, server.targets[0].model))
    )
    timer = StepTimer()
    timer.install(engine)
    runs: dict[str, list[Measured]] = {"direct": [], "http": []}
    repeats = args.repeats or plan.repeats
    rows: list[list[object]] = []
    for rep in range(repeats):
        order = ["direct", "http"] if rep % 2 == 0 else ["http", "direct"]
        for system in order:
            before, mark = snapshot(), timer.mark()
            if system == "direct":
                result = asyncio.run(run_direct(server.inference, schedule, f"r{rep}", args.temperature))
                name = "engine directly"
            else:
                result = http_run(args, server.base_url, schedule, work)
                name = "HTTP API"
            client_process = system == "http" and not args.inline_client
            m = measure(name, result, slo, before, timer, mark, client_process)
            runs[system].append(m)
            rows.append([rep + 1, *summary_row(m.summary)])
            print(f"  repeat {rep + 1} {name}: {m.summary.tokens_per_s:.1f} output tokens/s", flush=True)
    print(f"\n## Every run ({repeats} repeats, alternating which system goes first)")
    print(table(["repeat", *SUMMARY_HEADERS], rows))
    print(f"\n## Median over repeats (goodput SLO: TTFT <= {slo.ttft_s:g}s and TPOT <= {slo.tpot_s:g}s)")
    medians = {k: median_summary(v) for k, v in runs.items()}
    print(table(SUMMARY_HEADERS, [summary_row(medians["direct"]), summary_row(medians["http"])]))
    print_profile(runs["direct"], runs["http"])
    print_micro(server, statistics.fmean(r.output_len for r in schedule.requests))
    tput_http, tput_direct = medians["http"].tokens_per_s, medians["direct"].tokens_per_s
    # Each repeat's two runs are back to back, so their ratio sees the same background load; the
    # median over repeats then drops the repeats that another process disturbed.
    pairs = [1 - h.summary.tokens_per_s / d.summary.tokens_per_s for d, h in zip(*runs.values(), strict=True)]
    overhead = float(statistics.median(pairs))
    print(
        f"\nmedian output tokens/s: HTTP {tput_http:.1f}, engine directly {tput_direct:.1f}"
        f" (1 - ratio of medians = {1 - tput_http / tput_direct:.3f})"
    )
    quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [overhead] * 3
    print(
        f"api_overhead = median over repeats of (1 - tput_http / tput_direct) = {overhead:.3f},"
        f" interquartile range {quartiles[0]:.3f} to {quartiles[2]:.3f}"
        f" (per repeat: {', '.join(f'{p:.3f}' for p in pairs)}; target <= 0.10)"
    )
    print_cpu_estimate(runs["direct"], runs["http"])
    return overhead


def print_cpu_estimate(direct: list[Measured], http: list[Measured]) -> None:
    """Throughput predicted from CPU per token, which background load disturbs far less."""

    def per_token(runs: list[Measured], skip: str = "") -> float:
        return statistics.median(
            sum(t.cpu for k, t in m.threads.items() if k != skip) / m.summary.output_tokens for m in runs
        )

    d, h, h_server = per_token(direct), per_token(http), per_token(http, "client process")
    print(
        f"CPU per output token: engine directly {1000 * d:.3f} ms, HTTP {1000 * h:.3f} ms"
        f" ({1000 * h_server:.3f} ms without the client process). When every CPU is busy, throughput"
        f" goes as 1 / CPU per token: predicted api_overhead {1 - d / h:.3f},"
        f" or {1 - d / h_server:.3f} with the client on another machine"
    )


def median_summary(runs: list[Measured]) -> Summary:
    """Each figure's median over the repeats (so the row need not be any single run)."""
    s = [m.summary for m in runs]

    def med(attr: str) -> float:
        return statistics.median(float(getattr(x, attr)) for x in s)

    duration = med("duration_s")
    return Summary(
        system=s[0].system,
        completed=round(med("completed")),
        failed=round(med("failed")),
        duration_s=duration,
        # So that tokens/s in the table is the median throughput, not a ratio of medians.
        output_tokens=round(statistics.median(x.tokens_per_s for x in s) * duration),
        ttft_p50=med("ttft_p50"),
        ttft_p99=med("ttft_p99"),
        tpot_p50=med("tpot_p50"),
        tpot_p99=med("tpot_p99"),
        itl_p50=med("itl_p50"),
        itl_p99=med("itl_p99"),
        goodput_fraction=med("goodput_fraction"),
        goodput_rps=med("goodput_rps"),
    )


def external(args: argparse.Namespace, plan: Plan) -> None:
    targets = external_targets(args)
    schedule = workload(args, plan, targets)
    print_workload(schedule, args, targets)
    slo = SLO(args.slo_ttft, args.slo_tpot)
    client: ClientKind = "httpx" if args.base_url.startswith("https:") or args.client == "httpx" else "raw"
    result = asyncio.run(run_http(args.base_url, schedule, args.temperature, client))
    try:
        summary = summarize(args.base_url, result.records, result.duration_s, slo)
    except RuntimeError as exc:  # nothing completed: say why, without a traceback
        raise SystemExit(str(exc)) from None
    print(f"\n## {args.base_url} (goodput SLO: TTFT <= {slo.ttft_s:g}s and TPOT <= {slo.tpot_s:g}s)")
    print(table(SUMMARY_HEADERS, [summary_row(summary)]))
    print(f"client CPU: {result.client_cpu_s:.1f}s over {result.duration_s:.1f}s")


def main() -> None:
    args = parse_args()
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    print(
        f"# benchmarks/serving.py{' --quick' if args.quick else ''}\n"
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs,"
        f" load average {os.getloadavg()[0]:.2f}; torch {torch.__version__},"
        f" {args.threads or torch.get_num_threads()} threads; python {platform.python_version()}"
    )
    if args.base_url:
        external(args, plan)
        print(f"\ntotal benchmark time {time.perf_counter() - started:.0f}s")
        print("headline: api_overhead=n/a (no in-process engine to compare with under --base-url)")
        return
    engine: dict[str, object] = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        # Every run repeats the same prompts: a warm prefix cache would favour whichever runs later.
        "enable_prefix_caching": False,
    }
    if args.threads:
        engine["num_threads"] = args.threads
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    print(
        f"server: {uvicorn_impl()}, GIL switch interval {1000 * sys.getswitchinterval():g} ms;"
        f" HTTP client: {args.client}, in {client_where(args)}"
    )
    with tempfile.TemporaryDirectory(prefix="bz-serving-") as tmp, demo_server(engine) as server:
        overhead = compare(args, plan, server, Path(tmp))
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f}s")
    print(
        f"headline: api_overhead={overhead:.3f}" if math.isfinite(overhead) else "headline: api_overhead=nan"
    )


if __name__ == "__main__":
    main()
