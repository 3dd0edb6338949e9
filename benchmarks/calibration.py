"""Calibration of forecast intervals and the before-the-fact warnings, by seeded simulation.

    .venv/bin/python benchmarks/calibration.py [--series 100] [--part intervals|warnings|both]

Simulated series with a known law per instance (20 instances, the paper's sizes 0.036B..2.45B,
PassUntil with K passes or a per-cell budget); the pooled likelihood fit on the six smaller
sizes forecasts the mean PU at 2.45B. Prints:

* intervals: for each setting, how often the 90% "these instances" interval covers the true mean
  of the same 20 instances, and the 90% "population" interval the task's population mean
  (target: 85-95%), with the mean log error of the point;
* warnings: with the largest size (2.45B) held out, how often `forecast_warnings` raises
  "accelerated-emergence" on two-circuit series whose steep circuit takes over between the two
  largest fitted sizes, 0.89B and 1.54B (hits), and on plain-law series (false alarms); and every
  other warning code's rate.

Regimes: ordinary (a ~ N(1, 0.6), alpha ~ U(0.3, 0.7); K = 2 and 10, budgets 1e3 and 1e5) and
hard (each instance's PU at 2.45B is 10^U(-4, -2), alpha ~ U(0.5, 1.0): most fitted cells see
few or no passes; K = 2, budget 1e5).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np

from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.task_law import fit_likelihood, law_p
from passuntil.simulation import simulate_counts

N = np.array([3.6e7, 1.09e8, 2.41e8, 4.99e8, 8.92e8, 1.542e9, 2.45e9])
FIT, TARGET = N[:-1], N[-1]
X = np.log(N) - np.log(FIT).mean()
SETTINGS = (("ordinary", 2, 10**3), ("ordinary", 2, 10**5), ("ordinary", 10, 10**3),
            ("ordinary", 10, 10**5), ("hard", 2, 10**5))


def draw_laws(regime: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, alpha) of `size` instances of a regime's task population (F = a - alpha X)."""
    if regime == "ordinary":
        return rng.normal(1.0, 0.6, size), rng.uniform(0.3, 0.7, size)
    if regime == "hard":
        alpha = rng.uniform(0.5, 1.0, size)
        f_target = np.log(-np.log(10 ** rng.uniform(-4, -2, size)))
        return f_target + alpha * X[-1], alpha
    raise ValueError(regime)


def population_mean(regime: str, n_params: float = TARGET, draws: int = 400_000) -> float:
    """The task population's mean PU at N (Monte Carlo, fixed seed)."""
    a, alpha = draw_laws(regime, np.random.default_rng(99), draws)
    return float(law_p(a - alpha * (np.log(n_params) - np.log(FIT).mean())).mean())


def passuntil_counts(p: np.ndarray, rng: np.random.Generator, *, k_target: int, budget: int) -> SeriesCounts:
    """PassUntil (K passes or `budget` samples) on every cell of a true (I, M) pass-probability matrix."""
    k, n = np.zeros(p.shape, dtype=np.int64), np.zeros(p.shape, dtype=np.int64)
    for i in range(p.shape[0]):
        for m in range(p.shape[1]):
            (k[i, m],), (n[i, m],) = simulate_counts(p[i, m], k_target=k_target, max_samples=budget, runs=1, rng=rng)
    return SeriesCounts(N[: p.shape[1]], k, n, k_target)


def law_series(regime: str, rng: np.random.Generator, *, k_target: int, budget: int,
               instances: int = 20) -> tuple[SeriesCounts, np.ndarray]:
    """Counts at all seven sizes and the true (I, 7) pass probabilities."""
    a, alpha = draw_laws(regime, rng, instances)
    p = law_p(a[:, None] - alpha[:, None] * X[None])
    return passuntil_counts(p, rng, k_target=k_target, budget=budget), p


def circuit_series(rng: np.random.Generator, *, k_target: int, budget: int, instances: int = 20
                   ) -> tuple[SeriesCounts, np.ndarray]:
    """Two circuits per instance (paper Theorem 3, as tests/test_emergence.py's truth): a slow one,
    law(a + 0.5, 0.4 alpha), and a steep one, law(a2, 3 alpha), PU = their mean; a2 puts the
    takeover (both circuits equal) at a size drawn log-uniformly between the two largest fitted
    sizes, 0.89B and 1.54B: the forecast for 2.45B is made after the takeover began but before
    2.45B is evaluated."""
    a, alpha = draw_laws("ordinary", rng, instances)
    slow_a, slow, steep = a + 0.5, 0.4 * alpha, 3.0 * alpha
    x_cross = rng.uniform(X[-3], X[-2], instances)
    steep_a = slow_a + (steep - slow) * x_cross  # equal F at x_cross
    p = 0.5 * (law_p(slow_a[:, None] - slow[:, None] * X[None]) + law_p(steep_a[:, None] - steep[:, None] * X[None]))
    return passuntil_counts(p, rng, k_target=k_target, budget=budget), p


def interval_coverage(regime: str, k_target: int, budget: int, series: int, *, seed: int = 0,
                      level: float = 0.9) -> dict:
    """Coverage of the "these instances" and "population" intervals at the held-out 2.45B."""
    rng = np.random.default_rng([seed, k_target, budget, len(regime)])
    pop = population_mean(regime)
    these = population = 0
    err = []
    for _ in range(series):
        counts, p = law_series(regime, rng, k_target=k_target, budget=budget)
        f = fit_likelihood(counts.select_models(np.arange(6))).forecast(TARGET, level=level)
        truth = p[:, -1].mean()
        these += f.these_low <= truth <= f.these_high
        population += f.population_low <= pop <= f.population_high
        err.append(np.log(f.point / truth))
    return {"regime": regime, "K": k_target, "budget": budget, "series": series, "these": these / series,
            "population": population / series, "bias_log": float(np.mean(err)),
            "rmse_log": float(np.sqrt(np.mean(np.square(err))))}


def warning_rates(kind: str, series: int, *, k_target: int = 2, budget: int = 10**4, seed: int = 0) -> dict:
    """Share of series (largest size held out) on which each warning code fires."""
    from passuntil.scaling.warnings import forecast_warnings

    rng = np.random.default_rng([seed, len(kind), budget])
    fired: Counter = Counter()
    for _ in range(series):
        if kind == "circuits":
            counts, _ = circuit_series(rng, k_target=k_target, budget=budget)
        else:
            counts, _ = law_series("ordinary", rng, k_target=k_target, budget=budget)
        train = counts.select_models(np.arange(6))
        fit = fit_likelihood(train)
        fired.update({w.code for w in forecast_warnings(train, fit, TARGET)})
    return {"kind": kind, "K": k_target, "budget": budget, "series": series,
            **{code: n / series for code, n in sorted(fired.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=100)
    ap.add_argument("--part", choices=("intervals", "warnings", "both"), default="both")
    args = ap.parse_args()
    t0 = time.time()
    if args.part in ("intervals", "both"):
        print("| regime | K | budget | series | 90% 'these' covers | 90% 'population' covers | bias log | RMSE log |")
        print("|---|---|---|---|---|---|---|---|")
        for regime, k, budget in SETTINGS:
            r = interval_coverage(regime, k, budget, args.series)
            print(f"| {regime} | {k} | {budget:.0e} | {r['series']} | {r['these']:.0%} | {r['population']:.0%} "
                  f"| {r['bias_log']:+.3f} | {r['rmse_log']:.3f} |", flush=True)
    if args.part in ("warnings", "both"):
        print("\n| truth | K | budget | series | accelerated-emergence | other codes |")
        print("|---|---|---|---|---|---|")
        for budget in (10**4, 10**5):
            for kind in ("circuits", "plain"):
                r = warning_rates(kind, args.series, budget=budget)
                other = ", ".join(f"{c} {v:.0%}" for c, v in r.items()
                                  if c not in ("kind", "K", "budget", "series", "accelerated-emergence"))
                print(f"| {kind} | {r['K']} | {budget:.0e} | {r['series']} | "
                      f"{r.get('accelerated-emergence', 0.0):.0%} | {other or '-'} |", flush=True)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
