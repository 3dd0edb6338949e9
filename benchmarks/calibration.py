"""Calibration of forecast intervals and the before-the-fact warnings, by seeded simulation.

    .venv/bin/python benchmarks/calibration.py [--series 100] [--part intervals|design|prior|warnings|both]
        [--settings 0,2] [--seed 0] [--method likelihood|auto|bayes|bayes-gamma2|bayes-vague]
        [--instances 20]

Simulated series with a known law per instance (20 instances, the paper's sizes 0.036B..2.45B,
PassUntil with K passes or a per-cell budget); the pooled likelihood fit on the six smaller
sizes forecasts the mean PU at 2.45B. Prints:

* intervals: for each setting, how often the 90% "these instances" interval covers the true mean
  of the same 20 instances, and the 90% "population" interval the task's population mean
  (target: 85-95%), with the mean log error of the point (the posterior median) and of the
  posterior mean of the same draws;
* warnings: with the largest size (2.45B) held out, how often `forecast_warnings` raises
  "accelerated-emergence" on two-circuit series whose steep circuit takes over between the two
  largest fitted sizes, 0.89B and 1.54B (hits), and on plain-law series (false alarms); and every
  other warning code's rate; "circuits-late": the takeover between 1.54B and the 2.45B target;
* design: the emergent regime at the sequential design's stopping point (by width, by budget):
  coverage of its 90% "these instances" interval, bias of log(point);
* prior: where the hard regime's upward bias comes from (fitted vs true prior, `prior_diagnostic`).

`--settings 0,2` runs only those rows of a part's table (numbered from 0).

Regimes: ordinary (a ~ N(1, 0.6), alpha ~ U(0.3, 0.7); K = 2 and 10, budgets 1e3 and 1e5),
hard (each instance's PU at 2.45B is 10^U(-4, -2), alpha ~ U(0.5, 1.0): most fitted cells see
few or no passes; K = 2, budget 1e5) and emergent (every fitted cell PU < 1e-3, alpha ~ U(1, 1.8);
in the intervals part a fixed 1e5 or 1e6 samples per cell, "K" = fixed n).

`--method` picks the fit whose intervals are measured (likelihood; auto, the CLI's default:
bayes where over half the fitted cells have no pass, else likelihood; bayes, the full-Bayes fit of
scaling/bayes.py; bayes-gamma2 and bayes-vague, its prior variants); every method sees the same
series for the same seed and row.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np

from passuntil.scaling.bayes import ESS_WARN, fit_bayes
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.fitters import fit_task_law
from passuntil.scaling.task_law import fit_likelihood, law_p
from passuntil.simulation import simulate_counts

N = np.array([3.6e7, 1.09e8, 2.41e8, 4.99e8, 8.92e8, 1.542e9, 2.45e9])
FIT, TARGET = N[:-1], N[-1]
X = np.log(N) - np.log(FIT).mean()
# K = 0: a fixed number of samples (`budget`) in every cell, no stopping rule (the emergent
# regime at what the sequential design spends per cell early on)
SETTINGS = (("ordinary", 2, 10**3), ("ordinary", 2, 10**5), ("ordinary", 10, 10**3),
            ("ordinary", 10, 10**5), ("hard", 2, 10**5), ("emergent", 0, 10**5), ("emergent", 0, 10**6))
# --method: the task-law fit whose intervals are measured (same series and seeds for each)
FITS = {"likelihood": fit_likelihood, "bayes": fit_bayes, "auto": lambda counts: fit_task_law(counts, "auto"),
        "bayes-gamma2": lambda counts: fit_bayes(counts, sd_prior="gamma2"),
        "bayes-vague": lambda counts: fit_bayes(counts, mu_prior=((0.0, 10.0), (0.0, 10.0)))}


# mean and sd of F at 2.45B and of alpha in the hard regime (F = log(-log 10^U(-4, -2)), alpha ~ U(0.5, 1))
_F_HARD = np.log(np.log(10.0) * np.random.default_rng(98).uniform(2, 4, 400_000))
HARD_GAUSS = (float(_F_HARD.mean()), float(_F_HARD.std()), 0.75, 0.5 / np.sqrt(12))


def draw_laws(regime: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, alpha) of `size` instances of a regime's task population (F = a - alpha X)."""
    if regime == "ordinary":
        return rng.normal(1.0, 0.6, size), rng.uniform(0.3, 0.7, size)
    if regime == "emergent":  # every fitted cell below 1e-3 (benchmarks/efficiency.py's truth)
        alpha = rng.uniform(1.0, 1.8, size)
        return np.log(-np.log(1e-3)) + rng.exponential(0.35, size) + alpha * X[-2], alpha
    if regime == "hard-gauss":  # the hard regime's first two moments, Gaussian: a Gaussian prior is right
        f_mean, f_sd, a_mean, a_sd = HARD_GAUSS
        alpha = rng.normal(a_mean, a_sd, size)
        return rng.normal(f_mean, f_sd, size) + alpha * X[-1], alpha
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
    """PassUntil (K passes or `budget` samples) on every cell of a true (I, M) pass-probability matrix;
    K = 0: exactly `budget` samples per cell (binomial counts)."""
    if k_target == 0:
        n = np.full(p.shape, budget, dtype=np.int64)
        return SeriesCounts(N[: p.shape[1]], rng.binomial(n, p), n, 1)
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


def circuit_series(rng: np.random.Generator, *, k_target: int, budget: int, instances: int = 20,
                   late: bool = False) -> tuple[SeriesCounts, np.ndarray]:
    """Two circuits per instance (paper Theorem 3, as tests/test_emergence.py's truth): a slow one,
    law(a + 0.5, 0.4 alpha), and a steep one, law(a2, 3 alpha), PU = their mean; a2 puts the
    takeover (both circuits equal) at a size drawn log-uniformly between the two largest fitted
    sizes, 0.89B and 1.54B: the forecast for 2.45B is made after the takeover began but before
    2.45B is evaluated. `late`: the takeover lies between the largest fitted size and the target
    (1.54B and 2.45B), where nothing in the fitted sizes can show it."""
    a, alpha = draw_laws("ordinary", rng, instances)
    slow_a, slow, steep = a + 0.5, 0.4 * alpha, 3.0 * alpha
    x_cross = rng.uniform(X[-2], X[-1], instances) if late else rng.uniform(X[-3], X[-2], instances)
    steep_a = slow_a + (steep - slow) * x_cross  # equal F at x_cross
    p = 0.5 * (law_p(slow_a[:, None] - slow[:, None] * X[None]) + law_p(steep_a[:, None] - steep[:, None] * X[None]))
    return passuntil_counts(p, rng, k_target=k_target, budget=budget), p


def interval_coverage(regime: str, k_target: int, budget: int, series: int, *, seed: int = 0,
                      level: float = 0.9, method: str = "likelihood", instances: int = 20) -> dict:
    """Coverage of the "these instances" and "population" intervals at the held-out 2.45B, with
    the median width of the first in log, seconds per fit and (bayes fits) the share of series
    whose split-R-hat of log(mean) at 2.45B exceeds 1.05, whose largest over the five
    hyperparameters does, and whose thinnest instance's importance ESS is below ESS_WARN."""
    rng = np.random.default_rng([seed, k_target, budget, len(regime)])
    pop = population_mean(regime)
    these = population = 0
    err, err_mean, width, rhat, secs = [], [], [], [], []
    for _ in range(series):
        counts, p = law_series(regime, rng, k_target=k_target, budget=budget, instances=instances)
        t0 = time.time()
        fit = FITS[method](counts.select_models(np.arange(6)))
        f = fit.forecast(TARGET, level=level)
        secs.append(time.time() - t0)
        width.append(np.log(f.these_high / f.these_low))
        if hasattr(fit, "rhat"):  # the log mean at 2.45B; the largest over the hyperparameters; thin IS
            rhat.append((fit.rhat(TARGET), max(fit.extra.get("rhat_hyper", [np.nan])),
                         min(fit.extra.get("is_ess", [np.inf])) < ESS_WARN))
        truth = p[:, -1].mean()
        these += f.these_low <= truth <= f.these_high
        population += f.population_low <= pop <= f.population_high
        err.append(np.log(f.point / truth))
        err_mean.append(np.log(fit.sample_means(TARGET, resample_instances=False).mean() / truth))
    return {"regime": regime, "K": k_target, "budget": budget, "series": series, "these": these / series,
            "population": population / series, "bias_log": float(np.mean(err)),
            "bias_se": float(np.std(err, ddof=1) / np.sqrt(series)), "bias_log_mean": float(np.mean(err_mean)),
            "rmse_log": float(np.sqrt(np.mean(np.square(err)))), "width_log": float(np.median(width)),
            "seconds": float(np.median(secs)), "rhat_bad": float(np.mean(np.array(rhat)[:, 0] > 1.05)) if rhat else None,
            "rhat_hyper_bad": float(np.mean(np.array(rhat)[:, 1] > 1.05)) if rhat else None,
            "ess_low": float(np.mean(np.array(rhat)[:, 2])) if rhat else None}


def prior_diagnostic(series: int, *, seed: int = 0, k_target: int = 2, budget: int = 10**5) -> list[dict]:
    """Where the hard regime's upward bias comes from. On "hard-gauss" series (the hard regime's
    moments, Gaussian in (F at 2.45B, alpha), so a Gaussian prior is the right family and its true
    mean and covariance are known), the forecast's point (posterior mean of the mean PU over these
    instances) under four priors: the fitted one (EM), the true one, and each with one half
    swapped for the truth. Rows: relative error of the mean (sum of point - truth over sum of
    truth), mean log error, and the prior's mean and sd of F at the target."""
    from passuntil.scaling.task_law import Posterior, _posterior_modes, importance_draws

    f_mean, f_sd, a_mean, a_sd = HARD_GAUSS
    xt = X[-1]
    true_mu = np.array([f_mean + a_mean * xt, a_mean])
    true_cov = np.array([[f_sd**2 + (xt * a_sd) ** 2, xt * a_sd**2], [xt * a_sd**2, a_sd**2]])
    js = np.array([1.0, -xt])

    def point(c6, mu, cov, s):
        prec = np.linalg.inv(cov)
        x = c6.log_n - np.log(FIT).mean()
        k, n = c6.passes.astype(float), c6.samples.astype(float)
        mode, lap = _posterior_modes(k, n, x, np.repeat(mu[None], k.shape[0], 0), mu, prec)
        theta, w = importance_draws(Posterior(k, n, x, mu, prec, np.ones(k.shape[0])), mode, lap,
                                    np.random.default_rng([seed, s]), 4000)
        return float((w * law_p(theta[..., 0] - theta[..., 1] * xt)).sum(axis=0).mean())

    rng = np.random.default_rng([seed, k_target, budget, 99])
    names = ("fitted (EM)", "true mean, fitted cov", "fitted mean, true cov", "true")
    pts, truths, f_stats = {n: [] for n in names}, [], []
    for s in range(series):
        counts, p = law_series("hard-gauss", rng, k_target=k_target, budget=budget)
        c6 = counts.select_models(np.arange(6))
        fit = fit_likelihood(c6)
        mu, cov = np.asarray(fit.extra["prior_mean"]), np.asarray(fit.extra["prior_cov"])
        for name, (m, c) in zip(names, ((mu, cov), (true_mu, cov), (mu, true_cov), (true_mu, true_cov))):
            pts[name].append(point(c6, m, c, s))
        truths.append(p[:, -1].mean())
        f_stats.append((mu @ js, np.sqrt(js @ cov @ js)))
    t, fs = np.array(truths), np.array(f_stats)
    rows = []
    for name in names:
        e = np.log(np.array(pts[name]) / t)
        rows.append({"prior": name, "series": series, "rel_error_mean": float(np.sum(pts[name]) / t.sum() - 1),
                     "bias_log": float(e.mean()), "bias_se": float(e.std(ddof=1) / np.sqrt(series))})
    rows.append({"prior": "F at target: fitted mean, sd (truth)", "series": series,
                 "f_mean": float(fs[:, 0].mean()), "f_sd": float(fs[:, 1].mean()), "true": (f_mean, f_sd)})
    return rows


def _binomial_sampler(rng: np.random.Generator, p: np.ndarray):
    """A `run_sequential` sampler: each cell's quota of samples at its true pass probability."""
    return lambda quota: (rng.binomial(quota, p), quota)


# (stop, halfwidth, budget, min_samples before a width stop)
DESIGN_STOPS = (("width", 0.25, 10**9, 0), ("width", 0.10, 3 * 10**9, 0), ("budget", None, 10**7, 0),
                ("budget", None, 10**8, 0), ("budget", None, 10**9, 0), ("width", 0.25, 10**9, 10**8),
                ("width", 0.25, 10**8, 0))


def emergent_truth(rng: np.random.Generator, instances: int = 20) -> np.ndarray:
    """(instances, 7) true pass probabilities of one emergent-regime series (the design's truth)."""
    a, alpha = draw_laws("emergent", rng, instances)
    return law_p(a[:, None] - alpha[:, None] * X[None])


def run_design(p: np.ndarray, design, rng: np.random.Generator, *, seed: int, on_round=None):
    """`run_sequential` from no samples on the six fitted sizes of truth `p`, binomial draws from `rng`."""
    from passuntil.scaling.design import run_sequential

    zero = np.zeros(p[:, :-1].shape, dtype=np.int64)
    return run_sequential(SeriesCounts(FIT, zero, zero), design, _binomial_sampler(rng, p[:, :-1]), seed=seed,
                          on_round=on_round)


def design_coverage(stop: str, halfwidth: float | None, budget: int, series: int, *, seed: int = 0,
                    level: float = 0.9, min_samples: int = 0, refit: str = "likelihood") -> dict:
    """The emergent regime at the sequential design's stopping point: `run_sequential` (first
    round 1e5, rounds growing by 50%) until the "these instances" interval of log(target mean)
    is at most +-halfwidth (stop "width"; `budget` caps it) or `budget` is spent (stop "budget");
    then the coverage of its 90% interval (`target_interval`, = `forecast`'s) of the true mean of
    these 20 instances at 2.45B, of its population interval of the population mean, and the
    bias of log(point). Series s draws its truth from default_rng([seed, s]) in every row.

    `refit` other than "likelihood": also the coverage and bias of that fit's 90% "these
    instances" interval and point on the same stopped counts (the design itself, allocation and
    stop, stays the likelihood fit's: `run_sequential` takes no fitter)."""
    from scipy.stats import norm

    from passuntil.scaling.design import SequentialDesign

    pop = population_mean("emergent")
    these = population = stopped_by_width = 0
    err, spent, z, refit_err, refit_these = [], [], [], [], 0
    for s in range(series):
        rng = np.random.default_rng([seed, s])
        p = emergent_truth(rng)
        design = SequentialDesign(TARGET, total_budget=budget, first_round=100_000, level=level,
                                  halfwidth=halfwidth if stop == "width" else None, min_samples=min_samples)
        run = run_design(p, design, rng, seed=s)
        r, truth = run.result, p[:, -1].mean()
        these += r.low <= truth <= r.high
        population += r.population_low <= pop <= r.population_high
        stopped_by_width += r.reason == "halfwidth"
        err.append(np.log(r.point / truth))
        z.append(err[-1] / (r.log_halfwidth / norm.ppf((1 + level) / 2)))
        spent.append(run.counts.samples.sum())
        if refit != "likelihood":
            f = FITS[refit](run.counts).forecast(TARGET, level=level)
            refit_these += f.these_low <= truth <= f.these_high
            refit_err.append(np.log(f.point / truth))
    return {"refit_these": refit_these / series if refit_err else None,
            "refit_bias": float(np.mean(refit_err)) if refit_err else None,
            "refit_se": float(np.std(refit_err, ddof=1) / np.sqrt(series)) if len(refit_err) > 1 else None,
            "stop": stop, "halfwidth": halfwidth, "budget": budget, "series": series, "these": these / series,
            "population": population / series, "by_width": stopped_by_width / series,
            "median_spent": float(np.median(spent)), "bias_log": float(np.mean(err)),
            "bias_se": float(np.std(err, ddof=1) / np.sqrt(series)), "rmse_log": float(np.sqrt(np.mean(np.square(err)))),
            "z_sd": float(np.std(z, ddof=1))}


# "circuits-late": the takeover between the largest fitted size and the target (undetectable by nature)
WARNING_ROWS = (("circuits", 10**4), ("plain", 10**4), ("circuits", 10**5), ("plain", 10**5),
                ("circuits-late", 10**4), ("circuits-late", 10**5))


def warning_rates(kind: str, series: int, *, k_target: int = 2, budget: int = 10**4, seed: int = 0) -> dict:
    """Share of series (largest size held out) on which each warning code fires."""
    from passuntil.scaling.warnings import forecast_warnings

    rng = np.random.default_rng([seed, len(kind), budget])
    fired: Counter = Counter()
    for _ in range(series):
        if kind.startswith("circuits"):
            counts, _ = circuit_series(rng, k_target=k_target, budget=budget, late=kind == "circuits-late")
        else:
            counts, _ = law_series("ordinary", rng, k_target=k_target, budget=budget)
        train = counts.select_models(np.arange(6))
        fit = fit_likelihood(train)
        fired.update({w.code for w in forecast_warnings(train, fit, TARGET)})
    return {"kind": kind, "K": k_target, "budget": budget, "series": series,
            **{code: n / series for code, n in sorted(fired.items())}}


def _rows(rows: tuple, picked: str) -> tuple:
    """The rows of a table numbered in `picked` ("0,2"; empty: all)."""
    return rows if not picked else tuple(rows[int(i)] for i in picked.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=100)
    ap.add_argument("--part", choices=("intervals", "design", "prior", "warnings", "both"), default="both")
    ap.add_argument("--seed", type=int, default=0, help="the design part's seed (series s: rng [seed, s])")
    ap.add_argument("--settings", default="", help="comma-separated row numbers of the part's table (default all)")
    ap.add_argument("--instances", type=int, default=20, help="instances per series (intervals part)")
    ap.add_argument("--method", choices=tuple(FITS), default="likelihood",
                    help="the intervals part's fit; the design part: refit the stopped counts with it")
    args = ap.parse_args()
    t0 = time.time()
    if args.part in ("intervals", "both"):
        print(f"method: {args.method}\n")
        print("| regime | K | budget | series | 90% 'these' covers | 90% 'population' covers | bias log (SE) "
              "| bias log, posterior mean | RMSE log | median width log | s per fit | R-hat > 1.05 (target / hyper) "
              "| IS ESS < 20 |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for regime, k, budget in _rows(SETTINGS, args.settings):
            r = interval_coverage(regime, k, budget, args.series, method=args.method, instances=args.instances)
            bad = "-" if r["rhat_bad"] is None else f"{r['rhat_bad']:.0%} / {r['rhat_hyper_bad']:.0%}"
            ess = "-" if r["ess_low"] is None else f"{r['ess_low']:.0%}"
            print(f"| {regime} | {k or 'fixed n'} | {budget:.0e} | {r['series']} | {r['these']:.0%} "
                  f"| {r['population']:.0%} | {r['bias_log']:+.3f} ({r['bias_se']:.3f}) | {r['bias_log_mean']:+.3f} "
                  f"| {r['rmse_log']:.3f} | {r['width_log']:.2f} | {r['seconds']:.2f} | {bad} | {ess} |", flush=True)
    if args.part == "design":
        print("| stop | halfwidth | budget | min samples | series | stopped by width | median samples | 90% 'these' covers "
              "| 90% 'population' covers | bias log (SE) | RMSE log | z SD |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for stop, half, budget, least in _rows(DESIGN_STOPS, args.settings):
            r = design_coverage(stop, half, budget, args.series, seed=args.seed, min_samples=least,
                                refit=args.method)
            print(f"| {stop} | {half or '-'} | {budget:.0e} | {least:.0e} | {r['series']} | {r['by_width']:.0%} | "
                  f"{r['median_spent']:.2g} | {r['these']:.0%} | {r['population']:.0%} | "
                  f"{r['bias_log']:+.3f} ({r['bias_se']:.3f}) | {r['rmse_log']:.3f} | {r['z_sd']:.2f} |", flush=True)
            if r["refit_these"] is not None:
                print(f"|   {args.method} refit on the same stopped counts | | | | | | | {r['refit_these']:.0%} | | "
                      f"{r['refit_bias']:+.3f} ({r['refit_se']:.3f}) | | |", flush=True)
    if args.part == "prior":
        print("| prior used for the posterior | series | point / truth - 1 (sums) | bias log (SE) |")
        print("|---|---|---|---|")
        for r in prior_diagnostic(args.series):
            if "f_mean" in r:
                print(f"\n{r['prior']}: {r['f_mean']:.3f}, {r['f_sd']:.3f} ({r['true'][0]:.3f}, {r['true'][1]:.3f})")
            else:
                print(f"| {r['prior']} | {r['series']} | {r['rel_error_mean']:+.3f} | {r['bias_log']:+.3f} "
                      f"({r['bias_se']:.3f}) |", flush=True)
    if args.part in ("warnings", "both"):
        print("\n| truth | K | budget | series | accelerated-emergence | other codes |")
        print("|---|---|---|---|---|---|")
        for kind, budget in _rows(WARNING_ROWS, args.settings):
            r = warning_rates(kind, args.series, budget=budget)
            other = ", ".join(f"{c} {v:.0%}" for c, v in r.items()
                              if c not in ("kind", "K", "budget", "series", "accelerated-emergence"))
            print(f"| {kind} | {r['K']} | {budget:.0e} | {r['series']} | "
                  f"{r.get('accelerated-emergence', 0.0):.0%} | {other or '-'} |", flush=True)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
