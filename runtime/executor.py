"""Runs one scheduled step over a chain: a varlen batched forward with paged attention."""

from __future__ import annotations

from typing import NamedTuple

import torch

from runtime.attention import AttentionMetadata, PrefillSpan, paged_attention
from runtime.block_batching import BatchPlan, LayerGroup
from runtime.chain import Chain
from runtime.kv_segments import KVSegments
from runtime.kv_tensors import KVTensors
from runtime.request import Request
from runtime.rope import RotaryRows, rotary_rows
from runtime.scheduler_output import ExecutorOutput, ScheduledChunk, SchedulerOutput


class BatchInputs(NamedTuple):
    """Flattened inputs of one step: one row per scheduled token.

    `metas` holds the attention metadata of each KV segment (their page tables differ) and
    `layer_metas` the one each layer uses.
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    metas: list[AttentionMetadata]
    layer_metas: list[AttentionMetadata]
    sample_rows: torch.Tensor
    sample_requests: list[Request]
    segments: list[tuple[Chain, int, int]]

    @property
    def meta(self) -> AttentionMetadata:
        return self.metas[0]


class _SegmentRows:
    """Where one KV segment writes this step's keys and values: slots, and the rows it must skip."""

    def __init__(self) -> None:
        self.slots: list[int] = []
        self.skipped: list[int] = []
        self.spans: list[PrefillSpan] = []

    def write_rows(self, num_rows: int) -> torch.Tensor | None:
        """The rows whose keys and values are written, in order; None when that is every row."""
        if not self.skipped:
            return None
        keep = torch.ones(num_rows, dtype=torch.bool)
        keep[self.skipped] = False
        return keep.nonzero().flatten()


class ModelExecutor:
    """Executes what the scheduler decided; it never decides anything itself."""

    def __init__(
        self,
        chain: Chain,
        kv: KVTensors,
        per_block_batching: bool = True,
        max_block_rows: int | None = None,
        segments: KVSegments | None = None,
    ) -> None:
        self.chain = chain
        self.kv = kv
        self.page_size = kv.page_size
        self.per_block_batching = per_block_batching
        self.max_block_rows = max_block_rows
        self.segments = segments or KVSegments.whole(chain.config.num_layers)
        self.layer_segments = self.segments.layer_segments()

    def _add_slots(self, seg: _SegmentRows, g: int, request: Request, start: int, end: int, row: int) -> None:
        """Slots of positions [start, end) in segment g's pages, except those already written there."""
        ps = self.page_size
        table = request.page_tables[g]
        first = max(start, request.kv_write_floors[g]) if request.kv_write_floors else start
        if first > start:
            seg.skipped.extend(range(row, row + min(first, end) - start))
        seg.slots.extend(table[p // ps] * ps + p % ps for p in range(first, end))

    def _context_slots(self, page_tables: list[list[int]], length: int) -> torch.Tensor:
        """Slots of positions [0, length) for each page table, padded with slot 0: [B, length]."""
        ps = self.page_size
        num_pages = (length + ps - 1) // ps
        table = torch.zeros(len(page_tables), num_pages, dtype=torch.int64)
        for i, pt in enumerate(page_tables):
            n = min(len(pt), num_pages)
            table[i, :n] = torch.tensor(pt[:n], dtype=torch.int64)
        slots = table[:, :, None] * ps + torch.arange(ps)[None, None, :]
        return slots.reshape(len(page_tables), num_pages * ps)[:, :length]

    def prepare(self, output: SchedulerOutput) -> BatchInputs:
        # Decode-shaped chunks (one token) go first so they can share one padded attention call.
        decodes = [c for c in output.chunks if c.num_tokens == 1]
        prefills = [c for c in output.chunks if c.num_tokens != 1]
        rank = _chain_ranks([c.request.chain or self.chain for c in output.chunks])
        if rank is not None:
            # Rows of one chain next to each other (within the decode part and within the prompt
            # part): a block's or an adapter's rows are then a slice, not a gather (BatchPlan).
            decodes.sort(key=lambda c: rank[id(c.request.chain or self.chain)])
            prefills.sort(key=lambda c: rank[id(c.request.chain or self.chain)])
        num_segments = self.segments.num_segments
        token_ids: list[int] = []
        positions: list[int] = []
        per_segment = [_SegmentRows() for _ in range(num_segments)]
        last_row: dict[int, int] = {}
        segments: list[tuple[Chain, int, int]] = []
        for chunk in decodes:
            req = chunk.request
            pos = req.num_computed_tokens
            row = len(token_ids)
            last_row[id(chunk)] = row
            _extend_segments(segments, req.chain or self.chain, row, 1)
            token_ids.append(req.token_at(pos))
            positions.append(pos)
            for g, seg in enumerate(per_segment):
                self._add_slots(seg, g, req, pos, pos + 1, row)
        decode_lengths = torch.tensor([p + 1 for p in positions], dtype=torch.int64)
        max_len = int(decode_lengths.max()) if decodes else 0
        for chunk in prefills:
            req = chunk.request
            start, row = req.num_computed_tokens, len(token_ids)
            end = start + chunk.num_tokens
            _extend_segments(segments, req.chain or self.chain, row, chunk.num_tokens)
            token_ids.extend(req.tokens_slice(start, end))
            positions.extend(range(start, end))
            for g, seg in enumerate(per_segment):
                self._add_slots(seg, g, req, start, end, row)
                context = None if start == 0 else self._context_slots([req.page_tables[g]], end)[0]
                seg.spans.append(PrefillSpan(row, chunk.num_tokens, start, context))
            last_row[id(chunk)] = len(token_ids) - 1
        metas = [
            AttentionMetadata(
                slot_mapping=torch.tensor(seg.slots, dtype=torch.int64),
                num_decode_rows=len(decodes),
                decode_slots=self._context_slots([c.request.page_tables[g] for c in decodes], max_len)
                if decodes
                else torch.zeros(0, 0, dtype=torch.int64),
                decode_positions=decode_lengths - 1,
                decode_lengths=decode_lengths,
                prefills=seg.spans,
                write_rows=seg.write_rows(len(token_ids)),
            )
            for g, seg in enumerate(per_segment)
        ]
        sampled = [c for c in output.chunks if c.sample]
        return BatchInputs(
            token_ids=torch.tensor(token_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            metas=metas,
            layer_metas=[metas[g] for g in self.layer_segments],
            sample_rows=torch.tensor([last_row[id(c)] for c in sampled], dtype=torch.int64),
            sample_requests=[c.request for c in sampled],
            segments=segments,
        )

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> ExecutorOutput:
        """Run the step. Rows of different chains share one forward, block by block (or, with
        per-block batching off, each chain runs its own sub-batch over the shared KV)."""
        chains = list({id(c): c for c in (ch.request.chain or self.chain for ch in output.chunks)}.values())
        for chain in chains:
            chain.pin()
        try:
            return self._execute(output, chains)
        finally:
            for chain in chains:
                chain.unpin()

    def _execute(self, output: SchedulerOutput, chains: list[Chain]) -> ExecutorOutput:
        if not self.per_block_batching:
            return self._execute_per_chain(output)
        batch = self.prepare(output)
        num_rows = int(batch.token_ids.numel())
        # The common one-model step needs no grouping plan: the decode hot path stays as lean as before.
        if len(chains) == 1 and (self.max_block_rows is None or num_rows <= self.max_block_rows):
            return self._forward_chain(batch, chains[0])
        plan = BatchPlan(batch.segments, num_rows, self.max_block_rows)
        return ExecutorOutput(logits=forward_plan(plan, batch, self.kv), requests=batch.sample_requests)

    def _execute_per_chain(self, output: SchedulerOutput) -> ExecutorOutput:
        groups: dict[int, list[ScheduledChunk]] = {}
        for chunk in output.chunks:
            groups.setdefault(id(chunk.request.chain or self.chain), []).append(chunk)
        results = [
            self._forward_chain(
                self.prepare(SchedulerOutput(chunks, [], 0)), chunks[0].request.chain or self.chain
            )
            for chunks in groups.values()
        ]
        # Hand the logits back in the plan's order of sampling chunks.
        rows = {id(r): (i, j) for i, res in enumerate(results) for j, r in enumerate(res.requests)}
        order = [c.request for c in output.chunks if c.sample]
        if not order:
            return ExecutorOutput(torch.empty(0, self.chain.config.vocab_size), [])
        logits = torch.stack([results[rows[id(r)][0]].logits[rows[id(r)][1]] for r in order])
        return ExecutorOutput(logits=logits, requests=order)

    def _forward_chain(self, batch: BatchInputs, chain: Chain) -> ExecutorOutput:
        rotary = rotary_rows(*chain.rotary.lookup(batch.positions))
        hidden = chain.embed.forward(batch.token_ids)
        windows = chain.config.sliding_windows
        quantized = False
        for i, layer in enumerate(chain.layers):
            hidden = layer.forward_rows(
                hidden, rotary, batch.layer_metas[i], self.kv.layers[i], windows[i], chain.delta_for(i)
            )
            quantized = quantized or layer.quantized
        logits = chain.head.forward(hidden[batch.sample_rows], bf16_head=quantized)
        return ExecutorOutput(logits=logits, requests=batch.sample_requests)


def _chain_ranks(chains: list[Chain]) -> dict[int, tuple[int, ...]] | None:
    """A sort key per chain (by id) that puts chains sharing blocks and deltas next to each other.

    Chains compare position by position from the head down (a fine-tune's own top layers first),
    each position's blocks and deltas numbered in order of first appearance, so the order is
    deterministic. None when the rows all follow one chain.
    """
    distinct = list({id(c): c for c in chains}.values())
    if len(distinct) == 1:
        return None
    seen: list[dict[object, int]] = []
    keys: dict[int, tuple[int, ...]] = {}
    for chain in distinct:
        deltas = [id(chain.delta_for(i)) for i in range(chain.num_layers)]
        parts: list[object] = [*reversed(chain.block_keys()), *reversed(deltas)]
        if len(seen) < len(parts):
            seen.extend({} for _ in range(len(parts) - len(seen)))
        keys[id(chain)] = tuple(
            codes.setdefault(p, len(codes)) for codes, p in zip(seen, parts, strict=False)
        )
    return keys


def _extend_segments(segments: list[tuple[Chain, int, int]], chain: Chain, start: int, n: int) -> None:
    if segments and segments[-1][0] is chain and segments[-1][2] == start:
        segments[-1] = (chain, segments[-1][1], start + n)
    else:
        segments.append((chain, start, start + n))


def forward_plan(plan: BatchPlan, batch: BatchInputs, kv: KVTensors) -> torch.Tensor:
    """The per-block forward of a mixed batch; returns the logits of the sampled rows."""
    first = plan.chains[0]
    config = first.config
    num_rows = plan.num_rows
    hidden = torch.empty(num_rows, config.hidden_size, dtype=first.dtype)
    for embed, rows in plan.embed_groups():
        if rows is None:
            hidden = embed.forward(batch.token_ids)
        else:
            hidden[rows] = embed.forward(batch.token_ids[rows])
    cos = torch.empty(num_rows, config.head_dim, dtype=first.dtype)
    sin = torch.empty_like(cos)
    for rotary, rows in plan.rope_groups():
        c, s = rotary.lookup(batch.positions if rows is None else batch.positions[rows])
        if rows is None:
            cos, sin = c, s
        else:
            cos[rows], sin[rows] = c, s
    rows_rotary = rotary_rows(cos, sin)
    for i in range(config.num_layers):
        hidden = _layer_step(
            plan.layer_groups(i), hidden, rows_rotary, batch, kv, i, config.sliding_windows[i]
        )
    sampled = hidden[batch.sample_rows]
    logits = torch.empty(sampled.shape[0], config.vocab_size, dtype=torch.float32)
    for head, rows in plan.head_groups(batch.sample_rows):
        if rows is None:
            logits = head.forward(sampled)
        else:
            logits[rows] = head.forward(sampled[rows])
    return logits


def _layer_step(
    groups: list[LayerGroup],
    x: torch.Tensor,
    rotary: RotaryRows,
    batch: BatchInputs,
    kv: KVTensors,
    index: int,
    window: int | None,
) -> torch.Tensor:
    config = groups[0].block.config
    n = x.shape[0]
    heads = x.new_empty(n, config.num_heads + 2 * config.num_kv_heads, config.head_dim)
    for g in groups:
        hg = g.block.project_qkv(x if g.rows is None else x[g.rows], g.deltas)
        if g.rows is None:
            heads = hg
        else:
            heads[g.rows] = hg
    q, k, v = groups[0].block.rotated_qkv(heads, rotary)
    attn = paged_attention(q, k, v, batch.layer_metas[index], kv.layers[index], window)
    out = torch.empty_like(x)
    for g in groups:
        if g.rows is None:
            out = g.block.finish(x, attn, g.deltas)
        else:
            out[g.rows] = g.block.finish(x[g.rows], attn[g.rows], g.deltas)
    return out
