"""The Triton paged decode attention against the torch reference and the runtime's torch decode path.

On the CPU the kernel runs in Triton's interpreter, so shapes stay tiny: a few rows, contexts of a
few BLOCK_N tiles, pages scattered at random over a small cache.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels import paged_attention_triton as pat
from kernels.paged_attention_reference import paged_decode_attention_reference
from kernels.paged_attention_triton import CONFIGS, DecodeConfig, paged_decode_attention, pick_num_splits
from runtime.attention import AttentionMetadata, LayerKV, new_layer_kv, paged_attention

PAGE = 4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Lengths of 1, and of none or several BLOCK_N (16 in the interpreter's configuration) tiles.
LENGTHS = [37, 1, 16, 20]


class Case:
    """A decode batch over a cache whose pages are scattered at random; slots padded with garbage."""

    def __init__(
        self,
        lengths: list[int],
        heads: int,
        kv_heads: int,
        dim: int,
        dtype: torch.dtype,
        seed: int = 0,
        pad: int = -1,
    ) -> None:
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        pages_needed = [(n + PAGE - 1) // PAGE for n in lengths]
        num_pages = sum(pages_needed) + 3  # a few pages nobody uses
        self.kv = new_layer_kv(num_pages * PAGE, kv_heads, dim, dtype)
        self.kv.key.copy_(torch.randn(self.kv.key.shape, generator=gen))
        self.kv.value.copy_(torch.randn(self.kv.value.shape, generator=gen))
        pages = list(range(num_pages))
        rng.shuffle(pages)
        width = max(lengths)
        # Padding past a row's length must never be read: fill it with out-of-range slots (or `pad`).
        fill = num_pages * PAGE * 1000 if pad < 0 else pad
        self.slots = torch.full((len(lengths), width), fill, dtype=torch.int64)
        for row, (n, count) in enumerate(zip(lengths, pages_needed, strict=True)):
            table = [pages.pop() for _ in range(count)]
            self.slots[row, :n] = torch.tensor([table[p // PAGE] * PAGE + p % PAGE for p in range(n)])
        self.lengths = torch.tensor(lengths, dtype=torch.int64)
        self.q = torch.randn(len(lengths), heads, dim, generator=gen).to(dtype)

    def to(self, device: torch.device) -> Case:
        self.kv = LayerKV(self.kv.key.to(device), self.kv.value.to(device))
        self.q, self.slots, self.lengths = self.q.to(device), self.slots.to(device), self.lengths.to(device)
        return self

    def kernel(
        self, window: int | None, config: DecodeConfig | None = None, num_splits: int | None = None
    ) -> torch.Tensor:
        out = paged_decode_attention(
            self.q,
            self.kv.key,
            self.kv.value,
            self.slots,
            self.lengths,
            window,
            config=config,
            num_splits=num_splits,
        )
        assert out.dtype == self.q.dtype and out.shape == self.q.shape
        return out

    def reference(self, window: int | None) -> torch.Tensor:
        return paged_decode_attention_reference(
            self.q, self.kv.key, self.kv.value, self.slots, self.lengths, window
        )

    def runtime(self, window: int | None) -> torch.Tensor:
        """The runtime's torch decode path, through `paged_attention` (writing back the last slots)."""
        # The torch path gathers whole padded rows: its padding must be real slots.
        slots = torch.where(self.slots < self.kv.key.shape[0], self.slots, 0)
        rows = torch.arange(len(self.lengths), device=slots.device)
        last = slots[rows, self.lengths - 1]
        meta = AttentionMetadata(
            slot_mapping=last,
            num_decode_rows=len(self.lengths),
            decode_slots=slots,
            decode_positions=self.lengths - 1,
            decode_lengths=self.lengths,
            prefills=[],
        )
        k, v = self.kv.key[last].clone(), self.kv.value[last].clone()
        return paged_attention(self.q, k, v, meta, self.kv, window)


def assert_close(out: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = 2e-5 if dtype == torch.float32 else 5e-3
    err = float((out.float().cpu() - expected.float().cpu()).abs().max())
    assert err <= tol, f"max abs error {err} > {tol}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (2, 2)])
@pytest.mark.parametrize("dim", [16, 32])
@pytest.mark.parametrize("window", [None, 7])
def test_matches_the_reference(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, window: int | None
) -> None:
    case = Case(LENGTHS, heads, kv_heads, dim, dtype, seed=dim + heads)
    assert_close(case.kernel(window), case.reference(window), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("window", [None, 5, 30])
def test_matches_the_runtime_torch_path(dtype: torch.dtype, window: int | None) -> None:
    # Zero padding, as the executor builds it; a window of 30 cuts inside the longest row only.
    case = Case([*LENGTHS, 3], 8, 2, 16, dtype, seed=3, pad=0)
    expected = case.runtime(window)
    assert_close(case.kernel(window), expected, dtype)
    # And the reference agrees with the runtime: the two torch paths are written independently.
    assert_close(case.reference(window), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(("splits", "window"), [(2, None), (3, None), (4, 40)])
def test_split_k_merges_to_the_same_result(dtype: torch.dtype, splits: int, window: int | None) -> None:
    # 70 keys in 16-key tiles: 2 splits of 48, 3 of 32, 4 -> 3 of 16 over a window of 40. Short rows
    # leave later splits empty, which the merge must ignore.
    case = Case([70, 1, 33, 50], 4, 2, 16, dtype, seed=splits)
    assert_close(case.kernel(window, num_splits=splits), case.reference(window), dtype)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_configuration_is_correct(family: str) -> None:
    # The GPU tables' tile sizes too, with contexts spanning several of their tiles, split and not.
    config = CONFIGS[family]
    assert config.block_n >= 16
    case = Case([2 * config.block_n + 5, 3, config.block_n], 4, 1, 16, torch.float32, seed=11)
    for splits in (1, 2):
        assert_close(case.kernel(None, config=config, num_splits=splits), case.reference(None), torch.float32)


@pytest.mark.parametrize("dim", [8, 24])
def test_head_dims_that_are_not_tile_sized(dim: int) -> None:
    case = Case([9, 21], 4, 2, dim, torch.float32, seed=dim)
    assert_close(case.kernel(3), case.reference(3), torch.float32)


def test_int32_slots_and_lengths() -> None:
    case = Case([19, 4], 2, 1, 16, torch.float16, seed=5, pad=0)
    expected = case.reference(None)
    case.slots, case.lengths = case.slots.int(), case.lengths.int()
    assert_close(case.kernel(None), expected, torch.float16)


def test_contiguous_slot_major_cache() -> None:
    # Strides are read, not assumed: a [slots, KVH, D] contiguous cache gives the same answer.
    case = Case([23, 6], 4, 2, 16, torch.float32, seed=9)
    expected = case.reference(None)
    case.kv = LayerKV(case.kv.key.contiguous(), case.kv.value.contiguous())
    assert case.kv.key.stride() != new_layer_kv(1, 2, 16, torch.float32).key.stride()
    assert_close(case.kernel(None), expected, torch.float32)


def test_an_empty_row_gives_zeros() -> None:
    case = Case([5, 1], 2, 1, 16, torch.float32, seed=2)
    case.lengths[1] = 0
    out = case.kernel(None)
    assert_close(out, case.reference(None), torch.float32)
    assert float(out[1].abs().max()) == 0.0


def test_split_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    config = DecodeConfig(block_n=64, num_warps=4, num_stages=2, programs_per_sm=2, min_split_tokens=256)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(pat, "_sm_count", lambda index: 100)
    assert pick_num_splits(8, 4096, config, torch.device("cpu")) == 1
    assert pick_num_splits(200, 4096, config, cuda) == 1  # enough programs already
    assert pick_num_splits(8, 4096, config, cuda) == 16  # few programs, long context: capped
    assert pick_num_splits(8, 1024, config, cuda) == 4  # no range shorter than min_split_tokens
    assert pick_num_splits(8, 100, config, cuda) == 1


def test_bad_shapes_are_refused() -> None:
    case = Case([4], 3, 2, 16, torch.float32)  # 3 query heads over 2 KV heads
    with pytest.raises(ValueError, match="multiple of KV heads"):
        case.kernel(None)
    case = Case([4], 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=r"slots must be \[1, L\]"):
        paged_decode_attention(case.q, case.kv.key, case.kv.value, case.slots[0], case.lengths)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_bf16_on_the_gpu(splits: int | None) -> None:
    case = Case([700, 1, 129, 64], 8, 2, 128, torch.bfloat16, seed=4).to(DEVICE)
    for window in (None, 100):
        expected = case.reference(window)
        err = float((case.kernel(window, num_splits=splits).float() - expected.float()).abs().max())
        assert err <= 2e-2, f"max abs error {err}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runtime_uses_the_kernel_on_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = pat.paged_decode_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pat, "paged_decode_attention", spy)
    case = Case(LENGTHS, 4, 2, 64, torch.float16, seed=8, pad=0)
    expected = case.runtime(7)  # on the CPU: the torch path
    out = case.to(DEVICE).runtime(7)
    assert calls and out.is_cuda
    assert_close(out, expected, torch.float16)
