"""Fair scoring of a forecast against the target model's cells.

    from passuntil.scaling.scoring import score_cells
    s = score_cells(fit, target_n, passes, samples, exact_p=None, level=0.9)
    s.against, s.inside, s.z, s.log_score

Two rules, one function:

* **exact** — where the exact pass probability of every instance is known (the built-in
  sampler computes it for exact-match checks), the truth is their mean: the forecast's
  "these instances" interval either holds it or not, and the error is log(point / truth).
* **likelihood** — otherwise the held-out cells are scored by their own likelihood under the
  forecast, never by comparing an interval with a noisy mean PU. The statistic is
  z = sum_i (k_i - n_i p_i) / sqrt(sum_i n_i p_i (1 - p_i) + Var(sum_i n_i p_i)) with p_i the
  forecast's mean per-instance PU and the variance over its draws; k - n p has mean 0 under
  PassUntil's stopping rule too (Wald's identity). "Inside" means |z| within the level's normal
  quantile. A zero-pass cell contributes -n p: likely when n p is small, unlikely when the
  forecast expected many passes — not "outside" because its observed PU of 0 lies below a
  positive interval. `log_score` is the log predictive probability of all cells (binomial
  kernel, averaged over draws), a proper score for comparing forecasts on the same cells.

An exact probability that the cell's own samples contradict (a tail probability of its passes
below `CONTRADICTED`, 1e-9: e.g. 3 passes in 4 samples at an "exact p" of 1e-25, which a check
that also accepts whitespace variants of the reference gives where the model answers " 82" for
"82") is not that cell's pass probability: the cells are then scored by their likelihood and
`exact_contradicted` counts them.

Previously a held-out zero-pass cell always counted as "outside" and the exact probability was
ignored where the store had it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import special, stats

from passuntil.errors import UserError


@dataclass(frozen=True)
class CellScore:
    """One forecast scored against the target's cells (see the module docstring)."""

    against: str  # "exact" | "likelihood"
    level: float
    point: float  # forecast mean PU over these instances
    low: float  # its "these instances" interval
    high: float
    truth: float | None  # the mean exact probability (against = "exact"), else None
    inside: bool
    z: float  # standardised excess of passes (likelihood rule; NaN for exact)
    p_value: float  # two-sided, from z (likelihood rule; NaN for exact)
    log_ratio: float  # log(point / truth) (exact) or log(point / pooled k/n) (likelihood)
    log_score: float  # log predictive probability of the cells (binomial kernel)
    instance_p_values: tuple[float, ...]  # per instance: two-sided predictive mid-p of its cell
    exact_contradicted: int = 0  # instances whose exact p their own samples rule out (then not "exact")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["instance_p_values"] = list(self.instance_p_values)
        return d


CONTRADICTED = 1e-9  # a cell's passes with a tail probability below this rule its exact p out


def contradicted(passes, samples, exact_p) -> np.ndarray:
    """Per sampled cell: do its counts rule out its exact p? (P(at least k passes in n) or P(at most
    k) below `CONTRADICTED`; under PassUntil's stop "K passes by sample n" is the first tail exactly.)"""
    k, n = np.asarray(passes, dtype=float), np.asarray(samples, dtype=float)
    e = np.clip(np.asarray(exact_p, dtype=float), 0.0, 1.0)
    tail = np.minimum(stats.binom.sf(k - 1, n, e), stats.binom.cdf(k, n, e))
    return (n > 0) & np.isfinite(e) & (tail < CONTRADICTED)


def _validate(per: np.ndarray, passes, samples, exact_p) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    k, n = np.asarray(passes, dtype=float), np.asarray(samples, dtype=float)
    if k.shape != (per.shape[1],) or n.shape != k.shape:
        raise UserError(f"the target's results must give one (passes, samples) per forecast instance "
                        f"({per.shape[1]}), got {k.shape} and {n.shape}")
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise UserError("every target cell needs samples >= 1 and 0 <= passes <= samples")
    e = None
    if exact_p is not None:
        e = np.asarray(exact_p, dtype=float)
        if e.shape != k.shape:
            raise UserError("exact probabilities must be given per forecast instance")
        if not np.isfinite(e).all():
            e = None  # only used where every instance has one
    return k, n, e


def score_draws(per: np.ndarray, passes, samples, exact_p=None, *, level: float = 0.9) -> CellScore:
    """Score per-instance forecast draws `per` (B, I) of PU at the target against its cells."""
    per = np.clip(np.asarray(per, dtype=float), 0.0, 1.0)
    k, n, e = _validate(per, passes, samples, exact_p)
    ruled_out = 0 if e is None else int(contradicted(k, n, e).sum())
    e = None if ruled_out else e
    means = per.mean(axis=1)
    lo, hi = (float(v) for v in np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))
    point = float(means.mean())
    p = per.mean(axis=0)
    # per-draw log likelihood of every cell (binomial kernel; proportional under PassUntil's stop)
    with np.errstate(divide="ignore"):
        ll = (special.xlogy(k, per) + special.xlog1py(n - k, -per)).sum(axis=1)
        log_score = float(special.logsumexp(ll) - math.log(len(ll)))
    mix_cdf = stats.binom.cdf(k[None] - 1, n[None], per).mean(axis=0)  # P(K < k)
    mix_pmf = stats.binom.pmf(k[None], n[None], per).mean(axis=0)
    mid = mix_cdf + 0.5 * mix_pmf
    inst_p = tuple(float(v) for v in np.clip(2 * np.minimum(mid, 1 - mid), 0.0, 1.0))
    if e is not None:
        truth = float(e.mean())
        return CellScore("exact", level, point, lo, hi, truth, bool(lo <= truth <= hi), float("nan"), float("nan"),
                         float(np.log(max(point, 1e-300) / max(truth, 1e-300))), log_score, inst_p)
    var = float(np.sum(n * p * (1 - p)) + (per @ n).var())
    z = float(np.sum(k - n * p) / math.sqrt(max(var, 1e-300)))
    p_value = float(2 * stats.norm.sf(abs(z)))
    pooled = k.sum() / n.sum()
    ratio = float(np.log(max(point, 1e-300) / pooled)) if pooled > 0 else float("inf")
    return CellScore("likelihood", level, point, lo, hi, None, bool(abs(z) <= stats.norm.ppf((1 + level) / 2)),
                     z, p_value, ratio, log_score, inst_p, ruled_out)


def score_cells(fit, n_params: float, passes, samples, exact_p=None, *, level: float = 0.9,
                draws: int = 2000, seed: int = 0) -> CellScore:
    """`score_draws` with the per-instance draws of a fitted `TaskFit` at the target size."""
    return score_draws(fit.instance_draws(n_params, draws=draws, seed=seed), passes, samples, exact_p, level=level)
