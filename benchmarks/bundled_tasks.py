"""Measure the bundled tasks on the bundled series: greedy accuracy vs PassUntil, and the loss law.

    .venv/bin/python benchmarks/bundled_tasks.py [--store runs/bundled.sqlite] [--out docs/bundled-series.md]

For every size and task: greedy exact-match accuracy (temperature 0, one sample: the
"ordinary resolution"), PassUntil (K=1; budget 5,000 for arith, 3,000 for dates and reverse,
100 for code, whose checks execute unit tests in subprocesses), the number of instances with a non-zero PU, the mean PU, and for exact-match
tasks the exact pass probability. Resumable (one run store). Writes a Markdown report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from passuntil.backends.base import SamplingParams
from passuntil.evaluate import resolve_config, run_with_progress
from passuntil.scaling import fit_loss_law
from passuntil.series import load_series, open_sampler
from passuntil.store import Store
from passuntil.tables import estimates_table
from passuntil.tasks import get_task

BUDGETS = {"arith": 5000, "dates": 3000, "reverse": 3000, "code": 100}
# Deep runs: the middle sizes, where `dates` and `reverse` sit at p ~ 1e-5 (10^5 samples each).
# `code` gets 3,000 on tiny-3, where 100 samples see almost nothing.
DEEP = {"dates": (100_000, ("tiny-4", "tiny-5", "tiny-6")),
        "reverse": (100_000, ("tiny-3", "tiny-4", "tiny-5", "tiny-6")),
        "code": (3_000, ("tiny-3",))}
# Everything after this line in the report is written by hand and kept when the tables are redone.
PROSE_MARKER = "<!-- generated tables end; prose below is kept -->"


def greedy_accuracy(sampler, task) -> float:
    prompts = [task.prompt(x) for x in task.instances]
    params = [SamplingParams(n=1, temperature=0.0, max_tokens=task.max_new_tokens, stop=task.stop)] * len(prompts)
    outs = sampler.generate(prompts, params)
    return float(np.mean([task.check(x, o[0].text) for x, o in zip(task.instances, outs)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="runs/bundled.sqlite")
    ap.add_argument("--out", default="docs/bundled-series.md")
    ap.add_argument("--deep", action="store_true", help="Also the deep runs (about an hour).")
    args = ap.parse_args()
    Path(args.store).parent.mkdir(parents=True, exist_ok=True)
    store = Store(args.store)
    series = load_series("tiny")
    rows = []
    for task_name, budget in BUDGETS.items():
        rows += measure(store, series, task_name, budget, models=(), seed=0, batch_size=2048, greedy=True)
    if args.deep:
        for task_name, (budget, models) in DEEP.items():
            rows += measure(store, series, task_name, budget, models=models, seed=1, batch_size=8192,
                                greedy=False)
    metrics = [json.loads((Path(m.path) / "metrics.json").read_text()) for m in series.models]
    fit = fit_loss_law([m["n_params"] for m in metrics], [m["final_val_loss"] for m in metrics])
    out = Path(args.out)
    prose = out.read_text().partition(PROSE_MARKER)[2] if out.exists() else ""
    out.write_text(report(rows, metrics, fit) + "\n" + PROSE_MARKER + prose)
    print(f"wrote {args.out}")


def measure(store, series, task_name: str, budget: int, *, models, seed: int, batch_size: int,
            greedy: bool) -> list[dict]:
    """PassUntil K = 1 up to `budget` samples per instance (resumed if the run exists), one row per
    size, with greedy accuracy if `greedy`."""
    run = f"{task_name}-k1-{budget}"
    config = resolve_config(store, run, resume=store.run_exists(run), series="tiny", models=models,
                            tasks=[task_name], engine_overrides={
                                "k_target": 1, "max_samples": budget, "batch_size": batch_size,
                                "seed": seed, "check_workers": 2 if task_name == "code" else 0})
    run_with_progress(store, run, config)
    task = get_task(task_name)
    df = estimates_table(store, run)
    df = df[df["instance_id"].isin({x.id for x in task.instances})]
    rows = []
    for spec in series.select(models):
        g = df[df["model"] == spec.name]
        acc = greedy_accuracy(open_sampler(spec, [task]), task) if greedy else float("nan")
        rows.append({"task": task_name, "model": spec.name, "n_params": spec.n_params, "greedy_acc": acc,
                     "nonzero": int((g["passes"] > 0).sum()), "instances": len(g),
                     "mean_pu": float(g["pu"].mean()), "budget": budget,
                     "mean_exact_p": float(g["exact_p"].mean()) if g["exact_p"].notna().all() else None,
                     "samples": int(g["samples"].sum())})
        print(json.dumps(rows[-1]))
    return rows


def report(rows, metrics, fit) -> str:
    lines = ["# The bundled series and tasks, measured", "",
             "Made by `.venv/bin/python benchmarks/bundled_tasks.py --deep` (PassUntil K = 1; budget 5,000 "
             "samples for `arith`, 3,000 for `dates` and `reverse`, 100 for `code`, and the deep rows at the end "
             "with larger budgets on the sizes where those see little; greedy = temperature 0, one sample; "
             "exact p = the exact probability that one sample is exactly the reference, see docs/sampler.md).", "",
             "## Training (configs/tiny.toml)", "",
             "| model | N (non-embedding) | layers | width | tokens | batch x steps | val loss | loss-law fit | residual | minutes | GFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in zip(metrics, fit.residuals):
        c = m["config"]
        lines.append(f"| {m['name']} | {m['n_params']:,} | {c['num_hidden_layers']} | {c['hidden_size']} | "
                     f"{m['tokens'] / 1e6:.1f}M | {m['batch']} x {m['steps']} | {m['final_val_loss']:.4f} | "
                     f"{m['final_val_loss'] - r:.4f} | {r:+.4f} | {m['wall_s'] / 60:.1f} | {m['gflops_per_s']:.0f} |")
    lines += ["", f"Loss law L(N) = (c/N)^alpha + L0: c = {fit.c:.4g}, alpha = {fit.alpha:.3f} "
              f"(± {fit.stderr['alpha']:.3f}), L0 = {fit.l0:.3f} (± {fit.stderr['l0']:.3f}); RMSE {fit.rmse:.4f}. "
              f"Total training time {sum(m['wall_s'] for m in metrics) / 60:.0f} min on 2 cores.", "",
              "## Tasks: ordinary resolution vs PassUntil", "",
              "| task | model | N | budget | greedy accuracy | instances with PU > 0 | mean PU | mean exact p | samples |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ex = "" if r["mean_exact_p"] is None else f"{r['mean_exact_p']:.3g}"
        greedy = "" if r["greedy_acc"] != r["greedy_acc"] else f"{r['greedy_acc']:.3f}"
        lines.append(f"| {r['task']} | {r['model']} | {r['n_params']:,.0f} | {r['budget']:,} | {greedy} | "
                     f"{r['nonzero']}/{r['instances']} | {r['mean_pu']:.3g} | {ex} | {r['samples']:,} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
