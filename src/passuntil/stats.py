"""Estimators for PassUntil counts: pure numpy/scipy functions.

An instance sampled until `k_target` passes or `max_samples` samples ends in one of two ways:

* stopped at the K-th pass after n samples: n follows a negative binomial law, K/n is the
  maximum-likelihood estimate (paper, Theorem 1) and (K-1)/(n-1) the unbiased one;
* stopped by the budget with k < K passes in n = max_samples samples: k/n is both.

Order the outcomes by how strongly they point to a large p (an early K-th pass first, then
budget stops with K-1, K-2, ... 0 passes). The exact interval that inverts this ordering is
the negative-binomial interval for a K-stop and the Clopper-Pearson interval for a budget stop,
so one rule covers both outcomes, zero passes included (then the lower end is 0). The binomial
and negative-binomial likelihoods are proportional, so fits may use every (k, n) pair.

Every function takes arrays or scalars; keyword options follow `*`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, special
from scipy import stats as sps

from passuntil.errors import UserError

ArrayLike = np.ndarray | float | int


class InvalidCounts(UserError, ValueError):
    """Counts no sampling can produce (e.g. read from a damaged store or a hand-made table): a
    ValueError for library callers, and one `error:` line on the command line."""


def _validate(passes, samples, k_target: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    try:
        k = np.asarray(passes, dtype=np.float64)
        n = np.asarray(samples, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InvalidCounts(f"invalid PassUntil counts: passes and samples must be numbers ({err})") from None
    kb, nb = np.broadcast_arrays(k, n)
    bad_n = ~(nb >= 1) | (nb != np.floor(nb))  # NaN fails every comparison
    if np.any(bad_n):
        raise InvalidCounts(f"invalid PassUntil counts: samples must be whole numbers >= 1 "
                            f"(got {nb[bad_n].flat[0]:g})")
    bad_k = ~((kb >= 0) & (kb <= nb)) | (kb != np.floor(kb))
    if np.any(bad_k):
        i = np.flatnonzero(bad_k.ravel())[0]
        raise InvalidCounts(f"invalid PassUntil counts: passes must be whole numbers in [0, samples] "
                            f"(got {kb.flat[i]:g} passes in {nb.flat[i]:g} samples)")
    if k_target is not None and (k_target < 1 or np.any(k > k_target)):
        raise InvalidCounts(f"invalid PassUntil counts: k_target must be >= 1 and >= every passes count "
                            f"(k_target {k_target}, most passes {np.max(k):g})")
    return k, n


def pu_mle(passes: ArrayLike, samples: ArrayLike) -> np.ndarray:
    """PU = passes / samples, the maximum-likelihood estimate under either stopping outcome."""
    k, n = _validate(passes, samples)
    return k / n


def pu_unbiased(passes: ArrayLike, samples: ArrayLike, *, k_target: int) -> np.ndarray:
    """The unbiased estimate for the rule "stop at k_target passes or at the budget".

    (K-1)/(n-1) where sampling stopped at the K-th pass (1 when K = n = 1), k/n where the
    budget stopped it (Girshick, Mosteller and Savage's path-counting estimator).
    """
    k, n = _validate(passes, samples, k_target)
    stopped_at_k = k >= k_target
    with np.errstate(divide="ignore", invalid="ignore"):
        at_k = np.where(n > 1, (k_target - 1) / (n - 1), 1.0)
    return np.where(stopped_at_k, at_k, k / n)


def interval(
    passes: ArrayLike,
    samples: ArrayLike,
    *,
    k_target: int,
    confidence: float = 0.95,
    method: str = "exact",
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided confidence interval (low, high) for the pass probability.

    method="exact" guarantees coverage >= confidence (conservative where n is small and the
    outcome space is coarse, e.g. p near 1); method="midp" counts half the observed outcome's
    probability and is close to nominal on average.
    """
    k, n = _validate(passes, samples, k_target)
    alpha = 1.0 - confidence
    if method == "exact":
        return _exact_interval(k, n, k_target, alpha)
    if method == "midp":
        return _midp_interval(k, n, k_target, alpha)
    raise ValueError(f"unknown interval method {method!r} (use 'exact' or 'midp')")


def _exact_interval(k, n, k_target, alpha):
    at_k = k >= k_target
    kk = np.where(at_k, k_target, k)
    low = np.where(kk > 0, sps.beta.ppf(alpha / 2, np.maximum(kk, 1), n - kk + 1), 0.0)
    # K-stop: upper end from P(Bin(n-1, p) <= K-1) = alpha/2; budget stop: Clopper-Pearson.
    a, b = np.where(at_k, kk, kk + 1), n - kk
    high = np.where(b > 0, sps.beta.ppf(1 - alpha / 2, a, np.maximum(b, 1)), 1.0)
    return np.asarray(low, dtype=float), np.asarray(high, dtype=float)


def _tail_probs(k: float, n: float, k_target: int, p: float) -> tuple[float, float, float]:
    """P(outcome more extreme-high), P(outcome equal), P(more extreme-low) at p."""
    if k >= k_target:  # stopped at the K-th pass on sample n
        higher = sps.binom.sf(k_target - 1, n - 1, p)  # K-th pass before sample n
        equal = sps.nbinom.pmf(n - k_target, k_target, p)
        return higher, equal, max(0.0, 1.0 - higher - equal)
    lower = sps.binom.cdf(k - 1, n, p) if k > 0 else 0.0
    equal = sps.binom.pmf(k, n, p)
    return max(0.0, 1.0 - lower - equal), equal, lower


def _midp_interval(k, n, k_target, alpha):
    lows, highs = [], []
    for ki, ni in np.broadcast(k, n):
        def f_low(logit, ki=ki, ni=ni):
            higher, equal, _ = _tail_probs(ki, ni, k_target, special.expit(logit))
            return higher + 0.5 * equal - alpha / 2

        def f_high(logit, ki=ki, ni=ni):
            _, equal, lower = _tail_probs(ki, ni, k_target, special.expit(logit))
            return lower + 0.5 * equal - alpha / 2

        lo_b, hi_b = -60.0, 40.0
        lows.append(special.expit(optimize.brentq(f_low, lo_b, hi_b)) if ki > 0 else 0.0)
        highs.append(special.expit(optimize.brentq(f_high, lo_b, hi_b)) if f_high(hi_b) < 0 else 1.0)
    shape = np.broadcast(k, n).shape
    return np.reshape(lows, shape), np.reshape(highs, shape)


def upper_bound(samples: ArrayLike, *, confidence: float = 0.95) -> np.ndarray:
    """One-sided upper bound on p after zero passes in `samples` samples: 1 - alpha^(1/n)."""
    n = np.asarray(samples, dtype=np.float64)
    return -np.expm1(np.log1p(-confidence) / n)


def resolution_floor(max_samples: ArrayLike, *, confidence: float = 0.95) -> np.ndarray:
    """The smallest pass probability a budget resolves.

    Any p above it yields at least one pass within the budget with probability >= confidence;
    an instance with zero passes is known only to lie below it. About 3/max_samples at 95%.
    """
    return upper_bound(max_samples, confidence=confidence)


def expected_samples(p: ArrayLike, *, k_target: int, max_samples: int) -> np.ndarray:
    """E[samples drawn] = E[min(N_K, max_samples)], N_K the index of the K-th pass.

    With F = N_K - K failures (negative binomial) and M = max_samples - K,
    E[min(F, M)] = K(1-p)/p P(F' <= M-2) + M P(F >= M), F' ~ NB(K+1, p) (since
    f NB(f; K, p) = K(1-p)/p NB(f-1; K+1, p)): closed form, so a budget of 10^12 costs no
    more than one of 100. About K/p while that is well below the budget.
    """
    p_arr = np.atleast_1d(np.asarray(p, dtype=np.float64))
    if k_target < 1 or max_samples < k_target:
        raise ValueError("need k_target >= 1 and max_samples >= k_target")
    m = float(max_samples) - k_target
    out = np.full(p_arr.shape, float(max_samples))
    pos = p_arr > 0
    q = p_arr[pos]
    mean_f = (k_target * (1 - q) / q * sps.nbinom.cdf(m - 2, k_target + 1, q)
              + m * sps.nbinom.sf(m - 1, k_target, q))
    out[pos] = k_target + mean_f
    return out.reshape(np.shape(p))


def pass_at_k(samples: ArrayLike, passes: ArrayLike, k: int) -> np.ndarray:
    """pass@k from n samples with c passes, in the numerically stable product form.

    1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i). With PassUntil counts (stopped at
    the K-th pass) this is biased upward, strongly: pass@1 = K/n has mean about K/(K-1) x p
    for K >= 2 (1.25x at K = 5, 1.95x at K = 2) and about p ln(1/p) at K = 1 (4.6x at p = 1e-2,
    7.2x at 1e-3, 10x at 1e-4; simulated, 20,000 runs each). Use `pu_unbiased` for PassUntil
    counts; this formula is for a fixed number of samples.
    """
    n_arr, c_arr = np.broadcast_arrays(np.asarray(samples), np.asarray(passes))
    out = np.empty(n_arr.shape, dtype=np.float64)
    for idx, (n, c) in enumerate(zip(n_arr.ravel(), c_arr.ravel())):
        if n < k:
            raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
        out.flat[idx] = 1.0 if n - c < k else 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))
    return out


@dataclass(frozen=True)
class Estimate:
    """PassUntil estimate for one instance on one model."""

    passes: int
    samples: int
    k_target: int
    pu: float
    pu_unbiased: float
    low: float
    high: float
    stopped: str  # "k_passes" or "budget"

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(passes: int, samples: int, *, k_target: int, confidence: float = 0.95) -> Estimate:
    """All point estimates and the exact interval for one (passes, samples) pair."""
    low, high = interval(passes, samples, k_target=k_target, confidence=confidence)
    return Estimate(
        passes=int(passes),
        samples=int(samples),
        k_target=int(k_target),
        pu=float(pu_mle(passes, samples)),
        pu_unbiased=float(pu_unbiased(passes, samples, k_target=k_target)),
        low=float(low),
        high=float(high),
        stopped="k_passes" if passes >= k_target else "budget",
    )


@dataclass(frozen=True)
class BootstrapResult:
    """Mean over instances with its bootstrap standard error and percentile interval."""

    mean: float
    se: float
    low: float
    high: float
    n_boot: int

    def to_dict(self) -> dict:
        return asdict(self)


def bootstrap_mean(
    values: ArrayLike, *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> BootstrapResult:
    """Resample instances with replacement to get the dataset-level mean's uncertainty."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_mean needs at least one value")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return BootstrapResult(float(v.mean()), float(means.std(ddof=1)), float(lo), float(hi), n_boot)
