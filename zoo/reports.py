"""What a registration reports: blocks shared and new, bytes, and (for full fine-tunes) per-layer figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RegistrationReport:
    """The outcome of one registration, printed as a table by the CLI and returned by the API."""

    model: str
    kind: str
    base: str | None
    blocks_total: int = 0
    blocks_shared: int = 0
    blocks_new: int = 0
    deltas_new: int = 0
    bytes_new: int = 0
    bytes_shared: int = 0
    naive_bytes: int = 0
    seconds: float = 0.0
    substituted_layers: list[int] = field(default_factory=list)
    compressed_layers: list[int] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    effect: dict[str, float] | None = None
    # Relative to the public base only: what a tenant may be told (and is charged for).
    blocks_shared_with_base: int = 0
    bytes_shared_with_base: int = 0
    bytes_beyond_base: int = 0
    deltas_total: int = 0

    @property
    def bytes_saved(self) -> int:
        return self.naive_bytes - self.bytes_new

    def to_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["bytes_saved"] = self.bytes_saved
        return out

    def tenant_view(self) -> dict[str, Any]:
        """What the model's owner may see; see `tenant_view`."""
        return tenant_view(self.to_dict())

    def table(self) -> str:
        rows = [
            ("model", self.model),
            ("kind", self.kind),
            ("base", self.base or "-"),
            ("blocks shared", str(self.blocks_shared)),
            ("blocks new", str(self.blocks_new)),
            ("deltas new", str(self.deltas_new)),
            ("bytes new", _human(self.bytes_new)),
            ("bytes shared", _human(self.bytes_shared)),
            ("bytes if stored whole", _human(self.naive_bytes)),
            ("bytes saved", _human(self.bytes_saved)),
            ("seconds", f"{self.seconds:.2f}"),
        ]
        if self.substituted_layers:
            rows.append(("layers substituted by base", ",".join(map(str, self.substituted_layers))))
        if self.compressed_layers:
            rows.append(("layers stored as base+delta", ",".join(map(str, self.compressed_layers))))
        if self.effect:
            rows.append(("mean KL vs original", f"{self.effect['mean_kl']:.3g}"))
            rows.append(("top-1 agreement", f"{self.effect['top1_agreement']:.4f}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# `blocks_new`, `bytes_new`, `deltas_new`, `blocks_shared` and `bytes_shared` count what this
# registration added to the zoo as a whole, so they are 0 when another tenant already stored the same
# weights: only admins see them. A tenant sees what its model references, compared with the public base.
TENANT_FIELDS = (
    "model",
    "kind",
    "base",
    "blocks_total",
    "blocks_shared_with_base",
    "deltas_total",
    "naive_bytes",
    "bytes_shared_with_base",
    "bytes_beyond_base",
    "seconds",
    "substituted_layers",
    "compressed_layers",
    "layers",
    "effect",
)


def tenant_view(report: dict[str, Any]) -> dict[str, Any]:
    """The fields of a report (as `to_dict` made it) that say nothing about other tenants' models."""
    return {key: report[key] for key in TENANT_FIELDS if key in report}


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"
