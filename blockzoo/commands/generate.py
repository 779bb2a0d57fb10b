"""`blockzoo generate PATH --prompt TEXT`: print only the completion text on stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from blockzoo.settings import Settings
from runtime.errors import BlockZooError
from runtime.llm import LLM
from runtime.sampling_params import SamplingParams, SamplingParamsError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("generate", help="Generate a completion from a model folder.")
    p.add_argument("path", type=Path, help="Hugging Face checkpoint folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
            ignore_eos=args.ignore_eos,
        )
        llm = LLM(args.path, settings=Settings())
        result = llm.generate([args.prompt], params)[0]
    except (BlockZooError, SamplingParamsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(result.text)
    sys.stdout.flush()
    return 0
