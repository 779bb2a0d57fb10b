"""`blockzoo zoo add-base|register|quantize|list|delete|stats|gc`: the block zoo from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select
from tqdm import tqdm

from blockzoo.settings import Settings
from blockzoo.zoo_factory import open_zoo
from runtime.errors import BlockZooError
from zoo.calibration import CalibrationError, load_calibration_file
from zoo.catalog.models import Model, Tenant
from zoo.chat_template import ChatTemplateError, templates_in_folder, validate_template
from zoo.finetune_plan import FineTuneOptions
from zoo.quantize import METHODS, QuantizeOptions
from zoo.reports import RegistrationReport
from zoo.stats import zoo_stats


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser("zoo", help="Register, list, delete and collect blocks.")
    actions = p.add_subparsers(dest="zoo_command", required=True)

    base = actions.add_parser(
        "add-base", help="Register a shared base model from a checkpoint folder or a GGUF file."
    )
    base.add_argument("name")
    base.add_argument("path", type=Path)

    reg = actions.add_parser("register", help="Register a tenant's full fine-tune or PEFT LoRA adapter.")
    reg.add_argument("--tenant", required=True)
    reg.add_argument("--name", required=True)
    reg.add_argument("path", type=Path)
    reg.add_argument("--base", default=None, help="base model name (default: detected by name or shapes)")
    reg.add_argument(
        "--substitute-within",
        type=float,
        default=None,
        metavar="TOL",
        help="replace layers whose output differs from the base's by at most TOL (relative) by the base block",
    )
    reg.add_argument(
        "--compress-delta", action="store_true", help="store changed layers as base + low-rank delta"
    )
    reg.add_argument("--delta-energy", type=float, default=0.99, help="SVD energy a compressed delta keeps")
    reg.add_argument(
        "--max-kl", type=float, default=0.05, help="refuse if mean KL vs the original exceeds this"
    )
    reg.add_argument("--min-top1", type=float, default=0.0, help="refuse if top-1 agreement falls below this")
    reg.add_argument("--evaluate", action="store_true", help="measure every layer against the base")
    reg.add_argument("--calibration", type=Path, default=None, help="file of calibration prompts")
    for action in (base, reg):
        action.add_argument(
            "--dequantize",
            action="store_true",
            help="GGUF: store every tensor dense in fp32 instead of importing Q4_0/Q4_1 as 4-bit blocks",
        )

    quant = actions.add_parser(
        "quantize", help="Register a 4-bit twin of a model (RTN or GPTQ) and report its quality."
    )
    quant.add_argument("model")
    quant.add_argument("--tenant", default=None, help="the model's owner (default: a shared base)")
    quant.add_argument("--bits", type=int, default=4, help="bits per weight (4)")
    quant.add_argument("--group-size", type=int, default=128, help="inputs sharing one scale")
    quant.add_argument("--method", choices=METHODS, default="rtn", help="rtn, or gptq (uses calibration)")
    quant.add_argument("--symmetric", action="store_true", help="zero point fixed at 8 (no stored zeros)")
    quant.add_argument("--act-order", action="store_true", help="GPTQ: quantize high-activation inputs first")
    quant.add_argument("--name", default=None, help="the new model's name (default: MODEL-<quantization>)")
    quant.add_argument("--calibration", type=Path, default=None, help="file of calibration prompts")

    listing = actions.add_parser("list", help="List models.")
    listing.add_argument("--tenant", default=None)
    delete = actions.add_parser("delete", help="Delete a model (a base only when no fine-tune uses it).")
    delete.add_argument("name")
    delete.add_argument("--tenant", default=None)
    actions.add_parser("stats", help="Stored bytes against storing every model whole.")
    actions.add_parser("gc", help="Remove block files no model references.")
    for action in (base, reg, quant, listing, delete, actions.choices["stats"], actions.choices["gc"]):
        action.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.set_defaults(handler=run)


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[str, float], None]]:
    bar = tqdm(
        total=100, disable=not enabled, file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}|"
    )
    try:

        def update(stage: str, fraction: float) -> None:
            bar.set_description_str(stage)
            bar.n = int(fraction * 100)
            bar.refresh()

        yield update
    finally:
        bar.close()


def _print_report(report: RegistrationReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), default=str))
        return
    print(report.table())
    for row in report.layers:
        action = row.get("action", "kept" if not row["identical"] else "shared")
        print(
            f"  layer {row['layer']:3d}  {action:11s}  rel_frobenius={row['rel_frobenius']:.3g}  "
            f"rel_output_error={row['rel_output_error']:.3g}  cosine={row['cosine']:.6f}"
        )


def run(args: argparse.Namespace) -> int:
    settings = Settings()
    try:
        zoo = open_zoo(settings)
        return _dispatch(zoo, args)
    except (BlockZooError, CalibrationError, ValueError) as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _check_chat_templates(folder: Path) -> None:
    """The same template checks as a registration through the API: a tenant's template is data that
    the server renders later, so a bomb is refused here rather than at its first chat request."""
    for name, source in templates_in_folder(folder):
        if source is None:
            raise ValueError(f"{name} is not UTF-8 text")
        try:
            validate_template(source)
        except ChatTemplateError as exc:
            raise ValueError(f"{name}: {exc}") from None


def _dispatch(zoo: Any, args: argparse.Namespace) -> int:
    command = args.zoo_command
    if command == "add-base":
        with _progress_bar(not args.json) as progress:
            report = zoo.add_base(args.name, args.path, progress=progress, dequantize=args.dequantize)
        _print_report(report, args.json)
    elif command == "register":
        _check_chat_templates(Path(args.path))
        calibration = tuple(load_calibration_file(args.calibration)) if args.calibration else None
        options = FineTuneOptions(
            substitute_within=args.substitute_within,
            compress_delta=args.compress_delta,
            delta_energy=args.delta_energy,
            max_kl=args.max_kl,
            min_top1=args.min_top1,
            calibration_texts=calibration,
            evaluate=args.evaluate,
        )
        with _progress_bar(not args.json) as progress:
            report = zoo.register(
                args.tenant,
                args.name,
                args.path,
                base=args.base,
                progress=progress,
                options=options,
                dequantize=args.dequantize,
            )
        _print_report(report, args.json)
    elif command == "quantize":
        quantize_options = QuantizeOptions(
            bits=args.bits,
            group_size=args.group_size,
            method=args.method,
            symmetric=args.symmetric,
            act_order=args.act_order,
        )
        texts = tuple(load_calibration_file(args.calibration)) if args.calibration else None
        with _progress_bar(not args.json) as progress:
            result = zoo.quantize(
                args.tenant, args.model, quantize_options, args.name, texts, progress=progress
            )
        print(json.dumps(result.to_dict()) if args.json else result.table())
    elif command == "list":
        rows = _list_models(zoo, args.tenant)
        print(
            json.dumps(rows)
            if args.json
            else "\n".join(f"{r['tenant'] or '-':12s} {r['kind']:5s} {r['name']}" for r in rows)
        )
    elif command == "delete":
        zoo.delete_model(args.tenant, args.name)
        print(json.dumps({"deleted": args.name}) if args.json else f"deleted {args.name}")
    elif command == "stats":
        stats = zoo_stats(zoo)
        print(json.dumps(stats) if args.json else "\n".join(f"{k}: {v}" for k, v in stats.items()))
    elif command == "gc":
        result = zoo.gc()
        print(json.dumps(result._asdict()) if args.json else str(result))
    return 0


def _list_models(zoo: Any, tenant: str | None) -> list[dict[str, Any]]:
    with zoo.sessions() as session:
        query = select(Model, Tenant.name).outerjoin(Tenant, Model.tenant_id == Tenant.id).order_by(Model.id)
        if tenant is not None:
            query = query.where(Tenant.name == tenant)
        return [
            {
                "name": m.name,
                "tenant": t,
                "kind": m.kind.value,
                "status": m.status.value,
                "naive_bytes": m.naive_bytes,
            }
            for m, t in session.execute(query).all()
        ]
