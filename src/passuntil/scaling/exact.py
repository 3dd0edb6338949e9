"""The task law on exact pass probabilities: fits and forecasts with zero sampling variance.

An exact-mode run (`passuntil eval --exact`) stores, per instance and size, the exact
probability p that one sample passes, so F = log(-log p) is known without noise at every size.
No pretend counts: each instance's line F_i = a_i + b_i (log N - x0) is fitted by least squares,
and what uncertainty a forecast has comes from how badly the lines fit (lack of fit) alone, as
in the ordinary prediction interval F_i(N*) ~ Fhat_i + e sqrt(1 + 1/n + (x* - xbar)^2 / Sxx). The
residuals are split into a part shared by all instances at a size (the mean residual per size,
n - 2 dof: a misfit of the law itself, which averaging over instances does not shrink) and each
instance's own part (the rest, pooled over instances); each variance is drawn from its scaled
inverse chi^2, the shared error once per draw, the own errors per instance (centred, since the
shared part holds their mean). The draws are mapped to p and averaged over instances (point:
their median). Per-instance t_{n-2} draws alone made a 90% interval cover 98% of simulated
series with independent misfits, and pooling alone (no shared part) missed tiny-7 on arith.
An interval from noise-free points is then as wide as the law's misfit says (zero only where
the law fits exactly). The dataset-level version fits the same line to F of the mean p over
instances, with its t_{n-2} prediction interval. The same draws (parameter uncertainty and
lack of fit) give what a sampled forecast carries beside its interval: each instance's
forecast and interval, the pass@k profile (mean_i 1 - (1 - p_i)^k per draw) and the
"population" interval (instances resampled per draw and widened as `TaskFit` widens it: it
covers the task's population mean, which the "these instances" interval is not for).

Instances whose p is 0 at every size (e.g. a reference longer than max_tokens) are forecast as 0;
instances with 0 < p < 1 at fewer than 3 sizes are left out and counted (`unfitted`).
The emergence class of exact data comes from `passuntil.emergence.classify_exact`; beside it,
`exact_curvature` is the mean per-instance quadratic coefficient with its between-instance SE.

    fit = fit_exact(n_params, p)            # p: (instances, models)
    fc = forecast_exact(fit, 1e6, level=0.9)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

EPS = 1e-300
METHOD = "exact-ls"
DATA = "exact pass probabilities (zero sampling variance; uncertainty from lack of fit only)"
# k = 1, 3, 10, 32, ..., 1e6: the grid of `scaling.forecast.PASS_AT_K_GRID` (analysis passes that one)
PASS_AT_K = tuple(int(round(10 ** (e / 2))) for e in range(13))


@dataclass(frozen=True)
class ExactFit:
    """Per-instance least-squares lines of F = log(-log p) in log N, and one on the mean p."""

    n_params: np.ndarray  # (M,)
    x0: float  # mean log N of the fitted sizes
    a: np.ndarray  # (I,) F at x0 (NaN: unfitted)
    b: np.ndarray  # (I,) slope of F in log N (scaling: b < 0)
    s2: np.ndarray  # (I,) residual variance (n - 2 dof)
    never: np.ndarray  # (I,) bool: p = 0 at every size (forecast 0)
    dataset: tuple[float, float, float]  # (a, b, s2) of the line through F(mean p)
    f: np.ndarray  # (I, M) the data F = log(-log p); NaN where p is 0 or 1 (not fitted)
    method: str = METHOD

    @property
    def dof(self) -> int:
        return int(self.n_params.size - 2)

    def to_dict(self) -> dict:
        fitted = np.isfinite(self.a)
        return {"method": self.method, "data": DATA, "n_params": self.n_params.tolist(), "x0": self.x0,
                "instances": int(self.a.size), "unfitted": int((~fitted & ~self.never).sum()),
                "never_pass": int(self.never.sum()), "dof": self.dof,
                "alpha_median": float(np.median(-self.b[fitted])) if fitted.any() else None,
                "residual_sd_median": float(np.sqrt(np.median(self.s2[fitted]))) if fitted.any() else None,
                "dataset": dict(zip(("a", "b", "s2"), self.dataset))}


@dataclass(frozen=True)
class ExactForecast:
    """Mean PU at a size from an `ExactFit`: instance-level (point, interval) and dataset-level,
    with what a sampled forecast carries beside them (`scaling.task_law.Forecast`): the
    "population" interval (instances resampled too), each instance's forecast and interval
    (instance order; NaN: unfitted, left out of the mean; 0: never passes), each instance's
    `dispersion` (its residual variance of F over the pooled one: 1 is a typical misfit) and the
    pass@k profile `pass_at_k`: (k, central, low, high) of mean_i 1 - (1 - p_i)^k over the
    same draws (central: the median, so k = 1 gives `point`)."""

    n_params: float
    point: float
    low: float
    high: float
    level: float
    dataset_point: float
    dataset_low: float
    dataset_high: float
    method: str = METHOD
    population_low: float = float("nan")
    population_high: float = float("nan")
    instance_point: tuple[float, ...] = ()
    instance_low: tuple[float, ...] = ()
    instance_high: tuple[float, ...] = ()
    dispersion: tuple[float, ...] = ()
    pass_at_k: tuple[tuple[int, float, float, float], ...] = ()

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("n_params", "point", "low", "high", "level", "dataset_point",
                                                "dataset_low", "dataset_high", "method")} | {
            "data": DATA, "target": "these",
            "population": {"low": self.population_low, "high": self.population_high},
            "instances": {"point": list(self.instance_point), "low": list(self.instance_low),
                          "high": list(self.instance_high), "dispersion": list(self.dispersion)},
            "pass_at_k": [dict(zip(("k", "mean", "low", "high"), q)) for q in self.pass_at_k]}


def _validate(n_params, p) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(n_params, dtype=float)
    p = np.asarray(p, dtype=float)
    if p.ndim != 2 or p.shape[1] != n.size:
        raise ValueError(f"exact probabilities must be (instances, {n.size} models), not {p.shape}")
    if n.size < 3:
        raise ValueError(f"a line with lack-of-fit uncertainty needs at least 3 sizes (got {n.size})")
    if not (np.all(np.isfinite(n)) and np.all(n > 0)) or not np.all((p >= 0) & (p <= 1)):
        raise ValueError("sizes must be positive and probabilities in [0, 1]")
    return n, p


def _ff(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(-np.log(p))


def _lines(x: np.ndarray, f: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted (0/1) least-squares lines of rows of f in x, vectorised: (a at x0=0, b, s2)."""
    n = w.sum(1)
    xm = (w * x).sum(1) / n
    fm = (w * np.where(w > 0, f, 0)).sum(1) / n
    dx = x - xm[:, None]
    sxx = (w * dx * dx).sum(1)
    b = (w * dx * np.where(w > 0, f - fm[:, None], 0)).sum(1) / sxx
    a = fm - b * xm
    r = np.where(w > 0, f - a[:, None] - b[:, None] * x, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s2 = (w * r * r).sum(1) / (n - 2)
    return a, b, s2


def fit_exact(n_params, p) -> ExactFit:
    """Least-squares lines of F = log(-log p) in log N per instance and for the mean p."""
    n, p = _validate(n_params, p)
    x = np.log(n)
    x0 = float(x.mean())
    xc = np.broadcast_to(x - x0, p.shape)
    ok = ((p > 0) & (p < 1)).astype(float)
    use = ok.sum(1) >= 3
    a, b, s2 = (np.full(p.shape[0], np.nan) for _ in range(3))
    if use.any():
        a[use], b[use], s2[use] = _lines(xc[use], _ff(p[use]), ok[use])
    mean = p.mean(0, keepdims=True)
    mok = ((mean > 0) & (mean < 1)).astype(float)
    da, db, ds2 = (float(v[0]) for v in _lines((x - x0)[None], _ff(mean), mok)) if mok.sum() >= 3 else (np.nan,) * 3
    f = np.where(ok > 0, _ff(p), np.nan)
    return ExactFit(n, x0, a, b, s2, ~(p > 0).any(1), (da, db, ds2), f)


def _scale(fit: ExactFit, x_new: float, used: np.ndarray) -> np.ndarray:
    """sqrt(1 + 1/n + (x* - xbar)^2 / Sxx) per row of the 0/1 `used` (M,)-masks."""
    x = np.log(fit.n_params) - fit.x0
    n = used.sum(-1)
    xm = (used * x).sum(-1) / n
    sxx = (used * (x - xm[..., None]) ** 2).sum(-1)
    return np.sqrt(1 + 1 / n + (x_new - xm) ** 2 / sxx)


@dataclass(frozen=True)
class _Variance:
    """A residual variance s2 with `dof` degrees of freedom; draws from its scaled inverse chi^2."""

    s2: float
    dof: float

    def draw(self, rng, n: int) -> np.ndarray:
        if self.dof <= 0 or self.s2 <= 0:
            return np.zeros((n, 1))
        return self.dof * self.s2 / rng.chisquare(self.dof, size=(n, 1))


def _lack_of_fit(fit: ExactFit, fitted: np.ndarray, used: np.ndarray, dof: np.ndarray
                 ) -> tuple[_Variance, _Variance]:
    """The lack of fit split into a part shared by all instances at a size (the mean residual
    per size: n - 2 dof) and each instance's own (the rest, pooled: (I - 1)(n - 2) dof)."""
    x = np.log(fit.n_params) - fit.x0
    line = fit.a[fitted, None] + fit.b[fitted, None] * x
    r = np.where(used > 0, fit.f[fitted] - line, np.nan)
    counted = np.isfinite(r).sum(0)
    mean_r = np.where(counted > 0, np.nansum(r, axis=0) / np.maximum(counted, 1), np.nan)
    ok = np.isfinite(mean_r)
    shared_dof = float(ok.sum() - 2)
    shared = _Variance(float(np.sum(mean_r[ok] ** 2) / shared_dof) if shared_dof > 0 else 0.0, shared_dof)
    own_dof = float(dof.sum() - max(shared_dof, 0))
    dev = np.nan_to_num(r - mean_r)
    own = _Variance(float(np.sum(dev ** 2) / own_dof) if own_dof > 0 else 0.0, own_dof)
    return shared, own


def forecast_exact(fit: ExactFit, n_params: float, *, level: float = 0.9, draws: int = 4000,
                   seed: int = 0, p_data=None, ks: tuple[int, ...] = PASS_AT_K) -> ExactForecast:
    """Mean PU at `n_params` with a `level` prediction interval from lack of fit only, the
    population interval, per-instance forecasts and the pass@k profile at `ks` (`ExactForecast`).

    `p_data` (the probabilities fitted) tells which sizes each instance's line used; without it
    every fitted instance is taken to have used every size."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1) (got {level})")
    x_new = float(np.log(n_params) - fit.x0)
    fitted = np.isfinite(fit.a)
    if not fitted.any():
        raise ValueError("no instance has 0 < p < 1 at 3 sizes or more: nothing to fit")
    m = fit.n_params.size
    if p_data is None:
        used = np.ones((int(fitted.sum()), m))
    else:
        pd_ = np.asarray(p_data, dtype=float)[fitted]
        used = ((pd_ > 0) & (pd_ < 1)).astype(float)
    dof = used.sum(1) - 2
    centre = fit.a[fitted] + fit.b[fitted] * x_new
    scale = _scale(fit, x_new, used)
    rng = np.random.default_rng(seed)
    shared, own = _lack_of_fit(fit, fitted, used, dof)
    own_z = rng.standard_normal((draws, dof.size))
    own_z -= own_z.mean(1, keepdims=True)  # the shared part already holds the mean of the own parts
    z = rng.standard_normal((draws, 1)) * np.sqrt(shared.draw(rng, draws))
    z = z + own_z * np.sqrt(own.draw(rng, draws))
    f = centre + scale * z
    # the instances forecast: the fitted ones and the never-pass ones (at 0); unfitted ones are left out
    forecast = fitted | fit.never
    per = np.zeros((draws, int(forecast.sum())))  # (draws, instances forecast)
    per[:, fitted[forecast]] = np.exp(-np.exp(np.clip(f, -700, 700)))
    means = per.mean(1)
    q = ((1 - level) / 2, (1 + level) / 2)
    point, low, high = (float(v) for v in np.quantile(means, (0.5, *q)))
    da, db, ds2 = fit.dataset
    if np.isfinite(da) and fit.n_params.size > 2:
        dsd = np.sqrt(max(ds2, 0)) * float(_scale(fit, x_new, np.ones(m)))
        tq = stats.t.ppf(q[1], m - 2)
        f = da + db * x_new
        d_point, d_high, d_low = (float(np.exp(-np.exp(v))) for v in (f, f - tq * dsd, f + tq * dsd))
    else:
        d_point = d_low = d_high = float("nan")
    pop_low, pop_high = np.quantile(_population_means(per, level, seed), q)
    inst = np.full((3, fit.a.size), np.nan)  # point, low, high per instance (NaN: unfitted)
    inst[:, fit.never] = 0.0
    inst[0, fitted] = np.exp(-np.exp(np.clip(centre, -700, 700)))  # the line at N (the draws' median)
    inst[1:, fitted] = np.quantile(per[:, fitted[forecast]], q, axis=0)
    tup = lambda v: tuple(float(x) for x in v)  # noqa: E731
    return ExactForecast(float(n_params), point, low, high, float(level), d_point, d_low, d_high,
                         population_low=float(pop_low), population_high=float(pop_high),
                         instance_point=tup(inst[0]), instance_low=tup(inst[1]), instance_high=tup(inst[2]),
                         dispersion=tup(_dispersion(fit, fitted, dof)), pass_at_k=_pass_at_k(per, ks, q))


def _population_means(per: np.ndarray, level: float, seed: int) -> np.ndarray:
    """Draws of the mean over the task's population of instances: `per` (draws, I) with the
    instances resampled, widened on the logit scale by Hesterberg's sqrt(I/(I-1)) t_{I-1}/z,
    the rule `TaskFit` uses for sampled fits (a percentile bootstrap over ~20 instances is too
    narrow)."""
    n = per.shape[1]
    fixed = per.mean(1)
    if n < 2:
        return fixed
    idx = np.random.default_rng([seed, 1]).integers(0, n, size=per.shape)
    resampled = np.take_along_axis(per, idx, axis=1).mean(1)
    if n < 3:
        return resampled
    qq = (1 + level) / 2
    expand = np.sqrt(n / (n - 1)) * stats.t.ppf(qq, n - 1) / stats.norm.ppf(qq)
    lf, lr = (stats.logistic.ppf(np.clip(v, 1e-300, 1 - 1e-16)) for v in (fixed, resampled))
    return stats.logistic.cdf(lf + expand * (lr - lf))


def _dispersion(fit: ExactFit, fitted: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """Each instance's residual variance of F over the pooled one (1: a typical misfit; NaN
    where no line was fitted); 1 everywhere where the lines fit exactly."""
    out = np.full(fit.a.size, np.nan)
    s2 = fit.s2[fitted]
    pooled = float(np.sum(s2 * dof) / np.sum(dof)) if np.sum(dof) > 0 else 0.0
    out[fitted] = s2 / pooled if pooled > 0 else 1.0
    return out


def _pass_at_k(per: np.ndarray, ks, q) -> tuple[tuple[int, float, float, float], ...]:
    """(k, median, low, high) over draws of mean_i 1 - (1 - p_i)^k."""
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-np.clip(per, 0.0, 1.0))  # -inf where p = 1 (pass@k = 1)
    out = []
    for k in ks:
        mid, lo, hi = np.quantile((-np.expm1(k * log_miss)).mean(1), (0.5, *q))
        out.append((int(k), float(mid), float(lo), float(hi)))
    return tuple(out)


def exact_curvature(n_params, p) -> dict:
    """Mean per-instance quadratic coefficient c of F = a + b x + c x^2 (x standardised log N),
    with its SE over instances and z = c / SE: with exact data the only spread is the
    instances' disagreement (c < 0: concave, accelerated emergence)."""
    n, p = _validate(n_params, p)
    x = np.log(n)
    x = (x - x.mean()) / x.std()
    use = ((p > 0) & (p < 1)).all(1)
    if use.sum() < 2 or n.size < 4:
        return {"curvature": None, "se": None, "z": None, "instances": int(use.sum())}
    c = np.polynomial.polynomial.polyfit(x, _ff(p[use]).T, 2)[2]
    se = float(c.std(ddof=1) / np.sqrt(c.size))
    mean = float(c.mean())
    return {"curvature": mean, "se": se, "z": mean / se if se > 0 else None, "instances": int(use.sum())}


def backtest_exact(n_params, p, *, models=None, level: float = 0.9, min_fit_sizes: int = 3) -> list[dict]:
    """Leave-largest-out, then each inner size, on exact data: one row per held-out size with
    the exact-ls forecast from the other sizes and the held-out size's exact mean ("observed")."""
    n, p = _validate(n_params, p)
    rows = []
    for held in range(n.size - 1, 0, -1):
        keep = np.array([j for j in range(n.size) if j != held])
        if keep.size < min_fit_sizes:
            continue
        fc = forecast_exact(fit_exact(n[keep], p[:, keep]), n[held], level=level, p_data=p[:, keep])
        observed = float(p[:, held].mean())
        rows.append({"held_out": models[held] if models else held, "n_params": float(n[held]),
                     "kind": "largest" if held == n.size - 1 else "inner", "observed": observed,
                     "exact": observed, "point": fc.point, "low": fc.low, "high": fc.high,
                     "abs_error": abs(fc.point - observed), "covered": bool(fc.low <= observed <= fc.high),
                     "z": None, "against": "exact"})
    return rows
