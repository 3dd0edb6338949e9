"""Samples needed for a given forecast precision: fixed n, PassUntil K, static and sequential designs.

    .venv/bin/python benchmarks/efficiency.py [--reps 30] [--regime emergent|ordinary|both]

Simulated series with a known law per instance (20 instances, the paper's sizes 0.036B..2.45B;
the 2.45B mean PU over the same 20 instances is forecast from the six smaller sizes with the
pooled likelihood fit, point = posterior mean; seeded, seed r for repetition r in every
strategy, so all strategies see the same truths). Regimes:
  emergent   every fitted cell has PU < 1e-3 (F at 1.54B = log(-log 1e-3) + Exp(0.35)), slopes
             alpha ~ U(1.0, 1.8): target mean ~ 1.2e-2, the small sizes hopeless (the paper's case);
  ordinary   a ~ N(1.0, 0.6), alpha ~ U(0.3, 0.7): every size has passes at a few hundred samples.
Strategies, each at several budgets:
  fixed n          every instance x model gets n samples (ordinary evaluation);
  PassUntil K      sample each cell until K passes (K = 1, 2, 5), capped per cell;
  static           `allocate_budget` with guesses from a pilot (PassUntil K = 1 capped so the
                   pilot spends at most 10% of the total), then the rest in one go;
  sequential       `scaling.design`: rounds growing by 50%, each refit and allocated by the
                   expected variance reduction of log(target mean) per sample (posterior draws).
Prints RMSE of log(forecast / true mean) against mean samples spent, then for each strategy
the samples needed for 25% and 10% RMSE (log-log interpolation between budgets; "never" when
the largest budget does not reach it) and the ratio to fixed n and to PassUntil K = 2 (">": the
reference never got there; its largest spend over the strategy's need, a lower bound). The
emergent regime takes about 6 minutes on one core at 30 seeds, the ordinary one about 4.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.design import SequentialDesign, run_sequential
from passuntil.scaling.planner import allocate_budget
from passuntil.scaling.task_law import fit_likelihood, law_p
from passuntil.simulation import simulate_counts

N = np.array([3.6e7, 1.09e8, 2.41e8, 4.99e8, 8.92e8, 1.542e9, 2.45e9])
FIT, TARGET = N[:-1], N[-1]
X = np.log(N) - np.log(FIT).mean()
INSTANCES = 20
CELLS = INSTANCES * FIT.size
GOALS = {"emergent": (0.25, 0.10), "ordinary": (0.25, 0.10, 0.05, 0.02, 0.01)}


def truth(regime: str, rng: np.random.Generator) -> np.ndarray:
    """(I, 7) true pass probabilities."""
    if regime == "emergent":
        alpha = rng.uniform(1.0, 1.8, INSTANCES)
        f_last = np.log(-np.log(1e-3)) + rng.exponential(0.35, INSTANCES)  # F at the largest fitted size
        a = f_last + alpha * X[-2]
    else:
        a = rng.normal(1.0, 0.6, INSTANCES)
        alpha = rng.uniform(0.3, 0.7, INSTANCES)
    return law_p(a[:, None] - alpha[:, None] * X[None])


def point(k: np.ndarray, n: np.ndarray, k_target: int = 1) -> float:
    """The forecast of the target mean over these instances: posterior mean of the likelihood fit."""
    fit = fit_likelihood(SeriesCounts(FIT, k, n, k_target))
    return float(fit.sample_means(TARGET, draws=1000, seed=0, resample_instances=False).mean())


def passuntil_counts(p, k_target, cap, rng):
    k = np.zeros(p.shape, dtype=np.int64)
    n = np.zeros(p.shape, dtype=np.int64)
    caps = np.broadcast_to(cap, p.shape)
    for i in range(p.shape[0]):
        for m in range(p.shape[1]):
            (k[i, m],), (n[i, m],) = simulate_counts(p[i, m], k_target=k_target, max_samples=int(caps[i, m]),
                                                     runs=1, rng=rng)
    return k, n


def one_budget(name: str, arg: float, p: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """(log error, samples) of one strategy at one budget on one truth."""
    small = p[:, :-1]
    if name == "fixed n":
        n = np.full(small.shape, int(arg))
        k, kt = rng.binomial(n, small), 1
    elif name.startswith("PassUntil"):
        kt = int(name.split("=")[1])
        k, n = passuntil_counts(small, kt, int(arg), rng)
    else:  # static
        pk, pn = passuntil_counts(small, 1, max(int(0.1 * arg / CELLS), 1), rng)
        guess = np.where(pk > 0, pk / np.maximum(pn, 1), 0.5 / np.maximum(pn, 1))
        n_more = allocate_budget(guess, FIT, TARGET, int(arg) - int(pn.sum()), min_samples=1).samples
        k, n, kt = rng.binomial(n_more, small) + pk, n_more + pn, 1
    return float(np.log(point(k, n, kt) / p[:, -1].mean())), float(n.sum())


def sequential(p: np.ndarray, total: int, first: int, seed: int, rng: np.random.Generator):
    """[(samples, log error)] after every round of one sequential run up to `total`."""
    small = p[:, :-1]
    design = SequentialDesign(TARGET, total_budget=total, first_round=first)
    start = SeriesCounts(FIT, np.zeros(small.shape, dtype=np.int64), np.zeros(small.shape, dtype=np.int64))
    trace = []

    def sample(quota):
        return rng.binomial(quota, small), quota

    def record(counts):
        trace.append((float(counts.samples.sum()),
                      float(np.log(point(counts.passes, counts.samples) / p[:, -1].mean()))))

    run_sequential(start, design, sample, seed=seed, on_round=record)
    return trace


def needed(curve: list[tuple[float, float]], goal: float) -> float:
    """Samples where the RMSE curve [(samples, rmse)] first falls to `goal` (log-log), else inf."""
    curve = sorted(curve)
    for (s0, r0), (s1, r1) in zip(curve, curve[1:]):
        if r0 <= goal:
            return s0
        if r1 <= goal:
            t = (np.log(goal) - np.log(r0)) / (np.log(r1) - np.log(r0))
            return float(np.exp(np.log(s0) + t * (np.log(s1) - np.log(s0))))
    return curve[0][0] if curve and curve[0][1] <= goal else np.inf


PLANS = {
    "emergent": {"fixed n": [1e4, 1e5, 3e5, 1e6, 3e6, 1e7, 3e7, 1e8, 3e8, 1e9],
                 "PassUntil K=1": [1e4, 1e5, 1e6, 1e7, 1e8], "PassUntil K=2": [1e4, 1e5, 1e6, 1e7, 1e8],
                 "PassUntil K=5": [1e4, 1e5, 1e6, 1e7, 1e8],
                 "static": [1e7, 3e7, 1e8, 3e8, 1e9, 3e9],
                 "sequential": (3e9, 100_000)},
    "ordinary": {"fixed n": [10, 30, 100, 300, 1000, 3000],
                 "PassUntil K=1": [1e4, 1e6], "PassUntil K=2": [1e4, 1e6], "PassUntil K=5": [1e4, 1e6],
                 "static": [3_000, 12_000, 36_000, 120_000],
                 "sequential": (400_000, 1_200)},
}


def run_regime(regime: str, reps: int) -> None:
    plan = PLANS[regime]
    curves: dict[str, list[tuple[float, float]]] = {}
    t0 = time.time()
    for name, grid in plan.items():
        if name == "sequential":
            total, first = grid
            traces = [sequential(truth(regime, np.random.default_rng(r)), int(total), first, r,
                                 np.random.default_rng([r, 1])) for r in range(reps)]
            rounds = min(len(t) for t in traces)
            curves[name] = [(float(np.mean([t[j][0] for t in traces])),
                             float(np.sqrt(np.mean([t[j][1] ** 2 for t in traces])))) for j in range(rounds)]
        else:
            curves[name] = []
            for arg in grid:
                res = [one_budget(name, arg, truth(regime, np.random.default_rng(r)), np.random.default_rng([r, 1]))
                       for r in range(reps)]
                errs, spent = np.array(res).T
                curves[name].append((float(spent.mean()), float(np.sqrt(np.mean(errs**2)))))
    print(f"\n== {regime} regime, {reps} seeds ({time.time() - t0:.0f} s) ==")
    for name, curve in curves.items():
        print(f"{name:14s} " + "  ".join(f"{s:.2g}:{r:.3f}" for s, r in curve))
    goals = GOALS[regime]
    print(f"\nsamples for an RMSE of log(target mean) of {', '.join(f'{g:.0%}' for g in goals)}; "
          "ratios: fixed n's samples / the strategy's, then PassUntil K=2's / the strategy's")
    ref = [needed(curves["fixed n"], g) for g in goals]
    pu2 = [needed(curves["PassUntil K=2"], g) for g in goals]

    def ratio(a, b, most):  # a reference that never gets there spent at least `most`: a lower bound
        if not np.isfinite(b):
            return "       -"
        return f"{a / b:7.2f}x" if np.isfinite(a) else f" >{most / b:5.1f}x"

    for name, curve in curves.items():
        need = [needed(curve, g) for g in goals]
        print(f"{name:14s} " + " ".join(f"{x:9.3g}" if np.isfinite(x) else f"{'never':>9s}" for x in need)
              + " | vs fixed n" + "".join(ratio(a, b, curves["fixed n"][-1][0]) for a, b in zip(ref, need))
              + " | vs K=2" + "".join(ratio(a, b, curves["PassUntil K=2"][-1][0]) for a, b in zip(pu2, need)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--regime", choices=["emergent", "ordinary", "both"], default="both")
    args = ap.parse_args()
    for regime in (["emergent", "ordinary"] if args.regime == "both" else [args.regime]):
        run_regime(regime, args.reps)


if __name__ == "__main__":
    main()
