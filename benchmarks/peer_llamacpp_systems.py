"""The two servers of the llama.cpp side-by-side benchmark, each in a child process on the same GGUF.

llama.cpp: its own `llama-server` (built by `benchmarks.llamacpp_build`), continuous batching with one
parallel slot per concurrent stream. BlockZoo: `blockzoo serve` (started as the load benchmark starts
it) over a zoo holding the GGUF twice, imported as its own Q4_1 4-bit blocks and dequantized to fp32.
Both get the same number of compute threads.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
from transformers.utils import logging as transformers_logging

from benchmarks.load_server import ServerProcess, wait_ready
from benchmarks.serving_server import GENEROUS
from blockzoo.settings import Settings
from blockzoo.zoo_factory import open_zoo
from zoo.catalog.database import factory_engine
from zoo.catalog.tenants import create_tenant

Q4_MODEL = "smollm2-q4"
F32_MODEL = "smollm2-f32"
TENANT = "bench"
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class PeerConfig:
    """What llama-server is told: threads for decode and for prompt batches, parallel slots (one per
    concurrent stream, all decoded in one continuous batch) and the context each slot holds."""

    threads: int
    slots: int
    ctx_per_slot: int

    @property
    def ctx_total(self) -> int:
        # llama-server splits -c among its slots (or shares it when the KV cache is unified), so the
        # total is what makes every slot's context at least ctx_per_slot either way.
        return self.slots * self.ctx_per_slot


def llama_server_command(binary: Path, gguf: Path, port: int, peer: PeerConfig) -> list[str]:
    return [
        str(binary),
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        str(peer.threads),
        "--threads-batch",
        str(peer.threads),
        "--ctx-size",
        str(peer.ctx_total),
        "--parallel",
        str(peer.slots),
        "--cont-batching",
        "--n-gpu-layers",
        "0",
        "--no-webui",
    ]


def blockzoo_env(threads: int, max_num_seqs: int) -> dict[str, str]:
    """BlockZoo's settings for the run: the same thread count as the peer, and room for every stream."""
    return {"BLOCKZOO_NUM_THREADS": str(threads), "BLOCKZOO_MAX_NUM_SEQS": str(max_num_seqs)}


def prepare_zoo(data_dir: Path, gguf: Path) -> str:
    """Register the GGUF as both BlockZoo systems' bases and create the benchmark's tenant (quotas far
    above the load); returns its API key. In this process: the CLI would import torch twice more."""
    transformers_logging.disable_progress_bar()
    zoo = open_zoo(Settings(data_dir=data_dir, log_level="WARNING"))
    try:
        zoo.add_base(Q4_MODEL, gguf)
        zoo.add_base(F32_MODEL, gguf, dequantize=True)
        with zoo.sessions() as session, session.begin():
            _, key = create_tenant(session, TENANT, GENEROUS)
    finally:
        factory_engine(zoo.sessions).dispose()
    return key


def start_llama_server(command: list[str], log_path: Path, port: int) -> ServerProcess:
    """Start llama-server and wait until /health says the model is loaded."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    return wait_ready(server, "/health", "llama-server", READY_TIMEOUT_S)


def tokenize(server_url: str, text: str) -> list[int]:
    """Token ids of `text` from llama-server's /tokenize (no special tokens): both systems share the
    GGUF's vocabulary, so these ids mean the same prompt to each."""
    resp = httpx.post(server_url + "/tokenize", json={"content": text}, timeout=120)
    resp.raise_for_status()
    return [int(t) for t in resp.json()["tokens"]]


def chat_answer(base_url: str, model: str, api_key: str, question: str, max_tokens: int) -> str:
    """One greedy chat answer, to show that each system serves the same model (not timed)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    resp = httpx.post(
        base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}"}, timeout=300
    )
    resp.raise_for_status()
    return str(resp.json()["choices"][0]["message"]["content"])
