"""Commands that analyse a stored run: fit, forecast, score-forecast, backtest, emergence, plan,
metrics, report. Each parses its options (numbers checked by `cli.params`), calls one function
of `passuntil.analysis` (or the report) and formats what it returns."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from passuntil import analysis
from passuntil.cli.common import cli, console
from passuntil.cli.params import COUNT, PASS_PROBABILITY, POSITIVE, PROBABILITY
from passuntil.errors import UserError
from passuntil.jsonio import dumps

LEVEL = click.option("--level", type=PROBABILITY, default=0.9, show_default=True,
                     help="Interval level, in (0, 1).")


@cli.command()
@click.argument("store_path")
@click.option("--run", "run_ids", multiple=True, help="Runs to include (default: all).")
@click.option("--forecast", "forecast_files", multiple=True, help="Forecast files to draw and score against the runs' results.")
@click.option("--out", "out_dir", default="passuntil-report", show_default=True)
@click.option("--exact-run", default=None,
              help="An `eval --exact` run to compare PassUntil with: did the accelerated-emergence warning "
                   "fire before the target? [the store's one exact-mode run, if any]")
@click.option("--sampled-run", default=None,
              help="The PassUntil run of that comparison [the first of --run (else of the store) holding "
                   "a task the exact run computed]")
@click.option("--target-model", default=None, help="The model the comparison holds out [the exact run's largest].")
def report(store_path, run_ids, forecast_files, out_dir, exact_run, sampled_run, target_model):
    """One self-contained HTML report (plus PNG/SVG figures) of a run store; with an exact-mode
    run beside a PassUntil run, its "warning before the target: PassUntil vs exact" table."""
    from passuntil.report import load_report_data, write_report
    from passuntil.scaling.forecast import read_forecast
    from passuntil.warning_table import choose_comparison, report_comparison

    records = [read_forecast(f) for f in forecast_files]
    store, runs = analysis.open_runs(store_path, run_ids)
    chosen = choose_comparison(store_path, run_ids, exact_run=exact_run, sampled_run=sampled_run,
                               target_model=target_model)
    rows, skipped = report_comparison(store_path, chosen, records)
    data = load_report_data(store, runs, forecasts=records, warnings_before_target=rows)
    page = write_report(data, Path(out_dir), title=f"passuntil report: {Path(store_path).name}")
    if skipped:
        click.echo(f"no warning-before-target table (PassUntil run {chosen.sampled_run!r} vs exact run "
                   f"{chosen.exact_run!r}): {skipped}")
    elif chosen is not None:
        click.echo(f"warning before {chosen.target}: PassUntil run {chosen.sampled_run!r} vs exact run "
                   f"{chosen.exact_run!r} ({', '.join(r['task'] for r in rows)})")
    click.echo(f"report: {page}")


@cli.command()
@click.argument("store_path")
@click.option("--task", required=True)
@click.option("--run", "run_id", default=None)
@click.option("--target-model", default=None, help="A model of the run to hold out and forecast.")
@click.option("--target-n", type=POSITIVE, default=None, help="Or a size (non-embedding parameters).")
@click.option("--method", default=None,
              help="The task-law fit: auto, likelihood, bayes, instance-ls, dataset, loss-assisted [auto: bayes "
                   "where over half the cells have no pass, else likelihood; on a design run, the fit it ended on].")
@LEVEL
@click.option("--threshold", "thresholds", type=PROBABILITY, multiple=True,
              help="Also the N where mean PU reaches this (in (0, 1)).")
@click.option("--out", "out_path", required=True, help="Forecast file to create (never overwritten).")
def forecast(store_path, task, run_id, target_model, target_n, method, level, thresholds, out_path):
    """Write a pre-registered forecast file before the target model is evaluated."""
    from passuntil.scaling.forecast import write_forecast
    from passuntil.scaling.forecast_record import k_label

    if Path(out_path).exists():  # before any fitting: a pre-registration is made once
        raise UserError(f"{out_path} exists: a pre-registered forecast is never overwritten; choose a new file")
    record = analysis.forecast(store_path, task=task, run_id=run_id, target_model=target_model,
                               target_n=target_n, method=method, level=level, thresholds=thresholds)
    write_forecast(record, out_path)
    pop = record.pop_interval
    population = "" if pop is None else f"; population [{pop[0]:.4g}, {pop[1]:.4g}]"
    click.echo(f"{task} at N={record.target_n:.4g}: mean PU {record.point:.4g}; these instances "
               f"[{record.these_low:.4g}, {record.these_high:.4g}]{population} ({level:.0%}, {record.method}); "
               f"wrote {out_path}")
    if record.pass_at_k:
        click.echo("pass@k at the target (mean over these instances, interval): " + "; ".join(
            f"k={k_label(q.k)} {q.mean:.3g} [{q.low:.3g}, {q.high:.3g}]"
            for q in record.pass_at_k if q.k in (1, 10, 100, 1000, 10_000, 100_000, 1_000_000)))
    for w in record.warnings:
        click.echo(f"warning: {w}")


@cli.command()
@click.argument("store_path")
@click.option("--task", required=True)
@click.option("--run", "run_id", default=None)
@click.option("--model", "models", multiple=True, help="Fit on these models only [all finished].")
@click.option("--method", "methods", multiple=True,
              help="likelihood, instance-ls, dataset, loss-assisted, bayes, auto (repeat) [all that apply, "
                   "but bayes and auto].")
@click.option("--target-n", type=POSITIVE, default=None, help="Also forecast mean PU at this N.")
@LEVEL
@click.option("--json", "as_json", is_flag=True, help="Print the fits as JSON.")
def fit(store_path, task, run_id, models, methods, target_n, level, as_json):
    """Fit the loss law and the task scaling law (each method) on any subset of the series."""
    out = analysis.fit_summary(store_path, task=task, run_id=run_id, models=models, methods=methods,
                               target_n=target_n, level=level)
    if as_json:
        click.echo(dumps(out, indent=1))
        return
    ll = out.get("loss_law", {})
    if "c" in ll:
        click.echo(f"loss law: L(N) = ({ll['c']:.4g}/N)^{ll['alpha']:.3f} + {ll['l0']:.3f}")
    table = Table(title=f"{task}: task scaling law log(-log PU) = a - alpha (log N - x0), "
                        f"{len(out['models'])} models")
    for col in ("method", "median alpha", "instances", "unfitted", "forecast", f"{level:.0%} interval"):
        table.add_column(col)
    for method, row in out["fits"].items():
        if "skipped" in row:
            table.add_row(method, "-", "-", "-", row["skipped"][:80], "")
            continue
        fc, alpha = row.get("forecast"), row["alpha_median"]
        table.add_row(method, "-" if alpha is None else f"{alpha:.3f}", str(row["instances"]),
                      str(row["unfitted"]), f"{fc['point']:.4g}" if fc else "",
                      f"[{fc['low']:.4g}, {fc['high']:.4g}]" if fc else "")
    console.print(table)


@cli.command("score-forecast")
@click.argument("forecast_path")
@click.argument("store_path")
@click.option("--model", default=None, help="The evaluated target model [the forecast's target].")
@click.option("--run", "run_id", default=None)
def score_forecast_cmd(forecast_path, store_path, model, run_id):
    """Score a forecast file against the target model's results (JSON; `observed_is` says what
    "observed" means)."""
    score = analysis.score_forecast_file(forecast_path, store_path, model=model, run_id=run_id)
    click.echo(dumps(score.to_dict(), indent=1))


@cli.command("backtest")
@click.argument("store_path")
@click.option("--task", required=True)
@click.option("--run", "run_id", default=None)
@click.option("--method", default=None,
              help="The task-law fit [auto: per held-out size, bayes where over half the cells it is forecast "
                   "from have no pass, else likelihood; on a design run, the fit it ended on].")
@LEVEL
def backtest_cmd(store_path, task, run_id, method, level):
    """Hold out the largest size, then each inner size; report errors and coverage."""
    from passuntil.progress import duration

    def progress(done, total, seconds_left):
        click.echo(f"passuntil: backtest of {task}: {done}/{total} sizes held out (full-Bayes fit, ~0.1 s per "
                   f"instance), ETA {duration(seconds_left)}", err=True)

    rows = analysis.backtest(store_path, task=task, run_id=run_id, method=method, level=level, progress=progress)
    fits = list(dict.fromkeys(r.get("method", "") for r in rows))  # "auto" resolved per held-out size
    method = fits[0] if len(fits) == 1 else "auto: " + ", ".join(f"{r['method']} without {r['held_out']}" for r in rows)
    title = (f"{task}: backtest ({method}, {level:.0%} 'these instances' intervals; observed = mean "
             "unbiased PU; scored against the exact p where stored, else the held-out cells' likelihood)")
    if rows and rows[0].get("method", "exact-ls") == "exact-ls":  # an exact-mode run: no samples at all
        title = f"{task}: backtest (exact-ls, {level:.0%} lack-of-fit intervals; observed = mean exact p)"
    table = Table(title=title)
    for col in ("held out", "kind", "N", "observed", "forecast", "interval", "against", "z", "covered"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["held_out"]), r["kind"], f"{r['n_params']:.3g}", f"{r['observed']:.4g}", f"{r['point']:.4g}",
                      f"[{r['low']:.4g}, {r['high']:.4g}]",
                      _against(r),
                      "-" if r["z"] is None else f"{r['z']:+.2f}", "yes" if r["covered"] else "no")
    console.print(table)
    for note in dict.fromkeys(r.get("note") for r in rows if r.get("note")):
        click.echo(f"note: {note}")


def _against(row: dict) -> str:
    """What a backtest row was scored against; an exact p its samples ruled out is shown as such."""
    if row["exact"] is None:
        return row.get("against", "")
    if row.get("against", "exact") == "exact":
        return f"exact p {row['exact']:.4g}"
    return f"{row['against']} (exact p {row['exact']:.3g} ruled out by the samples)"


@cli.command("emergence")
@click.argument("store_path")
@click.option("--task", required=True)
@click.option("--run", "run_id", default=None)
def emergence_cmd(store_path, task, run_id):
    """Classify the task's scaling curve (linear / convex / concave / mixed)."""
    click.echo(dumps(analysis.emergence(store_path, task=task, run_id=run_id), indent=1))


@cli.command()
@click.option("--pu", "pu_guesses", type=PASS_PROBABILITY, multiple=True,
              help="A guessed pass probability in [0, 1] (repeat; 0: never passes).")
@click.option("--store", "store_path", default=None, help="Or take guesses from a pilot run's PU ...")
@click.option("--task", default=None, help="... for this task ...")
@click.option("--model", default=None, help="... on this model (exact p where recorded, else PU).")
@click.option("--run", "run_id", default=None)
@click.option("--k", "k_target", type=COUNT, default=2, show_default=True)
@click.option("--max-samples", type=COUNT, default=10_000, show_default=True)
@click.option("--samples-per-s", type=POSITIVE, default=None, help="Your sampler's measured throughput.")
def plan(pu_guesses, store_path, task, model, run_id, k_target, max_samples, samples_per_s):
    """Expected samples (and time) PassUntil will need, per instance and in total."""
    from passuntil.scaling.planner import plan_budget

    if pu_guesses and store_path:
        raise UserError("give --pu guesses or --store/--task/--model, not both")
    guesses = list(pu_guesses)
    if store_path:
        guesses = analysis.pilot_guesses(store_path, run_id=run_id, task=task, model=model)
    if not guesses:
        raise UserError("give --pu guesses or --store/--task/--model")
    if max_samples < k_target:
        raise UserError(f"--max-samples ({max_samples}) must be at least --k ({k_target})")
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
    from passuntil.metrics import resolution_floor, sharpness

    run_id, table, n_inst, coverage = analysis.metric_table(store_path, run_id)
    out = Table(title=f"{run_id}: one set of samples, five metrics (sharpness = largest step / total change)")
    for col in ("task", "model", "N", "exact match", "contains", "char edit distance",
                "token edit distance", "edit similarity"):
        out.add_column(col)
    cols = ("exact_match", "contains", "edit_distance", "token_edit_distance", "edit_similarity")
    for task, g in table.groupby("task", sort=False):
        for r in g.itertuples():
            out.add_row(task, r.model, f"{r.n_params:.3g}", f"{r.exact_match:.4g}", f"{r.contains:.4g}",
                        f"{r.edit_distance:.3g}", f"{r.token_edit_distance:.3g}", f"{r.edit_similarity:.3g}")
        out.add_row(task, "[b]sharpness[/]", "", *(f"{sharpness(g[c]):.2f}" for c in cols))
    console.print(out)
    click.echo(f"computed from the stored distinct completions, weighted by their counts: they hold "
               f"{coverage:.1%} of the counted samples (a run stores at most its completions cap of distinct "
               "texts per instance); exact match here is the pass rate of those samples, not the unbiased PU")
    click.echo("; ".join(f"{t}: a {n}-instance test set cannot show accuracy below {resolution_floor(n):.3g}"
                         for t, n in n_inst.items()))
    if scores:
        run_id, rows = analysis.score_rows(store_path, run_id)
        out = Table(title=f"{run_id}: metrics from log-probs (mc grade / Brier need listed choices)")
        for col in ("task", "model", "N", "ref log-prob", "mc grade", "Brier"):
            out.add_column(col)
        for r in rows:
            out.add_row(r["task"], r["model"], f"{r['n_params']:.3g}", f"{r['ref_logprob']:.3f}",
                        f"{r['mc_grade']:.3f}", f"{r['brier']:.3f}")
        console.print(out)
