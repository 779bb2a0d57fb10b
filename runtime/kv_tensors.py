"""The physical KV cache: one key and one value tensor per layer, addressed by page slots."""

from __future__ import annotations

import torch

from runtime.attention import LayerKV, new_layer_kv
from runtime.model_config import ModelConfig


def bytes_per_page(config: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    """KV bytes one page costs across all layers (keys and values)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * page_size * config.kv_size * element


def pages_for_memory(config: ModelConfig, page_size: int, dtype: torch.dtype, memory_bytes: int) -> int:
    return max(1, memory_bytes // bytes_per_page(config, page_size, dtype))


class KVTensors:
    """Per-layer KV storage of `num_pages` pages of `page_size` token slots each."""

    def __init__(self, config: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        slots = num_pages * page_size
        self.layers: list[LayerKV] = [
            new_layer_kv(slots, config.num_kv_heads, config.head_dim, dtype) for _ in range(config.num_layers)
        ]

    @property
    def nbytes(self) -> int:
        return sum(kv.key.nbytes + kv.value.nbytes for kv in self.layers)
