"""Zero-copy reading of safetensors files through mmap.

We parse the header ourselves so tensors are views of a copy-on-write mapping: the weights are
paged in from the page cache on first touch and never copied into a second buffer. Parsing it
ourselves also lets a truncated or malformed file fail with a message naming the file and tensor.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

import torch

from runtime.errors import CorruptCheckpointError

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """A memory-mapped safetensors file; `tensor(name)` returns a view into the mapping."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise CorruptCheckpointError(f"{path}: cannot read ({exc.strerror})") from exc
        if size < 8:
            raise CorruptCheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise CorruptCheckpointError(
                    f"{path}: truncated or malformed safetensors header (says {header_len} bytes, file is {size})"
                )
            try:
                header: dict[str, Any] = json.loads(fh.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CorruptCheckpointError(f"{path}: safetensors header is not valid JSON") from exc
            if not isinstance(header, dict):
                raise CorruptCheckpointError(f"{path}: safetensors header is not a JSON object")
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            self._data_start = 8 + header_len
            data_len = size - self._data_start
            self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for name, info in header.items():
                self._entries[name] = self._check_entry(name, info, data_len)
            # ACCESS_COPY gives a writable (copy-on-write) buffer, which torch.frombuffer needs,
            # while the file itself is never modified.
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if size > 0 else None

    def _check_entry(
        self, name: str, info: Any, data_len: int
    ) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{self.path}: bad header entry for tensor {name!r}") from exc
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - start != nbytes or start < 0:
            raise CorruptCheckpointError(
                f"{self.path}: tensor {name!r} has {end - start} bytes but shape {list(shape)} needs {nbytes}"
            )
        if end > data_len:
            raise CorruptCheckpointError(
                f"{self.path}: truncated file: tensor {name!r} ends at byte {end} of a {data_len}-byte data section"
            )
        return dtype, shape, start, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape, start, end = self._entries[name]
        if end == start or self._mmap is None:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(
            self._mmap, dtype=dtype, count=(end - start) // _itemsize(dtype), offset=self._data_start + start
        )
        return flat.view(shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name) for name in self._entries}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
