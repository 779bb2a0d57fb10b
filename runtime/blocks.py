"""The three kinds of block a chain is made of, and their forward passes.

A block holds only its tensors (views of memory-mapped files where possible); the per-step
context (positions, rotary tables, attention metadata, the KV tensors) is passed in, so the same
block object can serve rows of many requests and, later, of many models at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.attention import AttentionMetadata, LayerKV, paged_attention
from runtime.errors import CorruptCheckpointError
from runtime.fused_linear import FusedLinear, fuse_linears
from runtime.linear import DenseLinear, Int4Linear, Linear, make_linear
from runtime.lora import PROJECTIONS, DeltaGroups, LayerLora
from runtime.model_config import ModelConfig
from runtime.rope import RotaryRows, rotary_rows, rotate
from runtime.vocab_linear import vocab_linear

# Projections that read the same input: their adapters share one shrink matmul.
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same order of operations as transformers' LlamaRMSNorm, so fp32 results agree bit for bit
    # and bf16 ones round the same way.
    # (The casts are skipped where they would be no-ops: two dispatches fewer per norm.)
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h if dtype == torch.float32 else h.to(dtype))


def _require(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
    if name not in tensors:
        raise CorruptCheckpointError(f"{where}: tensor {name!r} is missing")
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise CorruptCheckpointError(
            f"{where}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}"
        )
    return t


class EmbedBlock:
    """Token embedding: ids → hidden states."""

    kind = "embed"

    def __init__(self, tensors: dict[str, torch.Tensor], config: ModelConfig, where: str = "embed") -> None:
        self.weight = _require(tensors, "embed_tokens.weight", (config.vocab_size, config.hidden_size), where)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)


# Logits the bf16 LM head rescores exactly in fp32 (see HeadBlock.forward).
RESCORE_TOP = 32


class HeadBlock:
    """Final RMSNorm plus the LM head: hidden states → logits (fp32)."""

    kind = "head"

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        config: ModelConfig,
        tied_embedding: torch.Tensor | None = None,
        where: str = "head",
    ) -> None:
        self.eps = config.rms_norm_eps
        self.norm = _require(tensors, "norm.weight", (config.hidden_size,), where)
        if "lm_head.weight" in tensors:
            self.lm_head = _require(tensors, "lm_head.weight", (config.vocab_size, config.hidden_size), where)
        elif tied_embedding is not None:
            self.lm_head = tied_embedding
        else:
            raise CorruptCheckpointError(f"{where}: lm_head.weight is missing and embeddings are not tied")
        self._bf16_head: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor, bf16_head: bool = False) -> torch.Tensor:
        """Logits of `hidden`. `bf16_head` (asked for by chains whose layers are 4-bit) runs the LM
        head's matmul in bf16: at one decode row it reads half the bytes of an fp32 head, which is
        most of such a chain's step; the chain's own precision is already 4-bit."""
        h = rms_norm(hidden, self.norm, self.eps)
        if bf16_head and self.lm_head.dtype == torch.float32 and h.device.type == "cpu":
            if self._bf16_head is None:
                # Built on first use: a block shared with a dense chain keeps its fp32 head for that one.
                self._bf16_head = self.lm_head.to(torch.bfloat16)
            logits = F.linear(h.to(torch.bfloat16), self._bf16_head).float()
            # bf16 output rounds logits near 20 to steps of 1/8, enough to swap the top two tokens
            # (seen on SmolLM2: "Paris" lost the argmax). The candidates that decide greedy and top-k
            # sampling are rescored exactly from the fp32 head; the tail keeps bf16 precision.
            top = logits.topk(min(RESCORE_TOP, logits.shape[-1]), dim=-1).indices
            exact = torch.einsum("rh,rkh->rk", h.float(), self.lm_head[top].float())
            return logits.scatter_(-1, top, exact)
        return vocab_linear(h, self.lm_head).float()


class LayerBlock:
    """One decoder layer: RMSNorm → GQA attention with RoPE over paged KV → RMSNorm → SwiGLU MLP."""

    kind = "layer"

    def __init__(self, tensors: dict[str, torch.Tensor], config: ModelConfig, where: str = "layer") -> None:
        c = config
        h, q, kv, inter = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
        self.config = c
        self.eps = c.rms_norm_eps
        self.input_norm = _require(tensors, "input_layernorm.weight", (h,), where)
        self.post_norm = _require(tensors, "post_attention_layernorm.weight", (h,), where)
        # Activations run in the norms' dtype, whatever the projections store (e.g. 4-bit codes).
        self.dtype = self.input_norm.dtype
        self.q_proj = make_linear(tensors, "self_attn.q_proj", q, h, c.qkv_bias, where)
        self.k_proj = make_linear(tensors, "self_attn.k_proj", kv, h, c.qkv_bias, where)
        self.v_proj = make_linear(tensors, "self_attn.v_proj", kv, h, c.qkv_bias, where)
        self.o_proj = make_linear(tensors, "self_attn.o_proj", h, q, c.o_bias, where)
        self.q_norm = (
            _require(tensors, "self_attn.q_norm.weight", (c.head_dim,), where) if c.qk_norm else None
        )
        self.k_norm = (
            _require(tensors, "self_attn.k_norm.weight", (c.head_dim,), where) if c.qk_norm else None
        )
        self.gate_proj = make_linear(tensors, "mlp.gate_proj", inter, h, c.mlp_bias, where)
        self.up_proj = make_linear(tensors, "mlp.up_proj", inter, h, c.mlp_bias, where)
        self.down_proj = make_linear(tensors, "mlp.down_proj", h, inter, c.mlp_bias, where)
        # Every tensor the layer computes with, under its block-local name (equivalence checks read these).
        self.tensors = {name: tensors[name] for name in _used_names(tensors, c)}
        self._qkv = self._fuse(QKV)
        self._gate_up = self._fuse(GATE_UP)
        # Per-head q/k norm weights side by side, so q and k are normed in one call ([heads, head_dim]).
        self.qk_norm: torch.Tensor | None = None
        if self.q_norm is not None and self.k_norm is not None:
            self.qk_norm = torch.cat(
                [self.q_norm.expand(c.num_heads, -1), self.k_norm.expand(c.num_kv_heads, -1)]
            ).contiguous()
        self.quantized = any(isinstance(p, Int4Linear) for p in self.projections().values())

    def _fuse(self, names: tuple[str, ...]) -> tuple[FusedLinear, tuple[Linear, ...]] | None:
        """Projections `names` as one matmul; dense ones (and the block's tensors) become views of it."""
        attrs = [n.split(".")[1] for n in names]
        fused = fuse_linears([getattr(self, a) for a in attrs])
        if fused is None:
            return None
        linear, parts = fused
        for name, attr, part in zip(names, attrs, parts, strict=True):
            setattr(self, attr, part)
            if isinstance(part, DenseLinear):
                self.tensors[f"{name}.weight"] = part.weight
                if part.bias is not None:
                    self.tensors[f"{name}.bias"] = part.bias
        return linear, tuple(parts)

    @property
    def qkv(self) -> FusedLinear | None:
        """The fused q/k/v projection, while q_proj, k_proj and v_proj are still the ones it was built
        from (GPTQ's calibration swaps in recording projections, which must then be called)."""
        if self._qkv is None or (self.q_proj, self.k_proj, self.v_proj) != self._qkv[1]:
            return None
        return self._qkv[0]

    @property
    def gate_up(self) -> FusedLinear | None:
        """The fused gate/up projection, under the same condition as `qkv`."""
        if self._gate_up is None or (self.gate_proj, self.up_proj) != self._gate_up[1]:
            return None
        return self._gate_up[0]

    def projections(self) -> dict[str, Linear]:
        """The seven projections by block-local name ("self_attn.q_proj", …)."""
        return {
            "self_attn.q_proj": self.q_proj,
            "self_attn.k_proj": self.k_proj,
            "self_attn.v_proj": self.v_proj,
            "self_attn.o_proj": self.o_proj,
            "mlp.gate_proj": self.gate_proj,
            "mlp.up_proj": self.up_proj,
            "mlp.down_proj": self.down_proj,
        }

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv: LayerKV,
        sliding_window: int | None,
        lora: LayerLora | None = None,
    ) -> torch.Tensor:
        """The whole layer for rows that all run this block (the executor splits it for mixed batches)."""
        return self.forward_rows(x, rotary_rows(cos, sin), meta, kv, sliding_window, lora)

    def forward_rows(
        self,
        x: torch.Tensor,
        rotary: RotaryRows,
        meta: AttentionMetadata,
        kv: LayerKV,
        sliding_window: int | None,
        lora: LayerLora | None = None,
    ) -> torch.Tensor:
        """`forward` with the step's rotary rows shaped once for all layers (the executor's path)."""
        deltas = DeltaGroups.single(lora)
        q, k, v = self.rotated_qkv(self.project_qkv(x, deltas), rotary)
        attn = paged_attention(q, k, v, meta, kv, sliding_window)
        return self.finish(x, attn, deltas)

    def project_qkv(self, x: torch.Tensor, deltas: DeltaGroups) -> torch.Tensor:
        """Input norm and q/k/v projections (plus deltas and q/k norms), before RoPE.

        Returns the heads side by side, [T, heads + 2 · kv_heads, head_dim]: q's, then k's, then v's
        (see `split_heads`), so RoPE rotates q and k in one go.
        """
        c = self.config
        t = x.shape[0]
        h = rms_norm(x, self.input_norm, self.eps)
        fused = self.qkv
        if fused is not None:
            qkv = fused(h)
            if deltas:
                # The deltas add in place into each projection's columns of the fused output.
                deltas.add_fused(QKV, h, fused.split(qkv))
        else:
            outs = [self.q_proj(h), self.k_proj(h), self.v_proj(h)]
            if deltas:
                outs = deltas.add_fused(QKV, h, outs)
            qkv = torch.cat(outs, dim=-1)
        heads = qkv.view(t, c.num_heads + 2 * c.num_kv_heads, c.head_dim)
        if self.qk_norm is not None:
            qk = rms_norm(heads[:, : c.num_heads + c.num_kv_heads], self.qk_norm, self.eps)
            heads = torch.cat([qk, heads[:, c.num_heads + c.num_kv_heads :]], dim=1)
        return heads

    def rotated_qkv(
        self, heads: torch.Tensor, rotary: RotaryRows
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, heads, D] and k [T, kv_heads, D] rotated (one RoPE call for both), and v, from
        `project_qkv`'s [T, heads + 2 · kv_heads, D] output. All three are views."""
        c = self.config
        n = c.num_heads + c.num_kv_heads
        qk = rotate(heads[:, :n], rotary)
        return qk[:, : c.num_heads], qk[:, c.num_heads :], heads[:, n:]

    def finish(self, x: torch.Tensor, attn: torch.Tensor, deltas: DeltaGroups) -> torch.Tensor:
        """Output projection, residual, post-attention norm and the SwiGLU MLP."""
        attn = attn.reshape(x.shape[0], self.config.q_size)
        o = self.o_proj(attn)
        if deltas:
            o = deltas.add("self_attn.o_proj", attn, o)
        x = x + o
        h = rms_norm(x, self.post_norm, self.eps)
        fused = self.gate_up
        if fused is not None:
            gate, up = fused.split(fused(h))
        else:
            gate, up = self.gate_proj(h), self.up_proj(h)
        if deltas:
            gate, up = deltas.add_fused(GATE_UP, h, [gate, up])
        act = F.silu(gate) * up
        down = self.down_proj(act)
        if deltas:
            down = deltas.add("mlp.down_proj", act, down)
        return x + down


def _used_names(tensors: dict[str, torch.Tensor], config: ModelConfig) -> list[str]:
    names = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    if config.qk_norm:
        names += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for proj in PROJECTIONS:
        names += [n for n in tensors if n.startswith(proj + ".")]
    return names
