"""Equivalence substitution and delta compression on the demo's real partial fine-tune of SmolLM2.

    .venv/bin/python -m benchmarks.finetune_compression [--quick] [--threads N] [--base-storage demo|fp32|q4_1]

The fine-tune is `bob-json` from `blockzoo/demo_assets/` (SmolLM2-135M-Instruct with its top layer
trained to answer as `{"answer": ...}`), registered the way `make serve` registers it: written into a
copy of the base GGUF (`blockzoo.demo_gguf`) and registered against the GGUF base, both stored as
the demo stores them (`blockzoo.demo_zoo.DEQUANTIZE`: fp32; `--base-storage q4_1` keeps the GGUF's
Q4_1 blocks). In a scratch zoo it is registered once plainly and once per setting of
`--substitute-within` and `--compress-delta` (the KL bound lifted so every setting is measured, not
refused; a column says what the default bound does). For each registration it prints which layers
were substituted by the base's block (with the output error the check accepted) or stored as base
plus a low-rank delta (or why not), the bytes it stored, the registration's own KL and top-1 (on the
built-in calibration prompts), and then, loading each registered chain as serving does, its mean KL,
top-1 agreement and perplexity against the plain fine-tune on held-out text (`benchmarks.texts`) and
on chat prompts the fine-tune was not trained on, and whether its greedy answers stay the same.
Prints, last: `headline: substituted_kl=<..> compressed=<layers or none> ...`.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from benchmarks.report import table
from benchmarks.text_quality import QualityFigures, evaluate
from benchmarks.texts import evaluation_windows, pydoc_split
from benchmarks.zoo_dedup import mib
from blockzoo.demo_gguf import compose_finetune_gguf
from blockzoo.demo_zoo import DEQUANTIZE
from blockzoo.settings import Settings
from blockzoo.smollm2 import smollm2_gguf
from runtime.blocks import LayerBlock
from runtime.chain import Chain
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.linear import cast_floating
from runtime.llm import LLM
from runtime.sampling_params import SamplingParams
from runtime.trace import trace
from zoo.block_store import BlockStore
from zoo.catalog.database import open_catalog
from zoo.catalog.tenants import create_tenant
from zoo.delta_compress import compress_layer
from zoo.deltas import layer_lora, make_delta
from zoo.finetune_plan import FineTuneOptions
from zoo.registry import Zoo
from zoo.reports import RegistrationReport

ASSET = Path(__file__).resolve().parents[1] / "blockzoo" / "demo_assets" / "bob-json" / "layers.safetensors"
BASE, TENANT, PLAIN = "smollm2", "bob", "plain"
DEFAULT_MAX_KL = FineTuneOptions().max_kl
# Questions in the style of the demo's, none of them among its training examples.
QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What gas do plants take in from the air?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water at sea level in Celsius?",
    "Which planet is known as the Red Planet?",
    "What is the largest ocean on Earth?",
    "How many days are in a leap year?",
)


@dataclass(frozen=True)
class Sizes:
    """Held-out text windows, chat questions, and greedy answer length."""

    windows: int
    window: int
    questions: int
    answer_tokens: int


QUICK = Sizes(windows=2, window=256, questions=3, answer_tokens=12)
FULL = Sizes(windows=6, window=256, questions=8, answer_tokens=16)
ANALYSIS_ENERGIES = (0.99, 0.9, 0.5)


def settings() -> list[tuple[str, FineTuneOptions]]:
    """Each registration: its flags as the CLI spells them, and the options they make."""
    lifted = math.inf
    out = [
        (f"--substitute-within {t}", FineTuneOptions(substitute_within=t, max_kl=lifted))
        for t in (0.01, 0.1, 1.0)
    ]
    out += [
        (
            f"--compress-delta --delta-energy {e}",
            FineTuneOptions(compress_delta=True, delta_energy=e, max_kl=lifted),
        )
        for e in (0.99, 0.9, 0.5)
    ]
    return out


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _greedy(
    chain: Chain, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], count: int
) -> list[list[int]]:
    """Greedy answers from the engine itself (continuous batching, paged KV), as serving runs them."""
    engine = LLMEngine(chain, tokenizer, Settings(kv_cache_memory=64 << 20))
    params = SamplingParams(temperature=0.0, max_tokens=count, ignore_eos=True)
    return [r.token_ids for r in LLM(engine=engine).generate(prompts, params)]


def _logits(chain: Chain) -> Callable[[list[int]], torch.Tensor]:
    return lambda ids: trace(chain, ids).logits


NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def delta_with_norms(zoo: Zoo, tuned: Chain, layer: int, energy: float) -> tuple[Chain, int, str]:
    """What the zoo cannot register yet: the base's block plus a low-rank delta *and the trained norms*.

    `compress_layer` keeps a layer dense when anything but its projections changed, and this
    fine-tune trained its norms too. Here the projections alone are compressed, the layer runs as
    the base's (4-bit) block with the fine-tune's norms swapped in and the delta on top, and its
    bytes are the factors plus the two norm vectors. Returns the chain, those bytes, and the ranks.
    """
    base_block = zoo.store.load(zoo.resolve(None, BASE).entries[layer + 1].block_id)
    tuned_block = zoo.store.load(zoo.resolve(TENANT, PLAIN).entries[layer + 1].block_id)
    strip = lambda t: {k: v for k, v in t.items() if k not in NORMS}  # noqa: E731
    result = compress_layer(strip(base_block.tensors), strip(tuned_block.tensors), energy)
    if not result.compressible:
        raise RuntimeError(f"projections alone are not compressible either: {result.reason}")
    tensors = {**base_block.tensors, **{k: tuned_block.tensors[k] for k in NORMS}}
    layers = list(tuned.layers)
    layers[layer] = LayerBlock(cast_floating(tensors, tuned.dtype), tuned.config, where=f"layer {layer}")
    deltas = [tuned.delta_for(i) for i in range(tuned.num_layers)]
    deltas[layer] = layer_lora([make_delta("lowrank", result.projections)], tuned.dtype)
    chain = Chain(
        tuned.config, tuned.embed, layers, tuned.head, tuned.rotary, tuned.dtype, b"analysis", deltas
    )
    norm_bytes = sum(tuned_block.tensors[k].nbytes for k in NORMS)
    ranks = sorted({r.rank for r in result.reports.values()})
    return chain, result.delta_bytes + norm_bytes, f"ranks {ranks[0]}-{ranks[-1]}"


def _open_zoo(root: Path) -> Zoo:
    zoo = Zoo(open_catalog(f"sqlite:///{root / 'catalog.db'}", auto_migrate=True), BlockStore(root / "store"))
    with zoo.sessions() as session, session.begin():
        create_tenant(session, TENANT)
    return zoo


@dataclass
class Measured:
    """One model against the plain fine-tune: a registration, or an analysis chain (no report)."""

    label: str
    report: RegistrationReport | None
    bytes_stored: int
    compressed: str = "-"
    text: QualityFigures | None = None
    chat: QualityFigures | None = None
    same_answers: int = 0


def _registered(label: str, report: RegistrationReport) -> Measured:
    compressed = ",".join(map(str, report.compressed_layers)) or "-"
    return Measured(label, report, report.bytes_beyond_base, compressed)


def run(root: Path, sizes: Sizes, dequantize: bool) -> None:
    started = time.perf_counter()
    zoo = _open_zoo(root)
    base_gguf = smollm2_gguf()
    _log(f"registering the GGUF base ({'fp32' if dequantize else 'Q4_1 blocks'})")
    zoo.add_base(BASE, base_gguf, dequantize=dequantize)
    layers = load_file(str(ASSET))
    trained = sorted({int(k.split(".")[2]) for k in layers})
    composed = compose_finetune_gguf(base_gguf, layers, root / "bob-json.gguf")
    _log(f"registering the fine-tune plainly (trained layers {trained}), measuring every layer")
    plain = zoo.register(
        TENANT, PLAIN, composed, base=BASE, options=FineTuneOptions(evaluate=True), dequantize=dequantize
    )
    rows = [_registered(PLAIN, plain)]
    for i, (label, options) in enumerate(settings()):
        _log(f"registering with {label}")
        report = zoo.register(TENANT, f"v{i}", composed, base=BASE, options=options, dequantize=dequantize)
        rows.append(_registered(label, report))
    chains = {
        m.label: zoo.load_chain(zoo.resolve(TENANT, m.report.model), torch.float32) for m in rows if m.report
    }
    for energy in ANALYSIS_ENERGIES:
        label = f"analysis: delta @ {energy} + trained norms"
        chain, stored, ranks = delta_with_norms(zoo, chains[PLAIN], trained[-1], energy)
        chains[label] = chain
        rows.append(Measured(label, None, stored, f"{trained[-1]} ({ranks})"))

    tokenizer = load_tokenizer(zoo.tokenizer_path(zoo.resolve(TENANT, PLAIN)))
    windows = evaluation_windows(
        pydoc_split().evaluation,
        lambda text: [int(t) for t in tokenizer.encode(text, add_special_tokens=False)],
        sizes.window,
        sizes.windows,
    )
    chat = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in QUESTIONS[: sizes.questions]
    ]
    prompts = [[int(t) for t in tokenizer.encode(str(text), add_special_tokens=False)] for text in chat]
    _log(f"greedy answers of {len(chains)} models to {len(prompts)} questions")
    answers = {label: _greedy(c, tokenizer, prompts, sizes.answer_tokens) for label, c in chains.items()}
    # Chat windows: each question with the fine-tune's own answer, so KL covers the answers it gives.
    chat_windows = [p + a for p, a in zip(prompts, answers[PLAIN], strict=True)]
    models = {label: _logits(c) for label, c in chains.items()}
    _log(f"evaluating on {len(windows)} held-out windows and {len(chat_windows)} chat windows")
    on_text = evaluate(models, PLAIN, windows)
    on_chat = evaluate(models, PLAIN, chat_windows)
    for m in rows:
        m.text, m.chat = on_text[m.label], on_chat[m.label]
        m.same_answers = sum(a == b for a, b in zip(answers[m.label], answers[PLAIN], strict=True))
    sample = str(tokenizer.decode(answers[PLAIN][0])).split("<|im_end|>")[0]
    storage = "fp32 (dequantized)" if dequantize else "Q4_1 blocks"
    print_report(rows, plain, trained, sizes, len(prompts), sample, storage, time.perf_counter() - started)


def _layer_cell(report: RegistrationReport) -> str:
    cells = []
    for row in report.layers:
        if row.get("identical"):
            continue
        cell = f"L{row['layer']}: output error {row['rel_output_error']:.3g} (of the update {row['rel_update_error']:.3g})"
        compression = row.get("compression")
        if isinstance(compression, dict):
            if compression["compressible"]:
                ratio = compression["delta_bytes"] / max(compression["dense_bytes"], 1)
                cell += f"; delta {ratio:.3f}x of dense"
            else:
                cell += f"; kept dense: {compression['reason'][:100]}"
        cells.append(cell)
    return "; ".join(cells) or "-"


def print_report(
    rows: list[Measured],
    plain: RegistrationReport,
    trained: list[int],
    sizes: Sizes,
    questions: int,
    sample: str,
    storage: str,
    seconds: float,
) -> None:
    print(
        "# benchmarks/finetune_compression.py: the demo's partial fine-tune bob-json on SmolLM2-135M-Instruct"
    )
    print(
        f"fine-tune: layers {trained} trained (every tensor), shipped fp16, composed into the base GGUF; "
        f"base and fine-tune registered from GGUF as {storage}. Held-out text: {sizes.windows} windows of "
        f"{sizes.window} tokens (Python docs, evaluation half); chat: {questions} unseen questions with "
        f"the fine-tune's {sizes.answer_tokens}-token greedy answer (e.g. {sample!r}). KL(fine-tune || model)."
    )
    print(f"plain registration stores {mib(plain.bytes_beyond_base)} beyond the base; {_layer_cell(plain)}")
    body: list[list[object]] = []
    for m in rows:
        r = m.report
        effect = r.effect if r is not None else None
        if r is None:
            within = "n/a (not registrable)"
        else:
            within = "yes" if effect is None or effect["mean_kl"] <= DEFAULT_MAX_KL else "no (refused)"
        assert m.text is not None and m.chat is not None
        body.append(
            [
                m.label,
                (",".join(map(str, r.substituted_layers)) or "-") if r is not None else "-",
                m.compressed,
                mib(m.bytes_stored),
                f"{m.bytes_stored / max(plain.bytes_beyond_base, 1):.3f}",
                f"{effect['mean_kl']:.3g} / {effect['top1_agreement']:.3f}" if effect else "-",
                within,
                f"{m.text.mean_kl:.4f} / {m.text.top1_agreement:.3f} / {m.text.perplexity:.2f}",
                f"{m.chat.mean_kl:.4f} / {m.chat.top1_agreement:.3f} / {m.chat.perplexity:.3f}",
                f"{m.same_answers}/{questions}",
            ]
        )
    headers = [
        "registration",
        "substituted",
        "compressed",
        "bytes beyond base",
        "vs plain",
        "registration KL / top-1",
        f"within max_kl {DEFAULT_MAX_KL}",
        "held-out KL / top-1 / ppl",
        "chat KL / top-1 / ppl",
        "same greedy answers",
    ]
    print(table(headers, body))
    for m in rows[1:]:
        if m.report is not None and any("compression" in row for row in m.report.layers):
            print(f"{m.label}: {_layer_cell(m.report)}")
    print(f"whole run {seconds:.0f} s")
    sub = next((m for m in rows if m.report is not None and m.report.substituted_layers), None)
    comp = next((m for m in rows if m.compressed != "-"), None)
    parts = [f"plain_bytes={plain.bytes_beyond_base}"]
    if sub is not None and sub.chat is not None:
        parts.append(f"substituted_chat_kl={sub.chat.mean_kl:.4f}")
    if comp is not None and comp.chat is not None:
        kind = "registered" if comp.report is not None else "analysis"
        parts.append(
            f"compressed_{kind}_bytes_ratio={comp.bytes_stored / max(plain.bytes_beyond_base, 1):.3f} "
            f"compressed_{kind}_chat_kl={comp.chat.mean_kl:.4f}"
        )
    print("headline: " + " ".join(parts))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="less text, fewer questions")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (figures do not depend on it)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the scratch zoo goes")
    parser.add_argument(
        "--base-storage",
        choices=("demo", "fp32", "q4_1"),
        default="demo",
        help="how base and fine-tune are stored: as the demo does (blockzoo.demo_zoo.DEQUANTIZE), "
        "fp32, or the GGUF's Q4_1 blocks",
    )
    args = parser.parse_args(argv)
    dequantize = DEQUANTIZE if args.base_storage == "demo" else args.base_storage == "fp32"
    torch.set_num_threads(args.threads)
    if not ASSET.is_file():
        raise SystemExit(
            f"{ASSET} is missing: the demo's partial fine-tune (scripts/train_demo_finetunes.py)"
        )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        run(Path(tmp), QUICK if args.quick else FULL, dequantize)


if __name__ == "__main__":
    main()
