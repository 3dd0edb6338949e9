"""`passuntil demo`: the whole pipeline on the bundled series, offline, resumable.

Today the bundled series is the simulated one (the paper's seven sizes with known true laws);
the demo runs PassUntil on every model, prints PU per model with bootstrap errors beside the
truth, and exports the tidy table. Re-running it continues an interrupted demo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from passuntil.evaluate import (
    estimates_table,
    resolve_config,
    run_eval,
    summary_table,
    total_instances,
)
from passuntil.progress import RichProgress
from passuntil.series import load_series
from passuntil.store import Store
from passuntil.tasks import get_task
from passuntil.tasks.simulated import SIMULATED_TASKS, law_probability


def run_demo(out_dir: Path, *, quick: bool = False, console: Console | None = None) -> Path:
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Store(out_dir / "demo.sqlite")
    run_id = "quick" if quick else "full"
    engine = {"k_target": 2, "max_samples": 3_000 if quick else 30_000, "batch_size": 4096, "seed": 0}
    config = resolve_config(store, run_id, resume=store.run_exists(run_id), series="sim", models=(),
                            tasks=SIMULATED_TASKS, engine_overrides=engine)
    with RichProgress(total_instances(config), console=Console(stderr=True)) as progress:
        run_eval(store, run_id, config, progress=progress)
    df = estimates_table(store, run_id)
    summary = summary_table(df)
    sizes = {m.name: m.n_params for m in load_series("sim").models}
    truth = {(t, name): float(np.mean([law_probability(i.meta["law"], n) for i in get_task(t).instances]))
             for t in SIMULATED_TASKS for name, n in sizes.items()}
    table = Table(title=f"PassUntil on the simulated series (K={engine['k_target']}, "
                        f"budget {engine['max_samples']:,})")
    for col in ("task", "model", "N", "non-zero", "mean PU", "SE", "true mean p"):
        table.add_column(col, justify="left" if col in ("task", "model") else "right")
    for r in summary.sort_values(["task", "n_params"]).itertuples():
        table.add_row(r.task, r.model, f"{r.n_params:.3g}", f"{r.nonzero}/{r.instances}",
                      f"{r.mean_pu:.4g}", f"{r.se:.2g}", f"{truth[(r.task, r.model)]:.4g}")
    console.print(table)
    csv = out_dir / f"{run_id}-results.csv"
    df.to_csv(csv, index=False)
    console.print(f"results: {csv}  (store: {store.path}, run {run_id!r})", soft_wrap=True)
    return csv
