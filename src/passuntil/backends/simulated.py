"""A sampler with known pass probabilities: no model, exact truth, any speed.

For each prompt it knows the right answer and the true probability p that one sample gives
it. Sample j of a request passes when the j-th uniform of its seed stream is below p, so
results are reproducible per sample index whatever the batching. Wrong samples are one of a
few near-misses of the answer (so the verification cache and edit-distance metrics see
realistic repeats). `score` reports log p spread evenly over the answer's characters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import numpy as np

from passuntil.backends.base import Completion, SamplingParams, TokenScores
from passuntil.errors import UserError
from passuntil.seeding import uniforms


def near_misses(answer: str, count: int) -> list[str]:
    """`count` distinct wrong answers, each one character away from `answer`."""
    out = []
    for i in range(count):
        pos = i % max(1, len(answer))
        ch = answer[pos] if answer else "a"
        repl = chr((ord(ch) - 65 + 1 + i // max(1, len(answer))) % 26 + 65)
        out.append(answer[:pos] + repl + answer[pos + 1:] if answer else repl)
    return out


class SimulatedSampler:
    """Sampler over a table prompt -> (answer, true pass probability)."""

    exact_is_exact = True  # the simulated truth

    def __init__(
        self,
        name: str,
        truth: Mapping[str, tuple[str, float]],
        *,
        n_wrong: int = 8,
        latency_s: float = 0.0,
    ):
        self.name = name
        self.latency_s = latency_s
        self._truth = dict(truth)
        self._wrong = {prompt: near_misses(answer, n_wrong) for prompt, (answer, _) in truth.items()}

    def _lookup(self, prompt: str) -> tuple[str, float]:
        try:
            return self._truth[prompt]
        except KeyError:
            raise UserError(
                f"simulated model {self.name!r} has no answer for this prompt; it knows only "
                "the simulated tasks (sim-scaling, sim-accelerated)"
            ) from None

    def generate(
        self, prompts: Sequence[str], params: Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        if self.latency_s:
            time.sleep(self.latency_s)
        out = []
        for prompt, sp in zip(prompts, params, strict=True):
            answer, p = self._lookup(prompt)
            idx = np.arange(sp.first_sample, sp.first_sample + sp.n, dtype=np.uint64)
            seed = sp.seed if sp.seed is not None else 0
            passed = uniforms(seed, idx) < p
            which = (uniforms(seed, idx, stream=1) * len(self._wrong[prompt])).astype(np.int64)
            wrong = self._wrong[prompt]
            out.append([Completion(j, answer if ok else wrong[w])
                        for j, (ok, w) in enumerate(zip(passed.tolist(), which.tolist()))])
        return out

    def exact_pass_probability(self, prompt: str, references: Sequence[str], params: SamplingParams) -> float:
        """The true pass probability (what PassUntil estimates)."""
        answer, p = self._lookup(prompt)
        return p if answer in {r.strip() for r in references} else 0.0

    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[TokenScores]:
        scores = []
        for prompt, cont in zip(prompts, continuations, strict=True):
            answer, p = self._lookup(prompt)
            total = math.log(max(p, 1e-300)) if cont.strip() == answer else math.log1p(-min(p, 0.999999))
            n = max(1, len(cont))
            scores.append(TokenScores(tuple([total / n] * n)))
        return scores
