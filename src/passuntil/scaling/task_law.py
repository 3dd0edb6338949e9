"""Task scaling-law fits and forecasts (paper §4.2-4.3, Eq. 4-5).

The law: PU(N) = exp(-c N^-alpha), i.e. F = log(-log PU) = log c - alpha log N is a line in
log N. Internally F = a - alpha (log N - x0), with x0 the mean log N of the fitted sizes.

* `fit_dataset`: mean PU per model, least squares of F on log N (the paper's dataset level).
* `fit_instances_ls`: one least-squares line per instance over its points with 0 < PU < 1,
  forecasts averaged (paper Eq. 5). Instances with fewer than two such points cannot be fitted
  and forecast 0 (the paper's weakness for hard instances).
* `fit_likelihood`: every (passes, samples) pair enters a binomial likelihood (proportional to
  the negative-binomial one, so valid under PassUntil's stopping rule), zero-pass and
  budget-stopped cells included; per-instance (a, alpha) are partially pooled through a
  Gaussian prior whose mean and covariance are estimated from all instances (empirical Bayes,
  EM with Laplace posteriors). Hard instances borrow strength instead of being dropped.

  Draws of each instance come from its exact posterior (importance resampling around the
  Laplace fit); instances that scatter beyond binomial noise (`lack_of_fit`) are tempered by
  their dispersion.

Every fit gives `forecast(N, level)`: a point forecast of the mean PU over the instances at N,
the interval for the mean over *these* instances (the default `low`/`high`) and for the task's
population, and each instance's forecast and interval (see `Forecast`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from passuntil.scaling.data import SeriesCounts

F_MIN, F_MAX = -12.0, 6.0  # F = log(-log p): p from ~1 - 6e-6 to exp(-403)
# The shared (prior-mean) part of the likelihood fit's uncertainty is scaled by this factor. The
# EM plug-in treats the estimated prior covariance as known and the laws as Gaussian in (a, alpha);
# on development seeds (benchmarks/calibration.py's generators, other seeds; 30-40 series each of
# K = 2 and 10 at budgets 1e3 and 1e5, and the hard regime) the z-scores of log(mean over these
# instances) had sd 1.05-1.5 without it (90% intervals covered 72-90%), 0.87-1.05 with it
# (85-93%). Measured coverage with it: docs/statistics.md.
HYPER_INFLATION = 2.5


def lack_of_fit_warning(phi: np.ndarray) -> list[str]:
    """The forecast's "lack of fit" warning for per-instance dispersions `phi` (none if all are 1)."""
    if not (phi > 1).any():
        return []
    worst = int(np.argmax(phi))
    return [f"lack of fit: {int((phi > 1).sum())} instance(s) scatter about their law more than "
            f"binomial noise allows (worst: instance #{worst}, dispersion {phi[worst]:.3g}); "
            "their intervals are widened by it"]


def law_p(f: np.ndarray) -> np.ndarray:
    return np.exp(-np.exp(np.clip(f, F_MIN, F_MAX)))


@dataclass(frozen=True)
class Forecast:
    """A forecast of the mean PU over instances at one size, with intervals for two targets.

    * "these instances" (`these_low`, `these_high`): the mean over the instances that were
      fitted, i.e. the user's own test set. Parameter uncertainty (and lack of fit) only. This is
      what scoring against the same instances at the target size must use.
    * "population" (`population_low`, `population_high`): the mean over the task's whole
      population of instances, of which these are a sample. The likelihood fit resamples these
      instances' draws (widened by Hesterberg's expansion); the full-Bayes fit averages new
      instances from each draw's fitted population N(mu, Sigma). Usually, not always, wider.

    `point`: for the likelihood fit the posterior median of the mean PU over these instances
    (the median of the draws the "these instances" interval comes from, so it lies inside it);
    for the other fits the mean over instances of each instance's fitted law.
    `low`/`high` are the interval of `target` (default "these"). Per instance, `instance_point`
    (likelihood fit: the median of that instance's draws),
    `instance_low`, `instance_high` are each instance's forecast PU and interval, in instance
    order; `dispersion` is each instance's lack-of-fit factor (1: binomial noise explains its
    scatter; > 1: its likelihood was tempered by that factor, widening its interval).
    """

    n_params: float
    point: float
    low: float
    high: float
    level: float
    method: str
    warnings: tuple[str, ...] = ()
    target: str = "these"
    these_low: float = float("nan")
    these_high: float = float("nan")
    population_low: float = float("nan")
    population_high: float = float("nan")
    instance_point: tuple[float, ...] = ()
    instance_low: tuple[float, ...] = ()
    instance_high: tuple[float, ...] = ()
    dispersion: tuple[float, ...] = ()

    @classmethod
    def from_draws(cls, n_params: float, per: np.ndarray, population: np.ndarray, *, level: float, method: str,
                   target: str, phi: np.ndarray, warnings: list[str], point: float | None = None,
                   instance_point: np.ndarray | None = None) -> Forecast:
        """The forecast a fit's draws give: `per` (draws, instances) of each instance's PU at N,
        `population` draws of the population mean. Both intervals are central `level` quantiles
        (of per's row means, of population); point and per-instance points are the medians of
        the same draws unless given (the least-squares fits give their laws' values);
        `warnings` plus the lack-of-fit warning for the dispersions `phi`."""
        qs = [(1 - level) / 2, (1 + level) / 2]
        these = per.mean(axis=1)
        t_lo, t_hi = np.quantile(these, qs)
        p_lo, p_hi = np.quantile(population, qs)
        inst_lo, inst_hi = np.quantile(per, qs, axis=0)
        point = float(np.median(these)) if point is None else point
        inst_point = np.median(per, axis=0) if instance_point is None else instance_point
        lo, hi = (t_lo, t_hi) if target == "these" else (p_lo, p_hi)
        tup = lambda v: tuple(float(x) for x in v)  # noqa: E731
        return cls(float(n_params), float(point), float(lo), float(hi), level, method,
                   tuple(warnings + lack_of_fit_warning(phi)), target, float(t_lo), float(t_hi), float(p_lo),
                   float(p_hi), tup(inst_point), tup(inst_lo), tup(inst_hi), tup(phi))

    def to_dict(self) -> dict:
        return {"n_params": self.n_params, "point": self.point, "low": self.low, "high": self.high,
                "level": self.level, "method": self.method, "warnings": list(self.warnings),
                "target": self.target,
                "these_instances": {"low": self.these_low, "high": self.these_high},
                "population": {"low": self.population_low, "high": self.population_high},
                "instances": {"point": list(self.instance_point), "low": list(self.instance_low),
                              "high": list(self.instance_high), "dispersion": list(self.dispersion)}}


@dataclass(frozen=True)
class Posterior:
    """What the likelihood fit's exact per-instance posterior needs: the cells (k, n) at the
    centred sizes x, the fitted Gaussian prior (mu, prec) and each instance's dispersion phi
    (its binomial log-likelihood is divided by phi: quasi-likelihood for lack of fit)."""

    k: np.ndarray  # (I, M)
    n: np.ndarray  # (I, M)
    x: np.ndarray  # (M,)
    mu: np.ndarray  # (2,)
    prec: np.ndarray  # (2, 2)
    phi: np.ndarray  # (I,)


def _loglik(theta: np.ndarray, k: np.ndarray, n: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Binomial log-likelihood of each instance's cells under (a, alpha) = theta (..., I, 2) -> (..., I)."""
    u = np.exp(np.clip(theta[..., :1] - theta[..., 1:] * x, F_MIN, F_MAX))  # -log p
    return np.where(n > 0, -k * u + (n - k) * np.log(-np.expm1(-u)), 0.0).sum(-1)


def importance_draws(post: Posterior, mode: np.ndarray, cov: np.ndarray, rng: np.random.Generator,
                     draws: int, df: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """(B, I, 2) draws from a Student-t proposal around each instance's Laplace fit, and (B, I)
    weights (summing to 1 per instance) towards its exact posterior: the tempered binomial
    likelihood times the Gaussian prior.

    Why: an instance with no or few passes has a skewed posterior (its cells bound p from
    above only), which the Laplace Gaussian at the mode misplaces; the pooled prior and every
    interval built on those Gaussians inherited that (the emergent regime's bias)."""
    inst = mode.shape[0]
    chol = np.linalg.cholesky(1.5 * cov + 1e-10 * np.eye(2))
    t = rng.standard_normal((draws, inst, 2)) / np.sqrt(rng.chisquare(df, (draws, inst)) / df)[..., None]
    theta = mode[None] + np.einsum("ijk,bik->bij", chol, t)
    log_q = -(df + 2) / 2 * np.log1p((t * t).sum(-1) / df)  # per-instance constants cancel
    d = theta - post.mu
    log_prior = -0.5 * np.einsum("bij,jk,bik->bi", d, post.prec, d)
    logw = _loglik(theta, post.k, post.n, post.x) / post.phi + log_prior - log_q
    w = np.exp(logw - logw.max(axis=0))
    return theta, w / w.sum(axis=0)


def _moments(theta: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean (I, 2) and covariance (I, 2, 2) of importance draws."""
    mean = np.einsum("bi,bij->ij", w, theta)
    d = theta - mean
    return mean, np.einsum("bi,bij,bik->ijk", w, d, d)


@dataclass(frozen=True)
class TaskFit:
    """Fitted per-instance lines F_i = a_i - alpha_i (log N - x0) and how to draw from them."""

    method: str
    x0: float
    a: np.ndarray  # (I,) NaN where an instance could not be fitted (it then forecasts 0)
    alpha: np.ndarray  # (I,)
    cov: np.ndarray | None  # (I, 2, 2) posterior covariance of (a, alpha), if known
    draws_ab: np.ndarray | None = None  # (B, I, 2) resampled parameters (bootstrap fits)
    fitted_n: tuple[float, ...] = ()
    extra: dict = field(default_factory=dict)
    posterior: Posterior | None = field(default=None, repr=False, compare=False)

    def instance_p(self, n_params: float) -> np.ndarray:
        x = np.log(n_params) - self.x0
        p = law_p(self.a - self.alpha * x)
        return np.where(np.isnan(self.a), 0.0, p)

    def predict(self, n_params: float) -> float:
        """Point forecast: the mean over instances of each instance's law at N."""
        return float(np.mean(self.instance_p(n_params)))

    @property
    def dispersion(self) -> np.ndarray:
        """(I,) each instance's lack-of-fit factor (1 where binomial noise explains its scatter)."""
        return np.asarray(self.extra.get("dispersion", np.ones(self.a.size)), dtype=float)

    def parameter_draws(self, *, draws: int = 2000, seed: int = 0,
                        resample_instances: bool = True) -> np.ndarray:
        """(B, I, 2) draws of every instance's (a, alpha): parameter uncertainty (sampling noise,
        widened by lack of fit) and, by default, instance resampling (the test set is a sample
        of the task's instances). NaN marks an instance that could not be fitted (it forecasts 0).
        The likelihood fit draws each instance from its exact posterior (importance resampling
        of a t proposal around the Laplace fit), not from the Laplace Gaussian."""
        rng = np.random.default_rng(seed)
        if self.draws_ab is not None:
            theta = self.draws_ab[rng.integers(0, len(self.draws_ab), size=draws)]
        elif self.cov is None:
            raise ValueError(f"{self.method} fit has no uncertainty model")
        elif self.posterior is not None:
            mode = np.stack([self.a, self.alpha], -1)
            prop, w = importance_draws(self.posterior, mode, self.cov, rng, max(2 * draws, 1000))
            cw = np.cumsum(w, axis=0)
            u = rng.random((draws, self.a.size))
            idx = np.stack([np.minimum(np.searchsorted(cw[:, i], u[:, i]), len(cw) - 1)
                            for i in range(self.a.size)], -1)  # (B, I)
            theta = np.take_along_axis(prop, idx[..., None], axis=0)
        else:
            theta = np.full((draws, self.a.size, 2), np.nan)
            ok = ~np.isnan(self.a)
            chol = np.linalg.cholesky(self.cov[ok] + 1e-12 * np.eye(2))
            z = rng.standard_normal((draws, ok.sum(), 2))
            theta[:, ok] = np.stack([self.a[ok], self.alpha[ok]], -1)[None] + np.einsum("ijk,bik->bij", chol, z)
        if "shrink" in self.extra:  # the estimated prior mean is uncertain too, and shared
            delta = rng.multivariate_normal(np.zeros(2), np.asarray(self.extra["prior_mean_cov"]), size=draws)
            theta = theta + np.einsum("ijk,bk->bij", np.asarray(self.extra["shrink"]), delta)
        if resample_instances and theta.shape[1] > 1:
            idx = rng.integers(0, theta.shape[1], size=theta.shape[:2])
            theta = np.take_along_axis(theta, idx[..., None], axis=1)
        return theta

    def instance_draws(self, n_params: float, *, draws: int = 2000, seed: int = 0) -> np.ndarray:
        """(B, I) draws of each instance's PU at N (parameter uncertainty, instance order)."""
        theta = self.parameter_draws(draws=draws, seed=seed, resample_instances=False)
        x = np.log(n_params) - self.x0
        return np.where(np.isnan(theta[..., 0]), 0.0, law_p(theta[..., 0] - theta[..., 1] * x))

    def sample_means(self, n_params: float, *, draws: int = 2000, seed: int = 0,
                     resample_instances: bool = True) -> np.ndarray:
        """Draws of the mean PU over instances at N (see `parameter_draws`)."""
        theta = self.parameter_draws(draws=draws, seed=seed, resample_instances=resample_instances)
        x = np.log(n_params) - self.x0
        p = np.where(np.isnan(theta[..., 0]), 0.0, law_p(theta[..., 0] - theta[..., 1] * x))
        return p.mean(axis=1)

    def _expanded_means(self, per: np.ndarray, level: float, seed: int) -> np.ndarray:
        """Draws of the population mean PU from per-instance draws `per` (B, I): instances
        resampled, and that part widened by Hesterberg's expansion sqrt(I/(I-1)) t_{I-1}/z:
        the percentile bootstrap of a mean over I = 20 instances is too narrow (its variance is
        (I-1)/I of the unbiased one, and a t rather than a normal quantile applies). The widening
        acts on logit(mean): a linear one on the mean itself pushed bounds below 0 (an all-zero
        task: [-0.027, 0.455])."""
        n = per.shape[1]
        if n < 2:  # one instance: resampling changes nothing
            return per.mean(axis=1)
        rng = np.random.default_rng([seed, 1])
        idx = rng.integers(0, n, size=per.shape)
        fixed, resampled = per.mean(axis=1), np.take_along_axis(per, idx, axis=1).mean(axis=1)
        if n < 3:
            return resampled
        from scipy import stats as st

        q = (1 + level) / 2
        expand = np.sqrt(n / (n - 1)) * st.t.ppf(q, n - 1) / st.norm.ppf(q)
        # widened on the logit scale, so no draw (and no interval) leaves [0, 1]
        lf, lr = (st.logistic.ppf(np.clip(m, 1e-300, 1 - 1e-16)) for m in (fixed, resampled))
        return st.logistic.cdf(lf + expand * (lr - lf))

    def forecast(self, n_params: float, *, level: float = 0.9, seed: int = 0, target: str = "these") -> Forecast:
        """Point, "these instances" and "population" intervals, and per-instance forecasts at N.

        `low`/`high` are the interval of `target` ("these": the mean over the fitted instances,
        what a score on the same instances must use; "population": the task's population mean).
        For the likelihood fit the point is the posterior median of the mean PU over these
        instances, from the same draws as the interval, so it lies inside every central interval
        of them (each instance's point: the median of its own draws). The posterior mean, the
        former point, is pulled up by the right tail of a skewed posterior: for a target below
        the smallest fitted size it lay above its own 90% interval. (The mode's plug-in value is
        biased low where instances are uncertain.)"""
        if target not in ("these", "population"):
            raise ValueError(f"the interval target is 'these' or 'population' (got {target!r})")
        per = self.instance_draws(n_params, seed=seed)  # (B, I)
        population = (self.sample_means(n_params, seed=seed) if self.draws_ab is not None
                      else self._expanded_means(per, level, seed))
        likelihood = self.posterior is not None  # else a least-squares fit: its laws' own values
        warn = []
        if np.isnan(self.a).any():
            warn.append(f"{int(np.isnan(self.a).sum())} instance(s) had too few non-zero points to fit "
                        "and forecast 0")
        return Forecast.from_draws(n_params, per, population, level=level, method=self.method, target=target,
                                   phi=self.dispersion, warnings=warn,
                                   point=None if likelihood else self.predict(n_params),
                                   instance_point=None if likelihood else self.instance_p(n_params))

    def to_dict(self) -> dict:
        return {"method": self.method, "x0": self.x0, "a": self.a.tolist(), "alpha": self.alpha.tolist(),
                "fitted_n": list(self.fitted_n), **self.extra}


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares y = a - alpha x; returns (a, alpha)."""
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(-slope)


def fit_dataset(counts: SeriesCounts, *, n_boot: int = 1000, seed: int = 0) -> TaskFit:
    """Dataset level: regress log(-log mean PU) on log N. Interval: bootstrap over instances,
    each resampled cell's passes redrawn binomially at its observed rate (without that a
    one-instance task's interval had zero width: resampling one instance changes nothing)."""
    x = counts.log_n - counts.log_n.mean()
    pu = np.nan_to_num(counts.pu)
    n_cells = counts.samples

    def one(p_mean):
        ok = (p_mean > 0) & (p_mean < 1)
        if ok.sum() < 2:
            return np.nan, np.nan
        return _line(x[ok], np.log(-np.log(p_mean[ok])))

    a, alpha = one(pu.mean(axis=0))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, pu.shape[0], size=(n_boot, pu.shape[0]))
    redraw = [rng.binomial(n_cells[i], pu[i]) / np.maximum(n_cells[i], 1) for i in idx]
    boots = np.array([one(r.mean(axis=0)) for r in redraw])  # (B, 2)
    boots = boots[~np.isnan(boots[:, 0])]
    draws = boots[:, None, :]  # one "instance": the dataset mean
    return TaskFit("dataset", float(counts.log_n.mean()), np.array([a]), np.array([alpha]), None, draws,
                   tuple(counts.n_params.tolist()))


def fit_instances_ls(counts: SeriesCounts, *, n_boot: int = 200, seed: int = 0) -> TaskFit:
    """Paper Eq. 5: a least-squares line per instance on its points with 0 < PU < 1.

    The interval comes from a parametric bootstrap: counts are redrawn (binomially, at the
    observed sample sizes) from each instance's fitted law and every instance refitted.
    """
    x = counts.log_n - counts.log_n.mean()

    def fit_all(k, n):
        with np.errstate(invalid="ignore", divide="ignore"):
            pu = np.where(n > 0, k / np.maximum(n, 1), np.nan)
        ab = np.full((k.shape[0], 2), np.nan)
        for i in range(k.shape[0]):
            ok = (pu[i] > 0) & (pu[i] < 1)
            if ok.sum() >= 2:
                ab[i] = _line(x[ok], np.log(-np.log(pu[i, ok])))
        return ab

    ab = fit_all(counts.passes, counts.samples)
    rng = np.random.default_rng(seed)
    p_fit = np.where(np.isnan(ab[:, :1]), np.nan_to_num(counts.pu), law_p(ab[:, :1] - ab[:, 1:] * x[None]))
    draws = np.array([fit_all(rng.binomial(counts.samples, np.clip(p_fit, 0, 1)), counts.samples)
                      for _ in range(n_boot)])
    return TaskFit("instance-ls", float(counts.log_n.mean()), ab[:, 0], ab[:, 1], None, draws,
                   tuple(counts.n_params.tolist()))


def fisher_scoring(k, n, J, theta, mu, prec, iters=60):
    """Posterior modes of F_i = J @ theta_i for every instance at once (Fisher scoring on the
    binomial log-likelihood of the cells plus a Gaussian log-prior N(mu, prec^-1)).

    k, n: (I, M) passes and samples (n = 0: no data); J: (M, P) design; theta: (I, P) start.
    Returns the modes and their Laplace covariances (I, P, P). Each step is halved until the
    log posterior does not fall (without that, a step capped at 2 could overshoot and cycle,
    leaving some instances 10 posterior SDs from their mode).
    """
    def objective(t):
        u = np.exp(np.clip(t @ J.T, F_MIN, F_MAX))
        ll = np.where(n > 0, -k * u + (n - k) * np.log(-np.expm1(-u)), 0.0).sum(axis=1)
        d = t - mu
        return ll - 0.5 * np.einsum("ij,jk,ik->i", d, prec, d)

    current = objective(theta)
    for _ in range(iters):
        u = np.exp(np.clip(theta @ J.T, F_MIN, F_MAX))  # (I, M): -log p
        em1 = np.expm1(u)
        g = np.where(n > 0, u * (-k + (n - k) / em1), 0.0)  # dlogL/dF
        w = np.where(n > 0, n * u * u / em1, 0.0)  # Fisher information in F
        H = np.einsum("im,mj,mk->ijk", w, J, J) + prec
        step = np.linalg.solve(H, (g @ J - (theta - mu) @ prec)[..., None])[..., 0]
        step *= np.minimum(1.0, 2.0 / np.maximum(np.abs(step).max(axis=1, keepdims=True), 1e-12))
        for _ in range(30):  # step halving, per instance
            new = objective(theta + step)
            worse = ~(new >= current - 1e-9 * np.abs(current))
            if not worse.any():
                break
            step[worse] *= 0.5
        theta = theta + step
        current = objective(theta)
        if np.abs(step).max() < 1e-8:
            break
    u = np.exp(np.clip(theta @ J.T, F_MIN, F_MAX))
    w = np.where(n > 0, n * u * u / np.expm1(u), 0.0)
    H = np.einsum("im,mj,mk->ijk", w, J, J) + prec
    return theta, np.linalg.inv(H)


def _posterior_modes(k, n, x, theta, mu, prec, iters=40):
    """The task law F = a - alpha x as a design: J = [1, -x]."""
    return fisher_scoring(k, n, np.stack([np.ones_like(x), -x], -1), theta, mu, prec, iters)


def lack_of_fit(counts: SeriesCounts, *, alpha_test: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per instance: binomial deviance of its own maximum-likelihood line, its degrees of
    freedom (sizes with samples - 2) and the dispersion factor phi.

    phi = deviance / dof where that exceeds 1 and the deviance is significant at `alpha_test`
    for the task (chi-square test at alpha_test / instances, Bonferroni: tested per instance at
    1%, 21% of 20-instance law-following series had a flagged instance), else 1. The paper's
    Table 2 instance 24 (deviance ~211 on 4 dof, p ~ 1e-44) gets phi ~53. phi tempers the
    instance's likelihood (quasi-likelihood), so its interval widens by about sqrt(phi)."""
    from scipy import stats as st

    x = counts.log_n - counts.log_n.mean()
    k, n = counts.passes.astype(float), counts.samples.astype(float)
    start = np.tile([1.0, 0.5], (k.shape[0], 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        pu = np.where(n > 0, k / np.maximum(n, 1), np.nan)
    for i in range(k.shape[0]):  # Fisher scoring from a far start can stall: start on the LS line
        ok = (pu[i] > 0) & (pu[i] < 1)
        if ok.sum() >= 2:
            start[i] = _line(x[ok], np.log(-np.log(pu[i, ok])))
    theta, _ = _posterior_modes(k, n, x, start, np.zeros(2), np.diag([1e-6, 1e-6]), iters=80)
    p = law_p(theta[:, :1] - theta[:, 1:] * x)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(k > 0, k * np.log(k / (n * p)), 0.0)
        t2 = np.where(n - k > 0, (n - k) * np.log((n - k) / (n * (1 - p))), 0.0)
    dev = np.maximum(2 * np.where(n > 0, t1 + t2, 0.0).sum(axis=1), 0.0)
    dof = (n > 0).sum(axis=1) - 2
    sig = (dof >= 1) & (st.chi2.sf(dev, np.maximum(dof, 1)) < alpha_test / max(k.shape[0], 1))
    phi = np.where(sig, np.maximum(dev / np.maximum(dof, 1), 1.0), 1.0)
    return dev, dof, phi


def fit_likelihood(counts: SeriesCounts, *, pooling: bool = True, em_iters: int = 30,
                   dispersion: bool = True, is_draws: int = 256) -> TaskFit:
    """Binomial likelihood on every (passes, samples) pair with partially pooled instance laws.

    The stopping rule needs no correction here: PassUntil's likelihood is proportional to the
    binomial one. (A former `bias_reduced` option entered stopped cells as (K-1, n-1), which is
    the unbiased per-cell estimate but not a likelihood: it made forecasts 0.58 low in log with
    4.5% coverage, and was removed.)

    The prior (mean, covariance of (a, alpha) over instances) is estimated by EM whose E-step
    uses each instance's exact posterior moments (importance sampling, `importance_draws`),
    not its Laplace mode: an instance with no passes bounds its law from one side only, and
    its mode sat at that bound and pulled the prior's slope. Instances whose scatter exceeds
    binomial noise (`lack_of_fit`) have their likelihood divided by their dispersion phi.
    """
    x0 = float(counts.log_n.mean())
    x = counts.log_n - x0
    k, n = counts.passes.astype(float), counts.samples.astype(float)
    phi = lack_of_fit(counts)[2] if dispersion else np.ones(k.shape[0])
    kt, nt = k / phi[:, None], n / phi[:, None]
    # start from the pooled (dataset) line fitted by likelihood with a vague prior
    vague = np.diag([1e-4, 1e-4])
    pooled, _ = _posterior_modes(k.sum(0, keepdims=True), n.sum(0, keepdims=True), x,
                                 np.array([[1.0, 0.5]]), np.zeros(2), vague)
    mu = pooled[0]
    sigma = np.diag([4.0, 0.5])
    theta = np.repeat(mu[None], k.shape[0], axis=0)
    extra = {"dispersion": phi.tolist()}
    if not pooling:
        prec = np.diag([1e-2, 1e-2])
        theta, cov = _posterior_modes(kt, nt, x, theta, mu, prec)
        post = Posterior(k, n, x, mu, prec, phi)
        return TaskFit("likelihood-unpooled", x0, theta[:, 0], theta[:, 1], cov, None,
                       tuple(counts.n_params.tolist()), extra, post)
    for _ in range(em_iters):
        prec = np.linalg.inv(sigma)
        theta, cov = _posterior_modes(kt, nt, x, theta, mu, prec)
        if is_draws:  # common random numbers: the same proposal stream every iteration
            draws, w = importance_draws(Posterior(k, n, x, mu, prec, phi), theta, cov,
                                        np.random.default_rng(12345), is_draws)
            m, c = _moments(draws, w)
        else:
            m, c = theta, cov
        mu = m.mean(axis=0)
        d = m - mu
        sigma = (d.T @ d + c.sum(axis=0)) / len(m) + 1e-4 * np.eye(2)
    prec = np.linalg.inv(sigma)
    theta, cov = _posterior_modes(kt, nt, x, theta, mu, prec)
    c = cov
    if is_draws:
        c = _moments(*importance_draws(Posterior(k, n, x, mu, prec, phi), theta, cov,
                                       np.random.default_rng(12345), is_draws))[1]
    shrink = c @ prec  # d(posterior mean)/d(prior mean), per instance
    # Sampling variance of the estimated prior mean: each instance informs it with precision
    # (sigma + V_i)^-1 = P - P C_i P (V_i: its likelihood's variance, C_i: its posterior's). The
    # former (sigma + mean C_i) / I put the posterior in place of the likelihood, too small
    # where data are weak (K = 2, zero-pass cells), and "these instances" intervals under-covered.
    info = len(theta) * prec - prec @ c.sum(axis=0) @ prec
    w, v = np.linalg.eigh((info + info.T) / 2)
    mu_cov = HYPER_INFLATION * (v / np.maximum(w, 1e-6 / len(theta))) @ v.T
    extra.update({"prior_mean": mu.tolist(), "prior_cov": sigma.tolist(), "shrink": shrink.tolist(),
                  "prior_mean_cov": mu_cov.tolist()})
    return TaskFit("likelihood", x0, theta[:, 0], theta[:, 1], cov, None, tuple(counts.n_params.tolist()),
                   extra, Posterior(k, n, x, mu, prec, phi))


def threshold_n(fit: TaskFit, target: float, *, level: float = 0.9, draws: int = 500, seed: int = 0
                ) -> tuple[float, float, float]:
    """The size N at which the mean PU first reaches `target` (paper: N = (c / -log target)^(1/alpha)
    for one law), with an interval from the parameter draws. inf where it is never reached
    within 10^12 x the largest fitted size."""
    if not 0 < target < 1:
        raise ValueError("the target PU must lie in (0, 1)")
    lo_x = np.log(min(fit.fitted_n)) - 5 if fit.fitted_n else fit.x0 - 10
    grid = np.linspace(lo_x, np.log(max(fit.fitted_n or (np.exp(fit.x0),))) + 28, 800)

    def crossing(theta):  # theta (B, I, 2) -> (B,) log N of first crossing
        x = grid[None, None, :] - fit.x0
        a, al = theta[..., :1], theta[..., 1:]
        p = np.where(np.isnan(a), 0.0, law_p(a - al * x)).mean(axis=1)  # (B, G)
        above = p >= target
        first = np.where(above.any(axis=1), above.argmax(axis=1), -1)
        j = np.maximum(first, 1)  # interpolate within the grid step (0.05 in log N) where it crosses
        rows = np.arange(len(p))
        p0, p1 = p[rows, j - 1], p[rows, j]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.clip(np.where(p1 > p0, (target - p0) / (p1 - p0), 1.0), 0.0, 1.0)
        x = np.where(first > 0, grid[j - 1] + frac * (grid[j] - grid[j - 1]), grid[np.maximum(first, 0)])
        return np.where(first >= 0, x, np.inf)

    point = crossing(np.stack([fit.a, fit.alpha], -1)[None])[0]
    sims = crossing(fit.parameter_draws(draws=draws, seed=seed))
    lo, hi = np.quantile(sims, [(1 - level) / 2, (1 + level) / 2])
    return float(np.exp(point)), float(np.exp(lo)), float(np.exp(hi))


def fit_loss_assisted(counts: SeriesCounts, *, min_points: int = 3, n_boot: int = 300, seed: int = 0) -> TaskFit:
    """Paper §5.4 / Appendix E.2: help hard instances with the reference answer's test loss.

    Easy instances (at least `min_points` sizes with passes) get their own likelihood-fitted law.
    On their cells with 0 < PU < 1, log(-log PU) is regressed on log(test loss) (one line for the
    task: -log PU grows with the answer's loss). Each hard instance's test loss, measured at every
    size whether or not it ever passed, is extrapolated with a power law in N and mapped to PU
    through that line; the mapping is expressed as an equivalent law (a, alpha) per instance, so
    the fit forecasts like the others. Intervals: bootstrap over instances.
    """
    if counts.ref_loss is None or np.isnan(counts.ref_loss).any():
        raise ValueError("the loss-assisted fit needs the reference test loss of every instance and size")
    x0 = float(counts.log_n.mean())
    x = counts.log_n - x0
    easy = (counts.passes > 0).sum(axis=1) >= min_points
    if easy.sum() < 2:
        raise ValueError(f"the loss-assisted fit needs at least 2 instances with passes at >= {min_points} sizes")
    base = fit_likelihood(counts.select_instances(np.flatnonzero(easy)), pooling=easy.sum() >= 5)
    log_loss = np.log(counts.ref_loss)

    def mapping(rows):  # log(-log PU) = b0 + b1 log(loss) on easy cells with 0 < PU < 1
        pu = counts.pu[rows]
        ok = (pu > 0) & (pu < 1)
        b1, b0 = np.polyfit(log_loss[rows][ok], np.log(-np.log(pu[ok])), 1)
        return b0, b1

    def hard_laws(b0, b1):  # log loss_i = l_i - s_i x  =>  F_i = b0 + b1 l_i - b1 s_i x
        slope, icpt = np.polyfit(x, log_loss[~easy].T, 1)  # per hard instance
        return b0 + b1 * icpt, b1 * slope * -1.0

    a, alpha = np.empty(easy.size), np.empty(easy.size)
    a[easy], alpha[easy] = base.a, base.alpha
    b0, b1 = mapping(np.flatnonzero(easy))
    if (~easy).any():
        a[~easy], alpha[~easy] = hard_laws(b0, b1)
    # Draws of each instance's own law, in instance order: easy instances from their posterior,
    # hard ones through a loss map refitted on resampled easy instances (the map's uncertainty).
    # Instances are resampled once, later, by `parameter_draws` when a population interval asks.
    rng = np.random.default_rng(seed)
    easy_idx, hard_idx = np.flatnonzero(easy), np.flatnonzero(~easy)
    draws = np.empty((n_boot, easy.size, 2))
    draws[:, easy_idx] = base.parameter_draws(draws=n_boot, seed=seed, resample_instances=False)
    for b in range(n_boot):
        if hard_idx.size:
            ha, hal = hard_laws(*mapping(rng.choice(easy_idx, easy_idx.size)))
            draws[b, hard_idx] = np.stack([ha, hal], -1)
    return TaskFit("loss-assisted", x0, a, alpha, None, draws, tuple(counts.n_params.tolist()),
                   {"easy": int(easy.sum()), "hard": int((~easy).sum()), "loss_map": [float(b0), float(b1)]})
