"""Scheduler limits and policy choice, validated once when the engine starts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SchedulingPolicyName = Literal["splitfuse", "prefill_first"]


class SchedulerConfig(BaseModel):
    """How much one step may do and how steps are filled.

    `max_num_batched_tokens` is the token budget of one forward pass. `policy` "splitfuse" fuses
    decodes with prompt chunks that fill the budget exactly (DeepSpeed-FastGen Dynamic SplitFuse,
    vLLM v1); "prefill_first" runs whole new prompts alone and decodes only when nothing can be
    admitted (vLLM v0 without chunked prefill), the baseline for benchmarks. It never splits a
    prompt, so a prompt longer than the budget runs alone in an over-budget step.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_num_seqs: int = Field(default=256, gt=0)
    max_num_batched_tokens: int = Field(default=2048, gt=0)
    # A cap over every request (the server setting); each request also carries its own model's limit.
    max_model_len: int | None = Field(default=None, gt=0)
    page_size: int = Field(default=16, gt=0)
    policy: SchedulingPolicyName = "splitfuse"
    enable_prefix_caching: bool = True

    @model_validator(mode="after")
    def _check_limits(self) -> SchedulerConfig:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs"
                f" ({self.max_num_seqs}), or some running requests could not decode in a step"
            )
        return self


def context_limit(max_position_embeddings: int, cap: int | None) -> int:
    """A model's longest prompt plus output: its own config's limit, capped by the server's setting."""
    return max_position_embeddings if cap is None else min(max_position_embeddings, cap)
