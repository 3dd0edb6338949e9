"""Commands that analyse a stored run: fit, forecast, score-forecast, backtest, emergence, plan,
metrics, report."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
from rich.table import Table

from passuntil.cli.common import cli, console, open_store, pick_run, task_counts
from passuntil.errors import UserError


@cli.command()
@click.argument("store_path")
@click.option("--run", "run_ids", multiple=True, help="Runs to include (default: all).")
@click.option("--forecast", "forecast_files", multiple=True, type=click.Path(exists=True),
              help="Forecast files to draw and score against the runs' results.")
@click.option("--out", "out_dir", default="passuntil-report", show_default=True)
def report(store_path, run_ids, forecast_files, out_dir):
    """One self-contained HTML report (plus PNG/SVG figures) of a run store."""
    from passuntil.report import load_report_data, write_report
    from passuntil.scaling.forecast import read_forecast, score_forecast

    store = open_store(store_path, create=False)
    runs = list(run_ids) or store.runs()
    if not runs:
        raise UserError(f"{store_path} holds no runs")
    data = load_report_data(store, runs)
    for f in forecast_files:
        record = read_forecast(Path(f))
        g = data.results[(data.results["task"] == record["task"])
                         & (data.results["model"] == record["target"]["model"])]
        score = None
        ids = record["data"]["instance_ids"]
        if set(ids) <= set(g["instance_id"]):
            g = g.set_index("instance_id").loc[ids]
            score = score_forecast(record, g["passes"].to_numpy(), g["samples"].to_numpy(),
                                   exact_p=g["exact_p"].to_numpy() if "exact_p" in g else None)
        data.forecasts.append((record, score))
    page = write_report(data, Path(out_dir), title=f"passuntil report: {Path(store_path).name}")
    click.echo(f"report: {page}")


@cli.command()
@click.argument("store_path")
@click.option("--task", required=True)
@click.option("--run", "run_id", default=None)
@click.option("--target-model", default=None, help="A model of the run to hold out and forecast.")
@click.option("--target-n", type=float, default=None, help="Or a size (non-embedding parameters).")
@click.option("--method", default="likelihood", show_default=True)
@click.option("--level", type=float, default=0.9, show_default=True)
@click.option("--threshold", "thresholds", type=float, multiple=True, help="Also the N where mean PU reaches this.")
@click.option("--out", "out_path", required=True, help="Forecast file to create (never overwritten).")
def forecast(store_path, task, run_id, target_model, target_n, method, level, thresholds, out_path):
    """Write a pre-registered forecast file before the target model is evaluated."""
    from passuntil.scaling.forecast import make_forecast, write_forecast

    exclude = (target_model,) if target_model else ()
    counts, df = task_counts(store_path, run_id, task, exclude)
    if target_model:
        target_n = float(df.loc[df["model"] == target_model, "n_params"].iloc[0])
    if not target_n:
        raise UserError("give --target-model or --target-n")
    record = make_forecast(counts, target_n, task=task, method=method, level=level,
                           target_model=target_model, thresholds=thresholds)
    write_forecast(record, out_path)
    f = record["forecast"]
    click.echo(f"{task} at N={target_n:.4g}: mean PU {f['point']:.4g} [{f['low']:.4g}, {f['high']:.4g}] "
               f"({level:.0%}, {method}); wrote {out_path}")
    for w in record["warnings"]:
        click.echo(f"warning: {w}")


@cli.command()
@click.argument("store_path")
@click.option("--task", required=True)
@click.option("--run", "run_id", default=None)
@click.option("--model", "models", multiple=True, help="Fit on these models only [all finished].")
@click.option("--method", "methods", multiple=True,
              help="likelihood, instance-ls, dataset, loss-assisted (repeat) [all that apply].")
@click.option("--target-n", type=float, default=None, help="Also forecast mean PU at this N.")
@click.option("--level", type=float, default=0.9, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the fits as JSON.")
def fit(store_path, task, run_id, models, methods, target_n, level, as_json):
    """Fit the loss law and the task scaling law (each method) on any subset of the series."""
    import json as _json

    from passuntil.scaling import fit_loss_law
    from passuntil.scaling.task_law import FITTERS

    counts, df = task_counts(store_path, run_id, task)
    if models:
        missing = set(models) - set(counts.models)
        if missing:
            raise UserError(f"no finished results for model(s) {sorted(missing)} in task {task!r}")
        counts = counts.select_models([counts.models.index(m) for m in models])
    out = {"task": task, "models": list(counts.models), "n_params": counts.n_params.tolist()}
    if counts.ref_loss is not None and counts.n_params.size >= 3:
        lf = fit_loss_law(counts.n_params, np.nanmean(counts.ref_loss, axis=0))
        out["loss_law"] = {"c": lf.c, "alpha": lf.alpha, "l0": lf.l0}
    out["fits"] = {}
    for method in methods or FITTERS:
        if method not in FITTERS:
            raise UserError(f"unknown method {method!r} (use {', '.join(FITTERS)})")
        try:
            tf = FITTERS[method](counts)
        except UserError as err:
            if methods:
                raise
            out["fits"][method] = {"skipped": str(err)}
            continue
        row = {"alpha_median": float(np.nanmedian(tf.alpha)), "instances": int(tf.a.size),
               "unfitted": int(np.isnan(tf.a).sum()), "fit": tf.to_dict()}
        if target_n:
            row["forecast"] = tf.forecast(target_n, level=level).to_dict()
        out["fits"][method] = row
    if as_json:
        click.echo(_json.dumps(out, indent=1))
        return
    if "loss_law" in out:
        ll = out["loss_law"]
        click.echo(f"loss law: L(N) = ({ll['c']:.4g}/N)^{ll['alpha']:.3f} + {ll['l0']:.3f}")
    table = Table(title=f"{task}: task scaling law log(-log PU) = a - alpha (log N - x0), "
                        f"{len(out['models'])} models")
    for col in ("method", "median alpha", "instances", "unfitted", "forecast", f"{level:.0%} interval"):
        table.add_column(col)
    for method, row in out["fits"].items():
        if "skipped" in row:
            table.add_row(method, "-", "-", "-", row["skipped"][:60], "")
            continue
        fc = row.get("forecast")
        table.add_row(method, f"{row['alpha_median']:.3f}", str(row["instances"]),
                      str(row["unfitted"]), f"{fc['point']:.4g}" if fc else "",
                      f"[{fc['low']:.4g}, {fc['high']:.4g}]" if fc else "")
    console.print(table)


@cli.command("score-forecast")
@click.argument("forecast_path")
@click.argument("store_path")
@click.option("--model", default=None, help="The evaluated target model [the forecast's target].")
@click.option("--run", "run_id", default=None)
def score_forecast_cmd(forecast_path, store_path, model, run_id):
    """Score a forecast file against the target model's results."""
    from passuntil.scaling.forecast import read_forecast, score_forecast

    record = read_forecast(forecast_path)
    model = model or record["target"]["model"]
    if not model:
        raise UserError("the forecast names no target model; pass --model")
    _, df = task_counts(store_path, run_id, record["task"])
    g = df[df["model"] == model].set_index("instance_id")
    missing = set(record["data"]["instance_ids"]) - set(g.index)
    if missing:
        raise UserError(f"model {model!r} has no finished result for {len(missing)} instance(s) of the forecast")
    ids = record["data"]["instance_ids"]
    exact = g.loc[ids, "exact_p"].to_numpy(dtype=float) if "exact_p" in g else None
    score = score_forecast(record, g.loc[ids, "passes"].to_numpy(), g.loc[ids, "samples"].to_numpy(), exact)
    click.echo(json.dumps(score, indent=1))


@cli.command("backtest")
@click.argument("store_path")
@click.option("--task", required=True)
@click.option("--run", "run_id", default=None)
@click.option("--method", default="likelihood", show_default=True)
def backtest_cmd(store_path, task, run_id, method):
    """Hold out the largest size, then each inner size; report errors and coverage."""
    from passuntil.scaling.forecast import backtest

    counts, _ = task_counts(store_path, run_id, task)
    rows = backtest(counts, method=method)
    table = Table(title=f"{task}: backtest ({method}, 90% intervals)")
    for col in ("held out", "kind", "N", "observed", "forecast", "interval", "covered"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["held_out"]), r["kind"], f"{r['n_params']:.3g}", f"{r['observed']:.4g}", f"{r['point']:.4g}",
                      f"[{r['low']:.4g}, {r['high']:.4g}]", "yes" if r["covered"] else "no")
    console.print(table)


@cli.command("emergence")
@click.argument("store_path")
@click.option("--task", required=True)
@click.option("--run", "run_id", default=None)
def emergence_cmd(store_path, task, run_id):
    """Classify the task's scaling curve (linear / convex / concave / mixed)."""
    from passuntil.emergence import classify

    counts, _ = task_counts(store_path, run_id, task)
    click.echo(json.dumps(classify(counts).to_dict(), indent=1))


@cli.command()
@click.option("--pu", "pu_guesses", type=float, multiple=True, help="A guessed pass probability (repeat).")
@click.option("--store", "store_path", default=None, help="Or take guesses from a pilot run's PU ...")
@click.option("--task", default=None, help="... for this task ...")
@click.option("--model", default=None, help="... on this model (exact p where recorded, else PU).")
@click.option("--run", "run_id", default=None)
@click.option("--k", "k_target", type=int, default=2, show_default=True)
@click.option("--max-samples", type=int, default=10_000, show_default=True)
@click.option("--samples-per-s", type=float, default=None, help="Your sampler's measured throughput.")
def plan(pu_guesses, store_path, task, model, run_id, k_target, max_samples, samples_per_s):
    """Expected samples (and time) PassUntil will need, per instance and in total."""
    from passuntil.scaling.planner import plan_budget

    guesses = list(pu_guesses)
    if store_path:
        if not task or not model:
            raise UserError("with --store, give --task and --model")
        _, df = task_counts(store_path, run_id, task)
        g = df[df["model"] == model]
        if g.empty:
            raise UserError(f"no finished results for model {model!r}")
        guesses = g["exact_p"].where(g["exact_p"].notna(), g["pu"]).tolist()
    if not guesses:
        raise UserError("give --pu guesses or --store/--task/--model")
    if k_target < 1 or max_samples < k_target:
        raise UserError("need --k >= 1 and --max-samples >= --k")
    result = plan_budget(guesses, k_target=k_target, max_samples=max_samples, samples_per_s=samples_per_s)
    stops = sum(s > 0.5 for s in result.p_budget_stop)
    click.echo(f"{len(guesses)} instances, K={k_target}, budget {max_samples:,}: expected "
               f"{result.total_samples:,.0f} samples in total; {stops} instance(s) will probably end at the budget"
               + (f"; about {result.hours * 60:,.1f} min at {samples_per_s:,.0f} samples/s"
                  if result.hours is not None else ""))


@cli.command("metrics")
@click.argument("store_path")
@click.option("--run", "run_id", default=None)
@click.option("--scores", is_flag=True,
              help="Also the log-prob metrics (reference log-prob, multiple-choice grade, Brier "
                   "score), from each model's teacher-forced scores.")
def metrics_cmd(store_path, run_id, scores):
    """The same stored samples under exact match, contains and edit distance, with sharpness."""
    from passuntil.metrics import metric_table, resolution_floor, sharpness
    from passuntil.tasks import get_task

    store = open_store(store_path, create=False)
    run_id = pick_run(store, run_id)
    comps = store.completions(run_id)
    if comps.empty:
        raise UserError(f"run {run_id!r} stored no completions")
    refs = {(t, x.id): x.references[0] for t in comps["task"].unique() for x in get_task(t).instances}
    sizes = {m["name"]: m["n_params"] for m in store.models(run_id)}
    table = metric_table(comps, refs, sizes)
    out = Table(title=f"{run_id}: one set of samples, five metrics (sharpness = largest step / total change)")
    for col in ("task", "model", "N", "exact match", "contains", "char edit distance",
                "token edit distance", "edit similarity"):
        out.add_column(col)
    cols = ("exact_match", "contains", "edit_distance", "token_edit_distance", "edit_similarity")
    for task, g in table.groupby("task", sort=False):
        for r in g.itertuples():
            out.add_row(task, r.model, f"{r.n_params:.3g}", f"{r.exact_match:.4g}", f"{r.contains:.4g}",
                        f"{r.edit_distance:.3g}", f"{r.token_edit_distance:.3g}",
                        f"{r.edit_similarity:.3g}")
        out.add_row(task, "[b]sharpness[/]", "", *(f"{sharpness(g[c]):.2f}" for c in cols))
    console.print(out)
    n_inst = comps.groupby("task")["instance_id"].nunique()
    click.echo("; ".join(f"{t}: a {n}-instance test set cannot show accuracy below {resolution_floor(n):.3g}"
                         for t, n in n_inst.items()))
    if scores:
        _score_table(store, run_id)


def _score_table(store, run_id):
    """Per model x task: mean reference log-prob, multiple-choice grade and Brier score."""
    from passuntil.metrics import score_metrics
    from passuntil.series import ModelSpec, open_sampler
    from passuntil.tasks import get_task

    config = store.run_config(run_id)
    tasks = [get_task(t) for t in config["tasks"]]
    out = Table(title=f"{run_id}: metrics from log-probs (mc grade / Brier need listed choices)")
    for col in ("task", "model", "N", "ref log-prob", "mc grade", "Brier"):
        out.add_column(col)
    for m in sorted(config["models"], key=lambda m: m["n_params"]):
        sampler = open_sampler(ModelSpec(**m), tasks)
        for task in tasks:
            rows = score_metrics(sampler, task)
            mean = {k: float(np.nanmean([r[k] for r in rows])) if any(r[k] == r[k] for r in rows)
                    else float("nan") for k in ("ref_logprob", "mc_grade", "brier")}
            out.add_row(task.name, m["name"], f"{m['n_params']:.3g}", f"{mean['ref_logprob']:.3f}",
                        f"{mean['mc_grade']:.3f}", f"{mean['brier']:.3f}")
    console.print(out)

