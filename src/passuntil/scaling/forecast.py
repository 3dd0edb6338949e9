"""Forecasts that are forecasts: pre-registered files, scoring, backtests, thresholds.

`make_forecast` fits a task law on the models evaluated so far and returns a record holding the
method, the exact data it used (with a SHA-256 content hash), the point forecast and interval
for a target size, the time, package version and git commit, and warnings (a task whose curve
looks concave — accelerated emergence — is flagged: extrapolating a line is unsafe there).
`write_forecast` never overwrites an existing file: a pre-registration is made once.
`score_forecast` checks the record's hash and scores it against the target model's counts.
`backtest` holds out the largest size (and each inner size in turn) and reports errors and
interval coverage.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np

from passuntil import __version__, stats
from passuntil.emergence import classify
from passuntil.errors import UserError
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.task_law import FITTERS, threshold_n

SCHEMA = "passuntil-forecast/1"


def _data_record(counts: SeriesCounts) -> dict:
    return {"n_params": counts.n_params.tolist(), "models": list(counts.models),
            "instance_ids": list(counts.instance_ids), "k_target": counts.k_target,
            "passes": counts.passes.tolist(), "samples": counts.samples.tolist()}


def content_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_forecast(counts: SeriesCounts, target_n: float, *, task: str, method: str = "likelihood",
                  level: float = 0.9, target_model: str | None = None,
                  thresholds: tuple[float, ...] = ()) -> dict:
    if method not in FITTERS:
        raise UserError(f"unknown fit method {method!r} (use {', '.join(FITTERS)})")
    if target_n <= 0:
        raise UserError("the target size must be > 0")
    try:
        fit = FITTERS[method](counts)
    except ValueError as err:  # data the method cannot use (e.g. no test losses, too few passes)
        raise UserError(f"{method} fit: {err}") from None
    f = fit.forecast(target_n, level=level)
    warnings = list(f.warnings)
    shape = classify(counts, compare=False)
    if shape.accelerated:
        warnings.append(f"the scaling curve looks {shape.category} (curvature z = {shape.z:.1f}): "
                        "accelerated emergence makes extrapolating the task law unsafe")
    if target_n < counts.n_params.max():
        warnings.append("the target is inside the fitted range (interpolation, not a forecast)")
    from passuntil.store import git_commit

    data = _data_record(counts)
    return {
        "schema": SCHEMA, "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "package_version": __version__, "git_commit": git_commit(), "task": task, "method": method,
        "target": {"n_params": float(target_n), "model": target_model},
        "forecast": {"point": f.point, "low": f.low, "high": f.high, "level": level},
        "thresholds": [dict(zip(("target", "n_params", "low", "high"), (t, *threshold_n(fit, t, level=level))))
                       for t in thresholds],
        "emergence": {"category": shape.category, "curvature_z": shape.z},
        "warnings": warnings, "data": data, "data_sha256": content_hash(data),
    }


def write_forecast(record: dict, path: str | Path) -> Path:
    path = Path(path)
    if path.exists():
        raise UserError(f"{path} exists: a pre-registered forecast is never overwritten; choose a new file")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x") as fh:
        json.dump(record, fh, indent=1, allow_nan=True)
    return path


def read_forecast(path: str | Path) -> dict:
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"no forecast file {path}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not a forecast file ({err})") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a passuntil forecast (schema {SCHEMA})")
    if content_hash(record["data"]) != record.get("data_sha256"):
        raise UserError(f"{path}: the data no longer matches its hash; the file was edited after it was made")
    return record


def score_forecast(record: dict, passes: np.ndarray, samples: np.ndarray, exact_p: np.ndarray | None = None) -> dict:
    """Score against the target model's counts (one entry per instance of the forecast's data).

    The observed value is the mean exact pass probability where the backend computed it (exact
    match with a finite reference set), else the mean unbiased PassUntil estimate; with K = 1
    the latter is only "did the first sample pass" per instance, so prefer K >= 2 for targets.
    """
    passes, samples = np.asarray(passes), np.asarray(samples)
    if passes.size != len(record["data"]["instance_ids"]) or np.any(samples < 1):
        raise UserError("the target model's results must cover every instance of the forecast")
    k = record["data"]["k_target"]
    # the forecast targets the mean pass probability; the mean of K/n overstates it (2x at small
    # p with K = 2), so the score uses the unbiased estimate and reports the MLE beside it
    observed_unbiased = float(stats.pu_unbiased(passes, samples, k_target=k).mean())
    observed_mle = float(stats.pu_mle(passes, samples).mean())
    has_exact = exact_p is not None and not np.any(np.isnan(np.asarray(exact_p, dtype=float)))
    observed = float(np.mean(exact_p)) if has_exact else observed_unbiased
    fc = record["forecast"]
    return {"observed": observed, "observed_from": "exact_p" if has_exact else "unbiased PU",
            "observed_mean_pu": observed_unbiased, "observed_mean_pu_mle": observed_mle,
            "point": fc["point"], "low": fc["low"], "high": fc["high"], "level": fc["level"],
            "abs_error": abs(fc["point"] - observed), "rel_error": abs(fc["point"] - observed) / max(observed, 1e-300),
            "log_ratio": float(np.log(max(fc["point"], 1e-300) / max(observed, 1e-300))),
            "inside_interval": fc["low"] <= observed <= fc["high"]}


def backtest(counts: SeriesCounts, *, method: str = "likelihood", level: float = 0.9,
             min_fit_sizes: int = 3) -> list[dict]:
    """Leave-largest-out and leave-one-size-out; one row per held-out size."""
    if method not in FITTERS:
        raise UserError(f"unknown fit method {method!r} (use {', '.join(FITTERS)})")
    m = counts.n_params.size
    rows = []
    for held in range(m - 1, 0, -1):
        keep = np.array([j for j in range(m) if j != held])
        if keep.size < min_fit_sizes:
            continue
        try:
            fit = FITTERS[method](counts.select_models(keep))
        except ValueError as err:
            raise UserError(f"{method} fit without size {held}: {err}") from None
        f = fit.forecast(counts.n_params[held], level=level)
        observed = float(np.mean(stats.pu_unbiased(counts.passes[:, held], np.maximum(counts.samples[:, held], 1),
                                                   k_target=counts.k_target)))
        rows.append({"held_out": counts.models[held] if counts.models else held,
                     "n_params": float(counts.n_params[held]), "kind": "largest" if held == m - 1 else "inner",
                     "observed": observed, "point": f.point, "low": f.low, "high": f.high,
                     "abs_error": abs(f.point - observed), "covered": f.low <= observed <= f.high})
    return rows
