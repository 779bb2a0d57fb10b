"""The serving benchmark's workload: who asks which model for what, and when.

Arrivals are a Poisson process (exponential gaps at `rate` requests/s; `rate=inf` sends everything at
t=0); prompt and output lengths are lognormal (ShareGPT's shape, scaled down for a CPU); each request
goes to a target (model and the API key of the tenant that owns it) drawn uniformly. One seed fixes
the whole schedule, so two systems can be run on exactly the same requests at the same times.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.workload import LengthSpec

# Prompts made of text, for servers that take no token ids: short common words, about one token each.
_WORD_TEXT = (
    "the of and to in is was for on are with as at be by this had not but from or have an they which one"
    " you were her all she there would their we him been has when who will more no if out so said what up"
    " its about into than them can only other new some could time these two may then do first any my now"
)


@dataclass(frozen=True)
class Target:
    """One model as one tenant sees it: the name to send and the key to send it with."""

    model: str
    api_key: str
    tenant: str = ""


@dataclass(frozen=True)
class ServingRequest:
    """One request of the schedule; `prompt_ids` is empty when prompts are sent as text."""

    index: int
    arrival_s: float
    target: int
    prompt_ids: list[int]
    prompt_text: str
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids) if self.prompt_ids else len(self.prompt_text.split())


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that decides a schedule."""

    num_requests: int
    rate: float
    prompt: LengthSpec
    output: LengthSpec
    seed: int = 0
    vocab_size: int = 512
    first_id: int = 8
    text_prompts: bool = False


@dataclass(frozen=True)
class Schedule:
    """The targets and the requests, sorted by arrival."""

    targets: list[Target]
    requests: list[ServingRequest]

    def save(self, path: Path) -> None:
        path.write_text(
            json.dumps(
                {"targets": [asdict(t) for t in self.targets], "requests": [asdict(r) for r in self.requests]}
            )
        )

    @classmethod
    def load(cls, path: Path) -> Schedule:
        raw = json.loads(path.read_text())
        return cls(
            [Target(**t) for t in raw["targets"]],
            [ServingRequest(**r) for r in raw["requests"]],
        )


def lognormal(mean: float, sigma: float, max_factor: float) -> LengthSpec:
    """A length distribution with the given mean, clipped to [4, max_factor * mean]."""
    if mean < 1:
        raise ValueError(f"mean length must be >= 1, got {mean}")
    return LengthSpec(mean, sigma, lo=min(4, round(mean)), hi=max(4, round(max_factor * mean)))


def build_schedule(spec: WorkloadSpec, targets: list[Target]) -> Schedule:
    """`spec.num_requests` requests with Poisson arrivals over `targets`, reproducible from `spec.seed`."""
    if not targets:
        raise ValueError("the workload needs at least one target model")
    if spec.num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {spec.num_requests}")
    if not spec.rate > 0:
        raise ValueError(f"rate must be positive (or inf), got {spec.rate}")
    rng = random.Random(spec.seed)
    words = _WORD_TEXT.split(" ")
    clock = 0.0
    requests = []
    for i in range(spec.num_requests):
        if i and math.isfinite(spec.rate):
            clock += rng.expovariate(spec.rate)
        prompt_len = spec.prompt.sample(rng)
        output_len = spec.output.sample(rng)
        target = rng.randrange(len(targets))
        if spec.text_prompts:
            ids: list[int] = []
            text = " ".join(rng.choice(words) for _ in range(prompt_len))
        else:
            ids = [rng.randrange(spec.first_id, spec.vocab_size) for _ in range(prompt_len)]
            text = ""
        requests.append(ServingRequest(i, clock, target, ids, text, output_len))
    return Schedule(list(targets), requests)
