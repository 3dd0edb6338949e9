"""Budget planning: how many samples PassUntil will draw, and how long that takes.

From rough pass-probability guesses (a pilot run, a smaller model's results, or the exact
probability) the expected number of samples per instance is E[min(N_K, budget)], with N_K the
index of the K-th pass (`stats.expected_samples`): about K/p while that is below the budget.
The plan also says which instances will probably end at the budget (and so contribute only an
upper bound), and the wall time at the user's measured samples per second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from passuntil import stats


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
    p = np.clip(np.asarray(p_guess, dtype=float).ravel(), 0.0, 1.0)
    if k_target < 1 or max_samples < k_target:
        raise ValueError("need k_target >= 1 and max_samples >= k_target")
    expected = np.array([float(stats.expected_samples(pi, k_target=k_target, max_samples=max_samples))
                         for pi in p])
    from scipy.stats import binom

    budget_stop = binom.cdf(k_target - 1, max_samples, p)
    total = float(expected.sum())
    hours = total / samples_per_s / 3600 if samples_per_s else None
    return BudgetPlan(k_target, max_samples, tuple(expected.tolist()), tuple(budget_stop.tolist()), total, hours)
