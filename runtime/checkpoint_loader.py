"""Load a local Hugging Face checkpoint folder into a chain of blocks, memory-mapped."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from runtime.blocks import EmbedBlock, HeadBlock, LayerBlock
from runtime.chain import Chain
from runtime.errors import CorruptCheckpointError, MissingFileError, ModelLoadError
from runtime.linear import cast_floating
from runtime.model_config import ModelConfig
from runtime.rope import RotaryTable
from runtime.safetensors_mmap import SafetensorsFile

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def checkpoint_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: from the shard index when there is one."""
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: not a directory")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"{index}: malformed shard index") from exc
        files = sorted({folder / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise MissingFileError(f"{folder}: shard {f.name} named in the index is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"{folder}: no *.safetensors weight files")
    return files


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the files, as views of their mappings."""
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        st = SafetensorsFile(f)
        for name in st.keys():  # noqa: SIM118 (SafetensorsFile is not a dict)
            if name in tensors:
                raise CorruptCheckpointError(f"{f}: tensor {name!r} appears in two shards")
            tensors[name] = st.tensor(name)
    return tensors


def split_into_blocks(
    tensors: dict[str, torch.Tensor], config: ModelConfig
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Group HF tensor names into the embed, per-layer and head blocks, with block-local names."""
    embed: dict[str, torch.Tensor] = {}
    layers: list[dict[str, torch.Tensor]] = [{} for _ in range(config.num_layers)]
    head: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = _LAYER.match(name)
        if m:
            idx = int(m.group(1))
            if idx >= config.num_layers:
                raise CorruptCheckpointError(
                    f"tensor {name!r} is for layer {idx}, but the model has {config.num_layers} layers"
                )
            layers[idx][m.group(2)] = t
        elif name == "model.embed_tokens.weight":
            embed["embed_tokens.weight"] = t
        elif name == "model.norm.weight":
            head["norm.weight"] = t
        elif name == "lm_head.weight":
            # transformers ties a tied model's head to the embedding and ignores a stored copy.
            if not config.tie_word_embeddings:
                head["lm_head.weight"] = t
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        else:
            raise CorruptCheckpointError(f"unexpected tensor {name!r} for a {config.architecture} checkpoint")
    return embed, layers, head


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Same-dtype tensors stay views of the mapping; others are converted exactly once.
    return cast_floating(tensors, dtype)


def build_chain(
    config: ModelConfig,
    embed: dict[str, torch.Tensor],
    layers: list[dict[str, torch.Tensor]],
    head: dict[str, torch.Tensor],
    dtype: torch.dtype,
    digest: bytes,
) -> Chain:
    """Assemble blocks from already split tensors (from a folder here, from the zoo later)."""
    embed_block = EmbedBlock(_cast(embed, dtype), config)
    tied = embed_block.weight if config.tie_word_embeddings else None
    return Chain(
        config=config,
        embed=embed_block,
        layers=[LayerBlock(_cast(t, dtype), config, where=f"layer {i}") for i, t in enumerate(layers)],
        head=HeadBlock(_cast(head, dtype), config, tied_embedding=tied),
        rotary=RotaryTable(config.rope, config.head_dim, dtype),
        dtype=dtype,
        digest=digest,
    )


def validate_split(
    config: ModelConfig,
    embed: dict[str, torch.Tensor],
    layers: list[dict[str, torch.Tensor]],
    head: dict[str, torch.Tensor],
) -> None:
    """Raise CorruptCheckpointError naming the first missing or misshapen tensor; copies nothing."""
    embed_block = EmbedBlock(embed, config)
    for i, tensors in enumerate(layers):
        LayerBlock(tensors, config, where=f"layer {i}")
    HeadBlock(head, config, tied_embedding=embed_block.weight if config.tie_word_embeddings else None)


def load_checkpoint(folder: Path, dtype: torch.dtype = torch.float32) -> Chain:
    """Load a Llama/Mistral/Qwen2/Qwen3 folder; errors name the file or tensor at fault."""
    folder = Path(folder)
    config = ModelConfig.from_folder(folder)
    files = checkpoint_files(folder)
    tensors = read_tensors(files)
    embed, layers, head = split_into_blocks(tensors, config)
    digest = hashlib.sha256()
    digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return build_chain(config, embed, layers, head, dtype, digest.digest())


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    folder = Path(folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise MissingFileError(f"{folder}: no tokenizer (expected one of {', '.join(_TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder}: cannot load tokenizer: {exc}") from exc
