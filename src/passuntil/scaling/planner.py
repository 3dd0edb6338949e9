"""Budget planning: how many samples PassUntil will draw, and how long that takes.

From rough pass-probability guesses (a pilot run, a smaller model's results, or the exact
probability) the expected number of samples per instance is E[min(N_K, budget)], with N_K the
index of the K-th pass (`stats.expected_samples`): about K/p while that is below the budget.
The plan also says which instances will probably end at the budget (and so contribute only an
upper bound), and the wall time at the user's measured samples per second.

`allocate_budget` plans one forecast's samples in one go from guesses. When the guesses come
from a pilot it gains little (2.1x fewer samples than fixed n for 25% RMSE in the emergent
regime of benchmarks/efficiency.py); `scaling.design` re-plans after every round from the
posterior instead (9.7x, and 21.7x for 10%; docs/statistics.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from passuntil import stats
from passuntil.errors import UserError


@dataclass(frozen=True)
class BudgetPlan:
    k_target: int
    max_samples: int
    expected_samples: tuple[float, ...]  # per instance
    p_budget_stop: tuple[float, ...]  # probability that the instance ends at the budget
    total_samples: float
    hours: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def plan_budget(p_guess, *, k_target: int, max_samples: int, samples_per_s: float | None = None) -> BudgetPlan:
    """Expected cost of PassUntil for instances with (guessed) pass probabilities `p_guess`."""
    p = np.asarray(p_guess, dtype=float).ravel()
    if not np.all((p >= 0) & (p <= 1)):  # also refuses NaN
        bad = p[~((p >= 0) & (p <= 1))][0]
        raise UserError(f"a pass-probability guess must lie in [0, 1] (got {bad})")
    if k_target < 1 or max_samples < k_target:
        raise ValueError("need k_target >= 1 and max_samples >= k_target")
    if samples_per_s is not None and not (math.isfinite(samples_per_s) and samples_per_s > 0):
        raise UserError(f"samples per second must be finite and > 0 (got {samples_per_s})")
    expected = np.array([float(stats.expected_samples(pi, k_target=k_target, max_samples=max_samples))
                         for pi in p])
    from scipy.stats import binom

    budget_stop = binom.cdf(k_target - 1, float(max_samples), p)  # float: any budget, even 10^30
    total = float(expected.sum())
    hours = total / samples_per_s / 3600 if samples_per_s else None
    return BudgetPlan(k_target, max_samples, tuple(expected.tolist()), tuple(budget_stop.tolist()), total, hours)


@dataclass(frozen=True)
class Allocation:
    """Samples per instance x model that minimise the forecast's variance for a total budget."""

    samples: np.ndarray  # (I, M)
    predicted_variance: float  # of the forecast mean PU, by the delta method
    fixed_variance: float  # the same, for the same total spread evenly
    total: int

    @property
    def efficiency(self) -> float:
        """How many times the samples an even split needs for the same variance."""
        return self.fixed_variance / self.predicted_variance

    def to_dict(self) -> dict:
        return {"samples": self.samples.tolist(), "predicted_variance": self.predicted_variance,
                "fixed_variance": self.fixed_variance, "total": self.total,
                "efficiency": self.efficiency}


def _cost_weights(p_guess, n_params, target_n: float, active: np.ndarray) -> np.ndarray:
    """c[i, m] with Var(forecast mean PU) ~= sum c[i, m] / n[i, m] over the active cells.

    Instance i's forecast F* = sum_m w_im F_im is the least-squares line through its active
    cells F_im = log(-log p_im) at x_m = log N_m, evaluated at x* = log target; Var(F_im) from n
    samples is (1 - p) / (n p log(p)^2) (delta method); dPU/dF = p* log p*."""
    p = np.clip(np.asarray(p_guess, dtype=float), 1e-12, 1 - 1e-9)
    x = np.log(np.asarray(n_params, dtype=float))
    xs = np.log(target_n)
    f = np.log(-np.log(p))
    c = np.zeros(p.shape)
    for i in range(p.shape[0]):
        use = active[i]
        xu = x[use]
        w = 1 / xu.size + (xs - xu.mean()) * (xu - xu.mean()) / np.sum((xu - xu.mean()) ** 2)
        b = np.polyfit(xu, f[i, use], 1)
        p_star = np.exp(-np.exp(np.clip(np.polyval(b, xs), -50, 50)))
        dp = (p_star * np.log(max(p_star, 1e-300))) ** 2 / p.shape[0] ** 2
        v = (1 - p[i, use]) / (p[i, use] * np.log(p[i, use]) ** 2)
        c[i, use] = dp * w**2 * v
    return c


def allocate_budget(p_guess, n_params, target_n: float, total: int, *,
                    min_samples: int = 1, min_expected_passes: float = 3.0) -> Allocation:
    """Neyman allocation: n[i, m] proportional to sqrt(c[i, m]) (see `_cost_weights`).

    The delta method needs passes: a cell whose share would not buy `min_expected_passes`
    expected passes is dropped (it keeps `min_samples`) and the rest re-allocated, keeping at
    least the two largest models per instance. The even split is what fixed-n evaluation
    would spend; `efficiency` compares the two by the same variance formula."""
    p = np.clip(np.asarray(p_guess, dtype=float), 1e-12, 1 - 1e-9)
    if total < min_samples * p.size:
        raise ValueError(f"a total of {total} cannot give {min_samples} sample(s) to each of "
                         f"{p.size} cells")
    order = np.argsort(np.asarray(n_params, dtype=float))
    active = np.ones(p.shape, dtype=bool)
    while True:
        c = _cost_weights(p, n_params, target_n, active)
        root = np.sqrt(c)
        spare = total - min_samples * p.size
        n = min_samples + np.floor(spare * root / root.sum())
        starved = active & (n * p < min_expected_passes)
        starved[:, order[-2:]] = False
        if not starved.any():
            break
        i, m = np.unravel_index(np.argmin(np.where(starved, n * p, np.inf)), p.shape)
        active[i, m] = False
    c_all = _cost_weights(p, n_params, target_n, np.ones(p.shape, dtype=bool))
    fixed = np.full(p.shape, total / p.size)
    return Allocation(n.astype(np.int64), float(np.sum(c / n)), float(np.sum(c_all / fixed)),
                      int(n.sum()))
