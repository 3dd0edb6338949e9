"""`passuntil demo`: the paper's workflow end to end, offline, resumable.

On the bundled series (default; trained by this project and shipped with it) or the simulated
one (`--series sim`: the paper's seven sizes, each instance with a known true law): PassUntil on
every size but the largest; a pre-registered forecast file per task for the largest size
(written before it is evaluated, with its "these instances" and population intervals, the
predicted pass@k profile and the warnings that fired, all printed before the target runs); then
the largest size is evaluated and every forecast scored (`ForecastRecord.score`);
emergence classes, the metric-choice panel and the HTML report. Re-running continues an
interrupted demo and never rewrites a forecast file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from passuntil.emergence import classify, classify_exact
from passuntil.evaluate import resolve_config, run_with_progress
from passuntil.jsonio import dumps
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.forecast import make_forecast, read_forecast, write_forecast
from passuntil.series import load_series
from passuntil.store import Store
from passuntil.tables import estimates_table
from passuntil.tasks import get_task
from passuntil.tasks.simulated import SIMULATED_TASKS, law_probability

# (tasks, engine settings) per series and mode; budgets sized for <= 10 min / <= 2 min on 2 cores
# (measured: 4.0 min and 1.5 min). "truth" is the exact pass probability (exact-match tasks on
# the built-in sampler) or the simulated law; "observed" is the mean unbiased PassUntil estimate
# (the one meaning it has everywhere); "inside" is the one score (`ForecastRecord.score`): the truth
# within the "these instances" interval where exact probabilities are known, else the target's
# cells' own likelihood.
# "curve" is the class PassUntil's counts on the smaller sizes give; "true curve" the class of
# the true probabilities over every size.
SETTINGS = {
    ("tiny", False): (("arith", "dates", "reverse", "code"),
                      {"k_target": 2, "max_samples": 800, "batch_size": 4096}),
    ("tiny", True): (("arith", "code"), {"k_target": 2, "max_samples": 300, "batch_size": 4096}),
    ("sim", False): (SIMULATED_TASKS, {"k_target": 2, "max_samples": 30_000, "batch_size": 4096}),
    ("sim", True): (SIMULATED_TASKS, {"k_target": 2, "max_samples": 3_000, "batch_size": 4096}),
}


def _evaluate(store: Store, run_id: str, series: str, models, tasks, engine: dict, exact: str = "off") -> None:
    config = resolve_config(store, run_id, resume=store.run_exists(run_id), series=series,
                            models=models, tasks=tasks, engine_overrides={**engine, "seed": 0}, exact=exact)
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


def _pass_at_k_table(forecasts: dict, target) -> Table:
    """The predicted pass@k of the target model per task (decades of k), before it is evaluated."""
    from passuntil.scaling.forecast_record import k_label

    ks = (1, 10, 100, 1000, 10_000, 100_000, 1_000_000)
    table = Table(title=f"Predicted mean pass@k of {target.name} (mean over the instances, 90% interval; "
                        "from the per-instance forecasts, before it is evaluated)")
    table.add_column("task")
    for k in ks:
        table.add_column(f"k={k_label(k)}")
    for task, (record, _) in forecasts.items():
        by_k = {q.k: q for q in record.pass_at_k}
        table.add_row(task, *(f"{by_k[k].mean:.3g} [{by_k[k].low:.3g}, {by_k[k].high:.3g}]" if k in by_k else "-"
                              for k in ks))
    return table


def _exact_tasks(tasks, models, engine: dict) -> list[str]:
    """The demo's tasks the exact mode computes on this series (exact-match checks)."""
    from passuntil.engine import EngineConfig
    from passuntil.reference import exact_refusal

    cfg = EngineConfig(**engine)
    return [t for t in tasks if all(exact_refusal(get_task(t), m.backend, cfg) is None for m in models)]


def _warning_table(rows: list[dict], target) -> Table:
    table = Table(title=f"Warning of accelerated emergence before {target.name} is seen: PassUntil at the "
                        "demo's budget vs the exact probabilities of the smaller sizes (infinite resolution)")
    for col in ("task", f"PassUntil (budget {rows[0]['budget']:,})", "PassUntil class", "exact",
                "exact class (curvature z)", "exact forecast", f"exact p at {target.name}"):
        table.add_column(col)
    for r in rows:
        z = r["exact curvature z"]
        table.add_row(r["task"], f"{'yes' if r['PassUntil warned'] else 'no'} ({r['PassUntil warnings']})",
                      r["PassUntil class"], f"{'yes' if r['exact warned'] else 'no'} ({r['exact warnings']})",
                      r["exact class"] + ("" if z is None else f" ({z:+.1f})"), f"{r['exact forecast']:.4g}",
                      f"{r['exact p at target']:.4g}")
    return table


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
        # ".v3": forecast files of schema 3 ("these instances" and population intervals, pass@k
        # profile); a demo directory made by an older version keeps its .v2 / schema-1 files
        path = out_dir / f"{runs}-forecast-{task}.v3.json"
        counts = SeriesCounts.from_table(df_small[df_small["task"] == task], k_target=engine["k_target"])
        if not path.exists():  # pre-register before the target is evaluated
            write_forecast(make_forecast(counts, target.n_params, task=task, target_model=target.name,
                                         thresholds=(0.5,)), path)
        forecasts[task] = (read_forecast(path), classify(counts))
    # the warnings were recorded in each file when it was made: before the target is evaluated
    for task, (record, _) in forecasts.items():
        fired = [w.split(":", 1)[0] for w in record.warnings]
        console.print(f"[yellow]before {target.name} is evaluated[/] ({task}): "
                      + (f"warnings fired: {', '.join(fired)}" if fired else "no warning fired"), soft_wrap=True)
        for w in record.warnings:
            console.print(f"  [yellow]warning[/]: {w}", soft_wrap=True)
    console.print(_pass_at_k_table(forecasts, target))

    _evaluate(store, f"{runs}-target", series, [target.name], tasks, engine)
    df_target = estimates_table(store, f"{runs}-target")
    table = Table(title=f"Forecasts for {target.name} (N={target.n_params:.3g}) made before it was "
                        f"evaluated (K={engine['k_target']}, budget {engine['max_samples']:,})")
    df_all = pd.concat([df_small, df_target])
    true_class = {task: _true_class(task, df_all[df_all["task"] == task]) for task in forecasts}
    for col in ("task", "curve", "true curve", "forecast", "90% these instances", "90% population", "observed",
                "truth", "scored against", "inside", "truth inside", "N for PU=0.5"):
        table.add_column(col)
    scored = []
    for task, (record, shape) in forecasts.items():
        score = record.score_results(df_target, k_target=engine["k_target"])
        g = df_target[df_target["task"] == task].set_index("instance_id").loc[list(record.data.instance_ids)]
        truth = _truth(task, target, g)
        scored.append((record, score))
        th, pop = record.thresholds[0], record.pop_interval
        against = score.against if score.z is None else f"{score.against} (z {score.z:+.2f})"
        table.add_row(task, shape.category, true_class[task], f"{score.point:.4g}",
                      f"[{score.low:.4g}, {score.high:.4g}]", "-" if pop is None else f"[{pop[0]:.4g}, {pop[1]:.4g}]",
                      f"{score.observed:.4g}", f"{truth:.4g}", against,
                      "yes" if score.inside_interval else "no",
                      "" if truth != truth else "yes" if score.low <= truth <= score.high else "no",
                      f"{th.n_params:.3g}")
    console.print(table)
    # beside PassUntil, the exact mode on every size (one forward pass per instance and size):
    # does a warning fire before the target from the exact probabilities of the smaller sizes?
    from passuntil.warning_table import warning_comparison

    exact_tasks = _exact_tasks(tasks, models, engine)
    warned = []
    if exact_tasks:
        _evaluate(store, f"exact-{runs}", series, [m.name for m in models], exact_tasks, engine, exact="on")
        warned = warning_comparison(str(store.path), sampled_run=f"{runs}-small", exact_run=f"exact-{runs}",
                                    target_model=target.name, tasks=exact_tasks,
                                    sampled={t: forecasts[t][0] for t in exact_tasks})
        console.print(_warning_table(warned, target))
    summary = out_dir / f"{tag}-results.csv"
    pd.concat([df_small.assign(stage="before forecast"), df_target.assign(stage="target")]
              ).to_csv(summary, index=False)
    (out_dir / f"{tag}-summary.json").write_text(dumps(
        {t: {"forecast": {"point": r.point, "low": r.these_low, "high": r.these_high, "level": r.level,
                          "interval": "these instances", "population": r.pop_interval},
             "pass_at_k": [{"k": q.k, "mean": q.mean, "low": q.low, "high": q.high} for q in r.pass_at_k],
             "warnings_before_target": list(r.warnings), "scored_against": s.against, "z": s.z,
             "inside": s.inside_interval,
             "observed": s.observed, "observed_is": s.observed_is, "exact": s.exact, "class": c.category,
             "true_class": true_class[t]}
         for (t, (r, c)), (_, s) in zip(forecasts.items(), scored)}
        | {"warning_before_target": warned}, indent=1))
    from passuntil.report import load_report_data, write_report

    data = load_report_data(store, [f"{runs}-small", f"{runs}-target"], forecasts=[r for r, _ in scored],
                             warnings_before_target=warned)
    page = write_report(data, out_dir / f"{tag}-report", title=f"passuntil demo: {series} series")
    console.print(f"report: {page}\nresults: {summary}; forecasts: {out_dir}/{runs}-forecast-*.json; "
                  f"store: {store.path}", soft_wrap=True)
    return page
