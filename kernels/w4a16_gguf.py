"""GGUF's Q4_0 and Q4_1 tensors in the canonical 4-bit layout (kernels.w4a16_format), without loss.

llama.cpp stores a [N, K] weight as rows of K values (K = GGUF's `ne[0]`), each row cut into blocks
of 32 consecutive inputs. A block is:
- Q4_0 (18 bytes): fp16 `d`, then 16 bytes of nibbles; `w = d · (q - 8)`.
- Q4_1 (20 bytes): fp16 `d`, fp16 `m`, then 16 bytes of nibbles; `w = d · q + m`.
Byte j of the nibbles holds element j in its low nibble and element j + 16 in its high nibble.

So a block is one group of 32: Q4_0 is our symmetric form (scale d, zero point 8), and Q4_1 is
scale d, zero point 0 and offset m. `dequantize` then gives llama.cpp's numbers bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from kernels.w4a16_format import PackedW4, pack_codes
from kernels.w4a16_import import QuantizedImportError

GGUF_GROUP = 32
BLOCK_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20}


def _fp16_column(blocks: np.ndarray, start: int) -> torch.Tensor:
    """The fp16 held at bytes start … start + 1 of every block, as [K/32, N]."""
    values = np.ascontiguousarray(blocks[..., start : start + 2]).view(np.float16)[..., 0]
    return torch.from_numpy(np.ascontiguousarray(values.T))


def packed_from_gguf_q4(
    raw: bytes | bytearray | memoryview | np.ndarray, qtype: int, shape: tuple[int, int]
) -> PackedW4:
    """A Q4_0 or Q4_1 tensor's raw blocks as PackedW4 (group size 32, scales and offsets fp16).

    `shape` is the torch weight's [N, K] (outputs, inputs): GGUF's dims reversed, as numpy sees the
    tensor (`ReaderTensor.data.shape[0]` is N). `raw` is the tensor's bytes, or the uint8 array
    `gguf.GGUFReader` gives for it.
    """
    try:
        kind = GGMLQuantizationType(int(qtype))
    except ValueError as exc:
        raise QuantizedImportError(f"unknown GGUF tensor type {qtype}") from exc
    if kind not in BLOCK_BYTES:
        raise QuantizedImportError(f"GGUF tensor type {kind.name} is not Q4_0 or Q4_1")
    if len(shape) != 2 or min(shape) < 1:
        raise QuantizedImportError(f"a 4-bit GGUF linear must be 2-D, got shape {tuple(shape)}")
    n, k = int(shape[0]), int(shape[1])
    if k % GGUF_GROUP:
        raise QuantizedImportError(f"{kind.name} rows of {k} values are not whole blocks of {GGUF_GROUP}")
    if isinstance(raw, np.ndarray):
        data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    else:
        data = np.frombuffer(raw, dtype=np.uint8)
    block_bytes = BLOCK_BYTES[kind]
    expected = n * (k // GGUF_GROUP) * block_bytes
    if data.size != expected:
        raise QuantizedImportError(
            f"{kind.name} tensor of shape [{n}, {k}] needs {expected} bytes, got {data.size}"
        )
    blocks = data.reshape(n, k // GGUF_GROUP, block_bytes)
    nibbles = blocks[..., block_bytes - GGUF_GROUP // 2 :]  # [N, K/32, 16]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(n, k)
    qweight = pack_codes(torch.from_numpy(codes.astype(np.int32)).t())
    scales = _fp16_column(blocks, 0)
    if kind == GGMLQuantizationType.Q4_0:
        return PackedW4(qweight, scales, None, GGUF_GROUP)
    zeros = torch.zeros(scales.shape, dtype=torch.int32)
    return PackedW4(qweight, scales, zeros, GGUF_GROUP, None, _fp16_column(blocks, 2))
