"""SmolLM2-135M-Instruct's 4-bit variants against its fp32 weights, on held-out text.

Run as `benchmarks/quantize_quality.py --model smollm2 [--quick]`. In a scratch zoo:
- `fp32`: the oracle's fp32 folder (`smollm2_hf_dir`, what transformers dequantizes from the GGUF),
  registered with `Zoo.add_base`: the reference every other row is compared with;
- `q4_1 (gguf)`: the GGUF itself through `Zoo.add_base(name, file.gguf)`, whose Q4_1 projections stay
  4-bit blocks with float offsets (a row saying why, if the importer cannot take it);
- RTN and GPTQ twins of the fp32 base at group sizes 32, 64 and 192 (`--quick`: 32), made by the zoo's own quantizer
  (`zoo.variants.quantize_model`, what `blockzoo zoo quantize` runs) with GPTQ calibrated on
  passages of the calibration half of Python's reference documentation (`benchmarks.texts`).
Every model is loaded from the zoo as serving loads it and run by `runtime.trace` (the executor's
own prefill path) over windows of the evaluation half; `benchmarks.text_quality` scores them.
The fp32 row is also checked against transformers on the first window.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.report import table
from benchmarks.text_quality import QualityFigures, evaluate
from benchmarks.texts import calibration_passages, evaluation_windows, pydoc_split
from blockzoo.smollm2 import smollm2_gguf, smollm2_hf_dir
from runtime.chain import Chain
from runtime.checkpoint_loader import load_tokenizer
from runtime.trace import trace
from zoo.block_store import BlockStore
from zoo.catalog.database import open_catalog
from zoo.quantize import QuantizeOptions
from zoo.registry import Zoo
from zoo.variants import quantize_model

FP32, Q4_1 = "fp32", "q4_1"
METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class Sizes:
    """Which group sizes, and how much text: GPTQ's calibration passages and the evaluation windows.

    128 is not among the group sizes: SmolLM2's hidden size 576 is not a multiple of it, and the
    4-bit layout needs every group whole. 64 and 192 (= gcd(576, 1536)) bracket it.
    """

    group_sizes: tuple[int, ...]
    passages: int
    windows: int
    window: int


QUICK = Sizes(group_sizes=(32,), passages=8, windows=2, window=256)
FULL = Sizes(group_sizes=(32, 64, 192), passages=32, windows=8, window=256)


@dataclass
class Row:
    """One model: its chain, its layer bytes, how long it took to make, and a note."""

    chain: Chain | None
    layer_bytes: int
    make_seconds: float
    note: str = ""


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _layer_bytes(zoo: Zoo, name: str) -> int:
    ref = zoo.resolve(None, name)
    return sum(zoo.store.load(e.block_id).tensor_bytes() for e in ref.entries[1:-1])


def _load(zoo: Zoo, name: str) -> Chain:
    return zoo.load_chain(zoo.resolve(None, name), torch.float32)


def _import_gguf(zoo: Zoo) -> Row:
    start = time.perf_counter()
    try:
        zoo.add_base("smollm2-gguf", smollm2_gguf())
    except Exception as exc:  # the importer may not take GGUF files yet: the row says why
        return Row(None, 0, 0.0, f"not measured: add_base(gguf) raised {type(exc).__name__}: {exc}"[:160])
    seconds = time.perf_counter() - start
    return Row(_load(zoo, "smollm2-gguf"), _layer_bytes(zoo, "smollm2-gguf"), seconds)


def _logits(chain: Chain) -> Callable[[list[int]], torch.Tensor]:
    return lambda ids: trace(chain, ids).logits


def _transformers_gap(folder: Path, chain: Chain, window: list[int]) -> float:
    """Largest |logit difference| between transformers and BlockZoo's fp32 chain on one window."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.inference_mode():
        theirs = model(torch.tensor([window])).logits[0].float()
    ours = trace(chain, window).logits.float()
    return float((theirs - ours).abs().max())


def run(root: Path, sizes: Sizes) -> None:
    started = time.perf_counter()
    zoo = Zoo(open_catalog(f"sqlite:///{root / 'catalog.db'}", auto_migrate=True), BlockStore(root / "store"))
    split = pydoc_split()
    passages = calibration_passages(split.calibration, sizes.passages)
    folder = smollm2_hf_dir()
    _log(f"registering the fp32 base from {folder}")
    t = time.perf_counter()
    zoo.add_base(FP32, folder)
    rows: dict[str, Row] = {FP32: Row(_load(zoo, FP32), _layer_bytes(zoo, FP32), time.perf_counter() - t)}
    tokenizer = load_tokenizer(zoo.tokenizer_path(zoo.resolve(None, FP32)))
    windows = evaluation_windows(
        split.evaluation,
        lambda text: [int(i) for i in tokenizer.encode(text, add_special_tokens=False)],
        sizes.window,
        sizes.windows,
    )
    _log("importing the GGUF (Q4_1 blocks)")
    rows[Q4_1] = _import_gguf(zoo)
    for group_size in sizes.group_sizes:
        for method in METHODS:
            options = QuantizeOptions(group_size=group_size, method=method)  # type: ignore[arg-type]
            _log(f"quantizing {options.label} ({len(passages)} calibration passages)")
            report = quantize_model(zoo, None, FP32, options, calibration_texts=passages, measure=False)
            rows[f"{method}_g{group_size}"] = Row(
                _load(zoo, report.model), report.quantized_layer_bytes, report.seconds
            )
    models = {name: _logits(row.chain) for name, row in rows.items() if row.chain is not None}
    _log(f"evaluating {len(models)} models on {len(windows)} windows of {sizes.window} tokens")
    figures = evaluate(models, FP32, windows, lambda d, n: _log(f"  window {d}/{n}"))
    fp32_chain = rows[FP32].chain
    assert fp32_chain is not None
    gap = _transformers_gap(folder, fp32_chain, windows[0])
    print_report(rows, figures, sizes, len(passages), gap, time.perf_counter() - started)


def print_report(
    rows: dict[str, Row],
    figures: dict[str, QualityFigures],
    sizes: Sizes,
    passages: int,
    gap: float,
    seconds: float,
) -> None:
    fp32_bytes = rows[FP32].layer_bytes
    body: list[list[object]] = []
    for name, row in rows.items():
        f = figures.get(name)
        if f is None:
            body.append([name, "-", "-", "-", "-", "-", "-", row.note])
            continue
        body.append(
            [
                name,
                f"{row.layer_bytes / fp32_bytes:.3f}",
                f"{f.perplexity:.3f}",
                f"{f.mean_kl:.4f}",
                f"{f.top1_agreement:.4f}",
                f"{row.make_seconds:.0f}",
                f"{f.seconds:.0f}",
                row.note,
            ]
        )
    positions = next(iter(figures.values())).positions
    print(
        "# benchmarks/quantize_quality.py --model smollm2: SmolLM2-135M-Instruct, held-out text "
        "(Python reference docs, evaluation half)"
    )
    print(
        f"evaluation: {sizes.windows} windows of {sizes.window} tokens, {positions} scored positions; "
        f"GPTQ calibration: {passages} passages of the calibration half (<= 128 tokens each); "
        "KL(fp32 || model), natural log"
    )
    headers = ["model", "layer bytes vs fp32", "perplexity", "mean KL", "top-1", "make s", "eval s", "note"]
    print(table(headers, body))
    print(f"fp32 chain vs transformers on window 0: max |logit difference| = {gap:.2e}")
    verdicts = []
    for g in sizes.group_sizes:
        rtn, gptq = figures.get(f"rtn_g{g}"), figures.get(f"gptq_g{g}")
        if rtn is not None and gptq is not None:
            beat = gptq.perplexity < rtn.perplexity
            verdicts.append(f"gptq_beats_rtn_g{g}={'yes' if beat else 'no'}")
    print(f"whole run {seconds:.0f} s")

    def ppl(name: str) -> str:
        f = figures.get(name)
        return f"{f.perplexity:.3f}" if f is not None and math.isfinite(f.perplexity) else "n/a"

    names = [FP32, Q4_1, *(f"{m}_g{g}" for g in sizes.group_sizes for m in METHODS)]
    print("headline: " + " ".join([*(f"ppl_{n}={ppl(n)}" for n in names), *verdicts]))
