"""Delta compression: a full fine-tune's layer as the base layer plus a low-rank delta.

For each projection, D = W_tuned − W_base is factored by a truncated SVD, keeping the fewest singular
values that retain the asked-for share of D's energy (Σσ²). The factors become a LoraProjection
(A = Vhᵣ, B = Uᵣ·diag(σᵣ), scaling 1), which the runtime adds to the shared base block. This only
pays, and is only exact enough, when every other tensor of the layer is unchanged and the factors
are smaller than the dense weights they replace; otherwise the layer stays a block of its own.

A 4-bit projection (offsets and all) takes part through the fp32 weight it computes with, so a
dense fine-tune of a 4-bit base becomes a delta on that base, as in QLoRA; a 4-bit fine-tune's
factors are weighed against its stored 4-bit bytes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from runtime.linear import QWEIGHT, dense_tensors
from runtime.lora import PROJECTIONS, LoraProjection
from zoo.equivalence import same_bytes


class ProjectionCompression(NamedTuple):
    """One projection's factorization: its rank, retained energy, ‖D − BA‖_F / ‖W_tuned‖_F and sizes."""

    rank: int
    retained_energy: float
    rel_error: float
    delta_bytes: int
    dense_bytes: int


class CompressionResult(NamedTuple):
    """The outcome for one layer.

    `projections` (only when `compressible`) go to `zoo.deltas.make_delta("lowrank", ...)`; `reason`
    says why a layer is not compressible. `reports` covers every changed projection that was factored.
    `delta_bytes` / `dense_bytes` total the factors and the dense changed weights they replace.
    """

    compressible: bool
    reason: str
    projections: dict[str, LoraProjection]
    reports: dict[str, ProjectionCompression]
    delta_bytes: int
    dense_bytes: int


def _not_compressible(
    reason: str, reports: dict[str, ProjectionCompression] | None = None
) -> CompressionResult:
    reports = reports or {}
    return CompressionResult(
        False,
        reason,
        {},
        reports,
        sum(r.delta_bytes for r in reports.values()),
        sum(r.dense_bytes for r in reports.values()),
    )


def _check_inputs(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], energy: float) -> None:
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if base.keys() != tuned.keys():
        raise ValueError(
            f"base and tuned layers hold different tensors: {sorted(base.keys() ^ tuned.keys())}"
        )
    for name in base:
        if base[name].shape != tuned[name].shape:
            raise ValueError(
                f"tensor {name!r}: base shape {list(base[name].shape)} != tuned {list(tuned[name].shape)}"
            )


def _factor(
    w_base: torch.Tensor, w_tuned: torch.Tensor, energy: float, max_rank: int | None
) -> tuple[LoraProjection | None, ProjectionCompression, int]:
    """The smallest-rank factorization of W_tuned − W_base reaching `energy`; also the rank that needs.

    The projection is None when that rank exceeds `max_rank`.
    """
    d = w_tuned.float() - w_base.float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    sq = s.double().pow(2)
    cum = sq.cumsum(0)
    ratio = cum / cum[-1]
    # ratio is nondecreasing and ends at exactly 1, so some rank always qualifies.
    needed = min(int((ratio < energy).sum()) + 1, s.numel())
    rank = needed if max_rank is None else min(needed, max_rank)
    dtype = w_tuned.dtype
    a = vh[:rank].to(dtype).contiguous()
    b = (u[:, :rank] * s[:rank]).to(dtype).contiguous()
    rel_error = float(torch.linalg.matrix_norm(d - b.float() @ a.float())) / max(
        float(torch.linalg.matrix_norm(w_tuned.float())), torch.finfo(torch.float32).tiny
    )
    elem = w_tuned.element_size()
    report = ProjectionCompression(
        rank, float(ratio[rank - 1]), rel_error, (a.numel() + b.numel()) * elem, w_tuned.numel() * elem
    )
    projection = LoraProjection(a, b, 1.0) if rank == needed else None
    return projection, report, needed


def compress_layer(
    base: dict[str, torch.Tensor],
    tuned: dict[str, torch.Tensor],
    energy: float,
    max_rank: int | None = None,
) -> CompressionResult:
    """Express `tuned` as `base` plus a low-rank delta on its projections, if that is exact and smaller.

    Both dicts use block-local names ("self_attn.q_proj.weight", "input_layernorm.weight", …) and the
    same names and shapes. `energy` in (0, 1] is the share of each projection delta's Σσ² to keep;
    a projection needing more than `max_rank` makes the layer not compressible.
    """
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")
    weights = {f"{p}.weight": p for p in PROJECTIONS}
    four_bit = {f"{p}.weight" for p in PROJECTIONS if f"{p}.{QWEIGHT}" in base or f"{p}.{QWEIGHT}" in tuned}
    stored_bytes = {
        f"{p}.weight": sum(t.nbytes for k, t in tuned.items() if k.startswith(f"{p}.") and k != f"{p}.bias")
        for p in PROJECTIONS
        if f"{p}.{QWEIGHT}" in tuned
    }
    base, tuned = dense_tensors(base, "base layer"), dense_tensors(tuned, "fine-tuned layer")
    _check_inputs(base, tuned, energy)
    for name in sorted(base):
        if name not in four_bit and base[name].dtype != tuned[name].dtype:
            return _not_compressible(
                f"tensor {name!r} changed dtype ({base[name].dtype} → {tuned[name].dtype})"
            )
        if name not in weights and not same_bytes(base[name], tuned[name]):
            return _not_compressible(
                f"tensor {name!r} differs from the base; only projection weights can be carried by a delta"
            )
    projections: dict[str, LoraProjection] = {}
    reports: dict[str, ProjectionCompression] = {}
    too_high: list[str] = []
    for key, proj in weights.items():
        if key not in tuned or same_bytes(base[key], tuned[key]):
            continue
        if torch.equal(base[key], tuned[key]):  # e.g. only -0.0 vs 0.0: a zero delta
            continue
        factor, report, needed = _factor(base[key], tuned[key], energy, max_rank)
        if key in stored_bytes:
            report = report._replace(dense_bytes=stored_bytes[key])
        reports[proj] = report
        if factor is None:
            too_high.append(f"{proj} needs rank {needed}")
        else:
            projections[proj] = factor
    if not reports:
        return _not_compressible("the layer is identical to the base layer; no delta is needed")
    if too_high:
        return _not_compressible(
            f"energy {energy} needs more than max_rank {max_rank}: {', '.join(too_high)}", reports
        )
    delta_bytes = sum(r.delta_bytes for r in reports.values())
    dense_bytes = sum(r.dense_bytes for r in reports.values())
    if delta_bytes >= dense_bytes:
        return _not_compressible(
            f"low-rank factors ({delta_bytes} bytes) are not smaller than the dense changed weights "
            f"({dense_bytes} bytes)",
            reports,
        )
    return CompressionResult(True, "", projections, reports, delta_bytes, dense_bytes)
