"""The transformers baseline: `model.generate` on padded static batches, the way a user runs it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from benchmarks.engine_runs import PROGRESS_INTERVAL_S
from benchmarks.workload import BenchRequest


class HFResult(NamedTuple):
    """Wall time, useful tokens (each request's own output length) and every request's tokens."""

    seconds: float
    useful_tokens: int
    generated_tokens: int
    token_ids: list[list[int]]


def load_hf_model(model_dir: Path, dtype: torch.dtype) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{model_dir} did not load as a transformers model")
    # ignore_eos: every row generates its full budget, as our requests do.
    model.generation_config.eos_token_id = None
    return model


class StepProgress(BaseStreamer):  # type: ignore[misc]
    """Advances a progress bar once per decoding step (generate pushes the prompt first: skipped)."""

    def __init__(self, bar: tqdm[Any]) -> None:
        self.bar = bar
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self.seen_prompt:
            self.bar.update(1)
        self.seen_prompt = True

    def end(self) -> None:
        self.seen_prompt = False


def _left_padded(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.int64)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def generate_batch(
    model: PreTrainedModel, batch: Sequence[BenchRequest], pad_id: int, streamer: BaseStreamer | None = None
) -> list[list[int]]:
    """Greedy `generate` of one padded batch up to its longest output; each row cut to its own length."""
    ids, mask = _left_padded([r.prompt for r in batch], pad_id)
    max_new = max(r.output_len for r in batch)
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad_id,
            streamer=streamer,
        )
    new = out[:, ids.shape[1] :]
    return [new[row, : r.output_len].tolist() for row, r in enumerate(batch)]


def run_hf(
    model: PreTrainedModel, requests: Sequence[BenchRequest], batch_size: int, pad_id: int
) -> HFResult:
    """Batches of `batch_size` consecutive requests, one after the other (after an untimed warm-up)."""
    tokens: list[list[int]] = []
    generated = 0
    warmup = [BenchRequest(list(range(10, 26)), 4)] * 2
    generate_batch(model, warmup, pad_id)
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    steps = sum(max(r.output_len for r in batch) for batch in batches)
    bar = tqdm(total=steps, desc="transformers generate", unit="step", mininterval=PROGRESS_INTERVAL_S)
    progress = StepProgress(bar)
    start = time.perf_counter()
    for batch in batches:
        tokens.extend(generate_batch(model, batch, pad_id, progress))
        generated += len(batch) * max(r.output_len for r in batch)
    seconds = time.perf_counter() - start
    bar.close()
    useful = sum(r.output_len for r in requests)
    return HFResult(seconds, useful, generated, tokens)
