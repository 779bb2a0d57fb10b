"""The segmented LoRA kernels against the torch references and `DeltaGroups.add_fused` (interpreter on the CPU)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from kernels.lora_reference import (
    lora_add_fused_reference,
    lora_expand_reference,
    lora_shrink_reference,
)
from kernels.lora_segments import (
    CONFIGS,
    SMALL_SEGMENT,
    LoraTileConfig,
    PackedLora,
    pack_segments,
    pick_config,
)
from kernels.lora_triton import lora_add_fused, lora_expand, lora_shrink
from runtime.lora import DeltaGroups, FusedLora, LayerLora, LoraProjection

# Widths that are no multiple of any block size, so every mask is exercised; k and v narrower than q.
HIDDEN = 40
WIDTHS = {"self_attn.q_proj": 48, "self_attn.k_proj": 24, "self_attn.v_proj": 24}
QKV = tuple(WIDTHS)
T = 13


def make_lora(rank: int, targets: tuple[str, ...], gen: torch.Generator, scaling: float = 0.5) -> LayerLora:
    return LayerLora(
        {
            name: LoraProjection(
                torch.randn(rank, HIDDEN, generator=gen) * 0.3,
                torch.randn(WIDTHS[name], rank, generator=gen) * 0.3,
                scaling,
            )
            for name in targets
        }
    )


def mixed_segments(seed: int) -> list[tuple[LayerLora, torch.Tensor | None]]:
    """Four adapters of ranks 4, 8, 16 and 24 on interleaved rows; one row (12) has no adapter.

    The rank-8 adapter targets only q and v, the rank-16 one has a single row.
    """
    gen = torch.Generator().manual_seed(seed)
    return [
        (make_lora(4, QKV, gen, scaling=2.0), torch.tensor([0, 3, 7, 10])),
        (make_lora(8, ("self_attn.q_proj", "self_attn.v_proj"), gen), torch.tensor([1, 4, 8])),
        (make_lora(16, QKV, gen), torch.tensor([5])),
        (make_lora(24, QKV, gen, scaling=0.25), torch.tensor([2, 6, 9, 11])),
    ]


def cast(
    segments: Sequence[tuple[LayerLora, torch.Tensor | None]], dtype: torch.dtype
) -> list[tuple[LayerLora, torch.Tensor | None]]:
    return [(lora.cast(dtype), rows) for lora, rows in segments]


def inputs(dtype: torch.dtype, seed: int, rows: int = T) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, HIDDEN, generator=gen).to(dtype)
    outs = [torch.randn(rows, w, generator=gen).to(dtype) for w in WIDTHS.values()]
    return h, outs


def fused(
    segments: Sequence[tuple[LayerLora, torch.Tensor | None]], names: tuple[str, ...] = QKV
) -> list[tuple[FusedLora | None, torch.Tensor | None]]:
    return [(lora.fused(names), rows) for lora, rows in segments]


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = {torch.float32: 1e-5, torch.float16: 1e-2}.get(dtype, 2e-2)
    err = float((got.float() - want.float()).abs().max())
    assert err <= tol * max(1.0, float(want.float().abs().max())), err


def clone(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [o.clone() for o in outs]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_matches_delta_groups_and_the_reference(dtype: torch.dtype) -> None:
    segments = cast(mixed_segments(1), dtype)
    h, outs = inputs(dtype, 2)
    want = DeltaGroups(segments).add_fused(QKV, h, clone(outs))
    ref = lora_add_fused_reference(fused(segments), h, clone(outs))
    got = lora_add_fused(fused(segments), h, clone(outs))
    for j, (g, w, r, base) in enumerate(zip(got, want, ref, outs, strict=True)):
        assert g.dtype == dtype
        assert_close(g, w, dtype)
        assert_close(g, r, dtype)
        # The delta is not negligible on adapted rows, and nothing touches the unadapted row 12
        # nor, for k, the rows of the adapter that targets only q and v.
        delta = (g.float() - base.float()).abs()
        assert float(delta[:12].max()) > 0.1
        assert float(delta[12].max()) == 0.0
        if j == 1:
            assert float(delta[[1, 4, 8]].max()) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_shrink_and_expand_each_match_the_reference(dtype: torch.dtype) -> None:
    segments = fused(cast(mixed_segments(3), dtype))
    h, outs = inputs(dtype, 4)
    packed = pack_segments(segments, len(QKV), T, h.device)
    assert packed is not None
    z = lora_shrink(h, packed)
    z_ref = lora_shrink_reference(h, segments)
    assert [i for i, _, _ in packed.positions] == [0, 1, 2, 3]
    for i, first, end in packed.positions:
        zi = z_ref[i]
        assert zi is not None
        assert_close(z[first:end, : zi.shape[1]], zi, dtype)
    # The expand on its own: fed the reference's z, laid out as the packed positions.
    z_packed = torch.zeros_like(z)
    for i, first, end in packed.positions:
        zi = z_ref[i]
        assert zi is not None
        z_packed[first:end, : zi.shape[1]] = zi
    got = clone(outs)
    lora_expand(z_packed, packed, got)
    want = clone(outs)
    lora_expand_reference(z_ref, segments, want)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_one_adapter_on_all_rows(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    segments = cast([(make_lora(8, QKV, gen), None)], dtype)
    h, outs = inputs(dtype, 6)
    want = DeltaGroups(segments).add_fused(QKV, h, clone(outs))
    got = lora_add_fused(fused(segments), h, clone(outs))
    for g, w, base in zip(got, want, outs, strict=True):
        assert_close(g, w, dtype)
        assert float((g.float() - base.float()).abs().amax(dim=1).min()) > 0.0  # every row changed


def test_long_segments_take_the_prefill_bucket() -> None:
    # A 40-row segment next to a 1-row and a 3-row one: the prefill tiles, several per segment.
    gen = torch.Generator().manual_seed(7)
    rows = 44
    perm = torch.randperm(rows, generator=gen)
    segments: list[tuple[LayerLora, torch.Tensor | None]] = [
        (make_lora(24, QKV, gen), perm[:40]),
        (make_lora(4, ("self_attn.k_proj",), gen), perm[40:41]),
        (make_lora(16, QKV, gen), perm[41:]),
    ]
    h, outs = inputs(torch.float32, 8, rows)
    packed = pack_segments(fused(segments), len(QKV), rows, h.device)
    assert packed is not None and packed.config == CONFIGS["default"][1]
    want = DeltaGroups(segments).add_fused(QKV, h, clone(outs))
    got = lora_add_fused(fused(segments), h, clone(outs))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, torch.float32)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_configuration_is_correct(family: str) -> None:
    # The GPU tables too (their block sizes and split-K), in both buckets.
    segments = fused(mixed_segments(9))
    h, outs = inputs(torch.float32, 10)
    want = lora_add_fused_reference(segments, h, clone(outs))
    for config in CONFIGS[family]:
        assert min(config.block_m, config.block_n, config.block_k, config.block_r) >= 16
        got = lora_add_fused(segments, h, clone(outs), config)
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, torch.float32)


def test_buckets_by_the_longest_segment() -> None:
    cpu = torch.device("cpu")
    assert pick_config(1, cpu).block_m == 16 and pick_config(SMALL_SEGMENT, cpu).split_k > 1
    assert pick_config(SMALL_SEGMENT + 1, cpu).split_k == 1


def test_tiles_skip_empty_work() -> None:
    # Rank 4 and 24 with block_r 16: one and two shrink tiles per row tile; the q/v-only adapter
    # gets no k tile; the segment without rows and the adapter without these projections none.
    gen = torch.Generator().manual_seed(11)
    config = LoraTileConfig(16, 32, 32, 16, 1, 4, 1)
    segments = [
        (make_lora(4, QKV, gen), torch.tensor([0, 2])),
        (make_lora(8, ("self_attn.q_proj", "self_attn.v_proj"), gen), torch.tensor([1])),
        (make_lora(24, ("self_attn.k_proj",), gen), torch.tensor([3])),
        (make_lora(8, QKV, gen), torch.tensor([], dtype=torch.int64)),
        (
            LayerLora({"mlp.up_proj": LoraProjection(torch.ones(4, 4), torch.ones(4, 4), 1.0)}),
            torch.tensor([4]),
        ),
    ]
    packed = pack_segments(fused(segments), len(QKV), 5, torch.device("cpu"), config)
    assert isinstance(packed, PackedLora)
    assert packed.num_positions == 4 and packed.rank_width == 24
    assert [i for i, _, _ in packed.positions] == [0, 1, 2]
    assert packed.shrink_tiles.tolist() == [[0, 0, 0], [1, 2, 0], [2, 3, 0], [2, 3, 16]]
    assert [t[:, 0].tolist() for t in packed.expand_tiles] == [[0, 1], [0, 2], [0, 1]]
    assert packed.row_idx.tolist() == [0, 2, 1, 3]


def test_nothing_adapted_leaves_the_outputs_alone() -> None:
    gen = torch.Generator().manual_seed(12)
    segments = [(make_lora(4, ("self_attn.q_proj",), gen), torch.tensor([0]))]
    h, outs = inputs(torch.float32, 13)
    names = ("mlp.gate_proj", "mlp.up_proj")
    assert pack_segments(fused(segments, names), 2, T, h.device) is None
    got = lora_add_fused(fused(segments, names), h, clone(outs[:2]))
    for g, base in zip(got, outs[:2], strict=True):
        assert torch.equal(g, base)


def test_outputs_may_be_column_slices_of_one_tensor() -> None:
    segments = fused(mixed_segments(14))
    h, outs = inputs(torch.float32, 15)
    wide = torch.cat(outs, dim=1)
    views = list(wide.split(list(WIDTHS.values()), dim=1))
    lora_add_fused(segments, h, views)
    want = lora_add_fused_reference(segments, h, clone(outs))
    assert_close(wide, torch.cat(want, dim=1), torch.float32)


def test_mismatched_inputs_are_refused() -> None:
    segments = mixed_segments(16)
    mixed = [(segments[0][0].cast(torch.float16), segments[0][1]), segments[1]]
    with pytest.raises(ValueError, match="contiguous"):
        pack_segments(fused(mixed), len(QKV), T, torch.device("cpu"))
    h, outs = inputs(torch.float32, 17)
    with pytest.raises(ValueError, match=r"output 0 must be \[T, 48\]"):
        lora_add_fused(fused(segments), h, [outs[1], outs[1], outs[2]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows_on_gpu", [False, True])
def test_bf16_on_the_gpu_through_delta_groups(rows_on_gpu: bool) -> None:
    dtype, cuda = torch.bfloat16, torch.device("cuda")
    segments = [
        (lora.cast(dtype), rows.to(cuda) if rows_on_gpu and rows is not None else rows)
        for lora, rows in mixed_segments(18)
    ]
    on_gpu = [
        (
            LayerLora(
                {
                    n: LoraProjection(p.a.to(cuda), p.b.to(cuda), p.scaling)
                    for n, p in lora.projections.items()
                }
            ),
            rows,
        )
        for lora, rows in segments
    ]
    h, outs = inputs(dtype, 19)
    want = lora_add_fused_reference(fused(segments), h, clone(outs))
    # On the GPU, `DeltaGroups.add_fused` takes the Triton path.
    got = DeltaGroups(on_gpu).add_fused(QKV, h.to(cuda), [o.to(cuda) for o in outs])
    for g, w in zip(got, want, strict=True):
        assert g.is_cuda and g.dtype == dtype
        assert_close(g.cpu(), w, dtype)
