"""Samples needed for a given forecast precision: fixed n per cell, PassUntil, planned budgets.

    .venv/bin/python benchmarks/efficiency.py [--reps 30] [--a-mean 1.0]

Simulated series with a known law per instance (20 instances, the paper's six smaller sizes,
forecast of the 2.4B mean PU with the pooled likelihood fit; seeded; --a-mean 1.6 makes the
small models' pass probabilities 1e-4..1e-6). Strategies, each at several budgets:
  fixed n          every instance x model gets n samples (ordinary evaluation);
  PassUntil K      sample each cell until K passes, at most 10^6;
  planned (oracle) `allocate_budget` with the true pass probabilities as guesses;
  planned (pilot)  the same with guesses from a pilot (PassUntil K = 1, at most 64 per cell).
Prints the root-mean-square log forecast error and the mean samples spent, and for each
strategy the fixed-n samples that reach the same error (log-log interpolation).
"""

from __future__ import annotations

import argparse

import numpy as np

from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.planner import allocate_budget
from passuntil.scaling.task_law import fit_likelihood, law_p
from passuntil.simulation import simulate_counts

N = np.array([3.6e7, 1.09e8, 2.41e8, 4.99e8, 8.92e8, 1.542e9, 2.45e9])
FIT, TARGET = N[:-1], N[-1]
CELLS = 20 * FIT.size


def truth(rng, a_mean):
    x0 = np.log(FIT).mean()
    a = rng.normal(a_mean, 0.6, 20)
    alpha = rng.uniform(0.3, 0.7, 20)
    return law_p(a[:, None] - alpha[:, None] * (np.log(N)[None] - x0))


def passuntil_counts(p, k_target, caps, rng):
    k = np.zeros(p.shape, dtype=np.int64)
    n = np.zeros(p.shape, dtype=np.int64)
    caps = np.broadcast_to(caps, p.shape)
    for i in range(p.shape[0]):
        for m in range(p.shape[1]):
            (k[i, m],), (n[i, m],) = simulate_counts(p[i, m], k_target=k_target,
                                                     max_samples=int(caps[i, m]), runs=1, rng=rng)
    return k, n


def strategy(name, arg, p, rng):
    """(k, n, K) for one simulated evaluation of the fitted sizes."""
    small = p[:, :-1]
    if name == "fixed n":
        n = np.full(small.shape, int(arg))
        return rng.binomial(n, small), n, 1
    if name == "PassUntil K":
        k, n = passuntil_counts(small, int(arg), 10**6, rng)
        return k, n, int(arg)
    if name == "planned (oracle)":
        n = allocate_budget(small, FIT, TARGET, int(arg), min_samples=8).samples
        return rng.binomial(n, small), n, 1
    pk, pn = passuntil_counts(small, 1, 64, rng)
    guess = np.where(pk > 0, pk / pn, 0.5 / pn)
    n = allocate_budget(guess, FIT, TARGET, int(arg), min_samples=8).samples
    return rng.binomial(n, small) + pk, n + pn, 1


def measure(name, arg, reps, a_mean):
    rng = np.random.default_rng(1)
    errs, spent = [], []
    for _ in range(reps):
        p = truth(rng, a_mean)
        k, n, kt = strategy(name, arg, p, rng)
        fc = fit_likelihood(SeriesCounts(FIT, k, n, kt)).forecast(TARGET).point
        errs.append(np.log(fc / p[:, -1].mean()))
        spent.append(n.sum())
    return float(np.sqrt(np.mean(np.square(errs)))), float(np.mean(spent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--a-mean", type=float, default=1.0)
    args = ap.parse_args()
    plan = {"fixed n": [100, 300, 1_000, 3_000, 10_000, 100_000],
            "PassUntil K": [2, 5, 20, 50],
            "planned (oracle)": [12_000, 36_000, 120_000],
            "planned (pilot)": [12_000, 36_000, 120_000]}
    rows = {name: [(a, *measure(name, a, args.reps, args.a_mean)) for a in grid]
            for name, grid in plan.items()}
    fixed = sorted(rows["fixed n"], key=lambda r: r[1])
    for name, results in rows.items():
        for arg, rmse, spent in results:
            equiv = np.exp(np.interp(np.log(rmse), np.log([r[1] for r in fixed]),
                                     np.log([r[2] for r in fixed])))
            print(f"{name:17s} {arg:>8,}: RMSE log error {rmse:.4f}, {spent:>12,.0f} samples; "
                  f"fixed n reaches that with {equiv:>12,.0f} ({equiv / spent:.2f}x)")


if __name__ == "__main__":
    main()
