"""`passuntil demo`: the paper's workflow end to end, offline, resumable.

On the simulated series (the paper's seven sizes, each instance with a known true law):
PassUntil on every size but the largest; a pre-registered forecast file per task for the
largest size (written before it is evaluated); then the largest size is evaluated and every
forecast scored against it and against the truth; emergence classes per task. Re-running
continues an interrupted demo and never rewrites a forecast file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from passuntil.emergence import classify
from passuntil.evaluate import estimates_table, resolve_config, run_with_progress
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.forecast import make_forecast, read_forecast, score_forecast, write_forecast
from passuntil.series import load_series
from passuntil.store import Store
from passuntil.tasks import get_task
from passuntil.tasks.simulated import SIMULATED_TASKS, law_probability


def _evaluate(store: Store, run_id: str, models, engine: dict) -> None:
    config = resolve_config(store, run_id, resume=store.run_exists(run_id), series="sim", models=models,
                            tasks=SIMULATED_TASKS, engine_overrides=engine)
    run_with_progress(store, run_id, config, console=Console(stderr=True))


def run_demo(out_dir: Path, *, quick: bool = False, console: Console | None = None) -> Path:
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Store(out_dir / "demo.sqlite")
    tag = "quick" if quick else "full"
    engine = {"k_target": 2, "max_samples": 3_000 if quick else 30_000, "batch_size": 4096, "seed": 0}
    series = load_series("sim").models
    small, target = [m.name for m in series[:-1]], series[-1]

    _evaluate(store, f"{tag}-small", small, engine)
    df_small = estimates_table(store, f"{tag}-small")
    forecasts = {}
    for task in SIMULATED_TASKS:
        path = out_dir / f"{tag}-forecast-{task}.json"
        counts = SeriesCounts.from_table(df_small[df_small["task"] == task], k_target=engine["k_target"])
        if not path.exists():  # pre-register before the target is evaluated
            write_forecast(make_forecast(counts, target.n_params, task=task, target_model=target.name,
                                         thresholds=(0.5,)), path)
        forecasts[task] = (read_forecast(path), classify(counts))

    _evaluate(store, f"{tag}-target", [target.name], engine)
    df_target = estimates_table(store, f"{tag}-target")
    table = Table(title=f"Forecasts for {target.name} (N={target.n_params:.3g}) made before it was evaluated "
                        f"(K={engine['k_target']}, budget {engine['max_samples']:,})")
    for col in ("task", "curve", "forecast", "90% interval", "observed", "truth", "inside", "N for PU=0.5"):
        table.add_column(col)
    for task, (record, shape) in forecasts.items():
        g = df_target[df_target["task"] == task].set_index("instance_id").loc[record["data"]["instance_ids"]]
        score = score_forecast(record, g["passes"].to_numpy(), g["samples"].to_numpy())
        truth = float(np.mean([law_probability(x.meta["law"], target.n_params) for x in get_task(task).instances]))
        th = record["thresholds"][0]
        table.add_row(task, shape.category, f"{score['point']:.4f}", f"[{score['low']:.4f}, {score['high']:.4f}]",
                      f"{score['observed_mean_pu']:.4f}", f"{truth:.4f}", "yes" if score["inside_interval"] else "no",
                      f"{th['n_params']:.3g}")
        for w in record["warnings"]:
            console.print(f"[yellow]warning[/] ({task}): {w}", soft_wrap=True)
    console.print(table)
    summary = out_dir / f"{tag}-results.csv"
    pd.concat([df_small.assign(stage="before forecast"), df_target.assign(stage="target")]).to_csv(summary, index=False)
    console.print(f"results: {summary}; forecasts: {out_dir}/{tag}-forecast-*.json; store: {store.path}",
                  soft_wrap=True)
    (out_dir / f"{tag}-summary.json").write_text(json.dumps({t: r["forecast"] for t, (r, _) in forecasts.items()}))
    return summary
