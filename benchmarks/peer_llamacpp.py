"""BlockZoo against llama.cpp's own llama-server, on the same GGUF, the same threads and the same load.

    .venv/bin/python -m benchmarks.peer_llamacpp [--quick] [--threads N] [--repeats K]

The peer is llama-server built from the llama.cpp sources vendored in the llama-cpp-python sdist
(`scripts/build_llama_server.sh`; built and cached on first use), serving SmolLM2-135M-Instruct.Q4_1.gguf
with continuous batching and one parallel slot per stream. BlockZoo serves the same file twice in one
`blockzoo serve`: imported as its own 4-bit Q4_1 blocks, and dequantized to fp32. Both get
`--threads` compute threads (default BLOCKZOO_NUM_THREADS, else this machine's cores).

One load generator (`benchmarks.loadgen`, in a child process) drives every system over streamed
/v1/completions with the same prompts (windows of Python's own reference text, as token ids) and
greedy decoding of exactly max_tokens tokens: 1 stream, then 16 and 64 at once. Each repeat runs
every scenario on every system in turn, in a rotating order, so background load drifts over all.

Prints the table and, last, `headline: single_vs_llamacpp=… c16_vs_llamacpp=… c64_vs_llamacpp=…`
(BlockZoo's 4-bit blocks over llama-server: decode tok/s at 1 stream, aggregate tok/s at 16 and 64).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics

from benchmarks.llamacpp_build import LLAMA_CPP_PYTHON_VERSION, ensure_llama_server, peer_dir
from benchmarks.load_server import ServerProcess
from benchmarks.load_server import start as start_blockzoo
from benchmarks.peer_llamacpp_figures import (
    FULL,
    QUICK,
    SCENARIOS,
    TABLE_HEADERS,
    Plan,
    RunFigures,
    burst,
    headline,
    median_figures,
    prompt_windows,
    ratios,
    run_figures,
    table_row,
)
from benchmarks.peer_llamacpp_systems import (
    F32_MODEL,
    Q4_MODEL,
    PeerConfig,
    blockzoo_env,
    chat_answer,
    llama_server_command,
    prepare_zoo,
    start_llama_server,
    tokenize,
)
from benchmarks.report import table
from benchmarks.serving import http_run
from benchmarks.serving_workload import Target
from blockzoo.settings import Settings
from blockzoo.smollm2 import smollm2_gguf

PEER = "llama.cpp llama-server (Q4_1)"
BZ_Q4 = "BlockZoo, GGUF Q4_1 blocks"
BZ_F32 = "BlockZoo, fp32 dequantized"
QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class System:
    """One system under test: its name in the table, the OpenAI base URL and the target to send."""

    name: str
    base_url: str
    target: Target


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter prompts and outputs (within ~10 minutes)")
    ap.add_argument(
        "--threads", type=int, help="compute threads of both servers (default: BlockZoo's setting)"
    )
    ap.add_argument("--repeats", type=int, help="runs of every scenario on every system")
    ap.add_argument("--prompt-len", type=int, help="prompt tokens per stream")
    ap.add_argument("--max-tokens", type=int, help="output tokens per stream")
    return ap.parse_args()


def default_threads() -> int:
    """BlockZoo's own setting (BLOCKZOO_NUM_THREADS) when given, else the machine's cores."""
    return Settings().num_threads or os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reference_text() -> str:
    """Python's reference documentation (pydoc_data): real English with code, the same on every machine."""
    return "\n\n".join(topics[key] for key in sorted(topics))


def measure(
    systems: list[System], plan: Plan, ids: list[int], work: Path
) -> dict[str, dict[int, RunFigures]]:
    """Every scenario on every system, `plan.repeats` times; the median figures per system and scenario."""
    args = argparse.Namespace(inline_client=False, client="raw", temperature=0.0)
    runs: dict[str, dict[int, list[RunFigures]]] = {s.name: {n: [] for n in SCENARIOS} for s in systems}
    next_prompt = len(SCENARIOS) * 64  # the first windows went to the warm-up
    for rep in range(plan.repeats):
        order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
        for streams in SCENARIOS:
            prompts = prompt_windows(ids, plan.prompt_len, streams, next_prompt)
            next_prompt += streams
            for system in order:
                run = http_run(args, system.base_url, burst(system.target, prompts, plan.max_tokens), work)
                fig = run_figures(run, plan.max_tokens)
                runs[system.name][streams].append(fig)
                print(
                    f"  repeat {rep + 1}/{plan.repeats} {streams:2d} streams {system.name:32s}"
                    f" {fig.decode_tok_s if streams == 1 else fig.aggregate_tok_s:7.1f} tok/s"
                    f" TTFT p50 {1000 * fig.ttft_p50_s:7.0f} ms failed {fig.failed}",
                    flush=True,
                )
    return {name: {n: median_figures(r) for n, r in per.items()} for name, per in runs.items()}


def warm_up(systems: list[System], plan: Plan, ids: list[int], work: Path) -> None:
    """A short burst per system, so that loading and first-call costs are not measured."""
    args = argparse.Namespace(inline_client=False, client="raw", temperature=0.0)
    prompts = prompt_windows(ids, plan.prompt_len, 16, 0)
    for system in systems:
        http_run(args, system.base_url, burst(system.target, prompts, 8), work)


def print_setup(binary: Path, peer: PeerConfig, command: list[str], plan: Plan, gguf: Path) -> None:
    build = peer_dir() / "build_seconds.txt"
    built = f", built here in {build.read_text().strip()} s" if build.exists() else ""
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores,"
        f" 1-min load average {os.getloadavg()[0]:.2f}; model {gguf.name}"
    )
    print(f"peer: llama.cpp from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist{built}: {binary}")
    print(f"peer command: {' '.join(command)}")
    print(
        f"threads: {peer.threads} on both sides (BLOCKZOO_NUM_THREADS={peer.threads}, --threads {peer.threads})"
    )
    print(
        f"workload: {plan.prompt_len}-token prompts (pydoc text, token ids), exactly {plan.max_tokens} greedy"
        f" output tokens per stream (ignore_eos); 1, 16 and 64 streams at once; median of {plan.repeats}"
    )


def report(figs: dict[str, dict[int, RunFigures]], prefix_hits: float) -> None:
    print()
    print(table(TABLE_HEADERS, [table_row(name, f) for name, f in figs.items()]))
    rows = []
    for name in (BZ_Q4, BZ_F32):
        r = ratios(figs[name], figs[PEER])
        rows.append([f"{name} / llama.cpp", r[1], r[16], r[64]])
    print()
    print(table(["ratio (higher: BlockZoo faster)", "1 stream decode", "16 streams", "64 streams"], rows))
    print(
        f"BlockZoo prefix-cache hits during the run: {prefix_hits:.0f} tokens (0 expected: every prompt is new)"
    )
    print(headline(ratios(figs[BZ_Q4], figs[PEER])))


def main() -> None:
    args = parse_args()
    base = QUICK if args.quick else FULL
    plan = Plan(
        args.prompt_len or base.prompt_len, args.max_tokens or base.max_tokens, args.repeats or base.repeats
    )
    threads = args.threads or default_threads()
    peer = PeerConfig(
        threads=threads, slots=max(SCENARIOS), ctx_per_slot=plan.prompt_len + plan.max_tokens + 64
    )
    started = time.monotonic()
    binary = ensure_llama_server()
    gguf = smollm2_gguf()
    with tempfile.TemporaryDirectory(prefix="bz-peer-llamacpp-") as tmp:
        work = Path(tmp)
        key = prepare_zoo(work / "data", gguf)
        port = free_port()
        command = llama_server_command(binary, gguf, port, peer)
        print_setup(binary, peer, command, plan, gguf)
        servers: list[ServerProcess] = []
        try:
            servers.append(start_llama_server(command, work / "llama-server.log", port))
            bz_env = blockzoo_env(threads, max(SCENARIOS))
            servers.append(start_blockzoo(work / "data", free_port(), bz_env))
            llama_url, bz_url = servers[0].url + "/v1", servers[1].url + "/v1"
            systems = [
                System(PEER, llama_url, Target("smollm2", "none")),
                System(BZ_Q4, bz_url, Target(Q4_MODEL, key)),
                System(BZ_F32, bz_url, Target(F32_MODEL, key)),
            ]
            for s in systems:
                answer = chat_answer(s.base_url, s.target.model, s.target.api_key, QUESTION, 16)
                print(f"{s.name}: {QUESTION!r} -> {answer!r}")
            ids = tokenize(servers[0].url, reference_text())
            print(f"setup (build or cache, import, start): {time.monotonic() - started:.0f} s", flush=True)
            warm_up(systems, plan, ids, work)
            figs = measure(systems, plan, ids, work)
            hits = servers[1].metrics().get("blockzoo:prefix_cache_hits_total", 0.0)
        finally:
            for server in servers:
                server.stop(timeout_s=30)
    print(
        f"total: {time.monotonic() - started:.0f} s; 1-min load average at the end {os.getloadavg()[0]:.2f}"
    )
    report(figs, hits)


if __name__ == "__main__":
    main()
