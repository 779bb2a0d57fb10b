"""Hostile and broken GGUF files get a clear RegistrationError (the CLI a clear message and exit 2),
and leave nothing behind: no block files, no tokenizer, no catalog rows.

Each bad file is a good tiny llama file with a few bytes changed where the header says something
(a length, a count, a dim, a type) or cut short, or a file written with something unsupported.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType
from sqlalchemy import func, select

from blockzoo.cli import main as cli_main
from tests.zoo.gguf_files import LAYER_TYPES, TinySpec, write_tiny_gguf
from tests.zoo.zoo_helpers import add_tenant, open_zoo, store_files
from zoo.catalog.models import BaseModel, Block, Model
from zoo.errors import RegistrationError
from zoo.registry import Zoo

BOMB = "{% set s = 'x' * 400000000 %}{{ s }}"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("good") / "good.gguf", TinySpec("llama")).read_bytes()


def _string_at(data: bytes, text: str) -> int:
    """Offset of the u64 length that precedes the GGUF string `text` (its first occurrence)."""
    raw = text.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw)
    return at


def _after_key(data: bytes, key: str) -> int:
    """Offset of the value type (u32) that follows the metadata key `key`."""
    return _string_at(data, key) + 8 + len(key.encode())


def _patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, offset, value)
    return bytes(out)


def _tensor_info(data: bytes, name: str) -> int:
    """Offset of the rank (u32) in the tensor info of `name`."""
    return _after_key(data, name)


MUTATIONS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated in the tensor data": (lambda d: d[: len(d) * 2 // 3], "truncated or lies"),
    "truncated in the header": (lambda d: d[:300], "truncated"),
    "not gguf at all": (lambda d: b"GGUF" + b"\x00" * 3, "truncated"),
    "unknown architecture": (
        lambda d: d.replace(struct.pack("<Q", 5) + b"llama", struct.pack("<Q", 5) + b"mamba", 1),
        "architecture 'mamba' is not supported",
    ),
    "tensor count lies": (lambda d: _patch(d, 8, "Q", 1 << 40), "tensors, over the limit"),
    "string length lies": (
        lambda d: _patch(d, _after_key(d, "tokenizer.chat_template") + 4, "Q", 1 << 50),
        "over the limit",
    ),
    "string runs past the end": (
        lambda d: _patch(d, _after_key(d, "tokenizer.chat_template") + 4, "Q", 900_000),
        "runs past the end",
    ),
    "array length lies": (
        lambda d: _patch(d, _after_key(d, "tokenizer.ggml.tokens") + 8, "Q", 1 << 45),
        "items, over the limit",
    ),
    "dims lie (absurd)": (
        lambda d: _patch(d, _tensor_info(d, "output_norm.weight") + 4, "Q", 1 << 62),
        "absurd dims",
    ),
    "dims lie (past the end)": (
        lambda d: _patch(d, _tensor_info(d, "output_norm.weight") + 4, "Q", 64 * 4096),
        "ends past the end of the file",
    ),
    "unknown tensor type": (
        lambda d: _patch(d, _tensor_info(d, "output_norm.weight") + 12, "I", 200),
        "unknown tensor type 200",
    ),
    "vocab mismatch": (
        lambda d: _patch(d, _after_key(d, "llama.vocab_size") + 4, "I", 1000),
        "rows but the vocabulary is 1000",
    ),
    "special token outside the vocabulary": (
        lambda d: _patch(d, _after_key(d, "tokenizer.ggml.eos_token_id") + 4, "I", 99999),
        "outside the vocabulary",
    ),
}


def _counts(zoo: Zoo) -> tuple[set[str], int, int, int]:
    with zoo.sessions() as session:
        rows = [session.scalar(select(func.count()).select_from(t)) or 0 for t in (Model, BaseModel, Block)]
    return store_files(zoo), rows[0], rows[1], rows[2]


@pytest.fixture(scope="module")
def zoo_with_base(tmp_path_factory: pytest.TempPathFactory, good: bytes) -> Zoo:
    root = tmp_path_factory.mktemp("zoo")
    zoo = open_zoo(root / "zoo")
    (root / "good.gguf").write_bytes(good)
    zoo.add_base("tiny", root / "good.gguf")
    add_tenant(zoo, "acme")
    return zoo


def _refused(zoo: Zoo, path: Path, match: str) -> None:
    before = _counts(zoo)
    with pytest.raises(RegistrationError, match=match):
        zoo.add_base("bad", path)
    with pytest.raises(RegistrationError, match=match):
        zoo.register("acme", "bad", path)
    assert _counts(zoo) == before


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_bad_header_is_refused_and_leaves_nothing(
    case: str, good: bytes, zoo_with_base: Zoo, tmp_path: Path
) -> None:
    mutate, match = MUTATIONS[case]
    bad = mutate(good)
    assert bad != good
    path = tmp_path / "model.bin"  # the name says nothing: the magic bytes decide
    path.write_bytes(bad)
    _refused(zoo_with_base, path, match)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer_types": [{**LAYER_TYPES[0], "ffn_up": GGMLQuantizationType.Q8_1}]}, "type Q8_1"),
        ({"chat_template": BOMB}, "chat template"),
        ({"tokenizer_model": "bert"}, "tokenizer model 'bert' is not supported"),
        ({"pre": "some-new-regex"}, "pre-tokenizer"),
    ],
    ids=["unsupported tensor type", "template bomb", "unknown tokenizer", "unknown pre-tokenizer"],
)
def test_unsupported_content_is_refused_and_leaves_nothing(
    kwargs: dict[str, object], match: str, zoo_with_base: Zoo, tmp_path: Path
) -> None:
    path = write_tiny_gguf(tmp_path / "x.gguf", TinySpec("llama"), seed=5, **kwargs)  # type: ignore[arg-type]
    _refused(zoo_with_base, path, match)


def test_cli_refuses_a_bad_file_with_a_clear_message(
    good: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BLOCKZOO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("BLOCKZOO_DATABASE_URL", raising=False)
    path = tmp_path / "cut.gguf"
    path.write_bytes(good[: len(good) // 2])
    assert cli_main(["zoo", "add-base", "cut", str(path)]) == 2
    err = capsys.readouterr().err
    assert "GGUF file is truncated" in err and "Traceback" not in err and str(tmp_path) not in err
    good_path = tmp_path / "good.gguf"
    good_path.write_bytes(good)
    assert cli_main(["zoo", "add-base", "tiny", str(good_path), "--dequantize", "--json"]) == 0
    assert '"blocks_new": 5' in capsys.readouterr().out
