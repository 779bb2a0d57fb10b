"""Registering bases, full fine-tunes and adapters: exact dedup, reports, ref counts, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import func, select
from transformers import AutoModelForCausalLM

from blockzoo.tiny_models import TinyModelCache
from runtime.errors import BlockZooError
from runtime.executor import ModelExecutor
from runtime.kv_tensors import KVTensors
from runtime.request import Request
from runtime.sampling_params import SamplingParams
from runtime.scheduler_output import ScheduledChunk, SchedulerOutput
from tests.zoo.test_lora_oracle import make_adapter
from tests.zoo.zoo_helpers import add_tenant, fine_tune_top_layers, open_zoo, store_files
from zoo.catalog.models import Block, ChainEntryDelta, Delta, Model
from zoo.catalog.models import ChainEntry as ChainEntryRow
from zoo.errors import (
    DuplicateNameError,
    InvalidNameError,
    NotFoundError,
    ShapeMismatchError,
    UnknownBaseError,
)
from zoo.registry import Zoo


@pytest.fixture(scope="module")
def base_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama", num_layers=4)


@pytest.fixture
def zoo(tmp_path: Path, base_dir: Path) -> Zoo:
    z = open_zoo(tmp_path / "zoo")
    z.add_base("tiny-llama", base_dir)
    add_tenant(z, "acme")
    add_tenant(z, "globex")
    return z


def logits_of(zoo: Zoo, tenant: str | None, name: str, prompt: list[int]) -> torch.Tensor:
    chain = zoo.load_chain(zoo.resolve(tenant, name), torch.float32, verify=True)
    request = Request("r", prompt, SamplingParams(temperature=0))
    request.page_table = [0]
    kv = KVTensors(chain.config, 2, 16, torch.float32)
    out = ModelExecutor(chain, kv).execute(
        SchedulerOutput([ScheduledChunk(request, len(prompt), True)], [], 0)
    )
    return out.logits[0]


def check_ref_counts(zoo: Zoo) -> None:
    with zoo.sessions() as s:
        for block in s.scalars(select(Block)):
            uses = s.scalar(
                select(func.count()).select_from(ChainEntryRow).where(ChainEntryRow.block_id == block.id)
            )
            assert block.ref_count == uses, block.id
        for delta in s.scalars(select(Delta)):
            uses = s.scalar(
                select(func.count()).select_from(ChainEntryDelta).where(ChainEntryDelta.delta_id == delta.id)
            )
            assert delta.ref_count == uses, delta.id


def test_full_fine_tune_dedups_exactly_and_serves_its_weights(
    zoo: Zoo, base_dir: Path, tmp_path: Path
) -> None:
    ft = fine_tune_top_layers(base_dir, tmp_path / "ft", layers=[3], seed=1)
    report = zoo.register("acme", "top1", ft)
    assert (report.blocks_total, report.blocks_shared, report.blocks_new) == (6, 5, 1)
    assert report.base == "tiny-llama" and report.kind == "full"
    assert 0 < report.bytes_new < report.naive_bytes
    # The served logits are the fine-tune's, not the base's.
    prompt = [1, 5, 9, 200, 31]
    from runtime.checkpoint_loader import load_checkpoint

    direct = load_checkpoint(ft)
    request = Request("r", prompt, SamplingParams(temperature=0))
    request.page_table = [0]
    expected = (
        ModelExecutor(direct, KVTensors(direct.config, 2, 16, torch.float32))
        .execute(SchedulerOutput([ScheduledChunk(request, len(prompt), True)], [], 0))
        .logits[0]
    )
    served = logits_of(zoo, "acme", "top1", prompt)
    assert torch.allclose(served, expected, atol=1e-5, rtol=0)
    # And the independent oracle: transformers running the original folder.
    hf = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32).eval()
    with torch.no_grad():
        oracle = hf(torch.tensor([prompt])).logits[0, -1]
    assert torch.allclose(served, oracle, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits_of(zoo, None, "tiny-llama", prompt), expected)
    check_ref_counts(zoo)


def test_dedup_ignores_sharding_and_tensor_order(zoo: Zoo, base_dir: Path, tmp_path: Path) -> None:
    reordered = tmp_path / "reordered"
    shutil.copytree(base_dir, reordered)
    tensors = load_file(str(reordered / "model.safetensors"))
    (reordered / "model.safetensors").unlink()
    names = sorted(tensors, reverse=True)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, str(reordered / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[half:]}, str(reordered / "model-00002-of-00002.safetensors"))
    before = store_files(zoo)
    report = zoo.register("acme", "same-as-base", reordered)
    assert report.blocks_new == 0 and report.blocks_shared == 6 and report.bytes_new == 0
    # Only the catalog changed: no block file was written.
    assert {f for f in store_files(zoo) if f.startswith("blocks")} == {
        f for f in before if f.startswith("blocks")
    }


def test_adapter_registers_on_base_and_deletes_cleanly(zoo: Zoo, base_dir: Path, tmp_path: Path) -> None:
    folder = make_adapter(
        base_dir, tmp_path / "ad", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}, 3
    )
    before = store_files(zoo)
    report = zoo.register("globex", "qlora", folder)
    assert report.kind == "lora" and report.base == "tiny-llama"
    assert report.blocks_new == 0 and report.deltas_new == 4
    check_ref_counts(zoo)
    zoo.delete_model("globex", "qlora")
    check_ref_counts(zoo)
    zoo.gc()
    assert store_files(zoo) == before


def test_tenants_cannot_see_each_others_models(zoo: Zoo, base_dir: Path, tmp_path: Path) -> None:
    zoo.register("acme", "mine", fine_tune_top_layers(base_dir, tmp_path / "ft", layers=[2], seed=2))
    assert zoo.resolve("acme", "mine").name == "mine"
    with pytest.raises(NotFoundError):
        zoo.resolve("globex", "mine")
    with pytest.raises(NotFoundError):
        zoo.delete_model("globex", "mine")
    # Both see the shared base.
    assert zoo.resolve("globex", "tiny-llama").kind == "base"


def _corrupt(base_dir: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "corrupt"
    shutil.copytree(base_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 100])
    return bad


def _wrong_shape(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama", num_layers=4, intermediate_size=96)


def _unknown_base_adapter(tiny_model_factory: TinyModelCache, tmp_path: Path) -> Path:
    other = tiny_model_factory("qwen3", hidden_size=32, num_heads=2, num_kv_heads=1)
    folder = make_adapter(other, tmp_path / "other-ad", {"r": 2, "target_modules": ["v_proj"]}, 4)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some/unregistered-model"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def _dora(base_dir: Path, tmp_path: Path) -> Path:
    return make_adapter(
        base_dir, tmp_path / "dora", {"r": 2, "target_modules": ["q_proj"], "use_dora": True}, 5
    )


@pytest.mark.parametrize(
    "case",
    ["corrupt", "truncated-header", "wrong-shape", "unknown-base", "duplicate", "traversal", "empty", "dora"],
)
def test_bad_input_is_refused_and_leaves_nothing(
    case: str, zoo: Zoo, base_dir: Path, tmp_path: Path, tiny_model_factory: TinyModelCache
) -> None:
    zoo.register("acme", "taken", fine_tune_top_layers(base_dir, tmp_path / "ok", layers=[1], seed=9))
    name = "new-model"
    if case == "corrupt":
        folder = _corrupt(base_dir, tmp_path)
    elif case == "truncated-header":
        folder = tmp_path / "hdr"
        shutil.copytree(base_dir, folder)
        (folder / "model.safetensors").write_bytes(b"\x00\x01")
    elif case == "wrong-shape":
        folder = _wrong_shape(tiny_model_factory)
    elif case == "unknown-base":
        folder = _unknown_base_adapter(tiny_model_factory, tmp_path)
    elif case == "duplicate":
        folder, name = fine_tune_top_layers(base_dir, tmp_path / "dup", layers=[0], seed=8), "taken"
    elif case == "traversal":
        folder, name = fine_tune_top_layers(base_dir, tmp_path / "tr", layers=[0], seed=8), "../../etc/passwd"
    elif case == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
    else:
        folder = _dora(base_dir, tmp_path)
    files_before = store_files(zoo)
    with zoo.sessions() as s:
        models_before = s.scalar(select(func.count()).select_from(Model))
        blocks_before = s.scalar(select(func.count()).select_from(Block))
    expected = {
        "duplicate": DuplicateNameError,
        "traversal": InvalidNameError,
        "unknown-base": UnknownBaseError,
        "wrong-shape": (ShapeMismatchError, UnknownBaseError),
    }.get(case, BlockZooError)
    with pytest.raises(expected) as info:
        zoo.register("acme", name, folder)
    assert str(info.value)  # a message that says what is wrong
    assert store_files(zoo) == files_before
    with zoo.sessions() as s:
        assert s.scalar(select(func.count()).select_from(Model)) == models_before
        assert s.scalar(select(func.count()).select_from(Block)) == blocks_before
    check_ref_counts(zoo)


def test_wrong_shape_against_named_base_is_a_shape_error(
    zoo: Zoo, tiny_model_factory: TinyModelCache
) -> None:
    with pytest.raises(ShapeMismatchError, match="intermediate_size"):
        zoo.register("acme", "x", _wrong_shape(tiny_model_factory), base="tiny-llama")
