"""A GGUF file as the zoo registers it: the blocks of its chain, its HF-style config and a tokenizer folder.

`import_gguf` is what `Zoo.add_base` and `Zoo.register` use when the path they are given starts
with GGUF's magic bytes. Everything is read and checked before anything is written: the header with
bounds (`zoo.gguf_file`), the config (`zoo.gguf_config`), the tokenizer and its chat template
(`zoo.gguf_tokenizer`), then every tensor converted (`zoo.gguf_tensors`) and every block built and
validated by the runtime's own block classes, exactly as for a Hugging Face folder.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from runtime.checkpoint_loader import validate_split
from runtime.errors import BlockZooError
from runtime.model_config import ModelConfig
from zoo.blocks import BlockData, BlockKind, fields_for
from zoo.gguf_config import gguf_architecture, gguf_raw_config
from zoo.gguf_file import DEFAULT_LIMITS, GGUFContents, GGUFError, GGUFLimits, read_gguf
from zoo.gguf_tensors import split_gguf_tensors
from zoo.gguf_tokenizer import write_tokenizer
from zoo.splitter import SplitCheckpoint

Progress = Callable[[int, int], None]
GGUF_GROUP = 32


class GGUFImport(NamedTuple):
    """The split checkpoint of a GGUF file and the folder holding its tokenizer files."""

    split: SplitCheckpoint
    tokenizer_dir: Path


def _quantization(tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """The layer block's `quantization` fields when any of its projections is 4-bit."""
    packed = [name for name in tensors if name.endswith(".qweight")]
    if not packed:
        return None
    with_offsets = any(name.endswith(".qoffsets") for name in tensors)
    symmetric = not any(name.endswith(".qzeros") for name in tensors)
    kind = "q4_1" if with_offsets else "q4_0"
    return {
        "format": "w4a16",
        "bits": 4,
        "group_size": GGUF_GROUP,
        "method": f"gguf-{kind}",
        "symmetric": symmetric,
        "act_order": False,
        "label": f"w4a16-g{GGUF_GROUP}-gguf-{kind}",
    }


def _meta(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.to("meta") for k, t in tensors.items()}


def split_gguf(
    contents: GGUFContents, dequantize: bool = False, progress: Progress | None = None
) -> SplitCheckpoint:
    """The blocks of a GGUF file's `contents` (4-bit layers where it holds Q4_0/Q4_1, unless `dequantize`)."""
    raw_config = gguf_raw_config(contents)
    config = ModelConfig.from_hf_dict(raw_config)
    arch = gguf_architecture(contents.metadata)
    parts = split_gguf_tensors(contents.tensors, config, arch, dequantize)
    embed_rows = parts.embed.get("embed_tokens.weight")
    if embed_rows is not None and embed_rows.shape[0] != config.vocab_size:
        raise GGUFError(
            f"GGUF token_embd.weight has {embed_rows.shape[0]} rows but the vocabulary is {config.vocab_size}"
        )
    try:
        # On the meta device: shapes and names are checked without packing 4-bit weights for a kernel.
        validate_split(config, _meta(parts.embed), [_meta(t) for t in parts.layers], _meta(parts.head))
    except BlockZooError as exc:
        raise GGUFError(f"GGUF tensors do not fit the model: {exc}") from exc
    pending: list[tuple[BlockKind, dict[str, torch.Tensor], dict[str, Any]]] = [
        ("embed", parts.embed, fields_for("embed", config)),
    ]
    for i, tensors in enumerate(parts.layers):
        fields = fields_for("layer", config, i)
        quant = _quantization(tensors)
        pending.append(("layer", tensors, fields if quant is None else {**fields, "quantization": quant}))
    pending.append(("head", parts.head, fields_for("head", config)))
    blocks: list[BlockData] = []
    for kind, tensors, fields in pending:
        block = BlockData(kind=kind, tensors=tensors, fields=fields)
        _ = block.block_id  # hash now, so that progress means something
        blocks.append(block)
        if progress is not None:
            progress(len(blocks), len(pending))
    return SplitCheckpoint(config, raw_config, blocks)


@contextmanager
def import_gguf(
    path: Path,
    dequantize: bool = False,
    progress: Progress | None = None,
    limits: GGUFLimits = DEFAULT_LIMITS,
) -> Iterator[GGUFImport]:
    """The split checkpoint and a temporary tokenizer folder (removed on exit) of the GGUF file `path`."""
    contents = read_gguf(path, limits)
    with tempfile.TemporaryDirectory(prefix="blockzoo-gguf-tokenizer-") as tmp:
        folder = Path(tmp)
        # Config and tokenizer first: they are cheap, and refuse a bad file before any tensor work.
        gguf_raw_config(contents)
        write_tokenizer(contents.metadata, folder)
        yield GGUFImport(split_gguf(contents, dequantize, progress), folder)
