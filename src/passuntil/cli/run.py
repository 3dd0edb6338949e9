"""Commands that make and read runs: eval, show, export, tasks, fetch-data, demo, train-series."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import click
from rich.table import Table

from passuntil.analysis import open_run
from passuntil.cli.common import Interrupted, cli, console, open_store
from passuntil.errors import UserError
from passuntil.jsonio import dumps
from passuntil.sequential import STOP_METHODS


@cli.command("eval")
@click.option("--task", "tasks", multiple=True, help="Task name or task file (repeat for several).")
@click.option("--series", default=None, help="Built-in series (tiny, sim) or a series file [tiny; sim for sim-* tasks].")
@click.option("--model", "models", multiple=True, help="Only these models of the series.")
@click.option("--store", "store_path", default="runs/passuntil.sqlite", show_default=True,
              help="Run store (SQLite file).")
@click.option("--run", "run_id", default="main", show_default=True, help="Run name inside the store.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run exactly as it was started.")
@click.option("--k", "k_target", type=int, default=None, help="Stop an instance at K passes [1].")
@click.option("--max-samples", type=int, default=None, help="Budget of samples per instance [10000].")
@click.option("--batch-size", type=int, default=None, help="Samples per round across instances [1024].")
@click.option("--seed", type=int, default=None, help="Base seed [0].")
@click.option("--temperature", type=float, default=None, help="Sampling temperature [1.0].")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling [1.0].")
@click.option("--top-k", type=int, default=None, help="Top-k sampling, 0 = off [0].")
@click.option("--max-tokens", type=int, default=None, help="Tokens per sample [each task's own].")
@click.option("--check-workers", type=int, default=None, help="Processes for checks, 0 = a thread [0].")
@click.option("--limit", type=int, default=None, help="Only the first N instances of each task (a pilot).")
@click.option("--no-reference-scores", is_flag=True,
              help="Skip the reference answers' test loss and exact pass probability.")
@click.option("--exact", "exact", type=click.Choice(["on", "auto"]), is_flag=False, flag_value="on",
              default=None, help="Store each instance's exact pass probability instead of sampling "
              "(exact-match tasks; vllm/openai only at temperature 1, no top-k/top-p); --exact=auto samples the rest.")
@click.option("--unsafe-local-execution", is_flag=True,
              help="Run code checks without the sandbox's isolation where it is unavailable (recorded).")
@click.option("--ray", "ray_address", default=None,
              help="Shard the work over Ray actors: a cluster address, or 'local'.")
@click.option("--ray-workers", type=int, default=None, help="Ray actors [one per CPU].")
@click.option("--design", "design", type=click.Choice(["passuntil", "forecast"]), default=None,
              help="passuntil: sample each instance until K passes [default]; forecast: sequential "
              "sampling toward the forecast at --target-n/--target-model (docs/sequential.md).")
@click.option("--target-n", type=float, default=None, help="--design forecast: the size to forecast.")
@click.option("--target-model", default=None,
              help="--design forecast: a model of the series to forecast (its N; it is not sampled).")
@click.option("--total-budget", type=float, default=None,
              help="--design forecast: samples per task over all rounds (e.g. 2e6).")
@click.option("--target-width", type=float, default=None,
              help="--design forecast: stop once the 90% interval of log(mean PU) is within ± this (0.25: ±25%).")
@click.option("--round-size", type=float, default=None,
              help="--design forecast: samples of the first round per task [budget/10, at most 20000].")
@click.option("--width-stop-after", type=float, default=None,
              help="--design forecast: no width stop before this many samples per task (a guard: early "
              "width stops under-cover in the emergent regime, docs/statistics.md).")
@click.option("--width-stop-method", type=click.Choice(STOP_METHODS), default=None,
              help="--design forecast: the fit whose interval decides the width stop [bayes: the full-Bayes "
              "fit's, about 1 s a round; likelihood: faster, under-covers in the emergent regime; docs/sequential.md].")
def eval_cmd(tasks, series, models, store_path, run_id, resume, limit, no_reference_scores, exact,
             unsafe_local_execution, ray_address, ray_workers, design, target_n, target_model,
             total_budget, target_width, round_size, width_stop_after, width_stop_method, **engine):
    """Run PassUntil for tasks x models into a run store (or, with --design forecast, sample
    round by round where the target forecast gains most)."""
    from passuntil.evaluate import start_eval
    from passuntil.execution import UNSAFE_ENV

    if unsafe_local_execution:
        os.environ[UNSAFE_ENV] = "1"
    try:
        outcome = start_eval(store_path, run_id, resume=resume, series=series, models=models,
                             tasks=tasks, engine=engine, limit=limit,
                             reference_scores=not no_reference_scores, ray=ray_address,
                             ray_workers=ray_workers, exact=exact or "off",
                             design={"design": design, "target_n": target_n, "target_model": target_model,
                                     "total_budget": total_budget, "target_width": target_width,
                                     "round_size": round_size, "width_stop_after": width_stop_after,
                                     "width_stop_method": width_stop_method})
    except KeyboardInterrupt:
        if not resume and not _recorded(store_path, run_id):
            raise click.exceptions.Abort() from None  # nothing to continue: the same command again
        raise Interrupted(shlex.join(["passuntil", "eval", "--store", store_path, "--run", run_id,
                                      "--resume"])) from None
    done = sum(r.stopped == "k_passes" for r in outcome.results)
    sampled = sum(r.samples > 0 for r in outcome.results)
    click.echo(f"run {run_id} in {store_path}: {len(outcome.results)} instance results, "
               + (f"{sampled} sampled by the design (no K-stop), {sum(r.samples for r in outcome.results):,} "
                  "samples in all, " if outcome.mode == "forecast" else f"{done} reached K passes, ")
               + f"{outcome.samples:,} samples drawn this session"
               + (f", {outcome.exact} exact pass probabilities" if outcome.exact else ""))
    for note in outcome.notes:
        click.echo(f"note: {note}")


def _recorded(store_path: str, run_id: str) -> bool:
    """Whether the run was recorded before an interrupt (else there is nothing to resume)."""
    try:
        return open_store(store_path, create=False).run_exists(run_id)
    except Exception:  # noqa: BLE001 - an unreadable store: nothing recorded either
        return False


@cli.command()
@click.argument("store_path")
@click.option("--run", "run_id", default=None, help="Run name [the only or latest run].")
@click.option("--instances", is_flag=True, help="One row per instance instead of per model x task.")
@click.option("--confidence", type=float, default=0.95, show_default=True)
def show(store_path, run_id, instances, confidence):
    """PU with intervals per instance and model."""
    from passuntil.runspec import run_notes
    from passuntil.tables import estimates_table, summary_table

    if not 0 < confidence < 1:
        raise UserError(f"--confidence must lie in (0, 1) (got {confidence})")
    store, run_id = open_run(store_path, run_id)
    df = estimates_table(store, run_id, confidence=confidence)
    if df.empty:
        raise UserError(f"run {run_id!r} has no results yet")
    if instances:
        table = Table(title=f"{run_id}: PassUntil per instance ({confidence:.0%} exact intervals)")
        for col in ("model", "task", "instance", "passes", "samples", "PU", "interval", "exact p",
                    "ref loss", "stopped"):
            table.add_column(col, justify="left" if col in ("model", "task", "instance", "stopped") else "right")
        for r in df.itertuples():
            exact = "" if r.exact_p != r.exact_p or r.exact_p is None else f"{r.exact_p:.3g}"
            loss = "" if not r.ref_tokens or r.ref_tokens != r.ref_tokens else f"{-r.ref_logprob / r.ref_tokens:.3f}"
            table.add_row(r.model, r.task, r.instance_id, str(r.passes), f"{r.samples:,}", f"{r.pu:.3g}",
                          f"[{r.ci_low:.2g}, {r.ci_high:.2g}]", exact, loss, r.stopped or "running")
    else:
        table = Table(title=f"{run_id}: mean PassUntil over instances (bootstrap SE)")
        for col in ("model", "N", "task", "non-zero", "mean PU", "SE", "samples", "done"):
            table.add_column(col, justify="left" if col in ("model", "task") else "right")
        for r in summary_table(df).itertuples():
            table.add_row(r.model, f"{r.n_params:.3g}", r.task, f"{r.nonzero}/{r.instances}",
                          f"{r.mean_pu:.4g}", f"{r.se:.2g}", f"{r.samples:,}", f"{r.done}/{r.instances}")
    console.print(table)
    for n in run_notes(store, run_id):
        click.echo(f"note ({n['model']}, {n['stage']}): {n['note']}")


@cli.command()
@click.argument("store_path")
@click.option("--out", "out_path", required=True, help="Output file (.csv, .parquet, .json, .jsonl).")
@click.option("--run", "run_id", default=None, help="Run name [the only or latest run].")
@click.option("--completions", is_flag=True, help="Export the distinct completions instead.")
def export(store_path, out_path, run_id, completions):
    """Export a run's tidy table (one row per model x task x instance)."""
    from passuntil.tables import estimates_table

    store, run_id = open_run(store_path, run_id)
    df = store.completions(run_id) if completions else estimates_table(store, run_id)
    out = Path(out_path)
    writers = {".csv": lambda: df.to_csv(out, index=False),
               ".parquet": lambda: df.to_parquet(out, index=False),
               ".json": lambda: out.write_text(dumps(_records(df), indent=1) + "\n", encoding="utf-8"),
               ".jsonl": lambda: out.write_text("".join(dumps(r) + "\n" for r in _records(df)), encoding="utf-8")}
    if out.suffix not in writers:
        raise UserError(f"cannot export to {out.name}: use .csv, .parquet, .json or .jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    writers[out.suffix]()
    click.echo(f"wrote {len(df)} rows to {out}")


def _records(df) -> list[dict]:
    """The table's rows as plain values for strict JSON: every float in full (pandas' own JSON
    writer keeps 10 decimal places, so a PU or exact p of 1.7e-14 was written as 0.0), missing
    values as null."""
    import pandas as pd

    return [{k: None if v is None or v is pd.NA or v != v else v for k, v in row.items()}
            for row in df.astype(object).to_dict(orient="records")]


@cli.command("tasks")
@click.option("--lm-eval", "lm_eval", is_flag=True,
              help="List lm-evaluation-harness tasks (bundled and --include-path) instead.")
@click.option("--include-path", "include", multiple=True, help="A folder of lm_eval task YAMLs.")
def tasks_cmd(lm_eval, include):
    """List every task with its instance count, check and source."""
    from passuntil.tasks import get_task, list_tasks

    if lm_eval or include:
        from passuntil.tasks.lm_eval import print_lm_eval_tasks

        return print_lm_eval_tasks(include, console)
    from passuntil.tasks.bigbench import available, cache_dir

    table = Table(title="passuntil tasks")
    for col in ("task", "instances", "check", "source"):
        table.add_column(col)
    for name in list_tasks():
        if name.startswith("bigbench/") and not available():
            table.add_row(name, "-", "-", f"not fetched: run `passuntil fetch-data` ({cache_dir()})")
            continue
        d = get_task(name).describe()
        table.add_row(name, str(d["instances"]), d["check"], d["source"])
    console.print(table)


@cli.command("fetch-data")
def fetch_data():
    """Download the BIG-bench task files (from the bigbench sdist on PyPI) into the data cache."""
    from passuntil.tasks.bigbench import fetch_bigbench

    fetch_bigbench(log=console.print)


@cli.command()
@click.option("--out", "out_dir", default="passuntil-demo", show_default=True, help="Output folder.")
@click.option("--quick", is_flag=True, help="Two tasks, small budgets (under 2 minutes).")
@click.option("--series", type=click.Choice(["tiny", "sim"]), default="tiny", show_default=True,
              help="The bundled trained series, or the simulated one with known true laws.")
def demo(out_dir, quick, series):
    """Run the whole pipeline on the bundled series and print where the report is."""
    from passuntil.demo import run_demo

    run_demo(Path(out_dir), quick=quick, series=series, console=console)



@cli.command("train-series")
@click.argument("config_path")
def train_series_cmd(config_path):
    """Train (or finish training) a model series from a TOML config."""
    from passuntil.models.train import SeriesConfig, train_series

    cfg = SeriesConfig.load(config_path)
    metrics = train_series(cfg, console=console)
    click.echo(f"series {cfg.name!r}: {len(metrics)} models trained in {cfg.out}")

