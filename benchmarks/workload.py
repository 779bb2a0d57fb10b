"""Synthetic request workloads: ShareGPT-shaped lengths, and a server-like arrival stream.

ShareGPT, as used in the vLLM paper (Kwon et al., 2023), averages 161 prompt and 338 output tokens
with a heavy right tail. On a 2-core CPU those lengths are scaled down by a constant factor while
keeping the shape: both are lognormal, clipped to a sane range. Prompts are random token ids;
their content does not change the cost of a forward pass.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

SHAREGPT_MEAN_PROMPT = 161
SHAREGPT_MEAN_OUTPUT = 338


@dataclass(frozen=True)
class BenchRequest:
    """One request: its prompt ids, how many tokens it must generate, and when it arrives (s)."""

    prompt: list[int]
    output_len: int
    arrival_s: float = 0.0


@dataclass(frozen=True)
class LengthSpec:
    """A lognormal length distribution given by its mean and log-space sigma, clipped to [lo, hi]."""

    mean: float
    sigma: float
    lo: int
    hi: int

    def sample(self, rng: random.Random) -> int:
        # mean = exp(mu + sigma^2 / 2) for a lognormal.
        mu = math.log(self.mean) - self.sigma**2 / 2
        return min(self.hi, max(self.lo, round(rng.lognormvariate(mu, self.sigma))))


@dataclass(frozen=True)
class ShareGPTShape:
    """ShareGPT-like prompt and output lengths, divided by `scale` to fit the machine."""

    scale: float
    prompt_sigma: float = 1.0
    output_sigma: float = 0.8

    @property
    def prompt(self) -> LengthSpec:
        mean = SHAREGPT_MEAN_PROMPT / self.scale
        return LengthSpec(mean, self.prompt_sigma, lo=4, hi=round(6 * mean))

    @property
    def output(self) -> LengthSpec:
        mean = SHAREGPT_MEAN_OUTPUT / self.scale
        return LengthSpec(mean, self.output_sigma, lo=4, hi=round(4 * mean))


def random_prompt(rng: random.Random, length: int, vocab_size: int, first_id: int) -> list[int]:
    """`length` random token ids in [first_id, vocab_size), avoiding the special tokens below it."""
    return [rng.randrange(first_id, vocab_size) for _ in range(length)]


def sharegpt_requests(
    num_requests: int, shape: ShareGPTShape, vocab_size: int, seed: int, first_id: int = 8
) -> list[BenchRequest]:
    """`num_requests` requests with independent lognormal prompt and output lengths."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt_len = shape.prompt.sample(rng)
        output_len = shape.output.sample(rng)
        requests.append(BenchRequest(random_prompt(rng, prompt_len, vocab_size, first_id), output_len))
    return requests


@dataclass(frozen=True)
class MixedStreamSpec:
    """Decoding requests that all arrive at t=0, then long prompts arriving every `long_every_s`.

    The decoders give a steady stream of tokens whose inter-token latency is measured; each long
    prompt is a prefill that, if run as one forward pass, stalls every decoder for its duration.
    """

    num_decoders: int
    decoder_prompt_len: int
    decoder_output_len: int
    num_long: int
    long_prompt_len: int
    long_output_len: int
    first_long_s: float
    long_every_s: float

    def requests(self, vocab_size: int, seed: int, first_id: int = 8) -> list[BenchRequest]:
        """All requests sorted by arrival time."""
        rng = random.Random(seed)
        out = [
            BenchRequest(
                random_prompt(rng, self.decoder_prompt_len, vocab_size, first_id), self.decoder_output_len
            )
            for _ in range(self.num_decoders)
        ]
        for i in range(self.num_long):
            arrival = self.first_long_s + i * self.long_every_s
            prompt = random_prompt(rng, self.long_prompt_len, vocab_size, first_id)
            out.append(BenchRequest(prompt, self.long_output_len, arrival))
        return sorted(out, key=lambda r: r.arrival_s)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation, as numpy's default."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
