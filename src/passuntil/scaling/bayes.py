"""Full-Bayes fit of the task law (`--method bayes`): MCMC over instances and hyperparameters.

The model (the likelihood fit's, with the prior's mean and covariance given priors instead of
being estimated by EM and plugged in):

    theta_i = (a_i, alpha_i) ~ N(mu, Sigma),   Sigma = D R D,  D = diag(s_a, s_alpha)
    k_im ~ Binomial(n_im, exp(-exp(a_i - alpha_i x_m)))   (F clamped as in task_law.law_p;
                                                            n = 0 cells carry nothing;
                                                            lack-of-fit instances tempered by phi)
    mu ~ N(MU_PRIOR);  s_a ~ half-normal(SD_SCALE[0]);  s_alpha ~ half-normal(SD_SCALE[1]);
    R: LKJ(eta = 2), i.e. density (1 - rho^2) on the correlation.

The intercept a_i is F at x_c, the information-weighted centre of the cells (the fit's x0 is
mean log N + x_c): there intercept and slope are not coupled by the pooled likelihood, so the
priors on the spread and the hyperparameters' moves act along the instances' ridges.

Why: the EM's plug-in slope spread collapses where the data barely identify slopes (every
fitted cell PU < 1e-3: 0.06-0.12 against a true 0.23-0.27); the forecast is then narrow and low.
Here the spread is integrated over its posterior, whose prior is proper, so the data cannot
drive it to a point at zero.

Scales: the sds' half-normal scales are 2 in F for the intercept (instances' F at a size spans
O(1): the paper's hard and easy instances differ by several units) and 0.5 for the slope (the
paper's slopes are O(0.1-1)); both are wide against the values seen, so they regularise only
what the data do not say.

Sampler (vectorised over chains and instances, seeded): per sweep, (1) INSTANCE_STEPS random-walk
Metropolis steps per instance with a proposal shaped by each instance's Laplace covariance and
a per-(chain, instance) scale adapted during burn-in (after half the burn-in, the shape is
re-estimated from the draws so far); (2) mu from its Gaussian full conditional; (3) several
Metropolis steps on (log s_a, log s_alpha, atanh rho) given the instances (centred), and (4) one
non-centred step on the same (instances move with the covariance, z_i = L^-1 (theta_i - mu) held
fixed) and one on mu (all instances shifted with it): the interweaving that lets a weakly
identified spread move without waiting for every instance (the funnel of centred samplers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.task_law import (
    Forecast,
    TaskFit,
    _loglik,
    _posterior_modes,
    lack_of_fit,
    law_p,
)

# Prior of mu = (mean F at xc, mean slope): (mean, sd) of each. F at the data's centre is pinned by
# the data (vague prior); the mean slope is not where every instance passes at one size only (its
# zero-pass cells bound the slopes from below, nothing bounds them above): a vague prior there let
# it run to ~8 (forecast 0.77 for a true 0.012). The paper's slopes are O(0.1-1): N(0.5, 1).
MU_PRIOR = ((0.0, 10.0), (0.5, 1.0))
SD_SCALE = np.array([2.0, 0.5])  # half-normal scales of (s_a, s_alpha); see the module docstring
LKJ_ETA = 2.0
RHAT_WARN = 1.05
# Metropolis steps per instance per sweep: with 2, instances whose posterior is one-sided (PU near
# 0 or 1 at most sizes) kept split-R-hats up to 1.13 on an ordinary series after 750 draws a chain
INSTANCE_STEPS = 4


def split_rhat(chains: np.ndarray) -> float:
    """Split-R-hat (Gelman et al., BDA3 sec. 11.4) of draws (C, S): each chain halved."""
    c, s = chains.shape
    h = s // 2
    parts = np.concatenate([chains[:, :h], chains[:, h:2 * h]], axis=0)
    w = parts.var(axis=1, ddof=1).mean()
    b = h * parts.mean(axis=1).var(ddof=1)
    if w <= 0:
        return 1.0 if b <= 0 else float("inf")
    return float(np.sqrt(((h - 1) / h * w + b / h) / w))


# the support of (log s_a, log s_alpha, atanh rho) (|rho| < 0.9999): beyond it a covariance is not
# numerically positive definite; proposals outside are rejected (the priors truncated there)
U_LOW, U_HIGH = np.array([-10.0, -10.0, -5.0]), np.array([4.0, 4.0, 5.0])


def _cov(u: np.ndarray) -> np.ndarray:
    """(C, 3) (log s_a, log s_alpha, atanh rho) -> (C, 2, 2) covariance (u clipped to its support)."""
    u = np.clip(u, U_LOW, U_HIGH)
    s, r = np.exp(u[:, :2]), np.tanh(u[:, 2])
    out = np.empty((len(u), 2, 2))
    out[:, 0, 0], out[:, 1, 1] = s[:, 0] ** 2, s[:, 1] ** 2
    out[:, 0, 1] = out[:, 1, 0] = r * s[:, 0] * s[:, 1]
    return out


def _log_prior_u(u: np.ndarray, sd_prior: str = "halfnormal") -> np.ndarray:
    """Log prior of (log s, atanh rho) (C,), Jacobians included: LKJ correlation; sds half-normal
    (scale SD_SCALE) or, "gamma2", Gamma(shape 2, mean SD_SCALE): the boundary-avoiding prior of
    Chung et al. (2013, Psychometrika 78), density -> 0 linearly as an sd -> 0."""
    s, r = np.exp(u[:, :2]), np.tanh(u[:, 2])
    if sd_prior == "gamma2":
        log_sd = (-2 * s / SD_SCALE + 2 * u[:, :2]).sum(1)
    else:
        log_sd = (-0.5 * (s / SD_SCALE) ** 2 + u[:, :2]).sum(1)
    inside = ((u >= U_LOW) & (u <= U_HIGH)).all(1)
    with np.errstate(divide="ignore"):
        return np.where(inside, log_sd + LKJ_ETA * np.log1p(-np.minimum(r * r, 1 - 1e-12)), -np.inf)


def _log_normal(theta: np.ndarray, mu: np.ndarray, u: np.ndarray) -> np.ndarray:
    """sum_i log N(theta_i | mu, Sigma(u)) up to a constant, per chain: theta (C, I, 2)."""
    u = np.clip(u, U_LOW, U_HIGH)
    s, r = np.exp(u[:, :2]), np.tanh(u[:, 2])
    d = (theta - mu[:, None]) / s[:, None]
    q = (d[..., 0] ** 2 - 2 * r[:, None] * d[..., 0] * d[..., 1] + d[..., 1] ** 2) / (1 - r * r)[:, None]
    inst = theta.shape[1]
    return -0.5 * q.sum(1) - inst * (u[:, :2].sum(1) + 0.5 * np.log1p(-r * r))


@dataclass(frozen=True)
class BayesFit(TaskFit):
    """A TaskFit whose draws come from the MCMC: `draws_ab` (C*S, I, 2) chain-major, with the
    hyperparameters of each draw (`hyper_mu` (C*S, 2), `hyper_cov` (C*S, 2, 2))."""

    hyper_mu: np.ndarray | None = field(default=None, repr=False, compare=False)
    hyper_cov: np.ndarray | None = field(default=None, repr=False, compare=False)
    chains: int = 1

    def mean_draws(self, n_params: float) -> np.ndarray:
        """(C*S,) draws of the mean PU over these instances at N."""
        x = np.log(n_params) - self.x0
        return law_p(self.draws_ab[..., 0] - self.draws_ab[..., 1] * x).mean(axis=1)

    def rhat(self, n_params: float) -> float:
        """Split-R-hat of log(mean PU over these instances) at N across the chains."""
        m = np.log(np.maximum(self.mean_draws(n_params), 1e-300))
        return split_rhat(m.reshape(self.chains, -1))

    def population_draws(self, n_params: float, *, new: int = 256, seed: int = 0) -> np.ndarray:
        """(C*S,) draws of the task population's mean PU at N: per draw, `new` fresh instances from
        N(mu, Sigma) of that draw (Monte Carlo of the population mean)."""
        rng = np.random.default_rng([seed, 2])
        chol = np.linalg.cholesky(self.hyper_cov + 1e-12 * np.eye(2))
        z = rng.standard_normal((len(chol), new, 2))
        theta = self.hyper_mu[:, None] + np.einsum("bjk,bik->bij", chol, z)
        x = np.log(n_params) - self.x0
        return law_p(theta[..., 0] - theta[..., 1] * x).mean(axis=1)

    def forecast(self, n_params: float, *, level: float = 0.9, seed: int = 0, target: str = "these") -> Forecast:
        """Point (posterior median of the mean over these instances), "these instances" interval
        (its central quantiles), population interval (`population_draws`), per-instance medians
        and intervals; a warning where the chains disagree (split-R-hat above RHAT_WARN)."""
        if target not in ("these", "population"):
            raise ValueError(f"the interval target is 'these' or 'population' (got {target!r})")
        x = np.log(n_params) - self.x0
        per = law_p(self.draws_ab[..., 0] - self.draws_ab[..., 1] * x)  # (B, I)
        warn = []
        r = self.rhat(n_params)
        if not r <= RHAT_WARN:
            warn.append(f"the bayes fit's chains disagree (split-R-hat {r:.3g} > {RHAT_WARN} on the log mean at "
                        "the target): the interval is not reliable")
        return Forecast.from_draws(n_params, per, self.population_draws(n_params, seed=seed), level=level,
                                   method=self.method, target=target, phi=self.dispersion, warnings=warn)


def _start(k, n, x, phi):
    """Per-instance modes and Laplace covariances under a wide prior around the pooled line."""
    vague = np.diag([1e-4, 1e-4])
    pooled, _ = _posterior_modes(k.sum(0, keepdims=True), n.sum(0, keepdims=True), x,
                                 np.array([[1.0, 0.5]]), np.zeros(2), vague)
    mu = pooled[0]
    prec = np.linalg.inv(np.diag(SD_SCALE ** 2))
    theta, cov = _posterior_modes(k / phi[:, None], n / phi[:, None], x, np.repeat(mu[None], k.shape[0], 0),
                                  mu, prec)
    return theta, cov


def sample(counts: SeriesCounts, *, chains: int = 4, warmup: int = 1000, keep: int = 1000, seed: int = 0,
           dispersion: bool = True, sd_prior: str = "halfnormal", mu_prior=MU_PRIOR) -> dict:
    """Run the sampler; returns draws (chains, keep, ...) of theta, mu, Sigma and acceptance rates."""
    rng = np.random.default_rng([seed, 7])
    x0 = float(counts.log_n.mean())
    x = counts.log_n - x0
    k, n = counts.passes.astype(float), counts.samples.astype(float)
    inst = k.shape[0]
    phi = lack_of_fit(counts)[2] if dispersion else np.ones(inst)

    def loglik(th):  # (C, I, 2) -> (C, I)
        return _loglik(th, k, n, x) / phi

    mode, lap = _start(k, n, x, phi)
    # Sample in (F at xc, alpha), xc the information-weighted centre of the cells: there the
    # pooled likelihood does not couple intercept and slope, so the hyperparameters' moves (and
    # the priors on the spread) act along the instances' ridges, not across them.
    uu = np.exp(np.clip(mode[:, :1] - mode[:, 1:] * x, -12.0, 6.0))
    w = np.where(n > 0, n * uu * uu / np.expm1(uu), 0.0) / phi[:, None]
    xc = float((w * x).sum() / w.sum()) if w.sum() > 0 else 0.0
    x = x - xc
    t_inv = np.array([[1.0, -xc], [0.0, 1.0]])
    mode, lap = mode @ t_inv.T, np.einsum("jk,ikl,ml->ijm", t_inv, lap, t_inv)
    shape = np.linalg.cholesky(lap + 1e-8 * np.eye(2))  # (I, 2, 2) proposal shape
    shape = np.broadcast_to(shape, (chains, inst, 2, 2)).copy()
    # dispersed starts: modes jittered by 1.5 Laplace sds; spread from the modes' scatter
    theta = mode[None] + 1.5 * np.einsum("cijk,cik->cij", shape, rng.standard_normal((chains, inst, 2)))
    mu = theta.mean(1)
    sd0 = np.maximum(theta.std(1), 0.05)
    u = np.column_stack([np.log(sd0) + rng.normal(0, 0.5, (chains, 2)), rng.normal(0, 0.3, chains)])
    ll = loglik(theta)
    log_step = np.full((chains, inst), np.log(1.2))
    u_step, nc_step, mu_step = np.full(chains, 0.3), np.full((chains, 3), 0.3), np.full((chains, 2), 0.1)
    total = warmup + keep
    out_theta = np.empty((chains, keep, inst, 2))
    out_mu, out_u = np.empty((chains, keep, 2)), np.empty((chains, keep, 3))
    acc_theta = np.zeros((chains, inst))
    history = []
    m0, prior_prec = np.array([m for m, _ in mu_prior]), np.diag([sd ** -2.0 for _, sd in mu_prior])

    for it in range(total):
        adapt = it < warmup
        gain = 1.0 / np.sqrt(1 + it / 20)
        sig = _cov(u)
        sig_inv = np.linalg.inv(sig)
        # (1) instances: random-walk Metropolis, INSTANCE_STEPS steps
        for _ in range(INSTANCE_STEPS):
            prop = theta + np.exp(log_step)[..., None] * np.einsum("cijk,cik->cij", shape,
                                                                   rng.standard_normal((chains, inst, 2)))
            ll_p = loglik(prop)
            d, dp = theta - mu[:, None], prop - mu[:, None]
            lp = -0.5 * np.einsum("cij,cjk,cik->ci", d, sig_inv, d)
            lpp = -0.5 * np.einsum("cij,cjk,cik->ci", dp, sig_inv, dp)
            ok = np.log(rng.random((chains, inst))) < (ll_p + lpp) - (ll + lp)
            theta = np.where(ok[..., None], prop, theta)
            ll = np.where(ok, ll_p, ll)
            if adapt:
                log_step += gain * (ok - 0.35)
            else:
                acc_theta += ok
        if adapt and it < warmup // 2:
            history.append(theta.copy())
        if adapt and it == warmup // 2 and len(history) > 50:  # re-shape proposals from the draws so far
            h = np.stack(history[len(history) // 2:])  # (T, C, I, 2)
            h = h.transpose(1, 2, 0, 3).reshape(1, inst, -1, 2).repeat(chains, 0)  # pooled over chains
            c = np.einsum("cits,citu->cisu", h - h.mean(2, keepdims=True), h - h.mean(2, keepdims=True)) / h.shape[2]
            shape = np.linalg.cholesky(c + 1e-6 * np.eye(2))
            log_step[:] = np.log(1.2)
            history = []
        # (2) mu | theta, Sigma: Gaussian
        post_prec = inst * sig_inv + prior_prec
        post_cov = np.linalg.inv(post_prec)
        m = np.einsum("cjk,ck->cj", post_cov, np.einsum("cjk,ck->cj", sig_inv, theta.sum(1)) + prior_prec @ m0)
        mu = m + np.einsum("cjk,ck->cj", np.linalg.cholesky(post_cov), rng.standard_normal((chains, 2)))
        # (3) Sigma | theta, mu: centred random-walk Metropolis on u, several steps
        cur = _log_normal(theta, mu, u) + _log_prior_u(u, sd_prior)
        for _ in range(5):
            up = u + u_step[:, None] * rng.standard_normal((chains, 3))
            new = _log_normal(theta, mu, up) + _log_prior_u(up, sd_prior)
            ok = np.log(rng.random(chains)) < new - cur
            u, cur = np.where(ok[:, None], up, u), np.where(ok, new, cur)
            if adapt:
                u_step *= np.exp(gain * (ok - 0.3) / 5)
        # (4) non-centred steps, one coordinate at a time: each of (log s_a, log s_alpha, atanh rho)
        # with z fixed (instances move with the covariance), then each of mu's with all instances
        # shifted with it
        for j in range(3):
            up = u.copy()
            up[:, j] += nc_step[:, j] * rng.standard_normal(chains)
            lc, lnew = np.linalg.cholesky(_cov(u)), np.linalg.cholesky(_cov(up))
            z = np.linalg.solve(lc, (theta - mu[:, None]).transpose(0, 2, 1))  # (C, 2, I)
            prop = mu[:, None] + np.einsum("cjk,cki->cij", lnew, z)
            ll_p = loglik(prop)
            ok = np.log(rng.random(chains)) < (ll_p.sum(1) + _log_prior_u(up, sd_prior)) - (ll.sum(1) + _log_prior_u(u, sd_prior))
            theta, ll = np.where(ok[:, None, None], prop, theta), np.where(ok[:, None], ll_p, ll)
            u = np.where(ok[:, None], up, u)
            if adapt:
                nc_step[:, j] *= np.exp(gain * (ok - 0.4))
        for j in range(2):
            delta = np.zeros((chains, 2))
            delta[:, j] = mu_step[:, j] * rng.standard_normal(chains)
            prop = theta + delta[:, None]
            ll_p = loglik(prop)
            mp = mu + delta
            ok = np.log(rng.random(chains)) < (ll_p.sum(1) - 0.5 * ((mp - m0) ** 2 * np.diag(prior_prec)).sum(1)) \
                - (ll.sum(1) - 0.5 * ((mu - m0) ** 2 * np.diag(prior_prec)).sum(1))
            theta, ll = np.where(ok[:, None, None], prop, theta), np.where(ok[:, None], ll_p, ll)
            mu = np.where(ok[:, None], mp, mu)
            if adapt:
                mu_step[:, j] *= np.exp(gain * (ok - 0.4))
        if not adapt:
            j = it - warmup
            out_theta[:, j], out_mu[:, j], out_u[:, j] = theta, mu, u
    return {"theta": out_theta, "mu": out_mu, "u": out_u, "x0": x0 + xc, "phi": phi,
            "accept": float(acc_theta.mean() / (INSTANCE_STEPS * keep))}


def fit_bayes(counts: SeriesCounts, *, chains: int = 4, warmup: int = 1500, keep: int = 750, seed: int = 0,
              dispersion: bool = True, sd_prior: str = "halfnormal", mu_prior=MU_PRIOR) -> BayesFit:
    """The full-Bayes fit (see the module docstring): a `BayesFit` with chains x keep draws.

    a, alpha: each instance's posterior median. extra: prior_mean / prior_sd / prior_corr
    (posterior medians), rhat (the largest split-R-hat over mu, log sds and every instance's
    a, alpha) and the instances' acceptance rate."""
    s = sample(counts, chains=chains, warmup=warmup, keep=keep, seed=seed, dispersion=dispersion,
               sd_prior=sd_prior, mu_prior=mu_prior)
    th, mu, u = s["theta"], s["mu"], s["u"]
    rh = [split_rhat(mu[..., j]) for j in range(2)] + [split_rhat(u[..., j]) for j in range(2)]
    rh += [split_rhat(th[:, :, i, j]) for i in range(th.shape[2]) for j in range(2)]
    flat = th.reshape(-1, *th.shape[2:])
    uf = u.reshape(-1, 3)
    med = np.median(flat, axis=0)
    extra = {"dispersion": s["phi"].tolist(), "prior_mean": np.median(mu.reshape(-1, 2), 0).tolist(),
             "prior_sd": np.median(np.exp(uf[:, :2]), 0).tolist(),
             "prior_corr": float(np.median(np.tanh(uf[:, 2]))), "rhat": float(max(rh)),
             "accept": s["accept"], "chains": chains, "draws_per_chain": keep, "sd_prior": sd_prior}
    return BayesFit("bayes", s["x0"], med[:, 0], med[:, 1], None, flat, tuple(counts.n_params.tolist()), extra,
                    None, mu.reshape(-1, 2), _cov(uf), chains)
