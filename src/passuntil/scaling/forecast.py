"""Forecasts that are forecasts: pre-registered files, scoring, backtests, thresholds.

`make_forecast` fits a task law on the models evaluated so far and returns a `ForecastRecord`
(scaling/forecast_record.py) holding the method, the exact data it used, the point forecast
with its "these instances" interval (the user's own test set: the default and what scoring
uses) and its "population" interval, per-instance forecasts, the pass@k profile of the target
model (`pass_at_k_profile`), thresholds, the time, package version and git commit, and the
warnings of `scaling.warnings.forecast_warnings` (each `code: message`). An all-zero task is
refused with that module's "all-zero" line (no law, no forecast). The file's SHA-256 covers
all of it. `write_forecast` never overwrites an existing file: a pre-registration is made once.
`read_forecast` refuses a file edited after it was made; `record.score(...)` scores it.
`backtest` holds out the largest size (and each inner size in turn) and scores each held-out
size's cells with `scaling.scoring.score_cells` (exact probabilities where the store has them),
on the instances sampled at that size (forecast and observed mean alike).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from pathlib import Path

import numpy as np

from passuntil import stats
from passuntil.emergence import classify
from passuntil.errors import UserError
from passuntil.jsonio import loads
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.fitters import AUTO, METHODS, auto_method, fit_task_law
from passuntil.scaling.forecast_record import (
    EXACT,
    OBSERVED,
    SCHEMA,
    ForecastData,
    ForecastRecord,
    ForecastScore,
    PassAtK,
    Threshold,
)
from passuntil.scaling.scoring import score_draws
from passuntil.scaling.task_law import threshold_n
from passuntil.scaling.warnings import forecast_warnings

__all__ = ["EXACT", "OBSERVED", "PASS_AT_K_GRID", "SCHEMA", "ForecastData", "ForecastRecord", "ForecastScore",
           "PassAtK", "Threshold", "backtest", "check_forecast_options", "fit_task_law", "forecast_at",
           "make_forecast", "pass_at_k_profile", "score_forecast", "read_forecast", "write_forecast"]

# k = 1, 3, 10, 32, ..., 316228, 1e6: half-decades up to the 1e6 the issue asks for
PASS_AT_K_GRID = tuple(int(round(10 ** (e / 2))) for e in range(13))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("passuntil")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def check_forecast_options(*, method: str, level: float, target_n: float | None = None,
                           thresholds=()) -> None:
    """One validation for every forecast entry point (UserError, one line each)."""
    if method not in METHODS:
        raise UserError(f"unknown fit method {method!r} (use {', '.join(METHODS)})")
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise UserError(f"the interval level must lie strictly between 0 and 1 (got {level})")
    if target_n is not None and not (math.isfinite(target_n) and target_n > 0):
        raise UserError(f"the target size must be a finite number > 0 (got {target_n})")
    for t in thresholds:
        if not (math.isfinite(t) and 0 < t < 1):
            raise UserError(f"a threshold is a mean PU strictly between 0 and 1 (got {t})")


def forecast_at(fit, n_params: float, *, level: float):
    """fit.forecast(N), with a fit too weak to draw from (e.g. a bootstrap with no usable
    resample) turned into one UserError line."""
    if fit.draws_ab is not None and len(fit.draws_ab) == 0:
        raise UserError(f"the {fit.method} fit cannot forecast from this data: no resample of it could be "
                        "fitted (too few sizes with 0 < mean PU < 1)")
    try:
        return fit.forecast(n_params, level=level)
    except (ValueError, np.linalg.LinAlgError) as err:
        raise UserError(f"the {fit.method} fit cannot forecast from this data: {err}") from None


def _threshold(fit, target: float, level: float) -> Threshold:
    """The N where the mean PU reaches target; inf (never within the searched range) also where
    the quantiles of draws that never reach it come out as NaN (inf - inf)."""
    with np.errstate(invalid="ignore"):
        n, low, high = threshold_n(fit, target, level=level)
    return Threshold(float(target), *(v if v == v else math.inf for v in (n, low, high)))


def pass_at_k_profile(fit, n_params: float, *, level: float = 0.9, ks=PASS_AT_K_GRID, draws: int = 2000,
                      seed: int = 0) -> tuple[PassAtK, ...]:
    """Mean pass@k over the fitted instances at N for each k, with its "these instances"
    interval: per posterior draw of every instance's PU p_i, mean_i 1 - (1 - p_i)^k; the mean and
    quantiles of that over draws. The target model's pass@k curve, predicted without sampling it."""
    per = np.clip(fit.instance_draws(n_params, draws=draws, seed=seed), 0.0, 1.0)  # (B, I)
    with np.errstate(divide="ignore"):
        log_miss = np.log1p(-per)  # -inf where p = 1 (pass@k = 1)
    qs = [(1 - level) / 2, (1 + level) / 2]
    out = []
    for k in ks:
        means = (-np.expm1(k * log_miss)).mean(axis=1)
        lo, hi = np.quantile(means, qs)
        out.append(PassAtK(int(k), float(means.mean()), float(lo), float(hi)))
    return tuple(out)


def refuse_all_zero(counts: SeriesCounts, task: str) -> None:
    """An all-zero task has no law to extrapolate: one UserError line (the "all-zero" warning)."""
    if int(np.asarray(counts.passes).sum()) == 0:
        w = forecast_warnings(counts, None, float(counts.n_params.max()))[0]
        raise UserError(f"no forecast for {task}: {w.code}: {w.message}")


def make_forecast(counts: SeriesCounts, target_n: float, *, task: str, method: str = AUTO,
                  level: float = 0.9, target_model: str | None = None,
                  thresholds: tuple[float, ...] = ()) -> ForecastRecord:
    """Fit `method` on `counts` and forecast the mean PU at `target_n` (see the module docstring).
    The record names the fit that ran ("auto" resolves to "bayes" or "likelihood")."""
    check_forecast_options(method=method, level=level, target_n=target_n, thresholds=thresholds)
    refuse_all_zero(counts, task)
    fit = fit_task_law(counts, method)
    method = fit.method
    f = forecast_at(fit, target_n, level=level)
    if not all(math.isfinite(v) for v in (f.point, f.low, f.high)):
        raise UserError(f"the {method} fit gives no finite forecast at N={target_n:.4g} on this data")
    found = tuple(_threshold(fit, t, level) for t in thresholds)
    # forecast_warnings reports lack of fit itself (by instance id); the fit's own line is dropped
    warnings = [w for w in f.warnings if not w.startswith("lack of fit")]
    if fit.extra.get("method_note"):  # auto wanted the Bayes fit and did not run it
        warnings.append(fit.extra["method_note"])
    warnings += [f"{w.code}: {w.message}" for w in forecast_warnings(
        counts, fit, target_n, thresholds_n=[t.n_params for t in found if math.isfinite(t.n_params)])]
    if target_n < counts.n_params.max():
        warnings.append("interpolation: the target is not beyond the largest fitted size (not a forecast)")
    shape = classify(counts, compare=False)
    pop = (f.population_low, f.population_high)
    from passuntil.store import git_commit

    return ForecastRecord(
        task=task, method=method, level=float(level), target_n=float(target_n), target_model=target_model,
        point=f.point, low=f.low, high=f.high, data=ForecastData.from_counts(counts),
        population_low=float(pop[0]) if all(map(math.isfinite, pop)) else None,
        population_high=float(pop[1]) if all(map(math.isfinite, pop)) else None,
        instance_point=tuple(f.instance_point), instance_low=tuple(f.instance_low),
        instance_high=tuple(f.instance_high), dispersion=tuple(f.dispersion),
        pass_at_k=pass_at_k_profile(fit, target_n, level=level),
        thresholds=found,
        emergence=shape.category, curvature_z=float(shape.z) if math.isfinite(shape.z) else None,
        warnings=tuple(warnings), created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        package_version=_version(), git_commit=git_commit())


def write_forecast(record: ForecastRecord, path: str | Path) -> Path:
    path = Path(path)
    if path.exists():
        raise UserError(f"{path} exists: a pre-registered forecast is never overwritten; choose a new file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x") as fh:
            fh.write(record.to_json())
    except OSError as err:
        raise UserError(f"cannot write the forecast file {path}: {err.strerror or err}") from None
    return path


def read_forecast(path: str | Path) -> ForecastRecord:
    """The verified record of a forecast file; one UserError line for anything else."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"no forecast file {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the forecast file {path}: {err}") from None
    try:
        d = loads(text)
    except ValueError as err:
        raise UserError(f"{path} is not a forecast file (not strict JSON: {err})") from None
    return ForecastRecord.from_dict(d, source=str(path))


def backtest(counts: SeriesCounts, *, method: str = AUTO, level: float = 0.9,
             min_fit_sizes: int = 3, exact_p=None, progress=None) -> list[dict]:
    """Leave-largest-out and leave-one-size-out; one row per held-out size. Each held-out size's
    cells are scored by `score_cells`'s rule (row "covered" = its `inside`, with "z" and "against"):
    against the mean exact probability where `exact_p` (instances x sizes, NaN: unknown) holds
    every instance of that size, else by the cells' own likelihood. "observed" (the mean
    unbiased PU) and the forecast's "these instances" interval are reported beside it.

    Like with like: a held-out size where some instances have no samples (a sequential design
    leaves hopeless or never-chosen cells empty) is compared on the instances sampled there only:
    "observed", "exact", the score and the forecast ("point", "low", "high": the mean over those
    instances of the fit's per-instance draws) all cover the same "instances" of "of". A size
    with no samples at all is skipped (nothing to compare). "auto" is resolved per held-out
    size, on the sizes it is forecast from, as `forecast --target-model` that size would resolve
    it: the leave-largest-out row checks the forecast a user would have made. Each row names its
    fit ("method") and, where auto fell back to the likelihood fit, why ("note"). `progress`
    (done, total, seconds left) is called before each refit of the slow Bayes fit."""
    check_forecast_options(method=method, level=level)
    m = counts.n_params.size
    exact = None if exact_p is None else np.asarray(exact_p, dtype=float)
    rows = []
    folds = [held for held in range(m - 1, 0, -1) if m - 1 >= min_fit_sizes and (counts.samples[:, held] > 0).any()]
    start = time.monotonic()
    for done, held in enumerate(folds):
        keep = np.array([j for j in range(m) if j != held])
        cells = counts.samples[:, held] > 0
        train = counts.select_models(keep)
        slow = method == "bayes" or (method == AUTO and auto_method(train)[0] == "bayes")
        if progress is not None and slow:
            progress(done, len(folds), (time.monotonic() - start) / done * (len(folds) - done) if done else math.inf)
        try:
            fit = fit_task_law(train, method)
        except UserError as err:
            raise UserError(f"without size {counts.models[held] if counts.models else held}: {err}") from None
        f = forecast_at(fit, counts.n_params[held], level=level)
        observed = float(np.mean(stats.pu_unbiased(counts.passes[cells, held], counts.samples[cells, held],
                                                   k_target=counts.k_target)))
        e = None if exact is None or not np.isfinite(exact[cells, held]).all() else exact[cells, held]
        every = fit.instance_draws(counts.n_params[held], seed=0)  # the draws forecast_at's interval is from
        per = every[:, cells]  # = score_cells on the evaluated cells
        point, low, high = (f.point, f.low, f.high) if cells.all() else _over(f, every, cells, level)
        s = score_draws(per, counts.passes[cells, held], counts.samples[cells, held], e, level=level)
        rows.append({"held_out": counts.models[held] if counts.models else held, "method": fit.method,
                     "note": fit.extra.get("method_note", ""),
                     "n_params": float(counts.n_params[held]), "kind": "largest" if held == m - 1 else "inner",
                     "instances": int(cells.sum()), "of": int(cells.size),
                     "observed": observed, "exact": None if e is None else float(e.mean()),
                     "point": point, "low": low, "high": high,
                     "abs_error": abs(point - observed), "covered": bool(s.inside),
                     "z": None if s.z != s.z else float(s.z), "against": s.against})
    return rows


def _over(f, every: np.ndarray, cells: np.ndarray, level: float) -> tuple[float, float, float]:
    """The forecast `f` (of the mean over all instances) restricted to the instances `cells`:
    the interval from the same per-instance draws `every` (B, I) that `f`'s "these instances"
    interval comes from, and the point by the same rule as `f.point` — a statistic of those draws
    (the likelihood fit's posterior median or mean of the mean; which one, read off `f` itself),
    else the mean of the per-instance points (the other fits' fitted laws)."""
    these, mine = every.mean(axis=1), every[:, cells].mean(axis=1)
    low, high = (float(q) for q in np.quantile(mine, [(1 - level) / 2, (1 + level) / 2]))
    for stat in (np.median, np.mean):
        if math.isclose(f.point, float(stat(these)), rel_tol=1e-9):
            return float(stat(mine)), low, high
    return float(np.mean(np.asarray(f.instance_point)[cells])), low, high


def score_forecast(record: ForecastRecord, passes, samples, exact_p=None, **kw) -> ForecastScore:
    """`record.score(...)` (the one scoring), under the name docs/api.md lists."""
    return record.score(passes, samples, exact_p, **kw)
