"""How much the zoo saves: 16 LoRA adapters and 5 full fine-tunes of one Llama-shaped base.

    .venv/bin/python -m benchmarks.zoo_dedup [--quick] [--workdir DIR] [--keep]

Every model is registered through `Zoo.register`, from folders, by several tenants. Prints stored,
naive and ideal bytes, registration time per model, and what equivalence substitution and delta
compression save and cost on the slightly changed fine-tune (in a scratch zoo holding only the
base, so the main figures are unaffected). Prints, last, one line:
`headline: dedup_ratio=<naive/stored> overhead_vs_ideal=<stored/ideal>`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.zoo_workload import (
    BASE_NAME,
    ENERGIES,
    TENANTS,
    Variant,
    Workload,
    WorkloadModel,
    WorkloadSpec,
    build_workload,
    ideal_bytes,
    naive_bytes,
    open_zoo,
    variants,
)
from zoo.finetune_plan import FineTuneOptions
from zoo.registry import Zoo
from zoo.reports import RegistrationReport
from zoo.stats import zoo_stats

MiB = 1 << 20
DEDUP_TARGET = 8.0
OVERHEAD_TARGET = 1.02
DEFAULT_MAX_KL = FineTuneOptions().max_kl


class Progress:
    """Log lines on stderr: one per message, and one per quarter of each registration stage."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.model = ""
        self._last: tuple[str, int] = ("", -1)

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)

    def for_model(self, model: str) -> Progress:
        self.model = model
        self._last = ("", -1)
        return self

    def __call__(self, stage: str, fraction: float) -> None:
        quarter = int(fraction * 4)
        if stage != self._last[0] or quarter > self._last[1]:
            self._last = (stage, quarter)
            self.log(f"  {self.model}: {stage} {quarter * 25}%")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, padded so it also reads well in a terminal."""
    cells = [list(headers), *[[str(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    return "\n".join(
        [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])]
    )


def mib(n: int) -> str:
    return f"{n / MiB:,.1f} MiB"


# -- the main zoo --------------------------------------------------------------------------------


def register_all(
    zoo: Zoo, workload: Workload, progress: Progress
) -> list[tuple[WorkloadModel | None, RegistrationReport]]:
    progress.log(f"registering base {BASE_NAME}")
    rows: list[tuple[WorkloadModel | None, RegistrationReport]] = [
        (None, zoo.add_base(BASE_NAME, workload.base, progress.for_model(BASE_NAME)))
    ]
    for i, m in enumerate(workload.models, start=1):
        progress.log(f"registering {i}/{len(workload.models)}: {m.tenant}/{m.name}")
        rows.append((m, zoo.register(m.tenant, m.name, m.folder, progress=progress.for_model(m.name))))
    return rows


def registration_table(rows: list[tuple[WorkloadModel | None, RegistrationReport]]) -> str:
    body = [
        [
            r.model,
            m.kind if m is not None else "base",
            m.tenant if m is not None else "-",
            f"{r.seconds:.2f}",
            f"{r.blocks_new}/{r.blocks_shared}",
            r.deltas_new,
            mib(r.bytes_new),
        ]
        for m, r in rows
    ]
    return table(["model", "kind", "tenant", "seconds", "blocks new/shared", "deltas new", "bytes new"], body)


def stored_breakdown(rows: list[tuple[WorkloadModel | None, RegistrationReport]]) -> str:
    by_kind: dict[str, int] = {}
    for m, r in rows:
        kind = m.kind if m is not None else "base"
        by_kind[kind] = by_kind.get(kind, 0) + r.bytes_new
    total = sum(by_kind.values())
    return ", ".join(f"{k} {mib(v)} ({v / total:.0%})" for k, v in by_kind.items())


# -- substitution and compression on the slightly changed fine-tune ----------------------------


def run_variants(
    root: Path, workload: Workload, progress: Progress
) -> list[tuple[Variant, RegistrationReport]]:
    """Register the slight fine-tune once per variant into a base-only zoo, deleting it after each."""
    slight = next(m for m in workload.models if m.kind == "full-slight")
    zoo = open_zoo(root)
    progress.log("scratch zoo: registering the base")
    zoo.add_base(BASE_NAME, workload.base, progress.for_model(BASE_NAME))
    base_only = zoo_stats(zoo)["stored_bytes"]
    out: list[tuple[Variant, RegistrationReport]] = []
    for i, v in enumerate(variants(), start=1):
        name = f"slight-{i}"
        progress.log(f"scratch zoo: {slight.name} with {v.label}")
        report = zoo.register(
            slight.tenant, name, slight.folder, progress=progress.for_model(name), options=v.options
        )
        out.append((v, report))
        zoo.delete_model(slight.tenant, name)
        zoo.gc()
        left = zoo_stats(zoo)["stored_bytes"]
        if left != base_only:
            raise RuntimeError(f"scratch zoo holds {left} bytes after deleting {name}, expected {base_only}")
    return out


def variants_table(results: list[tuple[Variant, RegistrationReport]]) -> str:
    plain = results[0][1].bytes_new
    body: list[list[object]] = []
    for v, r in results:
        saved = plain - r.bytes_new
        effect = r.effect
        kl = f"{effect['mean_kl']:.2e}" if effect else "0 (exact)"
        top1 = f"{effect['top1_agreement']:.3f}" if effect else "1.000"
        accepted = "yes" if effect is None or effect["mean_kl"] <= DEFAULT_MAX_KL else "no (refused)"
        body.append(
            [
                v.label,
                f"{r.seconds:.1f}",
                ",".join(map(str, r.substituted_layers)) or "-",
                ",".join(map(str, r.compressed_layers)) or "-",
                f"{r.blocks_new}/{r.deltas_new}",
                mib(r.bytes_new),
                f"{mib(saved)} ({saved / plain:.0%})" if plain else "-",
                kl,
                top1,
                accepted,
            ]
        )
    headers = [
        "registration",
        "seconds",
        "substituted",
        "compressed",
        "blocks/deltas new",
        "bytes new",
        "saved vs plain",
        "mean KL",
        "top-1 agree",
        f"within default max_kl {DEFAULT_MAX_KL}",
    ]
    return table(headers, body)


def layers_table(results: list[tuple[Variant, RegistrationReport]], light: list[int]) -> str:
    """Per layer: how far it moved, what substituting it costs locally, and the rank each energy needs."""
    measured = next(r for _, r in results if r.layers)
    ranks: dict[float, dict[int, str]] = {}
    for v, r in results:
        if v.options.compress_delta and v.options.substitute_within is None:
            ranks[v.options.delta_energy] = {
                row["layer"]: _rank_cell(row) for row in r.layers if "compression" in row
            }
    body = [
        [
            row["layer"],
            "light" if row["layer"] in light else "ordinary",
            f"{row['rel_frobenius']:.4f}",
            f"{row['rel_output_error']:.4f}",
            *(ranks.get(e, {}).get(row["layer"], "-") for e in ENERGIES),
        ]
        for row in measured.layers
    ]
    headers = [
        "layer",
        "change",
        "rel. weight change",
        "rel_output_error",
        *(f"rank @ {e}" for e in ENERGIES),
    ]
    return table(headers, body)


def _rank_cell(row: dict[str, object]) -> str:
    compression = row["compression"]
    if not isinstance(compression, dict):
        return "-"
    ranks = compression["ranks"]
    top = max(ranks.values()) if ranks else 0
    return f"{top}" if compression["compressible"] else f"{top} (kept dense)"


# -- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 12 (same 16+4+1 models)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (a fresh subfolder)")
    parser.add_argument("--keep", action="store_true", help="keep the built checkpoints and zoos")
    args = parser.parse_args(argv)
    spec = WorkloadSpec(num_layers=4) if args.quick else WorkloadSpec()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="zoo-dedup-", dir=args.workdir))
    progress = Progress()
    progress.log(f"workdir {root}")
    try:
        run(root, spec, progress)
    finally:
        if args.keep:
            progress.log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run(root: Path, spec: WorkloadSpec, progress: Progress) -> None:
    start = time.perf_counter()
    workload = build_workload(root / "checkpoints", spec, progress.log)
    zoo = open_zoo(root / "zoo")
    rows = register_all(zoo, workload, progress)
    stats = zoo_stats(zoo)
    progress.log("hashing every tensor of the full checkpoints for the ideal")
    distinct, adapters = ideal_bytes(workload)
    own_naive = naive_bytes(workload)
    results = run_variants(root / "scratch-zoo", workload, progress)
    total = time.perf_counter() - start

    stored, naive = int(stats["stored_bytes"]), int(stats["naive_bytes"])
    ideal = distinct + adapters
    ratio, overhead = naive / stored, stored / ideal
    print(
        f"# Zoo deduplication: Llama base, hidden {spec.hidden_size}, {spec.num_layers} layers, "
        f"intermediate {spec.intermediate_size}, vocab {spec.vocab_size}, untied head"
    )
    print(
        f"checkpoints: bf16 (base, fine-tunes and LoRA adapters); 16 LoRA adapters (ranks 8/16/32/64 x "
        f"{{q,v}}, {{q,k,v,o}}, all-linear, MLP), 4 full fine-tunes of the top {spec.top_layers} layers, "
        f"1 full fine-tune that changed every layer slightly; {len(TENANTS)} tenants"
    )
    print(f"slight fine-tune: {spec.slight_description()}")
    print()
    print("## Bytes")
    print(
        table(
            ["figure", "bytes", "MiB", "how"],
            [
                ["stored", stored, mib(stored), "zoo_stats stored_bytes: block + delta files on disk"],
                ["naive (zoo)", naive, mib(naive), "zoo_stats naive_bytes: each model's chain, tensor bytes"],
                [
                    "naive (own)",
                    own_naive,
                    mib(own_naive),
                    "22 checkpoints' safetensors files, LoRA = base + adapter",
                ],
                ["ideal", ideal, mib(ideal), "each distinct tensor once + adapters' tensor bytes"],
                [
                    "  distinct tensors",
                    distinct,
                    mib(distinct),
                    "sha256 of every tensor of the 6 full checkpoints",
                ],
                ["  adapters", adapters, mib(adapters), "16 adapters' tensors"],
            ],
        )
    )
    print(
        f"dedup ratio naive/stored = {ratio:.2f} (own naive: {own_naive / stored:.2f}); "
        f"overhead stored/ideal = {overhead:.4f}"
    )
    # peft upcasts bf16 adapters to fp32 by default (autocast_adapter_dtype=True): twice the adapter bytes.
    fp32_ratio = (naive + adapters) / (stored + adapters)
    print("where the stored bytes go: " + stored_breakdown(rows))
    print(f"with fp32 adapters (peft's default upcast) the ratio would be about {fp32_ratio:.2f}")
    print()
    print("## Registration (main zoo)")
    print(registration_table(rows))
    print()
    print("## Substitution and compression on full-slight (scratch zoo with only the base)")
    print(variants_table(results))
    print()
    print(layers_table(results, spec.light_layers))
    print()
    print(f"workload build {workload.build_seconds:.0f} s; whole run {total:.0f} s")
    met = ratio >= DEDUP_TARGET and overhead <= OVERHEAD_TARGET
    print(
        f"targets: dedup_ratio >= {DEDUP_TARGET} and overhead_vs_ideal <= {OVERHEAD_TARGET}: "
        + ("met" if met else "MISSED")
    )
    print(f"headline: dedup_ratio={ratio:.2f} overhead_vs_ideal={overhead:.4f}")


if __name__ == "__main__":
    main()
