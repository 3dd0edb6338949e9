"""Warnings that fire before the fact: what the fitted sizes say about a forecast's safety.

    from passuntil.scaling.warnings import forecast_warnings
    for w in forecast_warnings(counts, fit, target_n):  # counts: the sizes you already have
        print(w.code, w.message)

Every check uses only the data the forecast is fitted on (a warning is useful only if it fires
before the target size is evaluated). Codes:

* ``all-zero`` — no instance passed at any size: there is no law to extrapolate (fit may be None).
* ``mostly-zero`` — most cells have no pass, or fewer than 2 sizes have any: the slopes come
  mostly from the pooled prior.
* ``lack-of-fit`` — instances scatter about their law beyond binomial noise (deviance test,
  `task_law.lack_of_fit`); their intervals are widened by the dispersion factor.
* ``inverse-scaling`` / ``non-scaling`` — the pooled slope says PU falls with N, or does not
  move (`emergence.classify` classes "inverse" and "flat").
* ``extrapolation`` — the target (or a threshold size) lies beyond the largest fitted N by more
  than the fitted range spans in log N, or by more than 100x.
* ``underdetermined-comparison`` — a hypothesis (two circuits, two steps) has as many parameters
  as the sizes it would be fitted to: it is not fitted and says nothing.
* ``accelerated-emergence`` — the growth speeds up within the fitted sizes: the leave-largest-out
  backtest misses upward (the largest fitted size's cells hold more passes than the others
  forecast, z > `z_back`, scored by the cells' own likelihood) *and* the shape agrees (pooled
  curvature z below -`z_curv`, or the two-circuit model's BIC below the plain law's by
  `bic_margin`). With under 4 sizes (no backtest) a curvature z below -2.5 alone. Measured hit
  and false-alarm rates: docs/statistics.md (benchmarks/calibration.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from passuntil.emergence import classify
from passuntil.scaling.data import SeriesCounts


@dataclass(frozen=True)
class Warning:  # noqa: A001 - the name the issue asks for; never confused with builtins here
    """One warning: a stable machine-readable `code` and a one-line human `message`."""

    code: str
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class AccelerationSignals:
    """The three before-the-fact signals of accelerated emergence (NaN where not computable)."""

    curvature_z: float  # pooled instance-level curvature / SE (concave: < 0)
    bic_gain: float  # BIC(plain law) - BIC(two circuits) on the dataset curve (> 0: circuits fit better)
    backtest_z: float  # log(observed / forecast) at the largest fitted size, in draws' SDs (> 0: upward)

    def fires(self, *, z_curv: float = 1.0, bic_margin: float = 2.0, z_back: float = 1.645) -> bool:
        """The backtest misses upward and the curve's shape agrees (concave curvature or the
        two-circuit model preferred by BIC); without a backtest (under 4 sizes), a curvature
        beyond -2.5 alone (`classify`'s "concave")."""
        if not math.isfinite(self.backtest_z):
            return self.curvature_z < -2.5
        shape = self.curvature_z < -z_curv or (math.isfinite(self.bic_gain) and self.bic_gain > bic_margin)
        return bool(self.backtest_z > z_back and shape)


def backtest_z(counts: SeriesCounts, *, draws: int = 1000, seed: int = 0) -> float:
    """Leave the largest fitted size out, forecast its cells from the others (pooled likelihood
    fit, per-instance posterior draws) and return the standardised excess of passes there:
    z = sum_i (k_i - n_i p_i) / sqrt(sum_i n_i p_i (1 - p_i) + Var_draws(sum_i n_i p_i)), p_i the
    draws' mean. k - n p has mean 0 under PassUntil's stopping rule as well (Wald's identity),
    so the held-out cells are scored by their own likelihood, not against a noisy mean PU.
    z > 0: more passes than forecast (growth speeding up)."""
    from passuntil.scaling.task_law import fit_likelihood

    if counts.n_params.size < 4:
        return float("nan")
    order = np.argsort(counts.n_params)
    train = counts.select_models(order[:-1])
    if train.passes.sum() == 0:
        return float("nan")
    big = order[-1]
    k, n = counts.passes[:, big].astype(float), counts.samples[:, big].astype(float)
    per = fit_likelihood(train).instance_draws(float(counts.n_params[big]), draws=draws, seed=seed)  # (B, I)
    p = per.mean(axis=0)
    var = float(np.sum(n * p * (1 - p)) + (per @ n).var())
    return float(np.sum(k - n * p) / math.sqrt(max(var, 1e-12)))


def acceleration_signals(counts: SeriesCounts, *, shape=None, seed: int = 0) -> AccelerationSignals:
    """Curvature z, two-circuit BIC gain and backtest z from the fitted sizes only."""
    shape = shape if shape is not None else classify(counts, seed=seed)
    bic = {c.name: c.bic for c in shape.comparisons}
    gain = bic["scaling law"] - bic["two circuits"] if {"scaling law", "two circuits"} <= set(bic) else float("nan")
    return AccelerationSignals(float(shape.z), float(gain), backtest_z(counts, seed=seed))


def forecast_warnings(counts: SeriesCounts, fit, target_n: float, *, thresholds_n=(), z_curv: float = 1.0,
                      bic_margin: float = 2.0, z_back: float = 1.645, seed: int = 0) -> list[Warning]:
    """Every warning (see the module docstring) for a forecast at `target_n` of a `fit` made on
    `counts`; `thresholds_n` are threshold sizes the forecast reports. `fit` may be None (a task
    with no passes cannot be fitted)."""
    out: list[Warning] = []
    k, n = counts.passes, counts.samples
    if int(k.sum()) == 0:
        return [Warning("all-zero", f"no instance passed at any of the {counts.n_params.size} sizes "
                        f"({int(n.sum())} samples): PU is bounded from above, there is no law to "
                        "extrapolate and no forecast should be made")]
    zero_share = counts.zero_share
    sizes_with_passes = int((k.sum(axis=0) > 0).sum())
    if zero_share > 0.5 or sizes_with_passes < 2:
        out.append(Warning("mostly-zero", f"{zero_share:.0%} of the cells have no pass and {sizes_with_passes} "
                           "size(s) have any: the instances' slopes come mostly from the pooled prior"))
    if fit is not None and hasattr(fit, "dispersion"):
        phi = fit.dispersion
        if (phi > 1).any():
            worst = int(np.argmax(phi))
            name = counts.instance_ids[worst] if counts.instance_ids else f"#{worst}"
            out.append(Warning("lack-of-fit", f"{int((phi > 1).sum())} instance(s) scatter about their law beyond "
                               f"binomial noise (worst: {name}, dispersion {phi[worst]:.3g}); their intervals "
                               f"are widened by sqrt(dispersion)"))
    shape = classify(counts, seed=seed)
    if shape.category == "inverse":
        out.append(Warning("inverse-scaling", f"PU falls as N grows (pooled slope of log(-log PU) "
                           f"{shape.slope:+.3g} +- {shape.slope_se:.2g}): the task law assumes growth"))
    elif shape.category == "flat":
        out.append(Warning("non-scaling", f"PU does not change measurably with N (pooled slope "
                           f"{shape.slope:+.3g} +- {shape.slope_se:.2g}): an extrapolated law is not supported"))
    if shape.refused:
        out.append(Warning("underdetermined-comparison", f"{', '.join(shape.refused)}: as many parameters as the "
                           f"{shape.models_used} sizes with 0 < mean PU < 1, so not fitted or compared"))
    lo, hi = float(counts.n_params.min()), float(counts.n_params.max())
    span = max(math.log(hi / lo), 1e-9)
    for what, size in [("target", float(target_n))] + [("threshold", float(t)) for t in thresholds_n]:
        if not math.isfinite(size) or size <= hi:
            continue
        dist = math.log(size / hi)
        if dist > span or size / hi > 100:
            out.append(Warning("extrapolation", f"the {what} N = {size:.3g} is {size / hi:.3g}x the largest fitted "
                               f"size ({hi:.3g}); the fitted sizes span {hi / lo:.3g}x: the law is extrapolated "
                               "further than it was measured"))
    if shape.category != "undetermined":
        sig = acceleration_signals(counts, shape=shape, seed=seed)
        if sig.fires(z_curv=z_curv, bic_margin=bic_margin, z_back=z_back):
            out.append(Warning("accelerated-emergence", f"growth speeds up within the fitted sizes: the largest "
                               f"fitted size has more passes than the others forecast (leave-largest-out z = "
                               f"{sig.backtest_z:.2g}) and the shape agrees (curvature z = {sig.curvature_z:.2g}, "
                               f"two-circuit BIC gain {sig.bic_gain:.3g}): a forecast from the task law is likely "
                               "too low"))
    return out
