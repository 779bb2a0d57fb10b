"""Rotary position embeddings, including Llama-3 and linear frequency scaling."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from runtime.model_config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """The per-pair rotation frequencies, computed as transformers does so logits match exactly."""
    inv_freq = 1.0 / (
        rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim)
    )
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, and interpolate smoothly
    # between the two wavelength thresholds.
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryTable:
    """cos/sin tables indexed by position; grown on demand, shared by every layer of a chain."""

    def __init__(self, rope: RopeConfig, head_dim: int, dtype: torch.dtype, initial_len: int = 4096) -> None:
        self.inv_freq = inverse_frequencies(rope, head_dim)
        self.dtype = dtype
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)
        self._grow(initial_len)

    def _grow(self, length: int) -> None:
        positions = torch.arange(length, dtype=torch.int64).to(torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.dtype)
        self.sin = emb.sin().to(self.dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = int(positions.max().item()) + 1 if positions.numel() else 0
        if needed > self.cos.shape[0]:
            self._grow(max(needed, 2 * self.cos.shape[0]))
        return self.cos[positions], self.sin[positions]


class RotaryRows(NamedTuple):
    """A step's rotary rows, shaped once for every layer: cos and sin as [T, 1, head_dim], with
    rotate_half's sign folded into sin (its first half negated)."""

    cos: torch.Tensor
    sin: torch.Tensor


def rotary_rows(cos: torch.Tensor, sin: torch.Tensor) -> RotaryRows:
    """`RotaryRows` from per-token cos/sin [T, head_dim] (as `RotaryTable.lookup` returns them)."""
    half = sin.shape[-1] // 2
    signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return RotaryRows(cos[:, None, :], signed[:, None, :])


def rotate(x: torch.Tensor, rows: RotaryRows) -> torch.Tensor:
    """`apply_rotary` in four ops: the halves swapped by `roll`, times the signed sin.

    (-x₂)·s and x₂·(-s) are the same float, so this is bit for bit transformers' rotation.
    """
    return x * rows.cos + torch.roll(x, x.shape[-1] // 2, -1) * rows.sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [T, heads, head_dim] by per-token cos/sin of shape [T, head_dim] (half-split layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
