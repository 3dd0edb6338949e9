"""Sequential sampling toward a forecast as a mode of `passuntil eval` (`--design forecast`).

What a design run is made of, outside the loop itself (`passuntil.design_runner`):

* `DesignSettings`: the options a user gave (target size or target model, total sample budget
  per task, target interval half-width, first round), checked with one line each, recorded in
  the run's spec (`RunSpec.design`) and turned into the library's `scaling.design.SequentialDesign`;
* `series_counts`: the store's counts of one task as the `SeriesCounts` the design decides on;
* the design log: every round's decision (per task: the interval before it, the samples and the
  per-cell target counts) is written into the run's stored configuration *before* it is sampled,
  and each task's outcome when it stops. A resumed run first finishes the last recorded round,
  then decides the next one from the counts, so it ends with the counts of an uninterrupted run.

K-stop is off in this mode: every sample counts, and the run's engine records K = the per-cell
cap (`max_samples`), which makes every PassUntil estimator in `stats.py` the plain binomial one
(k/n, Clopper-Pearson): nothing can reach K passes before the cap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from passuntil.errors import UserError

STOP_METHODS = ("likelihood", "bayes")  # = scaling.design.STOP_METHODS (not imported: it loads the fits)
DESIGNS = ("passuntil", "forecast")  # the K-stop (default), sequential sampling toward a forecast
DESIGN_OPTIONS = ("target_n", "target_model", "total_budget", "target_width", "round_size", "width_stop_after",
                  "width_stop_method")
# The fit a width stop decides on unless --width-stop-method says: the full-Bayes fit's interval
# covers 90-91% at the stop in the emergent regime where the likelihood fit's covers 74-84%
# (docs/statistics.md, "Coverage at the design's stopping point"), for about 1 s a round
WIDTH_STOP_DEFAULT = "bayes"
DEFAULT_CAP = 10**9  # per-cell samples when only a width is asked for (no total budget)
MAX_ROUNDS = 1000


@dataclass(frozen=True)
class DesignSettings:
    """A design run's settings as recorded with the run (see `scaling.design.SequentialDesign`).

    total_budget is per task (each task has its own design); halfwidth is the target
    half-width of the `level` interval of log(mean PU at target_n) over these instances."""

    target_n: float
    target_model: str | None = None  # a model of the series, not sampled: target_n is its N
    total_budget: int | None = None
    halfwidth: float | None = None
    first_round: int = 20_000
    growth: float = 0.5
    level: float = 0.9
    kind: str = "forecast"
    width_stop_after: int = 0  # no width stop before this many samples per task (docs/statistics.md)
    width_stop_method: str = "likelihood"  # "bayes": width stops on the full-Bayes fit's interval (runs
    # recorded before this setting read back as "likelihood")

    def design(self):
        from passuntil.scaling.design import SequentialDesign

        return SequentialDesign(self.target_n, total_budget=self.total_budget, first_round=self.first_round,
                                growth=self.growth, halfwidth=self.halfwidth, level=self.level,
                                min_samples=self.width_stop_after, stop_method=self.width_stop_method)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> DesignSettings:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def describe(self) -> str:
        goal = [f"total budget {self.total_budget:,} samples per task" if self.total_budget else "",
                f"stop at ±{self.halfwidth:g} in log ({self.level:.0%} interval)" if self.halfwidth else "",
                f"no width stop before {self.width_stop_after:,} samples" if self.width_stop_after else "",
                "the width stop on the full-Bayes fit's interval (at split-R-hat <= 1.05; the run ends on its "
                "interval)" if self.width_stop_method == "bayes" else ""]
        target = f"{self.target_model} (N = {self.target_n:.3g})" if self.target_model else f"N = {self.target_n:.3g}"
        return (f"sequential design toward the forecast at {target}: " + ", ".join(g for g in goal if g)
                + f"; first round {self.first_round:,} samples, each later one {self.growth:g}x the samples "
                "so far; K-stop off (every sample counts; K recorded = the per-cell cap)")


def _whole(value, what: str) -> int:
    from passuntil.engine import MAX_INT

    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or value != int(value) or value < 1:
        raise UserError(f"{what} must be a whole number of samples >= 1 (got {value!r})")
    if value >= MAX_INT:  # the store's counts (and the per-cell cap, which defaults to the budget)
        raise UserError(f"{what} must be below 2**62 samples (got {value:g})")
    return int(value)


def check_design_options(design: str | None, options: Mapping[str, Any], engine: Mapping, exact: str) -> None:
    """Refuse design options without `--design forecast`, and PassUntil-only options with it."""
    given = [k for k in DESIGN_OPTIONS if options.get(k) is not None]
    if design not in (None, *DESIGNS):
        raise UserError(f"--design must be one of {', '.join(DESIGNS)} (got {design!r})")
    if design != "forecast":
        if given:
            raise UserError(f"--{given[0].replace('_', '-')} needs --design forecast (sequential sampling "
                            "toward a forecast); the default design is PassUntil's K-stop")
        return
    if engine.get("k_target") is not None:
        raise UserError("--k does not apply to --design forecast: the design samples fixed quotas per "
                        "round and counts every sample (no K-stop)")
    if exact != "off":
        raise UserError("--exact does not combine with --design forecast: exact probabilities need no "
                        "sampling design (use one or the other)")


def resolve_settings(options: Mapping[str, Any], *, series_models: Sequence, sampled: Sequence
                     ) -> DesignSettings:
    """The settings of a new design run, every option checked (one line each). `series_models`:
    the whole series (the target model may be any of them); `sampled`: the models to sample."""
    target_n, target_model = options.get("target_n"), options.get("target_model")
    if (target_n is None) == (target_model is None):
        raise UserError("--design forecast needs a target: --target-n SIZE or --target-model NAME (one of them)")
    if target_model is not None:
        by_name = {m.name: m for m in series_models}
        if target_model not in by_name:
            raise UserError(f"--target-model {target_model!r} is not in the series; it has: {', '.join(by_name)}")
        target_n = by_name[target_model].n_params
    elif isinstance(target_n, bool) or not isinstance(target_n, int | float) or not math.isfinite(target_n) \
            or target_n <= 0:
        raise UserError(f"--target-n must be a positive number of parameters (got {target_n!r})")
    budget = options.get("total_budget")
    budget = None if budget is None else _whole(budget, "--total-budget")
    width = options.get("target_width")
    if width is not None and not (isinstance(width, int | float) and math.isfinite(width) and width > 0):
        raise UserError(f"--target-width must be a positive half-width in log (0.25: about ±25%), got {width!r}")
    if budget is None and width is None:
        raise UserError("--design forecast needs --total-budget SAMPLES, --target-width HALFWIDTH, or both "
                        "(otherwise it never stops)")
    first = options.get("round_size")
    first = _whole(first, "--round-size") if first is not None else \
        (max(1, min(20_000, budget // 10)) if budget else 20_000)
    after = options.get("width_stop_after")
    if after is not None and width is None:
        raise UserError("--width-stop-after guards the width stop: it needs --target-width")
    after = 0 if after in (None, 0) else _whole(after, "--width-stop-after")  # 0: no guard
    how = options.get("width_stop_method")
    if how is not None and width is None:
        raise UserError("--width-stop-method decides the width stop: it needs --target-width")
    if how not in (None, *STOP_METHODS):
        raise UserError(f"--width-stop-method must be one of {', '.join(STOP_METHODS)} (got {how!r})")
    sizes = {float(m.n_params) for m in sampled}
    if len(sizes) < 2:
        raise UserError(f"--design forecast needs at least two sampled model sizes to fit a slope (got "
                        f"{', '.join(m.name for m in sampled)}{' without the target' if target_model else ''})")
    settings = DesignSettings(float(target_n), target_model, budget, None if width is None else float(width), first,
                              width_stop_after=after,
                              width_stop_method=how or (WIDTH_STOP_DEFAULT if width is not None else "likelihood"))
    settings.design()  # the library's own checks
    return settings


def design_engine(engine: Mapping, settings: DesignSettings) -> dict:
    """The engine settings of a design run: K = the per-cell cap (no K-stop, see the module
    docstring); the cap defaults to the task's whole budget."""
    engine = {k: v for k, v in engine.items() if v is not None}
    cap = engine.get("max_samples") or settings.total_budget or DEFAULT_CAP
    return {**engine, "max_samples": cap, "k_target": cap}


# the store's counts as the design sees them -----------------------------------------------------

def series_counts(stored: Mapping[str, Mapping], models: Sequence, task):
    """`SeriesCounts` of `task` over `models` (ascending N) from `stored[model][(task, id)]`
    (the store's `counts`); a cell never sampled has 0 of 0."""
    from passuntil.scaling.data import SeriesCounts

    models = sorted(models, key=lambda m: m.n_params)
    ids = [x.id for x in task.instances]
    passes = np.zeros((len(ids), len(models)), dtype=np.int64)
    samples = np.zeros_like(passes)
    for j, m in enumerate(models):
        for i, iid in enumerate(ids):
            c = stored[m.name].get((task.name, iid))
            if c is not None:
                passes[i, j], samples[i, j] = c.passes, c.samples
    return SeriesCounts(np.array([m.n_params for m in models], dtype=float), passes, samples,
                        instance_ids=tuple(ids), models=tuple(m.name for m in models))


def as_analysed(counts):
    """`counts` as the analysis reads the run (`analysis.task_counts`, which `forecast` uses):
    only the models with samples of the task and the instances with samples at some size, in id
    order. The design's stop and its recorded interval are computed on these, so they are the
    numbers `forecast` reports, over the same instances; a model never sampled would otherwise
    stay in the fit as a size without data and shift the interval (it narrowed ±0.24 to ±0.165
    on `sim-scaling --limit 2 --round-size 4`). The full counts (every model and instance) stay
    what the next round is decided on. Fewer than two sampled models: the full counts (there is
    no slope to fit either way)."""
    sampled = counts.samples.sum(axis=0) > 0
    if sampled.sum() < 2:
        return counts
    view = counts.select_models(sampled)
    seen = np.flatnonzero(view.samples.sum(axis=1) > 0)
    return view.select_instances(seen[np.argsort(np.array(view.instance_ids, dtype=object)[seen], kind="stable")])


# the design log in the run's stored configuration ------------------------------------------------

def plain(value):
    """JSON-safe: non-finite floats become None (SQLite's json() refuses NaN and Infinity)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value


def append_rounds(store, run_id: str, entries: Sequence[dict]) -> None:
    """Append one round's decisions (one entry per task) and a note on each (`passuntil show`)
    in one statement: all or none."""
    from passuntil.runspec import run_notes

    rounds = [*design_log(store, run_id)[0], *(plain(e) for e in entries)]
    notes = [*run_notes(store, run_id), *({"model": "*", "stage": "design", "note": round_line(e)} for e in entries)]
    store.db.execute("UPDATE runs SET config_json = json_set(config_json, '$.design_rounds', json(?), "
                     "'$.notes', json(?)) WHERE run_id = ?",
                     (json.dumps(rounds, allow_nan=False), json.dumps(notes), run_id))


def round_line(entry: Mapping) -> str:
    """One line: what a round decided for a task."""
    iv = entry.get("interval") or {}
    hw = iv.get("log_halfwidth")
    where = ", ".join(f"{m} {n:,}" for m, n in entry["by_model"].items() if n)
    return (f"round {entry['round']} of {entry['task']}: {entry['samples']:,} samples to {entry['cells']} cells "
            f"({where}) after {entry['spent']:,}; interval before it "
            + (f"{iv.get('point', 0):.4g} [{iv.get('low', 0):.4g}, {iv.get('high', 1):.4g}] (±{hw:.3g} in log)"
               if hw is not None else "unknown (no passes yet)") + _bayes_note(iv))


def record_result(store, run_id: str, task: str, result: dict) -> None:
    """Record why and where a task's design stopped."""
    results = {**design_log(store, run_id)[1], task: plain(result)}
    store.db.execute("UPDATE runs SET config_json = json_set(config_json, '$.design_results', json(?)) "
                     "WHERE run_id = ?", (json.dumps(results, allow_nan=False), run_id))


def design_log(store, run_id: str) -> tuple[list[dict], dict[str, dict]]:
    """(every recorded round entry, the outcome of every task that stopped)."""
    config = store.run_config(run_id)
    return list(config.get("design_rounds", [])), dict(config.get("design_results", {}))


def result_line(task: str, result: Mapping, settings: DesignSettings) -> str:
    """One line: how a task's design ended. A stop by the cap says so: the width and budget were
    not reached, and every cell that could still inform the forecast is at `--max-samples`."""
    iv = result.get("interval") or {}
    hw = iv.get("log_halfwidth")
    where = f"N = {settings.target_n:.3g}" + (f" ({settings.target_model})" if settings.target_model else "")
    rounds = result["rounds"]
    reason = result["reason"]
    if reason == "cap":
        left = f", {settings.total_budget - result['spent']:,} of the budget left" if settings.total_budget else ""
        cap = f" {result['cap']:,}" if result.get("cap") else ""
        width = f"; the width ±{settings.halfwidth:g} was not reached" if settings.halfwidth else ""
        reason = (f"cap (every cell that could still inform the forecast is at the per-cell cap, "
                  f"--max-samples{cap}{left}{width})")
    return (f"design {task}: {rounds} round{'s' * (rounds != 1)}, {result['spent']:,} samples, stopped by "
            f"{reason}; mean PU over these instances at {where}: {iv.get('point', 0):.4g} "
            f"[{iv.get('low', 0):.4g}, {iv.get('high', 1):.4g}] ({settings.level:.0%}, "
            + (f"±{hw:.3g} in log)" if hw is not None else "no passes yet)") + _bayes_note(iv))


def _bayes_note(iv: Mapping) -> str:
    """Where an interval is the full-Bayes fit's (`--width-stop-method bayes`): its split-R-hat,
    and whether unconverged chains held back a width stop."""
    if iv.get("method") != "bayes":
        return ""
    rhat = iv.get("rhat")
    return (" from the full-Bayes fit" + (f", split-R-hat {rhat:.3g}" if rhat is not None else "")
            + ("; narrow enough, but its chains disagree: no width stop" if iv.get("refused") else ""))


def sampled_instances(counts) -> dict:
    """How many of a task's instances have samples at each size (`counts`: every model of the
    run), and at any size: recorded with the task's outcome for `coverage_line`."""
    sampled = counts.samples > 0
    return {"instances": int(sampled.shape[0]), "any": int(sampled.any(axis=1).sum()),
            "by_model": {m: int(sampled[:, j].sum()) for j, m in enumerate(counts.models)}}


def coverage_line(task: str, result: Mapping) -> str | None:
    """One line where a design left some (model, instance) cells unsampled (hopeless cells,
    cells no round chose): `show`'s mean PU at such a size is the mean over the instances sampled
    there only, not comparable with a forecast of the mean over all of them; `backtest` scores a
    held-out size on the instances sampled there (docs/sequential.md). None: every cell sampled."""
    cov = result.get("sampled")
    if not cov:
        return None
    total = cov["any"]  # the instances the analysis reads: those with samples at some size
    short = {m: n for m, n in cov["by_model"].items() if n < total}
    never = cov["instances"] - total
    if not short and not never:
        return None
    parts = []
    if short:
        parts.append("not every instance has samples at every size (" + ", ".join(
            f"{m}: {n} of {total}" for m, n in short.items()) + f"): `show`'s mean PU at such a size is over the "
            f"instances sampled there only, not the mean over all {total} that a forecast is of; `backtest` "
            "compares a held-out size on the instances sampled there")
    if never:
        parts.append(f"{never} of {cov['instances']} instances were never sampled and are in no analysis "
                     "(nor in the forecast)")
    return f"design {task}: " + "; ".join(parts)
