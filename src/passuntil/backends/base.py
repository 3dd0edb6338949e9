"""The sampler protocol, with vLLM's names.

A backend turns prompts into completions (`generate`) and scores given continuations
(`score`, the teacher-forced log-probs of a reference answer: the paper's test loss).
Lists go in and lists of the same length come out; batching is the backend's business.

Reproducibility contract: sample j of a request is draw number `first_sample + j` of the
random stream named by `seed`. A backend that honours it (the built-in and simulated ones)
returns the same sample for the same (seed, index) however requests are batched, so PassUntil
results do not depend on scheduling, sharding or resumption. Remote backends fold
`first_sample` into the seed and are reproducible only as far as the server is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from passuntil.errors import UserError


class ScoringUnavailable(UserError):
    """The backend cannot score a continuation (e.g. a server without echo + logprobs).

    The run layer catches it, records a note with the run and goes on without reference
    scores, instead of failing the whole evaluation."""


@dataclass(frozen=True)
class SamplingParams:
    """What to sample for one prompt (vLLM's field names)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    first_sample: int = 0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must lie in (0, 1]")
        if self.top_k < 0 or self.max_tokens < 1:
            raise ValueError("top_k must be >= 0 and max_tokens >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Completion:
    """One sampled completion (vLLM's CompletionOutput, trimmed)."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: str = "stop"  # "stop" (stop sequence or EOS) or "length"
    cumulative_logprob: float | None = None


@dataclass(frozen=True)
class TokenScores:
    """Teacher-forced log-probs of a continuation, one per token."""

    token_logprobs: tuple[float, ...] = field(default_factory=tuple)

    @property
    def logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def loss(self) -> float:
        """Mean negative log-prob per token (the paper's test loss)."""
        return -self.logprob / max(1, len(self.token_logprobs))


@runtime_checkable
class Sampler(Protocol):
    """What the PassUntil engine needs from a model."""

    name: str

    def generate(
        self, prompts: Sequence[str], params: Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        """Completions for each prompt: params[i].n of them for prompts[i]."""
        ...

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[TokenScores]:
        """Log-probs of each continuation given its prompt."""
        ...


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut text at the first stop sequence; (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def exact_stop_endings(ref: str, stop: Sequence[str]) -> list[str] | None:
    """For a sampler that ends a row the moment its text holds a stop sequence and then cuts the
    text at the earliest stop (`truncate_at_stop`; the torch and transformers backends): the
    stops s whose stream `ref + s` ends as a sample whose text is exactly `ref`, or None when
    `ref` holds a stop (it is cut there: never a whole sample). `ref + s` counts when no stop
    ends before its last character (the row would have ended earlier) and no longer stop is also
    its suffix (the cut would fall inside `ref`). The streams are distinct, so their
    probabilities add up."""
    stops = [s for s in dict.fromkeys(stop) if s]
    if any(s in ref for s in stops):
        return None
    return [s for s in stops if not any(o in (ref + s)[:-1] for o in stops)
            and not any(len(o) > len(s) and (ref + s).endswith(o) for o in stops)]
