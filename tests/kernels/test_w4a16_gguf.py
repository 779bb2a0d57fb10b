"""GGUF's Q4_0 / Q4_1 blocks in the canonical layout: bit for bit what the `gguf` package dequantizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from kernels.w4a16_format import dequantize
from kernels.w4a16_gguf import packed_from_gguf_q4
from kernels.w4a16_import import QuantizedImportError

Q4_0, Q4_1 = GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1


def gguf_weight(n: int, k: int, qtype: GGMLQuantizationType, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw blocks, fp32 dequantized) of a random [n, k] weight, both made by the gguf package."""
    rng = np.random.default_rng(seed)
    # Rows with a shifted mean make Q4_1's minimum matter; a zero block checks d = 0.
    w = (rng.standard_normal((n, k)) * 0.05 + rng.standard_normal((n, 1)) * 0.1).astype(np.float32)
    w[0, :32] = 0.0
    raw = gguf_quantize(w, qtype)
    return raw, gguf_dequantize(raw, qtype)


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1])
def test_dequantize_is_bit_for_bit_the_gguf_reader(qtype: GGMLQuantizationType) -> None:
    n, k = 24, 96
    raw, expected = gguf_weight(n, k, qtype, seed=int(qtype))
    assert raw.dtype == np.uint8 and expected.dtype == np.float32
    packed = packed_from_gguf_q4(raw, qtype, (n, k))
    assert (packed.offsets is not None) == (qtype == Q4_1)
    assert packed.group_size == 32 and packed.scales.dtype == torch.float16
    ours = dequantize(packed, torch.float32)
    assert ours.shape == (n, k)
    # Bits, not values: -0.0 and 0.0 would compare equal as floats.
    assert np.array_equal(ours.numpy().view(np.int32), expected.view(np.int32))
    # Bytes work as well as the reader's uint8 array.
    again = dequantize(packed_from_gguf_q4(raw.tobytes(), int(qtype), (n, k)))
    assert torch.equal(again.view(torch.int32), ours.view(torch.int32))


def test_q4_1_needs_its_offsets() -> None:
    # Without the offsets (or with them added in another order) the numbers are not llama.cpp's.
    n, k = 16, 64
    raw, expected = gguf_weight(n, k, Q4_1, seed=3)
    packed = packed_from_gguf_q4(raw, Q4_1, (n, k))
    assert packed.offsets is not None and bool((packed.offsets != 0).any())
    assert not np.array_equal(dequantize(packed._replace(offsets=None)).numpy(), expected)
    assert packed.nbytes == packed._replace(offsets=None).nbytes + packed.offsets.nbytes


def test_nibble_order_of_one_block() -> None:
    # Byte j holds element j (low nibble) and element j + 16 (high nibble).
    d = np.array([1.0], dtype=np.float16).view(np.uint8)
    m = np.array([0.0], dtype=np.float16).view(np.uint8)
    nibbles = np.array([(j % 16) | ((15 - j % 16) << 4) for j in range(16)], dtype=np.uint8)
    packed = packed_from_gguf_q4(np.concatenate([d, m, nibbles]), Q4_1, (1, 32))
    expected = [float(j) for j in range(16)] + [float(15 - j) for j in range(16)]
    assert dequantize(packed)[0].tolist() == expected


def test_bad_blocks_are_refused() -> None:
    raw, _ = gguf_weight(8, 64, Q4_0, seed=4)
    with pytest.raises(QuantizedImportError, match="needs 288 bytes, got 287"):
        packed_from_gguf_q4(raw.reshape(-1)[:-1], Q4_0, (8, 64))
    with pytest.raises(QuantizedImportError, match="Q8_0 is not Q4_0 or Q4_1"):
        packed_from_gguf_q4(raw, GGMLQuantizationType.Q8_0, (8, 64))
    with pytest.raises(QuantizedImportError, match="unknown GGUF tensor type 999"):
        packed_from_gguf_q4(raw, 999, (8, 64))
    with pytest.raises(QuantizedImportError, match="whole blocks of 32"):
        packed_from_gguf_q4(raw, Q4_0, (16, 36))
