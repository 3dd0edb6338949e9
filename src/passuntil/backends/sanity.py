"""Is a remote sampler really sampling? Pure checks on what a server returned.

PassUntil counts every sample as an independent draw from the model at the requested
temperature. A server that silently ignores `temperature` (greedy decoding), `seed`, `n` or
`logprobs` breaks that without any error, so the openai backend runs these checks and records a
warning for each failure (`OpenAICompatSampler.warnings`):

* `identical_samples_warning`: k samples of one prompt all the same text, although the model's
  own probability of that text (the server's log-probs) makes k identical draws unlikely:
  P(k draws all equal to a text of probability p) = p**(k-1) given the first one.
* `temperature_probe_warning`: a few samples at a huge temperature (`PROBE_TEMPERATURE`, where
  every model is nearly uniform over its vocabulary) with different seeds, all the same text:
  for a vocabulary of V tokens and m tokens per sample the chance is about V**(-m(k-1)), so the
  server ignores temperature. This works without log-probs (`transformers serve` returns none).
* `seed_probe_warning`: the same request with the same seed twice at that temperature, two
  different texts: the server ignores `seed`, so a resumed run draws different samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

ALPHA = 1e-6  # warn when what was seen has at most this probability under honest sampling
PROBE_TEMPERATURE = 1000.0
PROBE_TOKENS = 4  # tokens per probe sample
PROBE_SAMPLES = 3


def chance_all_identical(k: int, logprob: float) -> float:
    """P(k - 1 further draws all equal the first), the text having log-probability `logprob`."""
    return math.exp(max(k - 1, 0) * min(logprob, 0.0))


def identical_samples_warning(texts: Sequence[str], logprobs: Sequence[float | None] | None = None,
                              *, alpha: float = ALPHA) -> str | None:
    """A warning when all `texts` are one text that the model itself finds too unlikely for that.

    `logprobs[i]` is the log-probability of `texts[i]` (the server's token log-probs summed);
    the most probable value given is used, so a warning means the samples are implausible even
    on the kindest reading. Without log-probs nothing can be said (a sure model repeats itself):
    `None`.
    """
    k = len(texts)
    if k < 2 or len(set(texts)) > 1:
        return None
    known = [lp for lp in (logprobs or ()) if lp is not None and math.isfinite(lp)]
    if not known:
        return None
    lp = max(known)
    chance = chance_all_identical(k, lp)
    if chance > alpha:
        return None
    return (f"all {k} samples of a prompt are the same text {_short(texts[0])}, whose probability "
            f"under the model is {math.exp(lp):.2g} (chance of {k} equal draws: {chance:.1g}): "
            "the server is not sampling as asked (temperature, top_p or seed ignored?), so these "
            "samples are not independent draws")


def temperature_probe_warning(texts: Sequence[str]) -> str | None:
    """A warning when samples at `PROBE_TEMPERATURE` with different seeds are all one text."""
    if len(texts) < 2 or len(set(texts)) > 1:
        return None
    return (f"the server ignores temperature (or caps it): {len(texts)} samples at "
            f"temperature {PROBE_TEMPERATURE:g} with different seeds were all "
            f"{_short(texts[0])} (an honest sampler is near-uniform there), so every sample is "
            "the same greedy text")


def seed_probe_warning(first: str, again: str) -> str | None:
    """A warning when one request repeated with the same seed gave a different text."""
    if first == again:
        return None
    return ("the server ignores seed: one request sent twice with the same seed gave "
            f"{_short(first)} and {_short(again)}, so samples are not reproducible "
            "(a resumed run draws different samples)")


def dropped_n_warning(requested: int, returned: int) -> str | None:
    """A warning when the server returned fewer choices than `n` asked for."""
    if returned >= requested:
        return None
    return (f"the server ignores n: it returned {returned} choice(s) for n={requested}; "
            "passuntil asks again for the rest (one request per sample, each with its own seed)")


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
