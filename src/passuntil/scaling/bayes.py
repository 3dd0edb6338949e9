"""Full-Bayes fit of the task law (`--method bayes`): the prior's mean and covariance integrated out.

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

Sampler (`sample`; seeded, chains vectorised): marginal MCMC over the five hyperparameters with
the instances integrated out by importance sampling on FIXED proposal points per instance
(common random numbers), so the marginal likelihood
    log p(data | mu, Sigma) = sum_i log mean_b L_i(theta_ib) N(theta_ib; mu, Sigma) / q_i(theta_ib)
is a smooth deterministic function of (mu, Sigma), one matrix product per evaluation. q_i is a
mixture of t4s: around the instance's conditional posterior at the hyperparameters' mode, around
its mode under the wide prior (SD_SCALE), and over the population (defensive), each widened.
The hyperparameters: random-walk Metropolis in (mu, s_a, s_alpha, atanh rho) (sds reflected at
0), shaped by the Hessian at the mode and by the warm-up; then independence steps from a t5
fitted by one round of adaptive importance sampling. Each kept draw's instances come from
importance resampling of their points; the effective sample sizes are reported (`fit_bayes`).
Why not the former Metropolis-within-Gibbs over instances and hyperparameters: where slopes are
barely identified (the emergent regime) the spread's posterior is a funnel that sampler crossed
slowly (split-R-hat > 1.05 in 79-88% of the sequential design's runs); here no instance is
sampled while the spread moves, so the funnel is gone, and in s (not log s) the half-normal's
stretch towards s = 0 is flat rather than a long exponential tail.
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
# The marginal sampler's importance sampling: proposal points per instance, the share of them from
# the defensive (population-wide) component, the variance inflation of the instance component, the
# t's degrees of freedom, and the median effective sample size below which the forecast warns
IS_POINTS = 512
DEFENSIVE = 0.25
PROPOSAL_INFLATION = 2.0
T_DF = 4.0
ESS_WARN = 20.0
INDEP_DF = 5.0  # the independence proposal's t degrees of freedom (see `sample`)
INDEP_STEPS = 2  # independence steps per random-walk step in the kept phase
REFINE_DRAWS = 512  # the draws of its one round of adaptive importance sampling
IMH_INFLATION = 1.44  # its covariance: the weighted moments x this (scale x 1.2)


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


@dataclass(frozen=True)
class BayesFit(TaskFit):
    """A TaskFit whose draws come from the MCMC: `draws_ab` (C*S, I, 2) chain-major, with the
    hyperparameters of each draw (`hyper_mu` (C*S, 2), `hyper_cov` (C*S, 2, 2))."""

    hyper_mu: np.ndarray | None = field(default=None, repr=False, compare=False)
    hyper_cov: np.ndarray | None = field(default=None, repr=False, compare=False)
    chains: int = 1

    def instance_draws(self, n_params: float, *, draws: int = 2000, seed: int = 0) -> np.ndarray:
        """(C*S, I) every instance's PU at N in each MCMC draw, in chain order: the draws the
        forecast's intervals and point come from (so a backtest restricted to some instances and
        the pass@k profile agree with it). `draws` and `seed` are ignored: the draws are fixed."""
        x = np.log(n_params) - self.x0
        return law_p(self.draws_ab[..., 0] - self.draws_ab[..., 1] * x)

    def mean_draws(self, n_params: float) -> np.ndarray:
        """(C*S,) draws of the mean PU over these instances at N."""
        return self.instance_draws(n_params).mean(axis=1)

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
        and intervals; a warning where the chains disagree (split-R-hat above RHAT_WARN) and where an
        instance's importance sampling is thin (median ESS below ESS_WARN)."""
        if target not in ("these", "population"):
            raise ValueError(f"the interval target is 'these' or 'population' (got {target!r})")
        per = self.instance_draws(n_params)  # (B, I)
        warn = []
        r = self.rhat(n_params)
        if not r <= RHAT_WARN:
            warn.append(f"the bayes fit's chains disagree (split-R-hat {r:.3g} > {RHAT_WARN} on the log mean at "
                        "the target): the interval is not reliable")
        ess = np.asarray(self.extra.get("is_ess", []), dtype=float)
        if ess.size and ess.min() < ESS_WARN:
            i = int(np.argmin(ess))
            warn.append(f"the bayes fit's importance sampling is thin for instance #{i} (median effective sample "
                        f"size {ess[i]:.3g} of {self.extra.get('is_points')} points): its draws are coarse")
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


def _t_draws(rng, loc, cov, count, df=T_DF):
    """(count, I, 2) draws of a bivariate Student-t per instance (loc (I, 2), scale matrix cov)."""
    chol = np.linalg.cholesky(cov + 1e-10 * np.eye(2))
    z = rng.standard_normal((count, len(loc), 2)) / np.sqrt(rng.chisquare(df, (count, len(loc))) / df)[..., None]
    return loc[None] + np.einsum("ijk,bik->bij", chol, z)


def _log_t(theta, loc, cov, df=T_DF):
    """Log density of the bivariate t (theta (B, I, 2); loc, cov per instance or shared)."""
    d = theta - loc
    prec = np.linalg.inv(cov)
    q = np.einsum("...j,...jk,...k->...", d, prec, d)
    return -(df + 2) / 2 * np.log1p(q / df) - 0.5 * np.log(np.linalg.det(cov)) - np.log(2 * np.pi)


@dataclass(frozen=True)
class _Marginal:
    """The instances integrated out: per instance, fixed proposal points and what the marginal
    needs of them. For hyperparameters h = (mu, log s_a, log s_alpha, atanh rho),
    log p(data | h) = sum_i log mean_b exp(base_ib + feats_ib . coef(h) + const(h)), where
    base = tempered log-likelihood - log proposal density and feats_ib . coef(h) + const(h) =
    log N(theta_ib; mu, Sigma): one matrix product per evaluation, a smooth deterministic
    function of h (the same points for every h: common random numbers)."""

    points: np.ndarray  # (B, I, 2) proposal points (F at xc, alpha)
    base: np.ndarray  # (I, B)
    feats: np.ndarray  # (5, I * B): d_a^2, d_a d_alpha, d_alpha^2, d_a, d_alpha (d = theta - ref)
    ref: np.ndarray  # (2,)
    m0: np.ndarray  # prior mean of mu
    mu_prec: np.ndarray  # (2,) prior precisions of mu
    sd_prior: str

    def log_weights(self, h: np.ndarray) -> np.ndarray:
        """(C, I, B) log of L_i(theta_ib) N(theta_ib; mu, Sigma) / q_i(theta_ib) for h (C, 5)."""
        u = np.clip(h[:, 2:], U_LOW, U_HIGH)
        s0, s1, r = np.exp(u[:, 0]), np.exp(u[:, 1]), np.tanh(u[:, 2])
        om = 1 - r * r
        p00, p11, p01 = 1 / (s0 * s0 * om), 1 / (s1 * s1 * om), -r / (s0 * s1 * om)
        e0, e1 = h[:, 0] - self.ref[0], h[:, 1] - self.ref[1]
        pe0, pe1 = p00 * e0 + p01 * e1, p01 * e0 + p11 * e1
        coef = np.stack([-0.5 * p00, -p01, -0.5 * p11, pe0, pe1], 1)
        const = -0.5 * (e0 * pe0 + e1 * pe1) - u[:, 0] - u[:, 1] - 0.5 * np.log(om) - np.log(2 * np.pi)
        inst, b = self.base.shape
        return (coef @ self.feats).reshape(-1, inst, b) + self.base[None] + const[:, None, None]

    def log_post(self, h: np.ndarray, space: str = "log") -> np.ndarray:
        """(C,) log posterior of h (C, 5) up to a constant (-inf outside the support). space "log":
        h = (mu, log s_a, log s_alpha, atanh rho), the Jacobian in the prior; "sd": h = (mu, s_a,
        s_alpha, atanh rho), the sampler's coordinates (see `sample`)."""
        if space == "sd":
            s = h[:, 2:4]
            inside = (s > np.exp(U_LOW[:2])).all(1) & (s < np.exp(U_HIGH[:2])).all(1)
            h = np.concatenate([h[:, :2], np.log(np.maximum(s, 1e-300)), h[:, 4:]], 1)
            jac = -h[:, 2:4].sum(1)  # the density in s = the density in log s / s
            jac = np.where(inside, jac, -np.inf)
        else:
            jac = 0.0
        lw = self.log_weights(h)
        m = lw.max(-1, keepdims=True)
        ll = (np.log(np.exp(lw - m).sum(-1)) + m[..., 0]).sum(-1)
        lp = ll - 0.5 * (((h[:, :2] - self.m0) ** 2) * self.mu_prec).sum(1) + _log_prior_u(h[:, 2:], self.sd_prior)
        lp = lp + jac
        return np.where(np.isfinite(lp), lp, -np.inf)


def _centre(k, n, x, phi):
    """Wide-prior modes and Laplace covariances (`_start`) in (F at xc, alpha), and xc: the
    information-weighted centre of the cells, where the pooled likelihood does not couple
    intercept and slope (the hyperparameters' posterior is nearer to uncorrelated there)."""
    mode, lap = _start(k, n, x, phi)
    uu = np.exp(np.clip(mode[:, :1] - mode[:, 1:] * x, -12.0, 6.0))
    w = np.where(n > 0, n * uu * uu / np.expm1(uu), 0.0) / phi[:, None]
    xc = float((w * x).sum() / w.sum()) if w.sum() > 0 else 0.0
    t_inv = np.array([[1.0, -xc], [0.0, 1.0]])
    return mode @ t_inv.T, np.einsum("jk,ikl,ml->ijm", t_inv, lap, t_inv), xc


def _marginal(k, n, x, phi, rng, points, components, sd_prior, mu_prior) -> _Marginal:
    """The `_Marginal` for cells at centred sizes x, with each instance's proposal the mixture of
    t4 `components` [(share of the points, loc (I, 2), scale (I, 2, 2)), ...] (the deterministic
    mixture: every point weighed by the whole mixture's density)."""
    counts = [max(1, int(round(share * points))) for share, _, _ in components[1:]]
    counts = [points - sum(counts)] + counts
    theta = np.concatenate([_t_draws(rng, loc, cov, c) for c, (_, loc, cov) in zip(counts, components)], 0)
    log_q = np.logaddexp.reduce([np.log(c / points) + _log_t(theta, loc, cov)
                                 for c, (_, loc, cov) in zip(counts, components)], axis=0)
    base = (_loglik(theta, k, n, x) / phi - log_q - np.log(points)).T  # (I, B); the mean's 1/B folded in
    ref = components[0][1].mean(0)
    d = (theta - ref).transpose(1, 0, 2)  # (I, B, 2)
    feats = np.stack([d[..., 0] ** 2, d[..., 0] * d[..., 1], d[..., 1] ** 2, d[..., 0], d[..., 1]]).reshape(5, -1)
    m0, mu_prec = np.array([m for m, _ in mu_prior]), np.array([sd ** -2.0 for _, sd in mu_prior])
    return _Marginal(theta, base, feats, ref, m0, mu_prec, sd_prior)


def _batched_grad_hess(f, h, eps=1e-3):
    """Central-difference gradient and Hessian of f at h (5,), all points in one batched call."""
    d = len(h)
    e = np.eye(d) * eps
    pts = [h]
    pairs = [(i, j) for i in range(d) for j in range(i, d)]
    for i, j in pairs:
        pts += [h + e[i] + e[j], h + e[i] - e[j], h - e[i] + e[j], h - e[i] - e[j]]
    pts += [h + e[i] for i in range(d)] + [h - e[i] for i in range(d)]
    v = f(np.array(pts))
    hess = np.empty((d, d))
    for p, (i, j) in enumerate(pairs):
        a, b, c, g = v[1 + 4 * p: 5 + 4 * p]
        hess[i, j] = hess[j, i] = (a - b - c + g) / (4 * eps * eps)
    off = 1 + 4 * len(pairs)
    grad = (v[off: off + d] - v[off + d: off + 2 * d]) / (2 * eps)
    return grad, hess


def _mode(marg: _Marginal, h0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mode of the hyperparameters (L-BFGS-B on the deterministic marginal) and a
    proposal covariance: the inverse negative Hessian there, eigenvalues kept in [1e-4, 4]."""
    from scipy.optimize import minimize

    lo = np.concatenate([h0[:2] - 50, U_LOW + 1e-3])
    hi = np.concatenate([h0[:2] + 50, U_HIGH - 1e-3])

    def fun(h):
        return float(-marg.log_post(h[None])[0])

    def jac(h):
        e = np.eye(5) * 1e-5
        v = -marg.log_post(np.concatenate([h + e, h - e]))
        return (v[:5] - v[5:]) / 2e-5

    res = minimize(fun, h0, jac=jac, method="L-BFGS-B", bounds=list(zip(lo, hi)), options={"maxiter": 200})
    h = res.x if np.isfinite(res.fun) else h0
    _, hess = _batched_grad_hess(marg.log_post, h, 1e-3)
    w, v = np.linalg.eigh(-(hess + hess.T) / 2)
    w = np.where(np.isfinite(w), w, 1.0)
    cov = (v / np.clip(w, 0.25, 1e4)) @ v.T
    return h, cov


def sample(counts: SeriesCounts, *, chains: int = 4, warmup: int = 500, keep: int = 500, thin: int = 1,
           seed: int = 0, dispersion: bool = True, sd_prior: str = "halfnormal", mu_prior=MU_PRIOR,
           points: int = IS_POINTS) -> dict:
    """Marginal MCMC over the hyperparameters, then instances by importance resampling.

    (1) Pilot proposals per instance: t4 around its mode under the wide prior (covariance x
    PROPOSAL_INFLATION) and a defensive t4 over the population (2 x the modes' scatter plus
    their mean Laplace covariance). (2) The hyperparameters' posterior mode (log sds) on that
    marginal; the final proposals add, with half the points, t4 around each instance's
    conditional posterior at that mode (where most of its posterior mass lies). (3) Random-walk
    Metropolis on (mu, s_a, s_alpha, atanh rho), sds reflected at 0: in log s the half-normal
    prior leaves a long exponential tail towards s -> 0 (a barely identified spread), which a
    random walk crosses slowly; in s it is a flat stretch. Proposal shaped by the Hessian at the
    mode, re-shaped twice from the warm-up draws, its scale adapted. (4) Each kept draw's
    instances by importance resampling of their points.
    Returns draws (chains, keep, ...) of theta, mu, u (log sds, atanh rho), the importance
    ESS per draw and instance, and the acceptance rate."""
    rng = np.random.default_rng([seed, 7])
    x0 = float(counts.log_n.mean())
    x = counts.log_n - x0
    k, n = counts.passes.astype(float), counts.samples.astype(float)
    inst = k.shape[0]
    phi = lack_of_fit(counts)[2] if dispersion else np.ones(inst)
    mode, lap, xc = _centre(k, n, x, phi)
    x = x - xc
    scatter = np.cov(mode.T).reshape(2, 2) if inst > 1 else np.zeros((2, 2))
    wide = np.broadcast_to(2.0 * (scatter + lap.mean(0)) + np.diag([1e-2, 1e-2]), (inst, 2, 2))
    own = (1 - DEFENSIVE, mode, PROPOSAL_INFLATION * lap)
    defensive = (DEFENSIVE, np.broadcast_to(mode.mean(0), (inst, 2)), wide)
    marg = _marginal(k, n, x, phi, rng, points, [own, defensive], sd_prior, mu_prior)
    sd0 = np.maximum(mode.std(0), 0.05) if inst > 1 else np.array([0.5, 0.2])
    with np.errstate(invalid="ignore", divide="ignore"):  # identical instances: no correlation to start from
        r0 = np.clip(np.nan_to_num(np.corrcoef(mode.T)[0, 1]), -0.8, 0.8) if inst > 2 else 0.0
    h_star, _ = _mode(marg, np.concatenate([mode.mean(0), np.log(sd0), [np.arctanh(r0)]]))
    sig = _cov(h_star[None, 2:])[0]
    cmode, clap = _posterior_modes(k / phi[:, None], n / phi[:, None], x, mode, h_star[:2], np.linalg.inv(sig))
    cond = (0.5, cmode, PROPOSAL_INFLATION * clap)
    marg = _marginal(k, n, x, phi, rng, points, [cond, (0.3, mode, own[2]), (0.2, *defensive[1:])],
                     sd_prior, mu_prior)
    h_star, cov_u = _mode(marg, h_star)
    # the sampler's coordinates v = (mu, s_a, s_alpha, atanh rho): ds = s dlog s
    jac = np.concatenate([[1.0, 1.0], np.exp(h_star[2:4]), [1.0]])
    v_star = np.concatenate([h_star[:2], np.exp(h_star[2:4]), h_star[4:]])
    chol = np.linalg.cholesky(cov_u * np.outer(jac, jac) + 1e-10 * np.eye(5))

    def log_post(v):
        return marg.log_post(v, space="sd")

    def log_post_batched(pts):  # 64 points a call: the marginal's (points, I, B) weights stay small
        return np.concatenate([log_post(pts[c0:c0 + 64]) for c0 in range(0, len(pts), 64)])

    def reflect(v):
        v[:, 2:4] = np.abs(v[:, 2:4])
        return v

    # dispersed starts: the mode plus 1.5 Laplace sds
    v = reflect(v_star + 1.5 * rng.standard_normal((chains, 5)) @ chol.T)
    lp = log_post(v)
    v = np.where(np.isfinite(lp)[:, None], v, v_star)
    lp = log_post(v)
    log_scale = np.full(chains, np.log(2.38 / np.sqrt(5)))
    history = []
    for it in range(warmup):
        prop = reflect(v + np.exp(log_scale)[:, None] * (rng.standard_normal((chains, 5)) @ chol.T))
        lpp = log_post(prop)
        ok = np.log(rng.random(chains)) < lpp - lp
        v, lp = np.where(ok[:, None], prop, v), np.where(ok, lpp, lp)
        log_scale += (ok - 0.3) / np.sqrt(1 + it / 10)
        history.append(v.copy())
        if it + 1 in (warmup // 3, 2 * warmup // 3):  # re-shape the proposal from the later draws so far
            past = np.concatenate(history[len(history) // 2:])
            chol = np.linalg.cholesky(np.cov(past.T) + 1e-8 * np.eye(5))
            log_scale[:] = np.log(2.38 / np.sqrt(5))
    # kept phase: each iteration a random-walk step and an independence step whose proposal is a
    # t5 fitted to the last third of the warm-up (covariance x 1.5^2): its proposals do not
    # depend on the chain, so they are evaluated in one batch; the independence steps carry the
    # chains across the posterior, the random-walk steps into what the t under-covers
    past = np.concatenate(history[len(history) // 2:])
    t_mean, t_cov = past.mean(0), 2.25 * np.cov(past.T) + 1e-8 * np.eye(5)
    # one round of adaptive importance sampling: the posterior's moments re-estimated from
    # weighted t draws, which reach the tails the autocorrelated warm-up under-visits (a slope
    # bounded from below only leaves mu_alpha a long right tail)
    t_chol = np.linalg.cholesky(t_cov)
    z = rng.standard_normal((REFINE_DRAWS, 5)) / np.sqrt(rng.chisquare(INDEP_DF, (REFINE_DRAWS, 1)) / INDEP_DF)
    pilot = t_mean + z @ t_chol.T
    lw = log_post_batched(pilot)
    lw += (INDEP_DF + 5) / 2 * np.log1p((z * z).sum(1) / INDEP_DF)
    if np.isfinite(lw).sum() > 20:
        w = np.exp(lw - lw[np.isfinite(lw)].max())
        w = np.where(np.isfinite(w), w, 0.0) / np.nansum(np.where(np.isfinite(w), w, 0.0))
        if 1 / (w * w).sum() > 20:  # trust the weighted moments only with enough effective draws
            m = w @ pilot
            d = pilot - m
            t_mean, t_cov = m, IMH_INFLATION * (d.T * w) @ d + 1e-8 * np.eye(5)
    t_chol, t_prec = np.linalg.cholesky(t_cov), np.linalg.inv(t_cov)
    steps = keep * thin
    z = rng.standard_normal((steps, INDEP_STEPS, chains, 5))
    z /= np.sqrt(rng.chisquare(INDEP_DF, (steps, INDEP_STEPS, chains, 1)) / INDEP_DF)
    indep = (t_mean + z @ t_chol.T).reshape(-1, 5)
    lp_indep = log_post_batched(indep)
    lq_indep = -(INDEP_DF + 5) / 2 * np.log1p((z * z).sum(-1) / INDEP_DF)  # (steps, INDEP_STEPS, chains)
    lp_indep, indep = lp_indep.reshape(lq_indep.shape), indep.reshape(z.shape)
    log_u = np.log(rng.random((steps, INDEP_STEPS + 1, chains)))

    def log_t5(w):
        d = w - t_mean
        return -(INDEP_DF + 5) / 2 * np.log1p(np.einsum("ci,ij,cj->c", d, t_prec, d) / INDEP_DF)

    out_v = np.empty((chains, keep, 5))
    accepted = 0
    lq = log_t5(v)
    for it in range(steps):
        prop = reflect(v + np.exp(log_scale)[:, None] * (rng.standard_normal((chains, 5)) @ chol.T))
        lpp = log_post(prop)
        ok = log_u[it, 0] < lpp - lp
        if ok.any():
            v, lp = np.where(ok[:, None], prop, v), np.where(ok, lpp, lp)
            lq = np.where(ok, log_t5(v), lq)
        for j in range(INDEP_STEPS):
            ok = log_u[it, j + 1] < (lp_indep[it, j] - lq_indep[it, j]) - (lp - lq)
            v = np.where(ok[:, None], indep[it, j], v)
            lp, lq = np.where(ok, lp_indep[it, j], lp), np.where(ok, lq_indep[it, j], lq)
            accepted += ok.sum()
        if it % thin == thin - 1:
            out_v[:, it // thin] = v
    out_h = np.concatenate([out_v[..., :2], np.log(out_v[..., 2:4]), out_v[..., 4:]], -1)
    # instances: importance resampling of each instance's proposal points at every kept draw
    flat = out_h.reshape(-1, 5)
    idx = np.empty((len(flat), inst), dtype=np.int64)
    ess = np.empty((len(flat), inst))
    for c0 in range(0, len(flat), 200):
        lw = marg.log_weights(flat[c0:c0 + 200])
        w = np.exp(lw - lw.max(-1, keepdims=True))
        cum = np.cumsum(w, -1)
        u = rng.random(cum.shape[:2] + (1,)) * cum[..., -1:]
        idx[c0:c0 + 200] = np.minimum((cum < u).sum(-1), points - 1)
        ess[c0:c0 + 200] = cum[..., -1] ** 2 / (w * w).sum(-1)
    theta = marg.points[idx, np.arange(inst)[None]]  # (C*keep, I, 2)
    return {"theta": theta.reshape(chains, keep, inst, 2), "mu": out_h[..., :2], "u": out_h[..., 2:],
            "sd": out_v[..., 2:4], "x0": x0 + xc, "phi": phi, "accept": float(accepted / (chains * steps * INDEP_STEPS)),
            "ess": ess.reshape(chains, keep, inst), "mode": h_star}


def fit_bayes(counts: SeriesCounts, *, chains: int = 4, warmup: int = 500, keep: int = 500, thin: int = 1,
              seed: int = 0, dispersion: bool = True, sd_prior: str = "halfnormal", mu_prior=MU_PRIOR,
              points: int = IS_POINTS) -> BayesFit:
    """The full-Bayes fit (see the module docstring): a `BayesFit` with chains x keep draws.

    a, alpha: each instance's posterior median. extra: prior_mean / prior_sd / prior_corr
    (posterior medians), rhat (the largest split-R-hat over the five hyperparameters and every
    instance's a, alpha), rhat_hyper (mu_F, mu_alpha, s_F, s_alpha, atanh rho), the
    hyperparameters' acceptance rate, and the importance sampling's effective sample sizes:
    is_ess (per instance, the median over draws) and is_ess_min (the smallest anywhere)."""
    s = sample(counts, chains=chains, warmup=warmup, keep=keep, thin=thin, seed=seed, dispersion=dispersion,
               sd_prior=sd_prior, mu_prior=mu_prior, points=points)
    th, mu, u = s["theta"], s["mu"], s["u"]
    # R-hat in the sampler's coordinates (sds, not log sds: see `sample`)
    rh_hyper = ([split_rhat(mu[..., j]) for j in range(2)] + [split_rhat(s["sd"][..., j]) for j in range(2)]
                + [split_rhat(u[..., 2])])
    rh = rh_hyper + [split_rhat(th[:, :, i, j]) for i in range(th.shape[2]) for j in range(2)]
    flat = th.reshape(-1, *th.shape[2:])
    uf = u.reshape(-1, 3)
    med = np.median(flat, axis=0)
    ess = s["ess"].reshape(-1, th.shape[2])
    extra = {"dispersion": s["phi"].tolist(), "prior_mean": np.median(mu.reshape(-1, 2), 0).tolist(),
             "prior_sd": np.median(np.exp(uf[:, :2]), 0).tolist(),
             "prior_corr": float(np.median(np.tanh(uf[:, 2]))), "rhat": float(np.nanmax(rh)),
             "rhat_hyper": [float(r) for r in rh_hyper], "accept": s["accept"], "chains": chains,
             "draws_per_chain": keep, "sd_prior": sd_prior, "sampler": "marginal", "is_points": points,
             "is_ess": np.median(ess, 0).tolist(), "is_ess_min": float(ess.min())}
    return BayesFit("bayes", s["x0"], med[:, 0], med[:, 1], None, flat, tuple(counts.n_params.tolist()), extra,
                    None, mu.reshape(-1, 2), _cov(uf), chains)
