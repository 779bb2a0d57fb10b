"""A block's 4-bit projection tensors: written by packed_tensors, read back (and checked) by make_linear."""

from __future__ import annotations

import pytest
import torch

from kernels.w4a16_format import dequantize, quantize_rtn
from runtime.errors import CorruptCheckpointError
from runtime.linear import QOFFSETS, Int4Linear, cast_floating, dense_tensors, make_linear, packed_tensors

N, K, G = 32, 64, 32


def tensors_with_offsets() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    packed = quantize_rtn(torch.randn(N, K, generator=gen), G)
    packed = packed._replace(offsets=torch.randn(K // G, N, generator=gen).half())
    return packed_tensors("proj", packed)


def test_offsets_round_trip_through_block_tensors() -> None:
    tensors = tensors_with_offsets()
    assert f"proj.{QOFFSETS}" in tensors
    linear = make_linear(tensors, "proj", N, K, has_bias=False, where="layer 0")
    assert isinstance(linear, Int4Linear) and linear.packed.offsets is not None
    assert torch.equal(linear.packed.offsets, tensors[f"proj.{QOFFSETS}"])
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(1))
    ref = x @ dequantize(linear.packed).t()
    assert float((linear(x) - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
    # The offsets matter: without them the layer computes something else.
    plain = dict(tensors)
    del plain[f"proj.{QOFFSETS}"]
    assert not torch.allclose(make_linear(plain, "proj", N, K, False, "layer 0")(x), ref, atol=1e-2)


def test_casting_a_block_casts_offsets_with_the_scales() -> None:
    cast = cast_floating(tensors_with_offsets(), torch.float32)
    assert cast[f"proj.{QOFFSETS}"].dtype == torch.float32 and cast["proj.qweight"].dtype == torch.int32


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.zeros(K // G, N + 1), r"proj\.qoffsets' has shape \[2, 33\], expected \[2, 32\]"),
        (torch.zeros(N), r"proj\.qoffsets' has shape \[32\]"),
        (torch.zeros(K // G, N, dtype=torch.int32), "proj.qoffsets must be floating point"),
    ],
)
def test_bad_offsets_are_refused(bad: torch.Tensor, message: str) -> None:
    tensors = tensors_with_offsets()
    tensors[f"proj.{QOFFSETS}"] = bad
    with pytest.raises(CorruptCheckpointError, match=message):
        make_linear(tensors, "proj", N, K, has_bias=False, where="layer 0")


def test_dense_view_of_a_block_checks_its_tensors() -> None:
    tensors = {**tensors_with_offsets(), "norm.weight": torch.ones(K)}
    view = dense_tensors(tensors, "layer 0")
    assert sorted(view) == ["norm.weight", "proj.weight"]
    expected = make_linear(tensors, "proj", N, K, False, "layer 0")
    assert isinstance(expected, Int4Linear)
    assert torch.equal(view["proj.weight"], dequantize(expected.packed))
    tensors[f"proj.{QOFFSETS}"] = torch.zeros(3, N)
    with pytest.raises(CorruptCheckpointError, match=r"layer 0: tensor 'proj\.qoffsets' has shape"):
        dense_tensors(tensors, "layer 0")
