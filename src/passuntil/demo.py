"""`passuntil demo`: the paper's workflow end to end, offline, resumable.

On the bundled series (default; trained by this project and shipped with it) or the simulated
one (`--series sim`: the paper's seven sizes, each instance with a known true law): PassUntil on
every size but the largest; a pre-registered forecast file per task for the largest size
(written before it is evaluated); then the largest size is evaluated and every forecast scored;
emergence classes, the metric-choice panel and the HTML report. Re-running continues an
interrupted demo and never rewrites a forecast file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from passuntil.emergence import classify, classify_exact
from passuntil.evaluate import estimates_table, resolve_config, run_with_progress
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.forecast import make_forecast, read_forecast, score_forecast, write_forecast
from passuntil.series import load_series
from passuntil.store import Store
from passuntil.tasks import get_task
from passuntil.tasks.simulated import SIMULATED_TASKS, law_probability

# (tasks, engine settings) per series and mode; budgets sized for <= 10 min / <= 2 min on 2 cores
# (measured: 4.0 min and 1.5 min). "truth" is the exact pass probability (exact-match tasks on
# the built-in sampler) or the simulated law; "inside" compares the forecast with the truth where
# known, else with the unbiased PassUntil estimate. "curve" is the class PassUntil's counts on the
# smaller sizes give; "true curve" the class of the true probabilities over every size.
SETTINGS = {
    ("tiny", False): (("arith", "dates", "reverse", "code"),
                      {"k_target": 2, "max_samples": 800, "batch_size": 4096}),
    ("tiny", True): (("arith", "code"), {"k_target": 2, "max_samples": 300, "batch_size": 4096}),
    ("sim", False): (SIMULATED_TASKS, {"k_target": 2, "max_samples": 30_000, "batch_size": 4096}),
    ("sim", True): (SIMULATED_TASKS, {"k_target": 2, "max_samples": 3_000, "batch_size": 4096}),
}


def _evaluate(store: Store, run_id: str, series: str, models, tasks, engine: dict) -> None:
    config = resolve_config(store, run_id, resume=store.run_exists(run_id), series=series,
                            models=models, tasks=tasks, engine_overrides={**engine, "seed": 0})
    run_with_progress(store, run_id, config, console=Console(stderr=True))


def _truth(task: str, target, g: pd.DataFrame) -> float:
    """The target's true mean pass probability where it is known: the simulated law, or the
    exact probability the built-in sampler computes for exact-match tasks."""
    if task in SIMULATED_TASKS:
        return float(np.mean([law_probability(x.meta["law"], target.n_params)
                              for x in get_task(task).instances]))
    if "exact_p" in g and g["exact_p"].notna().all():
        return float(g["exact_p"].mean())
    return float("nan")


def _true_class(task: str, df: pd.DataFrame) -> str:
    """The class of the task's curve over every size from its true probabilities (the simulated
    law, or the exact probabilities of an exact-match task), "" where they are not known."""
    if task in SIMULATED_TASKS:
        laws = {x.id: x.meta["law"] for x in get_task(task).instances}
        df = df.assign(exact_p=[law_probability(laws[i], n) for i, n in zip(df["instance_id"], df["n_params"])])
    if "exact_p" not in df or df["exact_p"].isna().any():
        return ""
    table = df.pivot_table(index="instance_id", columns="n_params", values="exact_p")
    return classify_exact(table.columns.to_numpy(dtype=float), table.to_numpy(), compare=False).category


def run_demo(out_dir: Path, *, quick: bool = False, series: str = "tiny",
             console: Console | None = None) -> Path:
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Store(out_dir / "demo.sqlite")
    tasks, engine = SETTINGS[(series, quick)]
    tag = f"{series}-{'quick' if quick else 'full'}"
    # Runs and forecasts are named by the tasks' fingerprint too: after an upgrade that changes
    # a task, the demo starts afresh beside the old runs instead of resuming them.
    runs = f"{tag}-{hashlib.sha256(''.join(get_task(t).digest() for t in tasks).encode()).hexdigest()[:8]}"
    models = load_series(series).models
    small, target = [m.name for m in models[:-1]], models[-1]

    _evaluate(store, f"{runs}-small", series, small, tasks, engine)
    df_small = estimates_table(store, f"{runs}-small")
    forecasts = {}
    for task in tasks:
        path = out_dir / f"{runs}-forecast-{task}.json"
        counts = SeriesCounts.from_table(df_small[df_small["task"] == task], k_target=engine["k_target"])
        if not path.exists():  # pre-register before the target is evaluated
            write_forecast(make_forecast(counts, target.n_params, task=task, target_model=target.name,
                                         thresholds=(0.5,)), path)
        forecasts[task] = (read_forecast(path), classify(counts))

    _evaluate(store, f"{runs}-target", series, [target.name], tasks, engine)
    df_target = estimates_table(store, f"{runs}-target")
    table = Table(title=f"Forecasts for {target.name} (N={target.n_params:.3g}) made before it was "
                        f"evaluated (K={engine['k_target']}, budget {engine['max_samples']:,})")
    df_all = pd.concat([df_small, df_target])
    true_class = {task: _true_class(task, df_all[df_all["task"] == task]) for task in forecasts}
    for col in ("task", "curve", "true curve", "forecast", "90% interval", "PassUntil mean PU", "truth",
                "inside", "N for PU=0.5"):
        table.add_column(col)
    scored = []
    for task, (record, shape) in forecasts.items():
        g = (df_target[df_target["task"] == task].set_index("instance_id")
             .loc[record["data"]["instance_ids"]])
        truth = _truth(task, target, g)
        score = score_forecast(record, g["passes"].to_numpy(), g["samples"].to_numpy(),
                               exact_p=g["exact_p"].to_numpy() if task not in SIMULATED_TASKS
                               and "exact_p" in g else None)
        scored.append((record, score))
        th = record["thresholds"][0]
        table.add_row(task, shape.category, true_class[task], f"{score['point']:.4g}",
                      f"[{score['low']:.4g}, {score['high']:.4g}]", f"{score['observed_mean_pu']:.4g}",
                      f"{truth:.4g}", "yes" if score["inside_interval"] else "no",
                      f"{th['n_params']:.3g}")
        for w in record["warnings"]:
            console.print(f"[yellow]warning[/] ({task}): {w}", soft_wrap=True)
    console.print(table)
    summary = out_dir / f"{tag}-results.csv"
    pd.concat([df_small.assign(stage="before forecast"), df_target.assign(stage="target")]
              ).to_csv(summary, index=False)
    (out_dir / f"{tag}-summary.json").write_text(json.dumps(
        {t: {"forecast": r["forecast"], "observed": s["observed"], "class": c.category,
             "true_class": true_class[t]}
         for (t, (r, c)), (_, s) in zip(forecasts.items(), scored)}, indent=1))
    from passuntil.report import load_report_data, write_report

    data = load_report_data(store, [f"{runs}-small", f"{runs}-target"], forecasts=scored)
    page = write_report(data, out_dir / f"{tag}-report", title=f"passuntil demo: {series} series")
    console.print(f"report: {page}\nresults: {summary}; forecasts: {out_dir}/{runs}-forecast-*.json; "
                  f"store: {store.path}", soft_wrap=True)
    return page
