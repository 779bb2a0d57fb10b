"""Reading a GGUF file that a tenant uploaded, every size it declares checked before it is trusted.

The header is parsed here, with bounds, rather than by `gguf.GGUFReader`, which trusts it: a string
or array length that runs past the end of the file, or an array of 2⁶⁰ strings, makes the reader
loop, allocate or fail with an IndexError far from the cause (and it builds one memmap view per
metadata item: 15 s for SmolLM2's 49k-token vocabulary on a loaded 2-core machine, against well
under a second here). Every length is checked against the bytes that remain and against
`GGUFLimits` before anything of that size is read; every tensor's type is known (the `gguf`
package's tables), its dims are sane and its data lies inside the file. Tensors come back as
views of a read-only memory map. Every refusal is a `GGUFError` (a `RegistrationError`) naming what
is wrong, never the path.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from zoo.errors import RegistrationError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32


class GGUFError(RegistrationError):
    """A GGUF file is malformed, truncated, lies about its sizes, or holds what the zoo cannot import."""


class GGUFLimits(NamedTuple):
    """Bounds on what a GGUF header may declare (generous for real models, small against abuse)."""

    max_kv: int = 4096
    max_tensors: int = 65536
    max_key_bytes: int = 256
    max_string_bytes: int = 1 << 20  # one metadata string; a chat template is a few kB
    max_array_items: int = 1 << 22  # a vocabulary or merge list: ~150k for Qwen2
    max_dims: int = 4
    max_dim: int = 1 << 31
    max_elements: int = 1 << 36


DEFAULT_LIMITS = GGUFLimits()


class GGUFTensor(NamedTuple):
    """One tensor as the file stores it: `shape` in torch order (GGUF's dims reversed), raw data view."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFContents(NamedTuple):
    """The metadata (plain Python values) and tensors of a GGUF file."""

    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


def is_gguf(path: Path) -> bool:
    """Whether `path` is a file that starts with GGUF's magic bytes (the name does not matter)."""
    try:
        with Path(path).open("rb") as handle:
            return handle.read(4) == MAGIC
    except OSError:
        return False


class _Cursor:
    """Bounded little-endian reads over a memory map; every overrun is a GGUFError."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(
                f"GGUF file is truncated or lies about sizes: {what} runs past the end of the file"
            )

    def unpack(self, fmt: str, what: str) -> int:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return int(value)

    def string(self, what: str, limit: int) -> str:
        length = self.unpack("Q", f"the length of {what}")
        if length > limit:
            raise GGUFError(f"GGUF {what} is {length} bytes long, over the limit of {limit}")
        self.need(length, what)
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"GGUF {what} is not UTF-8") from exc


_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


def _value(cur: _Cursor, vtype: int, key: str, limits: GGUFLimits, in_array: bool) -> Any:
    if vtype == GGUFValueType.STRING:
        return cur.string(f"value of {key!r}", limits.max_string_bytes)
    if vtype == GGUFValueType.ARRAY:
        if in_array:
            raise GGUFError(f"GGUF metadata {key!r} nests arrays, which no model needs")
        item_type = cur.unpack("I", f"the item type of {key!r}")
        count = cur.unpack("Q", f"the length of {key!r}")
        if count > limits.max_array_items:
            raise GGUFError(
                f"GGUF metadata {key!r} has {count} items, over the limit of {limits.max_array_items}"
            )
        if item_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[GGUFValueType(item_type)]
            size = struct.calcsize(fmt)
            cur.need(count * size, f"array {key!r}")
            values = list(struct.unpack_from(f"<{count}{fmt}", cur.buf, cur.pos))
            cur.pos += count * size
            return values
        if item_type == GGUFValueType.STRING:
            cur.need(count * 8, f"array {key!r}")  # each item holds at least its length
            return [cur.string(f"an item of {key!r}", limits.max_string_bytes) for _ in range(count)]
        raise GGUFError(f"GGUF metadata {key!r} has items of unknown type {item_type}")
    if vtype in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[GGUFValueType(vtype)]
        cur.need(struct.calcsize(fmt), f"value of {key!r}")
        (value,) = struct.unpack_from("<" + fmt, cur.buf, cur.pos)
        cur.pos += struct.calcsize(fmt)
        return value
    raise GGUFError(f"GGUF metadata {key!r} has unknown value type {vtype}")


class _TensorInfo(NamedTuple):
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order
    offset: int  # from the start of the file
    nbytes: int


def _parse(cur: _Cursor, limits: GGUFLimits) -> tuple[dict[str, Any], list[_TensorInfo]]:
    if bytes(cur.buf[0:4]) != MAGIC:
        raise GGUFError("not a GGUF file (bad magic bytes)")
    cur.pos = 4
    version = cur.unpack("I", "the version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
    n_tensors = cur.unpack("Q", "the tensor count")
    n_kv = cur.unpack("Q", "the metadata count")
    if n_kv > limits.max_kv:
        raise GGUFError(f"GGUF header declares {n_kv} metadata entries, over the limit of {limits.max_kv}")
    if n_tensors > limits.max_tensors:
        raise GGUFError(f"GGUF header declares {n_tensors} tensors, over the limit of {limits.max_tensors}")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key", limits.max_key_bytes)
        if key in metadata:
            raise GGUFError(f"GGUF metadata {key!r} appears twice")
        metadata[key] = _value(cur, cur.unpack("I", f"the type of {key!r}"), key, limits, in_array=False)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1) or alignment > 1 << 16:
        raise GGUFError(f"GGUF general.alignment {alignment!r} is not a power of two up to 65536")
    infos: list[_TensorInfo] = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name", limits.max_key_bytes)
        n_dims = cur.unpack("I", f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= limits.max_dims:
            raise GGUFError(f"GGUF tensor {name!r} has {n_dims} dims (1 to {limits.max_dims} allowed)")
        dims = [cur.unpack("Q", f"the dims of tensor {name!r}") for _ in range(n_dims)]
        if any(not 1 <= d <= limits.max_dim for d in dims):
            raise GGUFError(f"GGUF tensor {name!r} has absurd dims {dims}")
        elements = 1
        for d in dims:
            elements *= d
        if elements > limits.max_elements:
            raise GGUFError(f"GGUF tensor {name!r} declares {elements} elements, over the limit")
        code = cur.unpack("I", f"the type of tensor {name!r}")
        try:
            qtype = GGMLQuantizationType(code)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFError(f"GGUF tensor {name!r} has unknown tensor type {code}") from None
        if dims[0] % block:
            raise GGUFError(f"GGUF tensor {name!r}: rows of {dims[0]} are not whole {qtype.name} blocks")
        offset = cur.unpack("Q", f"the offset of tensor {name!r}")
        if offset % alignment:
            raise GGUFError(f"GGUF tensor {name!r} is not aligned to {alignment} bytes")
        infos.append(_TensorInfo(name, qtype, tuple(reversed(dims)), offset, elements // block * block_bytes))
    data_start = -(-cur.pos // alignment) * alignment
    for i, info in enumerate(infos):
        if data_start + info.offset + info.nbytes > cur.size:
            raise GGUFError(
                f"GGUF file is truncated or lies about sizes: tensor {info.name!r} ends past the end of the file"
            )
        infos[i] = info._replace(offset=data_start + info.offset)
    if len({info.name for info in infos}) != len(infos):
        raise GGUFError("GGUF file names a tensor twice")
    return metadata, infos


def read_gguf(path: Path, limits: GGUFLimits = DEFAULT_LIMITS) -> GGUFContents:
    """The metadata and tensors of the GGUF file `path`, every size checked (see the module docstring)."""
    try:
        with Path(path).open("rb") as handle:
            size = handle.seek(0, 2)
            if size < 24:
                raise GGUFError("GGUF file is truncated: shorter than its fixed header")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                metadata, infos = _parse(_Cursor(buf, size), limits)
        data = np.memmap(path, mode="r", dtype=np.uint8)
    except OSError as exc:
        raise GGUFError(f"GGUF file cannot be read ({exc.strerror})") from exc
    tensors = {info.name: GGUFTensor(info.name, info.qtype, info.shape, _view(data, info)) for info in infos}
    return GGUFContents(metadata, tensors)


def _view(data: np.ndarray, info: _TensorInfo) -> np.ndarray:
    raw = data[info.offset : info.offset + info.nbytes]
    if info.qtype == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(info.shape)
    if info.qtype == GGMLQuantizationType.F16:
        return raw.view(np.float16).reshape(info.shape)
    # Block-quantized (and BF16): rows of raw bytes, as gguf.quants.dequantize takes them.
    rows = info.nbytes // (
        info.shape[-1] // GGML_QUANT_SIZES[info.qtype][0] * GGML_QUANT_SIZES[info.qtype][1]
    )
    return raw.reshape(rows, -1)
