"""Several models in one step through one shared `BlockResidency`, as the server runs them.

Four models of one base: the base, two LoRA adapters (deltas on every layer) and a full fine-tune
of the top layer. Their chains are loaded into one residency, so a block they share is one object
and the executor runs it once on all of their rows (BlockLLM's per-block batching). The test counts
the calls of each block, checks which rows each adapter's delta is given, and checks every model's
tokens against that model served alone.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from blockzoo.settings import Settings
from blockzoo.tiny_models import TinyModelCache
from runtime.chain import Chain
from runtime.checkpoint_loader import load_tokenizer
from runtime.engine import LLMEngine
from runtime.executor import BatchInputs
from runtime.lora import DeltaGroups
from runtime.residency import BlockResidency
from runtime.row_ranges import Rows
from runtime.sampling_params import SamplingParams
from runtime.scheduler_output import SchedulerOutput
from tests.runtime.engine_helpers import finish_all
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import add_tenant, fine_tune_top_layers, open_zoo
from zoo.catalog.database import factory_engine
from zoo.registry import Zoo

MODELS = ("base", "lora-a", "lora-b", "ft")
PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = {
    "base": [5, 17, 33, 90, 41, 7, 300, 12],
    "lora-a": [8, 61, 140, 22, 9],
    "lora-b": [77, 3, 250, 19, 44, 18, 6],
    "ft": [31, 205, 11, 64, 99, 2],
}


class Zooed(NamedTuple):
    zoo: Zoo
    base_dir: Path


@pytest.fixture(scope="module")
def zooed(tmp_path_factory: pytest.TempPathFactory, tiny_model_factory: TinyModelCache) -> Any:
    root = tmp_path_factory.mktemp("cross-model")
    base_dir = tiny_model_factory("llama", num_layers=2)
    zoo = open_zoo(root / "zoo")
    zoo.add_base("base", base_dir)
    add_tenant(zoo, "acme")
    zoo.register(
        "acme",
        "lora-a",
        make_adapter(base_dir, root / "a", {"r": 4, "target_modules": ["q_proj", "v_proj"]}, 1),
    )
    zoo.register(
        "acme",
        "lora-b",
        make_adapter(base_dir, root / "b", {"r": 8, "target_modules": ["q_proj", "o_proj"]}, 2),
    )
    zoo.register("acme", "ft", fine_tune_top_layers(base_dir, root / "ft", layers=[1], seed=3))
    yield Zooed(zoo, base_dir)
    factory_engine(zoo.sessions).dispose()


def load(zooed: Zooed, residency: BlockResidency | None) -> dict[str, Chain]:
    zoo = zooed.zoo
    return {m: zoo.load_chain(zoo.resolve("acme", m), torch.float32, residency=residency) for m in MODELS}


def settings() -> Settings:
    return Settings(kv_cache_memory=8 << 20, page_size=8, per_block_batching=True)


def row_set(rows: Rows, n: int) -> set[int]:
    if rows is None:
        return set(range(n))
    if isinstance(rows, slice):
        return set(range(rows.start, rows.stop))
    return set(rows.tolist())


class Recorder:
    """Counts every block call of a step and the rows each adapter's delta is handed."""

    def __init__(self) -> None:
        self.calls: Counter[tuple[str, int]] = Counter()  # (what, id(block)) → calls
        self.rows: dict[tuple[str, int], int] = defaultdict(int)  # (what, id(block)) → rows run
        # Per layer block and projection group: id(adapter) → the rows (positions in x) it got.
        self.delta_rows: dict[tuple[int, int], list[set[int]]] = defaultdict(list)

    def wrap(self, what: str, block: Any, method: str) -> None:
        real = getattr(block, method)

        def counted(x: torch.Tensor, *args: Any) -> Any:
            self.calls[what, id(block)] += 1
            self.rows[what, id(block)] += x.shape[0]
            deltas = args[-1] if args else None
            if isinstance(deltas, DeltaGroups) and method == "project_qkv":
                for lora, rows in deltas.segments:
                    self.delta_rows[id(block), id(lora)].append(row_set(rows, x.shape[0]))
            return real(x, *args)

        setattr(block, method, counted)

    def reset(self) -> None:
        self.calls.clear()
        self.rows.clear()
        self.delta_rows.clear()


def test_shared_blocks_run_once_and_adapters_reach_only_their_rows(zooed: Zooed) -> None:
    # Each model alone, on its own engine and its own blocks: the reference tokens.
    alone: dict[str, list[int]] = {}
    tokenizer = load_tokenizer(zooed.base_dir)
    for model, chain in load(zooed, None).items():
        engine = LLMEngine(chain, tokenizer, settings())
        engine.add_request(PROMPTS[model], PARAMS, request_id=model)
        alone.update(finish_all(engine))

    residency = BlockResidency(None, prefetch=False)
    chains = load(zooed, residency)
    base = chains["base"]
    # One object per distinct block: the four models share the embed, layer 0 and the head; the
    # adapters also share layer 1 with the base, and the fine-tune has a layer 1 of its own.
    assert len({id(c.embed) for c in chains.values()}) == 1
    assert len({id(c.layers[0]) for c in chains.values()}) == 1
    assert len({id(c.head) for c in chains.values()}) == 1
    assert {id(chains[m].layers[1]) for m in ("base", "lora-a", "lora-b")} == {id(base.layers[1])}
    assert id(chains["ft"].layers[1]) != id(base.layers[1])
    assert chains["lora-a"].delta_for(0) is not None and chains["lora-b"].delta_for(1) is not None

    rec = Recorder()
    rec.wrap("embed", base.embed, "forward")
    rec.wrap("head", base.head, "forward")
    layer_blocks = {"layer0": base.layers[0], "layer1": base.layers[1], "ft-layer1": chains["ft"].layers[1]}
    for name, block in layer_blocks.items():
        rec.wrap(name, block, "project_qkv")
        rec.wrap(name, block, "finish")

    engine = LLMEngine(base, tokenizer, settings())
    prepared: list[BatchInputs] = []
    real_prepare = engine.executor.prepare

    def recording_prepare(output: SchedulerOutput) -> BatchInputs:
        prepared.append(real_prepare(output))
        return prepared[-1]

    engine.executor.prepare = recording_prepare  # type: ignore[method-assign]
    for model in MODELS:
        engine.add_request(PROMPTS[model], PARAMS, request_id=model, chain=chains[model], model=model)

    def rows_of(batch: BatchInputs) -> dict[str, set[int]]:
        """Each model's rows in the step's batch."""
        name = {id(c): m for m, c in chains.items()}
        out: dict[str, set[int]] = defaultdict(set)
        for chain, start, end in batch.segments:
            out[name[id(chain)]] |= set(range(start, end))
        return out

    for step in ("prefill", "decode"):
        rec.reset()
        outputs = engine.step()
        assert len(outputs) == len(MODELS)  # all four models in this one step
        rows = rows_of(prepared[-1])
        total = sum(len(r) for r in rows.values())
        assert total == (sum(len(p) for p in PROMPTS.values()) if step == "prefill" else len(MODELS))
        ft_rows = len(rows["ft"])
        # Each shared block ran once, on the rows of every model that uses it.
        assert rec.calls == {
            ("embed", id(base.embed)): 1,
            ("head", id(base.head)): 1,
            ("layer0", id(base.layers[0])): 2,  # project_qkv and finish
            ("layer1", id(base.layers[1])): 2,
            ("ft-layer1", id(chains["ft"].layers[1])): 2,
        }, step
        assert rec.rows["embed", id(base.embed)] == total
        assert rec.rows["layer0", id(base.layers[0])] == 2 * total
        assert rec.rows["layer1", id(base.layers[1])] == 2 * (total - ft_rows)
        assert rec.rows["ft-layer1", id(chains["ft"].layers[1])] == 2 * ft_rows
        # Each adapter's delta reached exactly its own model's rows. Layer 0 ran on every row, so
        # positions in its input are rows of the batch.
        for model in ("lora-a", "lora-b"):
            lora = chains[model].delta_for(0)
            assert rec.delta_rows[id(base.layers[0]), id(lora)] == [rows[model]], (step, model)
        # Layer 1's shared block ran on the rows of base, lora-a and lora-b only, in batch order.
        layer1_rows = sorted(rows["base"] | rows["lora-a"] | rows["lora-b"])
        for model in ("lora-a", "lora-b"):
            lora = chains[model].delta_for(1)
            got = rec.delta_rows[id(base.layers[1]), id(lora)]
            assert [{layer1_rows[i] for i in s} for s in got] == [rows[model]], (step, model)
        assert not [k for k in rec.delta_rows if k[0] == id(chains["ft"].layers[1])]

    served = finish_all(engine)
    assert served == alone
    residency.shutdown()
