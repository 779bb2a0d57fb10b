"""Quality of the zoo's 4-bit twins: RTN against GPTQ (plain, act-order, symmetric) on one model.

    .venv/bin/python -m benchmarks.quantize_quality

A tiny random Llama (hidden 128, 2 layers, intermediate 256, init std 0.05, vocab 512) is registered
as a base and quantized four ways with `Zoo.quantize` (what `blockzoo zoo quantize` runs), each
measured on the built-in calibration prompts: perplexity, mean KL(source || twin) and top-1 agreement.
Prints, last: `headline: gptq_kl_vs_rtn=<mean KL of GPTQ g32 / mean KL of RTN g32>`.
"""

from __future__ import annotations

import tempfile
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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
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
