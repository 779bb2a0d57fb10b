"""GPTQ and AWQ tensors, packed here by hand the way those tools write them, import to the same weights."""

from __future__ import annotations

import pytest
import torch

from kernels.w4a16_cpu import CpuInt4Linear
from kernels.w4a16_format import dequantize
from kernels.w4a16_import import AWQ_ORDER, QuantizedImportError, from_awq, from_gptq

K, N, G = 64, 16, 32


def pack_words(
    codes: torch.Tensor, along_rows: bool, order: tuple[int, ...] = tuple(range(8))
) -> torch.Tensor:
    """An independent, loop-by-loop packer: eight 4-bit codes per int32, in the given nibble order."""
    c = codes.tolist()
    rows, cols = len(c), len(c[0])
    if along_rows:
        out = [[0] * cols for _ in range(rows // 8)]
        for r in range(rows):
            for col in range(cols):
                out[r // 8][col] |= c[r][col] << (4 * (r % 8))
    else:
        out = [[0] * (cols // 8) for _ in range(rows)]
        for r in range(rows):
            for col in range(cols):
                nibble = order.index(col % 8)
                out[r][col // 8] |= c[r][col] << (4 * nibble)
    # Two's complement: values with the top bit set are negative int32s.
    return torch.tensor(
        [[v - (1 << 32) if v >= 1 << 31 else v for v in row] for row in out], dtype=torch.int32
    )


def reference(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """W [N, K] from codes [K, N], zero points and scales [groups, N], computed element by element."""
    w = torch.empty(N, K)
    for k in range(K):
        grp = int(g_idx[k])
        for n in range(N):
            w[n, k] = (int(codes[k, n]) - int(zeros[grp, n])) * float(scales[grp, n])
    return w


@pytest.fixture
def parts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (K, N), generator=gen, dtype=torch.int32)
    zeros = torch.randint(1, 16, (K // G, N), generator=gen, dtype=torch.int32)
    scales = (torch.rand(K // G, N, generator=gen) * 0.1 + 0.01).to(torch.float16)
    return codes, zeros, scales


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_imports_to_the_dequantized_reference(
    parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], version: int, act_order: bool
) -> None:
    codes, zeros, scales = parts
    g_idx = torch.arange(K, dtype=torch.int32) // G
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=torch.Generator().manual_seed(1))]
    stored_zeros = zeros - 1 if version == 1 else zeros
    packed = from_gptq(
        pack_words(codes, along_rows=True),
        pack_words(stored_zeros, along_rows=False),
        scales,
        g_idx,
        G,
        version,
    )
    expected = reference(codes, zeros, scales.float(), g_idx)
    assert torch.allclose(dequantize(packed), expected, atol=1e-6)
    assert (packed.g_idx is not None) == act_order
    # And the CPU kernel computes with it (bf16 activations: relative tolerance).
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(2))
    out = CpuInt4Linear(packed)(x)
    ref = x @ expected.t()
    assert float((out - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


def test_gptq_symmetric_v1_stores_seven(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    codes, _, scales = parts
    sevens = torch.full((K // G, N), 7, dtype=torch.int32)
    packed = from_gptq(pack_words(codes, True), pack_words(sevens, False), scales, None, G, 1, symmetric=True)
    assert packed.zeros is None
    eights = torch.full((K // G, N), 8, dtype=torch.int32)
    assert torch.allclose(
        dequantize(packed), reference(codes, eights, scales.float(), torch.arange(K) // G), atol=1e-6
    )


def test_awq_gemm_layout_imports(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    codes, zeros, scales = parts
    packed = from_awq(
        pack_words(codes, along_rows=False, order=AWQ_ORDER),
        pack_words(zeros, along_rows=False, order=AWQ_ORDER),
        scales,
        G,
    )
    assert torch.allclose(dequantize(packed), reference(codes, zeros, scales.float(), torch.arange(K) // G))


def test_mismatched_tensors_are_refused(parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    codes, zeros, scales = parts
    qweight, qzeros = pack_words(codes, True), pack_words(zeros, False)
    with pytest.raises(QuantizedImportError, match="shapes disagree"):
        from_gptq(qweight, qzeros[:, :1], scales, None, G)
    with pytest.raises(QuantizedImportError, match="g_idx"):
        from_gptq(qweight, qzeros, scales, torch.full((K,), 5, dtype=torch.int32), G)
    with pytest.raises(QuantizedImportError, match="format"):
        from_gptq(qweight, qzeros, scales, None, G, version=3)
    with pytest.raises(QuantizedImportError, match="AWQ shapes"):
        from_awq(qweight, qzeros, scales, G)
