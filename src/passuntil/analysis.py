"""Analyses of a stored run, one function per command: select the data, run the science, return.

The CLI's analysis commands (fit, forecast, score-forecast, backtest, emergence, plan,
metrics) parse their options, call one function here and format what it returns. Every
problem a user can cause (a missing run, task or model, too little data for a fit, a tampered
forecast file) leaves as one `UserError` line; fitters' `ValueError`s are turned into that
line here, at the boundary, so no command prints a traceback for bad data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from passuntil.errors import UserError
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.forecast import (
    ForecastRecord,
    ForecastScore,
    check_forecast_options,
    fit_task_law,
    forecast_at,
    make_forecast,
    read_forecast,
)


def open_run(store_path: str, run_id: str | None):
    """(store, run id): the named run, or the latest one; UserError when there is none."""
    from passuntil.store import Store

    store = Store(store_path, create=False)
    runs = store.runs()
    if run_id is None:
        if not runs:
            raise UserError(f"{store_path} holds no runs")
        return store, runs[-1]
    if run_id not in runs:
        raise UserError(f"no run {run_id!r} in {store_path} (runs: {', '.join(runs) or 'none'})")
    return store, run_id


def open_runs(store_path: str, run_ids=()) -> tuple[object, list[str]]:
    """(store, runs): the named runs (each checked), or every run of the store."""
    store, _ = open_run(store_path, None)
    runs = store.runs()
    for r in run_ids:
        if r not in runs:
            raise UserError(f"no run {r!r} in {store_path} (runs: {', '.join(runs)})")
    return store, list(run_ids) or runs


@dataclass(frozen=True)
class RunTable:
    """One run's results read from the store once (`tables.estimates_table`): an analysis asks
    several questions of them (the target's size, exact or sampled data, counts, unfinished
    models), and on a large store each read costs a pass over every result."""

    store: Any
    run_id: str
    df: Any  # pandas.DataFrame

    @classmethod
    def read(cls, store_path: str, run_id: str | None) -> RunTable:
        """The named run's table, or the latest run's; UserError when there is none."""
        from passuntil.tables import estimates_table

        store, run_id = open_run(store_path, run_id)
        return cls(store, run_id, estimates_table(store, run_id))


def task_counts(run: RunTable, task: str, exclude=()) -> tuple[SeriesCounts, object]:
    """SeriesCounts of one task's finished results in a run (optionally without some models),
    and the run's tidy table of that task."""
    store, run_id, df = run.store, run.run_id, run.df
    tasks = sorted(set(df["task"])) if not df.empty else []
    if task not in tasks:
        raise UserError(f"run {run_id!r} has no results for task {task!r} (tasks: {', '.join(tasks) or 'none'})")
    df = df[(df["task"] == task) & df["done"]]
    unknown = set(exclude) - set(df["model"])
    if unknown:
        raise UserError(f"no finished model {sorted(unknown)[0]!r} for task {task!r} in run {run_id!r}")
    kept = df[~df["model"].isin(set(exclude))]
    if kept.empty:
        raise UserError(f"run {run_id!r} has no finished results for task {task!r} to fit")
    k = store.run_config(run_id)["engine"]["k_target"]
    return SeriesCounts.from_table(kept, k_target=k), df


def exact_data(run: RunTable, task: str, exclude=()):
    """For a task an exact-mode run computed exactly at every size: (n_params, models,
    instance ids, p (instances, models), the task's table), without the `exclude` models;
    None where the task's data are sampled (then the PassUntil fits apply)."""
    store, run_id, df = run.store, run.run_id, run.df
    if store.run_config(run_id).get("exact", "off") == "off":
        return None
    g = df[df["task"] == task] if not df.empty else df
    if g.empty or not (g["stopped"] == "exact").all():
        return None
    unknown = set(exclude) - set(g["model"])
    if unknown:
        raise UserError(f"no finished model {sorted(unknown)[0]!r} for task {task!r} in run {run_id!r}")
    kept = g[~g["model"].isin(set(exclude))]
    # one column per model (two models of one size stay two points, not their average)
    models = kept.drop_duplicates("model").sort_values(["n_params", "model"])
    table = kept.pivot_table(index="instance_id", columns="model", values="exact_p")[models["model"].tolist()]
    if table.isna().any().any():
        raise UserError(f"run {run_id!r} lacks an exact probability for some instance of {task!r}")
    return (models["n_params"].to_numpy(dtype=float), models["model"].tolist(), [str(i) for i in table.index],
            table.to_numpy(dtype=float), g)


def _exact_fit(n, p, target_n, level):
    from passuntil.scaling.exact import fit_exact, forecast_exact
    from passuntil.scaling.forecast import PASS_AT_K_GRID

    try:
        fit = fit_exact(n, p)
        return fit, None if target_n is None else forecast_exact(fit, target_n, level=level, p_data=p,
                                                                 ks=PASS_AT_K_GRID)
    except ValueError as err:
        raise UserError(f"the exact-ls fit cannot run on this data: {err}") from None


def _exact_fit_summary(data, *, task, models, methods, target_n, level) -> dict:
    from passuntil.scaling.exact import DATA, METHOD

    if set(methods) - {METHOD, "auto"}:  # auto: the exact data's own fit
        raise UserError(f"task {task!r} holds exact pass probabilities: fit it with --method {METHOD}")
    n, names, _, p, _ = data
    if models:
        missing = set(models) - set(names)
        if missing:
            raise UserError(f"no finished results for model(s) {sorted(missing)} in task {task!r}")
        keep = [names.index(m) for m in models]
        n, names, p = n[keep], list(models), p[:, keep]
    fit, fc = _exact_fit(n, p, target_n, level)
    d = fit.to_dict()
    row = {"alpha_median": d["alpha_median"], "instances": d["instances"], "unfitted": d["unfitted"], "fit": d}
    if fc is not None:
        row["forecast"] = fc.to_dict()
    return {"task": task, "models": names, "n_params": n.tolist(), "data": DATA, "fits": {METHOD: row}}


def fit_summary(store_path: str, *, task: str, run_id: str | None = None, models=(), methods=(),
                target_n: float | None = None, level: float = 0.9) -> dict:
    """The loss law and every task-law method (or those named) on a task's finished results (all
    models, or those named), as plain data. A named method that cannot run is an error; an
    unnamed one is listed as skipped. Exact data: the exact-ls fit alone (`scaling.exact`)."""
    from passuntil.scaling import fit_loss_law
    from passuntil.scaling.fitters import FITTERS, OPT_IN_FITTERS

    run = RunTable.read(store_path, run_id)
    data = exact_data(run, task)
    if data is not None:
        check_forecast_options(method="likelihood", level=level, target_n=target_n)
        return _exact_fit_summary(data, task=task, models=models, methods=methods, target_n=target_n,
                                  level=level)

    for method in methods:
        check_forecast_options(method=method, level=level, target_n=target_n)
    check_forecast_options(method="likelihood", level=level, target_n=target_n)
    counts, _ = task_counts(run, task)
    if models:
        missing = set(models) - set(counts.models)
        if missing:
            raise UserError(f"no finished results for model(s) {sorted(missing)} in task {task!r}")
        counts = counts.select_models([counts.models.index(m) for m in models])
    out = {"task": task, "models": list(counts.models), "n_params": counts.n_params.tolist(), "fits": {}}
    if counts.ref_loss is not None and counts.n_params.size >= 3:
        try:
            lf = fit_loss_law(counts.n_params, np.nanmean(counts.ref_loss, axis=0))
            out["loss_law"] = {"c": lf.c, "alpha": lf.alpha, "l0": lf.l0}
        except (ValueError, RuntimeError) as err:  # too few or non-positive losses, no convergence
            out["loss_law"] = {"skipped": str(err)}
    for method in methods or [m for m in FITTERS if m not in OPT_IN_FITTERS]:
        try:
            tf = fit_task_law(counts, method)
            row = {"alpha_median": float(np.nanmedian(tf.alpha)) if np.isfinite(tf.alpha).any() else None,
                   "instances": int(tf.a.size), "unfitted": int(np.isnan(tf.a).sum()), "fit": tf.to_dict()}
            if target_n is not None:
                row["forecast"] = forecast_at(tf, target_n, level=level).to_dict()
        except UserError as err:
            if methods:
                raise
            row = {"skipped": str(err)}
        ran = row.get("fit", {}).get("method", method)
        out["fits"][method if ran == method else f"{method} ({ran})"] = row  # "auto (bayes)"
    return out


def forecast(store_path: str, *, task: str, run_id: str | None, target_model: str | None,
             target_n: float | None, method: str | None, level: float, thresholds=()) -> ForecastRecord:
    """A forecast record for a target model of the run (left out of the data, if it has any:
    a design run's target has none) or a size. A model with unfinished instances (a killed
    run) is fitted on its finished ones, and the record says so (`unfinished` warning).
    `method` None: the fit whose interval the run's width stop used (`default_method`)."""
    if (target_model is None) == (target_n is None):
        raise UserError("give either --target-model (a model of the run to hold out) or --target-n (a size)")
    run = RunTable.read(store_path, run_id)
    return forecast_run(run, task=task, target_model=target_model, target_n=target_n,
                        method=method or default_method(run), level=level, thresholds=thresholds)


def default_method(run: RunTable) -> str:
    """The task-law fit a forecast on `run` uses unless told. On a design run, the fit its closing
    interval came from, so the user is shown the interval the run ended on: "bayes" where the
    width stop was decided on the full-Bayes fit (`eval --width-stop-method bayes`), else
    "likelihood". On any other run "auto" (`fitters.auto_method`: the full-Bayes fit on
    zero-heavy data, the likelihood fit otherwise)."""
    design = run.store.run_config(run.run_id).get("design")
    if not design:
        return "auto"
    return "bayes" if design.get("width_stop_method") == "bayes" else "likelihood"


def _check_options(method: str, exact: bool, **options) -> None:
    """`check_forecast_options`, where exact data (one fit, exact-ls, whatever is named) also
    accept the name exact-ls; a name that is no fit is refused either way."""
    from passuntil.scaling.exact import METHOD as EXACT_FIT

    check_forecast_options(method="auto" if exact and method == EXACT_FIT else method, **options)


def forecast_run(run: RunTable, *, task: str, target_model: str | None, target_n: float | None, method: str,
                 level: float, thresholds=()) -> ForecastRecord:
    """`forecast` on a run already read (one of `target_model`, `target_n`)."""
    import dataclasses

    exclude = ()
    if target_model:
        target_n, has_results = _target_model(run, task, target_model)
        exclude = (target_model,) if has_results else ()
    data = exact_data(run, task, exclude)
    _check_options(method, data is not None, level=level, target_n=target_n, thresholds=thresholds)
    if data is not None:
        return _exact_forecast(data, task=task, target_model=target_model, target_n=target_n,
                               level=level, thresholds=thresholds)
    counts, _ = task_counts(run, task, exclude)
    unfinished = _unfinished(run, task, exclude)
    record = make_forecast(counts, target_n, task=task, method=method, level=level,
                           target_model=target_model, thresholds=tuple(thresholds))
    return dataclasses.replace(record, warnings=record.warnings + tuple(unfinished)) if unfinished else record


def _target_model(run: RunTable, task: str, target_model: str) -> tuple[float, bool]:
    """(N of a model of the run, whether it has finished results for `task`)."""
    store, run_id, df = run.store, run.run_id, run.df
    sizes = {m["name"]: float(m["n_params"]) for m in store.models(run_id)}
    design = store.run_config(run_id).get("design") or {}
    if design.get("target_model"):  # a design run's target: in its series, never sampled
        sizes.setdefault(design["target_model"], float(design["target_n"]))
    if target_model not in sizes:
        raise UserError(f"no model {target_model!r} in run {run_id!r} (models: {', '.join(sizes)})")
    done = not df.empty and bool(((df["model"] == target_model) & (df["task"] == task) & df["done"]).any())
    return sizes[target_model], done


def _unfinished(run: RunTable, task: str, exclude=()) -> list[str]:
    """`unfinished: ...` warnings for fitted models some of whose instances have no finished
    result (they are fitted on the finished ones only)."""
    df = run.df
    df = df[(df["task"] == task) & ~df["model"].isin(set(exclude))]
    out = []
    for model, g in df.groupby("model", sort=False):
        left = int((~g["done"]).sum())
        if left and g["done"].any():
            out.append(f"unfinished: model {model!r} has {left} of {len(g)} instances unfinished; "
                       "it is fitted on the finished ones only (resume the run to finish it)")
    return out


def _exact_forecast(data, *, task, target_model, target_n, level, thresholds) -> ForecastRecord:
    """The forecast record of exact data: the exact-ls fit with what a sampled record carries
    (population interval, per-instance forecasts, pass@k profile: `scaling.exact.forecast_exact`),
    classify_exact's class, and the probabilities themselves as the record's data
    (`ForecastData.exact_p`)."""
    import datetime as dt
    import math

    from passuntil.emergence import classify_exact
    from passuntil.scaling.exact import DATA, METHOD
    from passuntil.scaling.forecast import _version
    from passuntil.scaling.forecast_record import ForecastData, PassAtK
    from passuntil.store import git_commit

    check_forecast_options(method="likelihood", level=level, target_n=target_n)
    if thresholds:
        raise UserError("--threshold is not computed for exact data yet; forecast a size instead")
    n, models, ids, p, df = data
    if target_model:
        target_n = float(df.loc[df["model"] == target_model, "n_params"].iloc[0])
    _, fc = _exact_fit(n, p, target_n, level)
    shape = _classify_exact(classify_exact, n, p, task)
    warnings = [f"data: {DATA}; the line through the mean p gives {fc.dataset_point:.4g} "
                f"[{fc.dataset_low:.4g}, {fc.dataset_high:.4g}]"]
    warnings += [f"{w.code}: {w.message}" for w in exact_warnings(n, p, target_n, shape)]
    if target_n < n.max():
        warnings.append("interpolation: the target is not beyond the largest fitted size (not a forecast)")
    zeros = tuple(tuple(0 for _ in models) for _ in ids)
    record = ForecastData(tuple(ids), tuple(models), tuple(float(v) for v in n), 0, zeros, zeros,
                          tuple(tuple(float(v) for v in row) for row in p))
    return ForecastRecord(
        task=task, method=METHOD, level=float(level), target_n=float(target_n), target_model=target_model,
        point=fc.point, low=fc.low, high=fc.high, data=record,
        population_low=fc.population_low, population_high=fc.population_high,
        instance_point=fc.instance_point, instance_low=fc.instance_low, instance_high=fc.instance_high,
        dispersion=fc.dispersion, pass_at_k=tuple(PassAtK(*q) for q in fc.pass_at_k),
        emergence=shape.category, curvature_z=float(shape.z) if math.isfinite(shape.z) else None,
        warnings=tuple(warnings), created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        package_version=_version(), git_commit=git_commit())


def exact_warnings(n, p, target_n: float, shape) -> list:
    """The `scaling.warnings.forecast_warnings` codes that apply to exact data (`shape`: its
    `classify_exact` class): all-zero, inverse-scaling / non-scaling, extrapolation (the same
    rule), and accelerated-emergence from the curvature alone (concave or mixed: |z| > 2.5,
    what `forecast_warnings` accepts without a backtest; with exact data the curvature has no
    sampling noise, only the instances' disagreement). Lack of fit is the interval itself."""
    import math

    from passuntil.scaling.warnings import Warning

    n, p = np.asarray(n, dtype=float), np.asarray(p, dtype=float)
    if not (p > 0).any():
        return [Warning("all-zero", f"every exact probability is 0 at the {n.size} sizes: there is no law "
                        "to extrapolate")]
    out = []
    if shape.category == "inverse":
        out.append(Warning("inverse-scaling", f"p falls as N grows (pooled slope of log(-log p) {shape.slope:+.3g}): "
                           "the task law assumes growth"))
    elif shape.category == "flat":
        out.append(Warning("non-scaling", f"p does not change measurably with N (pooled slope {shape.slope:+.3g}): "
                           "an extrapolated law is not supported"))
    lo, hi = float(n.min()), float(n.max())
    if math.isfinite(target_n) and target_n > hi and (math.log(target_n / hi) > max(math.log(hi / lo), 1e-9)
                                                       or target_n / hi > 100):
        out.append(Warning("extrapolation", f"the target N = {target_n:.3g} is {target_n / hi:.3g}x the largest "
                           f"fitted size ({hi:.3g}); the fitted sizes span {hi / lo:.3g}x: the law is "
                           "extrapolated further than it was measured"))
    if shape.accelerated:
        out.append(Warning("accelerated-emergence", f"the exact scaling curve is {shape.category} within the "
                           f"fitted sizes (curvature z = {shape.z:.2g}, no sampling noise): accelerated emergence "
                           "makes a forecast from the task law likely too low"))
    return out


def fired(warnings) -> list[str]:
    """The codes of a forecast record's warnings (`code: message`), without the exact data's note."""
    return [w.split(":", 1)[0] for w in warnings if not w.startswith("data:")]


def _classify_exact(classify_exact, n, p, task, **kw):
    try:
        return classify_exact(n, p, **kw)
    except (ValueError, np.linalg.LinAlgError) as err:
        raise UserError(f"cannot classify {task!r} on this data: {err}") from None


def score_forecast_file(forecast_path: str, store_path: str, *, model: str | None,
                        run_id: str | None) -> ForecastScore:
    """Read and verify a forecast file, then score it on the target model's results of a run."""
    from passuntil.tables import estimates_table

    record = read_forecast(forecast_path)
    model = model or record.target_model
    if not model:
        raise UserError("the forecast names no target model; pass --model")
    store, run_id = open_run(store_path, run_id)
    return record.score_results(estimates_table(store, run_id), model=model,
                                k_target=store.run_config(run_id)["engine"]["k_target"])


def _exact_matrix(counts: SeriesCounts, df):
    """(instances, sizes) exact pass probabilities of the store, in `counts`' order (NaN where
    not recorded); None where the store has none for this task."""
    if "exact_p" not in df or df["exact_p"].isna().all():
        return None
    g = df.drop_duplicates(["instance_id", "model"], keep="last").set_index(["instance_id", "model"])["exact_p"]
    table = g.unstack("model")
    table.index = table.index.map(str)
    return table.reindex(index=[str(i) for i in counts.instance_ids], columns=list(counts.models)).to_numpy(dtype=float)


def backtest(store_path: str, *, task: str, run_id: str | None, method: str | None, level: float = 0.9,
             progress=None) -> list[dict]:
    """`scaling.forecast.backtest` on a task of a run (`progress`: see there); `method` None: the
    run's `default_method`, as `forecast` uses. An exact-mode run is backtested by its exact-ls fit."""
    from passuntil.scaling.forecast import backtest as run_backtest

    run = RunTable.read(store_path, run_id)
    method = method or default_method(run)
    data = exact_data(run, task)
    _check_options(method, data is not None, level=level)
    if data is not None:  # exact pass probabilities: the exact-ls fit, observed = the exact mean
        from passuntil.scaling.exact import backtest_exact

        n, models, _, p, _ = data
        try:
            rows = backtest_exact(n, p, models=models, level=level)
        except ValueError as err:
            raise UserError(f"cannot backtest {task!r} on this data: {err}") from None
        if not rows:
            raise UserError(f"a backtest needs at least 4 sizes of {task!r} (this run has {n.size})")
        return rows

    counts, df = task_counts(run, task)
    rows = run_backtest(counts, method=method, level=level, exact_p=_exact_matrix(counts, df), progress=progress)
    if not rows:
        raise UserError(f"a backtest needs at least 4 finished sizes of {task!r} (this run has "
                        f"{counts.n_params.size})")
    return rows


def emergence(store_path: str, *, task: str, run_id: str | None) -> dict:
    from passuntil.emergence import classify, classify_exact

    run = RunTable.read(store_path, run_id)
    data = exact_data(run, task)
    if data is not None:
        from passuntil.scaling.exact import DATA, exact_curvature

        n, _, _, p, _ = data
        return {**_classify_exact(classify_exact, n, p, task).to_dict(), "data": DATA,
                "instance_ls_curvature": exact_curvature(n, p)}

    counts, _ = task_counts(run, task)
    try:
        return classify(counts).to_dict()
    except (ValueError, np.linalg.LinAlgError) as err:
        raise UserError(f"cannot classify {task!r} on this data: {err}") from None


def pilot_guesses(store_path: str, *, run_id: str | None, task: str | None, model: str | None) -> list[float]:
    """Pass-probability guesses from a pilot run: the exact p where recorded, else PU."""
    if not task or not model:
        raise UserError("with --store, give --task and --model")
    _, df = task_counts(RunTable.read(store_path, run_id), task)
    g = df[df["model"] == model]
    if g.empty:
        raise UserError(f"no finished results for model {model!r} in task {task!r}")
    return [float(p) for p in g["exact_p"].where(g["exact_p"].notna(), g["pu"])]


def task_references(store, run_ids) -> dict:
    """(task, instance id) -> the first reference, for the tasks of one or more runs, loaded
    from what each run recorded (a task file's path, a registry name), never a bare name."""
    from passuntil.runspec import run_tasks

    return {(name, x.id): x.references[0] for name, task in run_tasks(store, run_ids).items()
            for x in task.instances}


def metric_table(store_path: str, run_id: str | None):
    """(run id, per model x task metric table, instances per task), from the stored distinct
    completions (see the metrics command's note on the per-instance cap)."""
    from passuntil.metrics import metric_table as table

    store, run_id = open_run(store_path, run_id)
    comps = store.completions(run_id)
    if comps.empty:
        raise UserError(f"run {run_id!r} stored no completions")
    refs = task_references(store, run_id)
    sizes = {m["name"]: m["n_params"] for m in store.models(run_id)}
    results = store.results(run_id)
    stored = results["samples"].sum() - results["overflow"].sum()
    coverage = float(stored / max(1, results["samples"].sum()))
    return run_id, table(comps, refs, sizes), comps.groupby("task")["instance_id"].nunique(), coverage


def score_rows(store_path: str, run_id: str | None) -> tuple[str, list[dict]]:
    """Per model x task of a run: mean reference log-prob, multiple-choice grade and Brier score,
    from each model's teacher-forced scores (the models are loaded)."""
    from passuntil.metrics import score_metrics
    from passuntil.runspec import RunSpec
    from passuntil.series import open_sampler

    store, run_id = open_run(store_path, run_id)
    spec = RunSpec.from_store(store, run_id)
    tasks = spec.load_tasks()
    rows = []
    for m in sorted(spec.models, key=lambda m: m.n_params):
        sampler = open_sampler(m, tasks)
        for task in tasks:
            per = score_metrics(sampler, task)
            mean = {k: float(np.nanmean(v)) if np.isfinite(v := np.array([r[k] for r in per], dtype=float)).any()
                    else float("nan") for k in ("ref_logprob", "mc_grade", "brier")}
            rows.append({"task": task.name, "model": m.name, "n_params": m.n_params, **mean})
    return run_id, rows
