"""Sequential sampling toward a forecast: how many samples each (instance, model) cell gets next.

PassUntil's fixed K spends most of its budget on cells that barely inform the forecast (the
smallest models' hopeless instances) and too little on the cells that do. This module decides,
round by round, where the next samples go when the goal is the forecast of the mean PU over
*these* instances at a target size N*:

1. refit the pooled likelihood law (`task_law.fit_likelihood`) to the counts so far;
2. draw instance laws theta_b ~ posterior (b = 1..B);
3. for every draw, the posterior covariance of each instance's (a, alpha) *if theta_b were
   true* is (sum_m n_im e_im(theta_b) J_m J_m' + prior precision)^-1, with e = u^2 / (e^u - 1),
   u = -log p, the Fisher information of one sample about F = log(-log p) (about
   p log(p)^2 / (1 - p): nothing where p is hopelessly small, nothing where p ~ 1);
4. give the round's samples away in equal chunks, each to the cell whose chunk lowers the
   variance of log(target mean), averaged over the draws, the most (the covariance update is
   a rank-one Sherman-Morrison step, so returns diminish within the round).

A cold start (fewer than two sizes with `SequentialDesign.min_passes` passes) cannot identify
any slope: the first round goes evenly to every cell (a pilot), later ones to the two largest
fitted sizes, where passes come first (see `_cold_start`). A share `spread` of every fitted
round goes to the cells in proportion to their information per sample (see `allocate`).

A per-cell cap (`next_round(..., cap=)`, the engine's `--max-samples`) is part of the decision:
a cell gets at most its headroom (cap - samples so far), and what a full cell cannot take goes
to the next-best cells. A fitted round spends only on informative cells (spending the whole
round on the cell could lower the variance of log(target mean) by at least `MIN_GAIN` of
itself), so a round can come out smaller than its budget, or empty: every informative cell is
at its cap, and the run stops by the cap rather than by budget or width.

Everything is a deterministic function of the counts and the seed: the round's random stream is
`default_rng([seed, total samples so far])`, so a resumed or sharded run that has the same
counts makes the same decision. `run_sequential` is the loop (for simulations and tests); an
engine calls `next_round` between rounds and evaluates each cell for its quota.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from passuntil.errors import UserError
from passuntil.scaling.bayes import fit_bayes
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.task_law import F_MAX, F_MIN, fit_likelihood, law_p

MIN_GAIN = 1e-6  # a cell is informative if the whole round there could lower var(log target) by this share
STOP_METHODS = ("likelihood", "bayes")  # the fit whose interval decides a width stop (SequentialDesign.stop_method)
RHAT_STOP = 1.05  # a Bayes check stops a run only if its split-R-hat at the target is at most this


@dataclass(frozen=True)
class SequentialDesign:
    """What a sequential run aims at and how it spends.

    target_n: the size whose mean PU is forecast. total_budget: samples over all rounds (None:
    no limit, then `halfwidth` must be set). first_round: the first round's samples; later
    rounds spend `growth` x the samples so far (at least first_round), so a run has about
    log(total / first_round) / log(1 + growth) rounds. halfwidth: stop once the `level`
    interval of log(target mean) is at most +-halfwidth (0.1: about +-10%). draws: posterior
    draws the allocation averages over; chunks: granularity of a round's allocation.
    min_samples: no width stop before this many samples. A width stop that comes early can come
    on an overconfident interval: the EM estimate of the slope spread from instances whose slopes
    the data barely identify collapses, every slope is pulled to the common one, the forecast is
    low and its interval narrow, and the stop is taken exactly then (emergent regime, +-0.25:
    79% coverage over 200 series, the misses stopped at a median 4e7 samples with a fitted slope
    sd of 0.12 against a true 0.23); with min_samples = 1e8 it covered 84.5% (200 series). A
    guard the user sets for the regime, not a cure (docs/statistics.md, "Coverage at the
    design's stopping point").
    stop_method: "likelihood" (default) stops on the likelihood fit's interval; "bayes" on the
    full-Bayes fit's (`scaling.bayes`, about 1 s a fit), whenever a width stop is possible, and
    only at a split-R-hat at the target of at most RHAT_STOP; the interval a run ends on is then
    the Bayes one (see `target_interval`). Its coverage at the stopping point: docs/statistics.md,
    "Coverage at the design's stopping point".
    """

    target_n: float
    total_budget: int | None = None
    first_round: int = 20_000
    growth: float = 0.5
    halfwidth: float | None = None
    level: float = 0.9
    draws: int = 200
    chunks: int = 64
    min_passes: int = 5
    spread: float = 0.2
    min_samples: int = 0
    stop_method: str = "likelihood"

    def __post_init__(self):
        _validate(self)

    def round_budget(self, spent: int) -> int:
        """Samples for the next round after `spent` (0 when the budget is used up)."""
        want = max(self.first_round, int(self.growth * spent))
        if self.total_budget is not None:
            want = min(want, self.total_budget - spent)
        return max(int(want), 0)


def _validate(d: SequentialDesign) -> None:
    if d.stop_method not in STOP_METHODS:
        raise UserError(f"the width stop's method must be one of {', '.join(STOP_METHODS)} (got {d.stop_method!r})")
    if not np.isfinite(d.target_n) or d.target_n <= 0:
        raise UserError(f"the target size must be a positive number of parameters, got {d.target_n}")
    if d.total_budget is None and d.halfwidth is None:
        raise UserError("a sequential design needs a total sample budget, a target interval half-width, or both")
    if d.min_samples < 0:
        raise UserError(f"the minimum number of samples before a width stop must be >= 0, got {d.min_samples}")
    if d.total_budget is not None and d.total_budget < 1:
        raise UserError(f"the total sample budget must be at least 1, got {d.total_budget}")
    if d.halfwidth is not None and not d.halfwidth > 0:
        raise UserError(f"the target interval half-width must be positive, got {d.halfwidth}")
    if d.first_round < 1 or d.growth < 0 or d.draws < 10 or d.chunks < 1 or not 0 < d.level < 1 \
            or not 0 <= d.spread < 1:
        raise UserError("need first_round >= 1, growth >= 0, draws >= 10, chunks >= 1, 0 < level < 1 "
                        "and 0 <= spread < 1")


@dataclass(frozen=True)
class TargetInterval:
    """The forecast of the mean PU over these instances at the target, and the stopping verdict.

    `low`/`high` are `TaskFit.forecast`'s calibrated "these instances" interval (the same numbers
    `forecast(target_n, level=level, seed=seed)` reports, so a run stops on the interval the user
    is shown); `population_low`/`population_high` its population interval. `method`: the fit
    these numbers come from ("likelihood" or "bayes"); `rhat`: the Bayes fit's split-R-hat of
    log(mean) at the target (nan for a likelihood interval); `refused`: "rhat" where the Bayes
    interval was narrow enough but its chains had not converged (no stop), else ""."""

    point: float
    low: float
    high: float
    log_halfwidth: float  # (log high - log low) / 2
    stop: bool
    reason: str  # "halfwidth", "budget" or "" (go on)
    population_low: float = float("nan")
    population_high: float = float("nan")
    method: str = "likelihood"
    rhat: float = float("nan")
    refused: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _design_matrix(counts: SeriesCounts, x0: float, target_n: float) -> tuple[np.ndarray, np.ndarray]:
    x = counts.log_n - x0
    J = np.stack([np.ones_like(x), -x], -1)  # (M, 2): F_m = J_m @ (a, alpha)
    js = np.array([1.0, -(np.log(target_n) - x0)])  # (2,)
    return J, js


def _split(total: int, parts: int) -> np.ndarray:
    """`parts` non-negative integers summing to `total`, as equal as possible."""
    edges = np.round(np.linspace(0, total, parts + 1)).astype(np.int64)
    return np.diff(edges)


def _identified(counts: SeriesCounts, min_passes: int) -> bool:
    """Whether at least two sizes have `min_passes` passes: before that the slopes come from the
    prior alone (the pooled prior is then overconfident, so the allocation cannot be trusted)."""
    return int((counts.passes.sum(axis=0) >= min_passes).sum()) >= 2


def _fill(total: int, room: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Non-negative integers <= `room` (1-d) summing to min(total, room.sum()): evenly (`_split`)
    or, with `weights`, in proportion to them (the remainder of the floors to the largest weight)
    over the cells with room and positive weight; what a full cell cannot take goes round again
    to the others (water-filling). With room everywhere it is one even or proportional split."""
    room = np.asarray(room, dtype=np.int64)
    w = np.ones(room.shape) if weights is None else np.asarray(weights, dtype=float)
    out = np.zeros(room.shape, dtype=np.int64)
    left = int(total)
    while left > 0:
        open_ = (room - out > 0) & (w > 0)
        if not open_.any():
            break
        if weights is None:
            share = _split(left, int(open_.sum()))
        else:
            ww = w[open_]
            share = np.floor(left * ww / ww.sum()).astype(np.int64)
            share[np.argmax(ww)] += left - share.sum()
        take = np.minimum(share, (room - out)[open_])
        out[open_] += take
        left -= int(take.sum())
    return out


def _cold_start(counts: SeriesCounts, budget: int, room: np.ndarray | None = None) -> np.ndarray:
    """A first round (nothing sampled yet) goes evenly to every cell. Until two sizes have
    passes, half of a round goes to the largest fitted size (evenly over instances) and half to
    the next, in proportion to each instance's passes at the largest size plus one (instances
    that pass most there are the first to pass one size down). Under a cap (`room`: each cell's
    headroom) the two largest sizes with room are used, and what their cells cannot take goes
    to the next sizes down, evenly (passes come first at the larger sizes)."""
    shape = counts.samples.shape
    room = np.full(shape, budget, dtype=np.int64) if room is None else np.asarray(room, dtype=np.int64)
    quota = np.zeros(shape, dtype=np.int64)
    if not counts.samples.any():
        return _fill(budget, room.ravel()).reshape(shape)
    sizes = [int(j) for j in np.argsort(counts.n_params) if room[:, j].any()]  # ascending N, with room
    if not sizes:
        return quota
    top = sizes[-1]
    if len(sizes) == 1:
        quota[:, top] = _fill(budget, room[:, top])
    else:
        nxt, half = sizes[-2], budget // 2
        quota[:, top] = _fill(budget - half, room[:, top])
        quota[:, nxt] = _fill(half, room[:, nxt], counts.passes[:, top] + 1.0)
    for j in reversed(sizes):  # only under a cap: the rest to the largest sizes that can take it
        left = budget - int(quota.sum())
        if left <= 0:
            break
        quota[:, j] += _fill(left, room[:, j] - quota[:, j])
    return quota


def allocate(counts: SeriesCounts, *, target_n: float, budget: int, seed: int, draws: int = 200,
             chunks: int = 64, spread: float = 0.2, room: np.ndarray | None = None) -> np.ndarray:
    """(I, M) samples for one round of at most `budget`, by expected variance reduction per sample.

    See the module docstring. A share `spread` of the round first goes to the cells in
    proportion to their information per sample averaged over the draws (hopeless cells get
    next to nothing): a defence against a posterior that is sure of itself too early (the
    pooled prior shrinks instances with little data). Cells neither part picks get 0.

    `room` (I, M): each cell's headroom under the per-cell cap (None: no cap). No cell gets
    more; a chunk a cell cannot take whole is cut to its room, chunks are compared by gain per
    sample, and the rest of a cut chunk goes to the next-best cell. Only informative cells are
    chosen (the whole round there would lower var(log target) by at least `MIN_GAIN` of it), so
    the round is smaller than `budget` when the informative cells run out of room."""
    fit = fit_likelihood(counts)
    rng_seed = int(np.random.default_rng([seed, int(counts.samples.sum())]).integers(2**62))
    theta = fit.parameter_draws(draws=draws, seed=rng_seed, resample_instances=False)  # (B, I, 2)
    J, js = _design_matrix(counts, fit.x0, target_n)
    room = np.full(counts.samples.shape, budget, dtype=np.int64) if room is None \
        else np.asarray(room, dtype=np.int64)
    prec = np.linalg.inv(np.asarray(fit.extra["prior_cov"]))
    f = np.clip(theta @ J.T, F_MIN, F_MAX)  # (B, I, M)
    u = np.exp(f)
    e = u * u / np.expm1(u)  # (B, I, M) information per sample about F
    H = np.einsum("bim,im,mj,mk->bijk", e, counts.samples.astype(float), J, J) + prec  # (B, I, 2, 2)
    fs = np.clip(theta @ js, F_MIN, F_MAX)  # (B, I)
    ps = law_p(fs)
    mean = ps.mean(axis=1, keepdims=True)  # (B, 1)
    g = (-ps * np.exp(fs) / (ps.shape[1] * np.maximum(mean, 1e-300)))[..., None] * js  # (B, I, 2) dlogT/dtheta
    floor = MIN_GAIN * float(np.einsum("bij,bijk,bik->b", g, np.linalg.inv(H), g).mean()) / budget
    info = e.mean(axis=0)  # (I, M)
    even = int(spread * budget)
    quota = np.floor(even * info / max(info.sum(), 1e-300)).astype(np.int64)
    quota = np.minimum(quota, room)  # a capped cell's share is not handed on: the greedy part gets it
    even = int(quota.sum())
    H = H + np.einsum("bim,im,mj,mk->bijk", e, quota.astype(float), J, J)
    S = np.linalg.inv(H)
    sJ = np.einsum("bijk,mk->bimj", S, J)  # (B, I, M, 2) S J_m
    gsj = np.einsum("bij,bimj->bim", g, sJ)  # g' S J_m
    jsj = np.einsum("mj,bimj->bim", J, sJ)  # J_m' S J_m
    steps = list(_split(budget - even, min(chunks, budget - even))) if budget > even else []
    carry = 0
    while steps or carry:
        amount = carry + (int(steps.pop(0)) if steps else 0)
        take = np.minimum(amount, room - quota)  # (I, M) what each cell can take of this chunk
        gain = (take * e * gsj**2 / (1 + take * e * jsj)).mean(axis=0) / np.maximum(take, 1)  # per sample
        ok = (take > 0) & (gain >= floor)
        if not ok.any():
            break  # every informative cell is full
        i, m = np.unravel_index(np.argmax(np.where(ok, gain, -np.inf)), gain.shape)
        step = int(take[i, m])
        carry = amount - step
        quota[i, m] += step
        v = sJ[:, i, m]  # (B, 2)
        c = step * e[:, i, m] / (1 + step * e[:, i, m] * jsj[:, i, m])
        S[:, i] -= c[:, None, None] * np.einsum("bj,bk->bjk", v, v)  # only instance i changes
        sJ[:, i] = np.einsum("bjk,mk->bmj", S[:, i], J)
        gsj[:, i] = np.einsum("bj,bmj->bm", g[:, i], sJ[:, i])
        jsj[:, i] = np.einsum("mj,bmj->bm", J, sJ[:, i])
    return quota


def next_round(counts: SeriesCounts, design: SequentialDesign, *, seed: int, cap: int | None = None
               ) -> np.ndarray:
    """(I, M) samples each cell gets in the next round: all zero once the budget is spent, or
    once every cell that could still inform the forecast is at the per-cell `cap` (None: no cap);
    no cell is given more than its headroom under the cap."""
    if counts.n_params.size < 2:
        raise UserError("a sequential design needs at least two fitted model sizes (a slope)")
    budget = design.round_budget(int(counts.samples.sum()))
    room = None if cap is None else np.maximum(int(cap) - counts.samples, 0)
    if budget <= 0 or (room is not None and not room.any()):
        return np.zeros(counts.samples.shape, dtype=np.int64)
    if not _identified(counts, design.min_passes):
        return _cold_start(counts, budget, room)
    return allocate(counts, target_n=design.target_n, budget=budget, seed=seed, draws=design.draws,
                    chunks=design.chunks, spread=design.spread, room=room)


def target_interval(counts: SeriesCounts, design: SequentialDesign, *, seed: int = 0,
                    final: bool = False) -> TargetInterval:
    """The mean PU over these instances at the target and whether the run should stop.

    Point and interval are exactly `fit_likelihood(counts).forecast(target_n, level, seed)`'s
    point and "these instances" interval (posterior median of the draws; exact-posterior draws with the prior
    mean's uncertainty and lack-of-fit widening; no instance resampling): the interval the run
    stops on is the one the user is shown and scoring uses. Its coverage at the stopping point,
    by width and by budget, is measured in docs/statistics.md (benchmarks/calibration.py
    --part design). A narrow interval stops the run only once two sizes have passes: before
    that it is the prior's width, and not before `design.min_samples` samples (see
    `SequentialDesign`: an early narrow interval under-covers).

    With `design.stop_method` "bayes" the interval is `fit_bayes(counts, seed=seed)`'s (`passuntil
    forecast --method bayes`'s fit and interval) whenever a width stop is possible (two sizes
    with passes, past `min_samples`), the budget is spent, or `final` (the caller ends the run,
    e.g. by the per-cell cap): the run stops by width when that interval is within +-halfwidth
    and its split-R-hat at the target is at most RHAT_STOP (an unconverged chain never stops a
    run: `refused` is then "rhat"). Before that the likelihood interval is shown. Seeded, so
    a deterministic function of counts and seed."""
    spent = int(counts.samples.sum())
    out_of_budget = design.total_budget is not None and spent >= design.total_budget
    if int(counts.passes.sum()) == 0:
        return TargetInterval(0.0, 0.0, 1.0, np.inf, out_of_budget, "budget" if out_of_budget else "", 0.0, 1.0)
    may_stop = design.halfwidth is not None and _identified(counts, design.min_passes) and spent >= design.min_samples
    rhat, refused, method = float("nan"), "", "likelihood"
    if design.stop_method == "bayes" and (may_stop or out_of_budget or final):
        method = "bayes"
        fit = fit_bayes(counts, seed=seed)
        f, rhat = fit.forecast(design.target_n, level=design.level, seed=seed), fit.rhat(design.target_n)
    else:
        f = fit_likelihood(counts).forecast(design.target_n, level=design.level, seed=seed)
    half = _log_half(f.these_low, f.these_high)
    narrow = may_stop and half <= design.halfwidth
    if narrow and method == "bayes" and not rhat <= RHAT_STOP:
        narrow, refused = False, "rhat"  # an unconverged chain never stops a run
    reason = "halfwidth" if narrow else "budget" if out_of_budget else ""
    return TargetInterval(float(f.point), float(f.these_low), float(f.these_high), half, bool(reason), reason,
                          float(f.population_low), float(f.population_high), method, float(rhat), refused)


def _log_half(lo: float, hi: float) -> float:
    return float((np.log(hi) - np.log(max(lo, 1e-300))) / 2)


Sampler = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class SequentialRun:
    counts: SeriesCounts
    quotas: tuple[np.ndarray, ...]  # one (I, M) quota per round
    result: TargetInterval
    verdicts: tuple[TargetInterval, ...] = ()  # the width check before each round (halfwidth set)


def run_sequential(counts: SeriesCounts, design: SequentialDesign, sample: Sampler, *, seed: int,
                   max_rounds: int = 200, on_round: Callable[[SeriesCounts], None] | None = None,
                   cap: int | None = None) -> SequentialRun:
    """Round after round: quota = next_round(..., cap=cap), (passes, samples) = sample(quota),
    until the interval is narrow enough, the budget is spent or every informative cell is at the
    per-cell `cap`. `sample(quota)` returns the passes and samples the cells gained (samples may
    fall short of the quota, e.g. a cell that is closed). The result is `closing_interval` on the
    final counts."""
    quotas, verdicts, verdict = [], [], None
    for _ in range(max_rounds):
        verdict = target_interval(counts, design, seed=seed) if design.halfwidth is not None else None
        if verdict is not None:
            verdicts.append(verdict)
            if verdict.stop:
                break
        quota = next_round(counts, design, seed=seed, cap=cap)
        if not quota.any():
            break
        verdict = None  # the counts change: the check is stale
        k, n = sample(quota)
        counts = SeriesCounts(counts.n_params, counts.passes + k, counts.samples + n, counts.k_target,
                              counts.instance_ids, counts.models, counts.ref_loss)
        quotas.append(quota)
        if on_round is not None:
            on_round(counts)
    return SequentialRun(counts, tuple(quotas), closing_interval(counts, design, verdict, seed=seed), tuple(verdicts))


def closing_interval(counts: SeriesCounts, design: SequentialDesign, verdict: TargetInterval | None, *,
                     seed: int) -> TargetInterval:
    """The interval a run ends on: its last check `verdict` on these counts when that stopped the
    run or already carries the stop method's fit, else `target_interval(..., final=True)` (a run
    ended by the cap or the rounds gets the stop method's interval too)."""
    if verdict is not None and (verdict.stop or verdict.method == design.stop_method):
        return verdict
    return target_interval(counts, design, seed=seed, final=True)
