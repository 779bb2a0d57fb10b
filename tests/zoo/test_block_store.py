"""The block store: atomic writes, dedup, zero-copy loads, corruption checks, gc, deltas, tokenizers."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from blockzoo.tiny_models import TinyModelCache
from runtime.checkpoint_loader import load_tokenizer
from runtime.errors import MissingFileError
from zoo.block_store import BlockStore, CorruptBlockError, MissingBlockError
from zoo.blocks import BlockData, DeltaData, InvalidContentError


def make_layer(seed: int) -> BlockData:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "self_attn.q_proj.weight": torch.randn(32, 32, generator=g),
        "mlp.down_proj.weight": torch.randn(32, 64, generator=g).to(torch.bfloat16),
        "input_layernorm.weight": torch.ones(32),
    }
    return BlockData(kind="layer", tensors=tensors, fields={"family": "llama", "hidden_size": 32})


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def header_offsets(path: Path) -> dict[str, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def test_put_load_roundtrip_is_a_zero_copy_view_of_the_file(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    block = make_layer(0)
    result = store.put(block)
    assert result.created and result.block_id == block.block_id
    path = tmp_path / "blocks" / block.block_id[:2] / f"{block.block_id}.safetensors"
    assert files_under(tmp_path) == [path]
    assert result.nbytes == path.stat().st_size == store.nbytes(block.block_id)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "layer" and meta["block_id"] == block.block_id
    assert json.loads(meta["fields"]) == block.fields

    loaded = store.load(block.block_id, verify=True)
    assert loaded.kind == "layer" and loaded.fields == block.fields and loaded.block_id == block.block_id
    assert loaded.tensors.keys() == block.tensors.keys()
    for name, t in block.tensors.items():
        assert loaded.tensors[name].dtype == t.dtype and torch.equal(loaded.tensors[name], t), name
    # Views of one mapping sit as far apart in memory as their data sits in the file.
    offsets = header_offsets(path)
    a, b = "self_attn.q_proj.weight", "mlp.down_proj.weight"
    assert loaded.tensors[a].data_ptr() - loaded.tensors[b].data_ptr() == offsets[a] - offsets[b]


def test_duplicate_put_writes_nothing(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    first = store.put(make_layer(0))
    path = store.path(first.block_id)
    before = path.stat()
    time.sleep(0.01)
    again = store.put(make_layer(0))  # equal content, other tensor objects
    assert again == first._replace(created=False)
    after = path.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert files_under(tmp_path) == [path]


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    shared = torch.ones(4)
    block = BlockData(kind="layer", tensors={"a": shared, "b": shared}, fields={})  # safetensors refuses
    with pytest.raises(RuntimeError, match="share memory"):
        store.put(block)
    assert files_under(tmp_path) == []
    assert not store.has(block.block_id)


def test_dtype_the_runtime_cannot_read_is_refused_before_publishing(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    block = BlockData(kind="layer", tensors={"w": torch.ones(2, dtype=torch.complex64)}, fields={})
    with pytest.raises(InvalidContentError, match="cannot be read back"):
        store.put(block)
    assert files_under(tmp_path) == []


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


def test_verify_catches_a_flipped_byte(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    block_id = store.put(make_layer(0)).block_id
    flip_last_byte(store.path(block_id))
    store.load(block_id)  # without verify only the structure is checked
    with pytest.raises(CorruptBlockError, match=f"not to its id {block_id}"):
        store.load(block_id, verify=True)


def test_truncated_block_is_a_clear_error_and_put_repairs_it(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    block = make_layer(0)
    path = store.path(store.put(block).block_id)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptBlockError, match=rf"{block.block_id}.*truncated"):
        store.load(block.block_id)
    assert store.put(block).created
    assert store.load(block.block_id, verify=True).block_id == block.block_id


def test_file_under_a_wrong_id_is_refused(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    a, b = make_layer(0), make_layer(1)
    store.put(a)
    store.path(b.block_id).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(store.path(a.block_id), store.path(b.block_id))
    with pytest.raises(CorruptBlockError, match="metadata names"):
        store.load(b.block_id)


def test_missing_and_malformed_ids(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    absent = make_layer(0).block_id
    with pytest.raises(MissingBlockError, match=absent):
        store.load(absent)
    with pytest.raises(MissingBlockError):
        store.nbytes(absent)
    assert not store.has(absent) and not store.delete(absent)
    with pytest.raises(InvalidContentError):
        store.load("../../etc/passwd")


def test_list_delete_and_stored_bytes(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    ids = [store.put(make_layer(i)).block_id for i in range(3)]
    assert store.list_ids() == set(ids)
    assert store.stored_bytes() == sum(p.stat().st_size for p in files_under(tmp_path))
    assert store.delete(ids[0])
    assert store.list_ids() == set(ids[1:]) and not store.path(ids[0]).exists()


def make_delta(seed: int) -> DeltaData:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "q_proj.lora_A": torch.randn(4, 32, generator=g),
        "q_proj.lora_B": torch.randn(32, 4, generator=g),
    }
    return DeltaData(kind="lora", tensors=tensors, fields={"rank": 4, "scaling": 2.0})


def test_deltas_live_in_their_own_namespace(tmp_path: Path) -> None:
    store = BlockStore(tmp_path)
    delta = make_delta(0)
    result = store.put(delta)
    assert result.created and result.block_id == delta.delta_id
    assert store.path(delta.delta_id, "deltas").is_file()
    assert store.list_ids("deltas") == {delta.delta_id} and store.list_ids() == set()
    loaded = store.load_delta(delta.delta_id, verify=True)
    assert loaded.kind == "lora" and loaded.fields == {"rank": 4, "scaling": 2.0}
    assert torch.equal(loaded.tensors["q_proj.lora_B"], delta.tensors["q_proj.lora_B"])
    with pytest.raises(MissingBlockError):
        store.load(delta.delta_id)
    assert not store.put(make_delta(0)).created


def age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_gc_removes_unreferenced_and_stale_temp_files(tmp_path: Path) -> None:
    store = BlockStore(tmp_path, temp_grace_s=60)
    keep, drop1, drop2 = (store.put(make_layer(i)).block_id for i in range(3))
    delta_id = store.put(make_delta(0)).block_id
    folder = store.path(keep).parent
    crashed = folder / f".{keep}.deadbeef.tmp"  # what a write killed before its rename leaves
    crashed.write_bytes(store.path(keep).read_bytes()[:50])
    age(crashed, 3600)
    in_flight = folder / f".{drop1}.cafe.tmp"
    in_flight.write_bytes(b"x" * 10)
    expected_freed = sum(p.stat().st_size for p in (store.path(drop1), store.path(drop2), crashed))

    report = store.gc({keep})

    assert report.removed_blocks == 2 and report.removed_temp_files == 1
    assert report.freed_bytes == expected_freed
    assert store.list_ids() == {keep}
    assert not crashed.exists() and in_flight.exists()  # a young temp file may be a write in progress
    assert store.load(keep, verify=True).block_id == keep
    assert store.has(delta_id, "deltas")  # deltas are collected only when their references are given
    report = store.gc({keep}, referenced_deltas=set())
    assert report.removed_deltas == 1 and not store.has(delta_id, "deltas")


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory: TinyModelCache) -> Path:
    return tiny_model_factory("llama")


def test_tokenizer_roundtrip_and_dedup(tmp_path: Path, model_dir: Path) -> None:
    store = BlockStore(tmp_path / "store")
    tid = store.put_tokenizer(model_dir)
    folder = store.tokenizer_path(tid)
    assert {p.name for p in folder.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    assert not any(p.suffix == ".safetensors" for p in folder.iterdir())
    ours, original = load_tokenizer(folder), load_tokenizer(model_dir)
    text = "Hello zoo! <|im_start|>user\nWhat is two plus two?<|im_end|>"
    assert ours.encode(text) == original.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(
        messages, tokenize=False
    )

    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    (copy / "model.safetensors").unlink()  # weights are not part of a tokenizer's identity
    assert store.put_tokenizer(copy) == tid
    assert store.list_tokenizer_ids() == {tid}
    assert not [p for p in (tmp_path / "store" / "tokenizers").iterdir() if p.name.startswith(".")]
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    other = store.put_tokenizer(copy)
    assert other != tid and store.list_tokenizer_ids() == {tid, other}

    assert store.gc(set()).removed_tokenizers == 0  # not collected without a referenced set
    report = store.gc(set(), referenced_tokenizers={tid})
    assert report.removed_tokenizers == 1 and store.list_tokenizer_ids() == {tid}


def test_tokenizer_gc_removes_stale_temp_dirs_and_missing_tokenizer_is_named(tmp_path: Path) -> None:
    store = BlockStore(tmp_path, temp_grace_s=60)
    stale = tmp_path / "tokenizers" / ".abc.tmp"
    stale.mkdir(parents=True)
    (stale / "tokenizer.json").write_text("{")
    age(stale, 3600)
    assert store.gc(set()).removed_temp_files == 1 and not stale.exists()
    with pytest.raises(MissingFileError, match="tokenizer"):
        store.put_tokenizer(tmp_path)
