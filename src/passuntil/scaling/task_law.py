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

Every fit gives `forecast(N, level)`: a point forecast of the mean PU over the instances at N
with a prediction interval.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from passuntil.scaling.data import SeriesCounts

F_MIN, F_MAX = -12.0, 6.0  # F = log(-log p): p from ~1 - 6e-6 to exp(-403)


def law_p(f: np.ndarray) -> np.ndarray:
    return np.exp(-np.exp(np.clip(f, F_MIN, F_MAX)))


@dataclass(frozen=True)
class Forecast:
    """A forecast of the mean PU over instances at one size, with its interval."""

    n_params: float
    point: float
    low: float
    high: float
    level: float
    method: str
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"n_params": self.n_params, "point": self.point, "low": self.low, "high": self.high,
                "level": self.level, "method": self.method, "warnings": list(self.warnings)}


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

    def instance_p(self, n_params: float) -> np.ndarray:
        x = np.log(n_params) - self.x0
        p = law_p(self.a - self.alpha * x)
        return np.where(np.isnan(self.a), 0.0, p)

    def predict(self, n_params: float) -> float:
        """Point forecast: the mean over instances of each instance's law at N."""
        return float(np.mean(self.instance_p(n_params)))

    def parameter_draws(self, *, draws: int = 2000, seed: int = 0,
                        resample_instances: bool = True) -> np.ndarray:
        """(B, I, 2) draws of every instance's (a, alpha): parameter uncertainty (sampling noise)
        and, by default, instance resampling (the test set is a sample of the task's
        instances). NaN marks an instance that could not be fitted (it forecasts 0)."""
        rng = np.random.default_rng(seed)
        if self.draws_ab is not None:
            theta = self.draws_ab[rng.integers(0, len(self.draws_ab), size=draws)]
        elif self.cov is None:
            raise ValueError(f"{self.method} fit has no uncertainty model")
        else:
            theta = np.full((draws, self.a.size, 2), np.nan)
            ok = ~np.isnan(self.a)
            chol = np.linalg.cholesky(self.cov[ok] + 1e-12 * np.eye(2))
            z = rng.standard_normal((draws, ok.sum(), 2))
            t = np.stack([self.a[ok], self.alpha[ok]], -1)[None] + np.einsum("ijk,bik->bij", chol, z)
            if "shrink" in self.extra:  # the estimated prior mean is uncertain too, and shared
                delta = rng.multivariate_normal(np.zeros(2), np.asarray(self.extra["prior_mean_cov"]), size=draws)
                t = t + np.einsum("ijk,bk->bij", np.asarray(self.extra["shrink"])[ok], delta)
            theta[:, ok] = t
        if resample_instances and theta.shape[1] > 1:
            idx = rng.integers(0, theta.shape[1], size=theta.shape[:2])
            theta = np.take_along_axis(theta, idx[..., None], axis=1)
        return theta

    def sample_means(self, n_params: float, *, draws: int = 2000, seed: int = 0,
                     resample_instances: bool = True) -> np.ndarray:
        """Draws of the mean PU over instances at N (see `parameter_draws`)."""
        theta = self.parameter_draws(draws=draws, seed=seed, resample_instances=resample_instances)
        x = np.log(n_params) - self.x0
        p = np.where(np.isnan(theta[..., 0]), 0.0, law_p(theta[..., 0] - theta[..., 1] * x))
        return p.mean(axis=1)

    def _expanded_means(self, n_params: float, level: float, seed: int) -> np.ndarray:
        """Draws of the mean PU whose instance-resampling part is widened by Hesterberg's
        expansion sqrt(I/(I-1)) t_{I-1}/z: the percentile bootstrap of a mean over I = 20
        instances is too narrow (its variance is (I-1)/I of the unbiased one, and a
        t rather than a normal quantile applies)."""
        fixed = self.sample_means(n_params, seed=seed, resample_instances=False)
        resampled = self.sample_means(n_params, seed=seed)
        n = self.a.size
        if n < 3 or self.draws_ab is not None:  # bootstrap fits already resample instances
            return resampled
        from scipy import stats as st

        q = (1 + level) / 2
        expand = np.sqrt(n / (n - 1)) * st.t.ppf(q, n - 1) / st.norm.ppf(q)
        return fixed + expand * (resampled - fixed)

    def forecast(self, n_params: float, *, level: float = 0.9, seed: int = 0) -> Forecast:
        """Point and interval at N. For the likelihood fit the point is the posterior mean of the
        mean PU (the mode's plug-in value is biased low where instances are uncertain)."""
        means = self._expanded_means(n_params, level, seed)
        lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        point = float(means.mean()) if self.method == "likelihood" else self.predict(n_params)
        warn = ()
        if np.isnan(self.a).any():
            warn = (f"{int(np.isnan(self.a).sum())} instance(s) had too few non-zero points to fit "
                    "and forecast 0",)
        return Forecast(float(n_params), point, float(lo), float(hi), level, self.method, warn)

    def to_dict(self) -> dict:
        return {"method": self.method, "x0": self.x0, "a": self.a.tolist(), "alpha": self.alpha.tolist(),
                "fitted_n": list(self.fitted_n), **self.extra}


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares y = a - alpha x; returns (a, alpha)."""
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(-slope)


def fit_dataset(counts: SeriesCounts, *, n_boot: int = 1000, seed: int = 0) -> TaskFit:
    """Dataset level: regress log(-log mean PU) on log N; bootstrap over instances for the interval."""
    x = counts.log_n - counts.log_n.mean()
    pu = np.nan_to_num(counts.pu)

    def one(p_mean):
        ok = (p_mean > 0) & (p_mean < 1)
        if ok.sum() < 2:
            return np.nan, np.nan
        return _line(x[ok], np.log(-np.log(p_mean[ok])))

    a, alpha = one(pu.mean(axis=0))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, pu.shape[0], size=(n_boot, pu.shape[0]))
    boots = np.array([one(pu[i].mean(axis=0)) for i in idx])  # (B, 2)
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
    Returns the modes and their Laplace covariances (I, P, P).
    """
    for _ in range(iters):
        u = np.exp(np.clip(theta @ J.T, F_MIN, F_MAX))  # (I, M): -log p
        em1 = np.expm1(u)
        g = np.where(n > 0, u * (-k + (n - k) / em1), 0.0)  # dlogL/dF
        w = np.where(n > 0, n * u * u / em1, 0.0)  # Fisher information in F
        H = np.einsum("im,mj,mk->ijk", w, J, J) + prec
        step = np.linalg.solve(H, (g @ J - (theta - mu) @ prec)[..., None])[..., 0]
        step *= np.minimum(1.0, 2.0 / np.maximum(np.abs(step).max(axis=1, keepdims=True), 1e-12))
        theta = theta + step
        if np.abs(step).max() < 1e-8:
            break
    return theta, np.linalg.inv(H)


def _posterior_modes(k, n, x, theta, mu, prec, iters=40):
    """The task law F = a - alpha x as a design: J = [1, -x]."""
    return fisher_scoring(k, n, np.stack([np.ones_like(x), -x], -1), theta, mu, prec, iters)


def fit_likelihood(counts: SeriesCounts, *, pooling: bool = True, em_iters: int = 30,
                   bias_reduced: bool = False) -> TaskFit:
    """Binomial likelihood on every (passes, samples) pair with partially pooled instance laws.

    bias_reduced: a cell that stopped at its K-th pass enters as (K - 1) passes in n - 1
    samples, the likelihood whose maximiser is the unbiased (K-1)/(n-1) rather than the upward
    biased K/n (2x at K = 2, see docs/statistics.md).
    """
    x0 = float(counts.log_n.mean())
    x = counts.log_n - x0
    k, n = counts.passes.astype(float), counts.samples.astype(float)
    if bias_reduced:
        at_k = (k >= counts.k_target) & (n > 0)
        k, n = np.where(at_k, k - 1, k), np.where(at_k, n - 1, n)
    # start from the pooled (dataset) line fitted by likelihood with a vague prior
    vague = np.diag([1e-4, 1e-4])
    pooled, _ = _posterior_modes(k.sum(0, keepdims=True), n.sum(0, keepdims=True), x,
                                 np.array([[1.0, 0.5]]), np.zeros(2), vague)
    mu = pooled[0]
    sigma = np.diag([4.0, 0.5])
    theta = np.repeat(mu[None], k.shape[0], axis=0)
    if not pooling:
        theta, cov = _posterior_modes(k, n, x, theta, mu, np.diag([1e-2, 1e-2]))
        return TaskFit("likelihood-unpooled", x0, theta[:, 0], theta[:, 1], cov, None, tuple(counts.n_params.tolist()))
    for _ in range(em_iters):
        theta, cov = _posterior_modes(k, n, x, theta, mu, np.linalg.inv(sigma))
        mu = theta.mean(axis=0)
        d = theta - mu
        sigma = (d.T @ d + cov.sum(axis=0)) / len(theta) + 1e-4 * np.eye(2)
    prec = np.linalg.inv(sigma)
    shrink = cov @ prec  # d(posterior mode)/d(prior mean), per instance
    mu_cov = (sigma + cov.mean(axis=0)) / len(theta)  # sampling variance of the estimated prior mean
    return TaskFit("likelihood", x0, theta[:, 0], theta[:, 1], cov, None, tuple(counts.n_params.tolist()),
                   {"prior_mean": mu.tolist(), "prior_cov": sigma.tolist(), "shrink": shrink.tolist(),
                    "prior_mean_cov": mu_cov.tolist()})


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
        return np.where(first >= 0, grid[np.maximum(first, 0)], np.inf)

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
    rng = np.random.default_rng(seed)
    easy_idx, hard_idx = np.flatnonzero(easy), np.flatnonzero(~easy)
    draws = np.empty((n_boot, easy.size, 2))
    base_draws = base.parameter_draws(draws=n_boot, seed=seed, resample_instances=False)
    for b in range(n_boot):
        e = rng.choice(easy_idx, easy_idx.size)
        bb0, bb1 = mapping(e)
        draws[b, : easy_idx.size] = base_draws[b][np.searchsorted(easy_idx, e)]
        if hard_idx.size:
            ha, hal = hard_laws(bb0, bb1)
            pick = rng.integers(0, hard_idx.size, hard_idx.size)
            draws[b, easy_idx.size:] = np.stack([ha[pick], hal[pick]], -1)
    return TaskFit("loss-assisted", x0, a, alpha, None, draws, tuple(counts.n_params.tolist()),
                   {"easy": int(easy.sum()), "hard": int((~easy).sum()), "loss_map": [float(b0), float(b1)]})


FITTERS = {"likelihood": fit_likelihood, "instance-ls": fit_instances_ls, "dataset": fit_dataset,
           "loss-assisted": fit_loss_assisted}
