"""`blockzoo demo`: build a small random model if there is none and generate from it offline."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from blockzoo.settings import Settings
from blockzoo.tiny_models import build_tiny_model
from runtime.llm import LLM
from runtime.sampling_params import SamplingParams

_PROMPTS = [
    "The zoo keeps every block once,",
    "Many fine-tunes share one base model",
    "Continuous batching means",
    "Paged KV cache pages",
]


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("demo", help="Offline demo on a small random model.")
    p.add_argument("--max-tokens", type=int, default=24)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings()
    model_dir = Path(settings.data_dir) / "demo" / "base"
    if not (model_dir / "config.json").is_file():
        print(f"building a small random Llama model in {model_dir} ...")
        build_tiny_model(
            model_dir,
            "llama",
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=256,
        )
    llm = LLM(model_dir, settings=settings)
    params = SamplingParams(
        temperature=0.8, top_p=0.95, seed=1234, max_tokens=args.max_tokens, ignore_eos=True
    )
    start = time.perf_counter()
    results = llm.generate(_PROMPTS, params)
    elapsed = time.perf_counter() - start
    for r in results:
        print(f"--- {r.prompt!r}\n{r.text!r}")
    tokens = sum(len(r.token_ids) for r in results)
    print(f"\n{len(results)} requests, {tokens} tokens in {elapsed:.2f}s ({tokens / elapsed:.1f} tok/s)")
    print("The weights are random, so the text is noise; the engine, batching and sampling are real.")
    return 0
