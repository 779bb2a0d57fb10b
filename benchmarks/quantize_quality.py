"""Quality of the zoo's 4-bit twins: RTN against GPTQ (plain, act-order, symmetric) on one model.

    .venv/bin/python -m benchmarks.quantize_quality [--model random|smollm2] [--quick] [--workdir DIR]

`--model smollm2` measures the real model instead (see `benchmarks.smollm2_quality`). The default:

A tiny random Llama (hidden 128, 2 layers, intermediate 256, init std 0.05, vocab 512) is registered
as a base and quantized four ways with `Zoo.quantize` (what `blockzoo zoo quantize` runs), each
measured on the built-in calibration prompts: perplexity, mean KL(source || twin) and top-1 agreement.
Prints, last: `headline: gptq_kl_vs_rtn=<mean KL of GPTQ g32 / mean KL of RTN g32>`.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks.report import table
from blockzoo.tiny_models import build_tiny_model
from zoo.block_store import BlockStore
from zoo.catalog.database import open_catalog
from zoo.quantize import QuantizeOptions
from zoo.registry import Zoo

VARIANTS = (
    QuantizeOptions(group_size=32, method="rtn"),
    QuantizeOptions(group_size=32, method="gptq"),
    QuantizeOptions(group_size=32, method="gptq", act_order=True),
    QuantizeOptions(group_size=64, method="gptq", symmetric=True),
)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("random", "smollm2"), default="random")
    parser.add_argument("--quick", action="store_true", help="smollm2: less calibration and evaluation text")
    parser.add_argument("--workdir", type=Path, default=None, help="where the scratch zoo goes")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="smollm2: torch threads (1 by default: on a busy machine GPTQ's many small ops spin-wait "
        "across threads, 17x slower with 2; the figures do not depend on it)",
    )
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        import torch

        from benchmarks.smollm2_quality import FULL, QUICK, run

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            run(Path(tmp), QUICK if args.quick else FULL)
        return
    random_model(args.workdir)


def random_model(workdir: Path | None) -> None:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        base = build_tiny_model(root / "base", "llama", hidden_size=128, intermediate_size=256, init_std=0.05)
        zoo = Zoo(
            open_catalog(f"sqlite:///{root / 'catalog.db'}", auto_migrate=True), BlockStore(root / "store")
        )
        zoo.add_base("base", base)
        rows: list[list[object]] = []
        kl: dict[str, float] = {}
        for options in VARIANTS:
            r = zoo.quantize(None, "base", options)
            kl[options.label] = r.mean_kl
            rows.append(
                [
                    r.quantization,
                    f"{r.quantized_layer_bytes / r.source_layer_bytes:.3f}",
                    f"{r.source_perplexity:.1f} -> {r.quantized_perplexity:.1f}",
                    f"{r.mean_kl:.4f}",
                    f"{r.top1_agreement:.3f}",
                    r.positions,
                ]
            )
    print("# benchmarks/quantize_quality.py: tiny random Llama, built-in calibration prompts")
    headers = ["quantization", "layer bytes vs fp32", "perplexity", "mean KL", "top-1", "positions"]
    print(table(headers, rows))
    print(f"headline: gptq_kl_vs_rtn={kl['w4a16-g32-gptq'] / kl['w4a16-g32-rtn']:.3f}")


if __name__ == "__main__":
    main()
