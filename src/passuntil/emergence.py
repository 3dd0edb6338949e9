"""Emergence categories (paper Definition 1) and the circuit / multi-step hypotheses.

Let F(N) = log(-log PU(N)) with PU the dataset mean over instances. Against log N:

* linear  — scaling-law growth (the task law holds);
* convex  — sub-scaling growth (growth slows; what multi-step reasoning produces, Theorem 2);
* concave — super-scaling growth, "accelerated emergence" (growth speeds up; what several
  circuits in soft majority produce, Theorem 3) — extrapolating a line is unsafe;
* mixed   — both (the second derivative changes sign inside the measured range);
* flat    — no scaling: the pooled slope of F is not distinguishable from 0 (|z| < 2);
* inverse — inverse scaling: PU falls as N grows (F rises significantly).
A task is tested for its slope first: "linear" and the curvature classes are for tasks that
scale (a task whose PU falls with N used to be called "linear").

The test. Each instance's F_i = a + b x + c x^2 (x = standardised log N) is fitted by binomial
likelihood on its raw (passes, samples) cells, zero-pass cells included; the curvatures c_i are
pooled with a random-effects (DerSimonian-Laird) mean, and the class is linear unless |mean c| /
SE exceeds `z_crit`. On simulated series (20 instances, K = 2, budgets of 10^4) this keeps
linear series linear in 98% and flags two-circuit series in 100%, where the paper's
dataset-level statistic (a quadratic through log(-log mean PU), with a bootstrap over instances,
also reported here) flags about 90%. "Mixed" needs a significant instance-level curvature and a
dataset-level cubic whose second derivative changes sign within the measured range.
The plain law, a two-circuit soft mixture and a two-step product are fitted to the mean PU and
compared by AIC and BIC; a model with as many parameters as points (5 for two circuits, 4 for
two steps) is not fitted — it would pass through every point — and is listed in
`EmergenceResult.refused` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.task_law import fisher_scoring

EPS = 1e-12


@dataclass(frozen=True)
class ModelComparison:
    name: str
    params: dict
    chi2: float
    aic: float
    bic: float

    def to_dict(self) -> dict:
        return {"name": self.name, "params": self.params, "chi2": self.chi2, "aic": self.aic, "bic": self.bic}


@dataclass(frozen=True)
class EmergenceResult:
    category: str  # linear | convex | concave | mixed | flat | inverse | undetermined
    curvature: float  # pooled instance-level c in F_i = a + b x + c x^2, x standardised log N
    curvature_se: float
    z: float
    dataset_curvature: float  # the paper's: b2 of a quadratic through log(-log mean PU)
    dataset_curvature_se: float  # by bootstrap over instances
    n_boot: int
    models_used: int
    comparisons: tuple[ModelComparison, ...] = ()
    note: str = ""
    slope: float = float("nan")  # pooled instance-level b in F_i = a + b x (scaling: b < 0)
    slope_se: float = float("nan")
    refused: tuple[str, ...] = ()  # hypotheses not fitted: as many parameters as points

    @property
    def accelerated(self) -> bool:
        return self.category in ("concave", "mixed")

    def to_dict(self) -> dict:
        return {"category": self.category, "curvature": self.curvature, "curvature_se": self.curvature_se,
                "z": self.z, "dataset_curvature": self.dataset_curvature,
                "dataset_curvature_se": self.dataset_curvature_se, "n_boot": self.n_boot,
                "models_used": self.models_used,
                "comparisons": [c.to_dict() for c in self.comparisons], "note": self.note,
                "slope": self.slope, "slope_se": self.slope_se, "refused": list(self.refused)}


def _f_curve(pu_matrix: np.ndarray) -> np.ndarray:
    """F per model from an (instances, models) PU matrix: log(-log mean PU)."""
    mean = np.clip(np.nanmean(pu_matrix, axis=0), EPS, 1 - 1e-9)
    return np.log(-np.log(mean))


def _poly(x, y, deg):
    return np.polynomial.polynomial.polyfit(x, y, deg)


def classify(counts: SeriesCounts, *, n_boot: int = 100, z_crit: float = 2.5, seed: int = 0,
             compare: bool = True, z_slope: float = 2.0) -> EmergenceResult:
    """Classify the task's scaling curve; needs at least 4 sizes with a non-zero mean PU."""
    pu = counts.pu
    sampled = (~np.isnan(pu)).sum(axis=0)  # a size no instance was sampled at (a design run) has no mean
    mean = np.where(sampled > 0, np.nansum(pu, axis=0) / np.maximum(sampled, 1), np.nan)
    use = (mean > 0) & (mean < 1)
    if use.sum() < 4:
        return EmergenceResult("undetermined", np.nan, np.nan, np.nan, np.nan, np.nan, 0, int(use.sum()),
                               note="fewer than 4 sizes with a non-zero mean PU")
    logn = counts.log_n[use]
    x = (logn - logn.mean()) / logn.std()
    f = _f_curve(pu[:, use])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, pu.shape[0], size=(n_boot, pu.shape[0]))
    boot_f = np.array([_f_curve(pu[i][:, use]) for i in idx])  # (B, M)
    boot_b = np.array([_poly(x, bf, 2) for bf in boot_f])
    b = _poly(x, f, 2)
    se = float(boot_b[:, 2].std(ddof=1))
    all_x = (counts.log_n - counts.log_n.mean()) / counts.log_n.std()
    curv, curv_se = instance_curvature(counts.passes.astype(float), counts.samples.astype(float), all_x)
    slope, slope_se = instance_slope(counts.passes.astype(float), counts.samples.astype(float), all_x)
    z = curv / curv_se
    category = "linear"
    if abs(z) > z_crit:
        category = "convex" if curv > 0 else "concave"
    if slope / slope_se > z_slope:
        category = "inverse"
    elif abs(slope / slope_se) <= z_slope:
        category = "flat"
    if category in ("convex", "concave") and use.sum() >= 5:  # mixed: the curvature changes sign in range
        c = _poly(x, f, 3)
        c_se = np.array([_poly(x, bf, 3) for bf in boot_f])[:, 3].std(ddof=1)
        second = 2 * c[2] + 6 * c[3] * x
        if c_se > 0 and abs(c[3] / c_se) > z_crit and second.min() < 0 < second.max():
            category = "mixed"
    comparisons, refused = (), ()
    if compare:
        var = np.maximum(boot_f.var(axis=0, ddof=1), 1e-6)
        comparisons = compare_hypotheses(logn, f, var)
        refused = refused_hypotheses(len(f))
    return EmergenceResult(category, curv, curv_se, float(z), float(b[2]), se, n_boot, int(use.sum()), comparisons,
                           slope=slope, slope_se=slope_se, refused=refused)


EXACT_SAMPLES = 1e12


def classify_exact(n_params: np.ndarray, exact_p: np.ndarray, **kw) -> EmergenceResult:
    """The class of a curve of exact pass probabilities, (instances, models).

    What `classify` converges to with unlimited samples: each probability enters as the pass
    rate of 10^12 samples, so what uncertainty remains is the instances' disagreement. The
    built-in sampler computes these for exact-match tasks at every size, including sizes where
    PassUntil at a practical budget sees no pass.
    """
    p = np.clip(np.asarray(exact_p, dtype=float), 0.0, 1.0)
    return classify(SeriesCounts(np.asarray(n_params, dtype=float), p * EXACT_SAMPLES,
                                 np.full_like(p, EXACT_SAMPLES)), **kw)


def _random_effects_mean(c: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """DerSimonian-Laird random-effects mean of estimates c with variances v, and its SE."""
    w = 1 / v
    mean = np.sum(w * c) / w.sum()
    q = np.sum(w * (c - mean) ** 2)
    denom = w.sum() - np.sum(w * w) / w.sum()  # 0 for one instance: no between-instance variance
    tau2 = max(0.0, (q - (len(c) - 1)) / denom) if len(c) > 1 and denom > 0 else 0.0
    w = 1 / (v + tau2)
    return float(np.sum(w * c) / w.sum()), float(np.sqrt(1 / w.sum()))


def instance_slope(k: np.ndarray, n: np.ndarray, x: np.ndarray, *, iters: int = 60) -> tuple[float, float]:
    """Pooled slope b of F_i = a + b x across instances and its SE (b < 0: PU grows with N).

    Instances with no pass anywhere carry no slope (their likelihood is flat in b wherever p is
    tiny) and are left out; the weak prior (sd 10) keeps the rest finite."""
    has = (k > 0).any(axis=1)
    if has.sum() == 0:
        return float("nan"), float("nan")
    J = np.stack([np.ones_like(x), x], -1)
    start = np.tile([1.0, 0.0], (int(has.sum()), 1))
    theta, cov = fisher_scoring(k[has], n[has], J, start, np.zeros(2), np.diag([1e-2, 1e-2]), iters)
    return _random_effects_mean(theta[:, 1], cov[:, 1, 1])


def instance_curvature(k: np.ndarray, n: np.ndarray, x: np.ndarray, *, iters: int = 60) -> tuple[float, float]:
    """Pooled curvature of F_i = a + b x + c x^2 across instances, and its standard error.

    Each instance is fitted by Fisher scoring on the binomial likelihood (weak Gaussian prior:
    sd 10 on a and b, 2 on c); the c_i are combined by a DerSimonian-Laird random-effects mean.
    """
    J = np.stack([np.ones_like(x), x, x * x], -1)  # (M, 3)
    start = np.zeros((k.shape[0], 3))
    start[:, 0] = 1.0
    theta, cov = fisher_scoring(k, n, J, start, np.zeros(3), np.diag([1e-2, 1e-2, 0.25]), iters)
    return _random_effects_mean(theta[:, 2], cov[:, 2, 2])


def _circuit_p(logn, c, a):
    with np.errstate(over="ignore"):
        return np.exp(-np.exp(c - a * logn))


def _hypotheses():
    """name -> (F as a function of (log N, params), initial guesses, parameter names)."""
    def law(x, t):
        return t[0] - t[1] * x

    def two_circuits(x, t):  # PU = w exp(-c1 N^-a1) + (1 - w) exp(-c2 N^-a2), w = sigmoid(t[4])
        w = special.expit(t[4])
        p = w * _circuit_p(x, t[0], t[1]) + (1 - w) * _circuit_p(x, t[2], t[3])
        return np.log(-np.log(np.clip(p, EPS, 1 - 1e-12)))

    def two_steps(x, t):  # PU = exp(-c1 N^-a1) exp(-c2 N^-a2)
        return np.logaddexp(t[0] - t[1] * x, t[2] - t[3] * x)

    return {"scaling law": (law, ["log_c", "alpha"]),
            "two circuits": (two_circuits, ["log_c1", "alpha1", "log_c2", "alpha2", "w_logit"]),
            "two steps": (two_steps, ["log_c1", "alpha1", "log_c2", "alpha2"])}


def refused_hypotheses(points: int) -> tuple[str, ...]:
    """The hypotheses with at least as many parameters as `points`: not identified, not fitted."""
    return tuple(name for name, (_, names) in _hypotheses().items() if len(names) >= points)


def compare_hypotheses(logn: np.ndarray, f: np.ndarray, var: np.ndarray) -> tuple[ModelComparison, ...]:
    """Weighted fits of F with the plain law, two circuits and two steps; AIC/BIC from chi^2.

    A hypothesis with as many parameters as points (or more) would interpolate them (chi^2 = 0)
    and "win" every comparison: it is not fitted (see `refused_hypotheses`)."""
    xm = logn.mean()
    slope, icpt = np.polyfit(logn - xm, f, 1)
    a0, c0 = -slope, icpt + (-slope) * xm  # F = c - a log N
    starts = {"scaling law": [[c0, a0]],
              "two circuits": [[c0, a0, c0 + s * a0 * 2 * xm, a0 * (1 + s * 2), w]
                               for s in (0.5, 1.0) for w in (-1.0, 0.0, 1.0)],
              "two steps": [[c0 - 0.7, a0 * 0.5, c0 - 0.7, a0 * 1.5], [c0, a0, c0 - 3, a0 * 0.3]]}
    out = []
    for name, (fn, names) in _hypotheses().items():
        if len(names) >= len(f):
            continue
        best = None
        for t0 in starts[name]:
            try:
                r = optimize.least_squares(lambda t, fn=fn: (fn(logn, t) - f) / np.sqrt(var), t0,
                                           method="lm", max_nfev=4000)
            except (ValueError, FloatingPointError):
                continue
            if best is None or r.cost < best.cost:
                best = r
        if best is None:
            continue
        chi2 = 2 * best.cost
        k = len(names)
        out.append(ModelComparison(name, dict(zip(names, best.x.tolist())), float(chi2),
                                   float(chi2 + 2 * k), float(chi2 + k * np.log(len(f)))))
    return tuple(out)
