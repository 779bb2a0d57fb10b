"""Offline batch generation: `LLM(path).generate(prompts, params)`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from blockzoo.settings import Settings
from runtime.engine import LLMEngine
from runtime.outputs import CompletionResult
from runtime.sampler import TokenLogprobs
from runtime.sampling_params import SamplingParams


class LLM:
    """Runs every prompt through one engine with continuous batching and returns them in order."""

    def __init__(
        self,
        path: Path | str | None = None,
        settings: Settings | None = None,
        engine: LLMEngine | None = None,
    ) -> None:
        if engine is None:
            if path is None:
                raise ValueError("LLM needs a model path or an engine")
            engine = LLMEngine.from_path(Path(path), settings or Settings())
        self.engine = engine

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[CompletionResult]:
        if params is None:
            params = SamplingParams()
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, per_prompt, strict=True)]
        tokens: dict[str, list[int]] = {}
        texts: dict[str, str] = {}
        logprobs: dict[str, list[TokenLogprobs]] = {rid: [] for rid in ids}
        reasons: dict[str, str | None] = {}
        prompt_ids: dict[str, list[int]] = {}
        with tqdm(total=len(ids), disable=not progress, desc="generate") as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    logprobs[out.request_id].extend(out.new_logprobs)
                    if out.finished:
                        tokens[out.request_id] = out.token_ids
                        texts[out.request_id] = out.text
                        reasons[out.request_id] = out.finish_reason
                        prompt_ids[out.request_id] = out.prompt_token_ids
                        bar.update(1)
        return [
            CompletionResult(
                rid, prompt, prompt_ids[rid], tokens[rid], texts[rid], reasons[rid], logprobs[rid]
            )
            for rid, prompt in zip(ids, prompts, strict=True)
        ]
