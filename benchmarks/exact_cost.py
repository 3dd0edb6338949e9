"""Cost of exact pass probabilities against PassUntil on the bundled series (issue 19's must-show).

    .venv/bin/python benchmarks/exact_cost.py [--budget 800] [--k 2] [--once] [--limit N] [--threads N]
                                              [--store DIR]

On the three bundled exact-match tasks (arith, dates, reverse) over the six bundled sizes, in
one run and through the door users use (a subprocess of `passuntil eval`, into a fresh
store): `eval --exact` (one teacher-forced pass per instance, reference and size), then
PassUntil with the demo's settings (K = 2, budget 800, batch 4096, seed 0), then `eval --exact`
again, so a change of the shared machine's load during the long PassUntil run shows as two
different exact times rather than a skewed ratio (`--once`: skip the second). Both keep
their default reference scores, as a user's runs would. Prints each wall time with the load
average (`os.getloadavg`, as `uptime` shows it) before and after, the samples and exact
probabilities each stored (read from the stores), and the ratio exact / PassUntil with the
issue's bound: exact in at most 10% of PassUntil's wall time.

Measured on the shared 2-core machine (2026-12-01, default threads): exact 90.3 s and 9.8 s
against PassUntil's 496.1 s (load average 2.3-3.6); under heavier load (6.6-21) 411.5 s and
209.3 s against 1,211.3 s. The exact mode's small forward passes are what contention slows
most (torch's intra-op threads wait on each other when another process holds a core): the same
`eval --exact` took 131 s with the default threads and 12 s with OMP_NUM_THREADS=1, one after
the other. docs/worked-example.md has the numbers beside the warning table they feed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from passuntil.store import Store
from passuntil.tables import estimates_table

TASKS = ("arith", "dates", "reverse")
BOUND = 0.10
CLI = Path(sys.executable).with_name("passuntil")


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def timed_eval(store: Path, run: str, *flags: str, threads: int | None = None) -> tuple[float, dict]:
    """Wall seconds of one `passuntil eval` subprocess, and what its run stored."""
    env = os.environ | ({} if threads is None else {"OMP_NUM_THREADS": str(threads)})
    args = [str(CLI), "eval", *(a for t in TASKS for a in ("--task", t)), "--series", "tiny",
            "--store", str(store), "--run", run, *flags]
    before = load()
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    df = estimates_table(Store(store, create=False), run)
    return wall, {"load before": before, "load after": load(), "cells": len(df),
                  "samples": int(df["samples"].sum()), "exact": int((df["stopped"] == "exact").sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=800, help="PassUntil's samples per instance (the demo's)")
    ap.add_argument("--k", type=int, default=2, help="PassUntil's K (the demo's)")
    ap.add_argument("--once", action="store_true", help="time the exact mode once, before PassUntil only")
    ap.add_argument("--limit", type=int, default=None, help="only the first N instances per task (a smoke run)")
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for both evals [torch's default]: the exact mode's small forward "
                         "passes slow down most when torch's threads contend with other processes for cores")
    ap.add_argument("--store", default=None, help="folder for the stores [a temporary one]")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(args.store or tmp)
        where.mkdir(parents=True, exist_ok=True)
        store = where / f"exact-cost-{time.strftime('%Y%m%d-%H%M%S')}.sqlite"
        print(f"tasks {', '.join(TASKS)} x the six tiny sizes; {os.cpu_count()} CPUs; load average {load()}; "
              f"OMP_NUM_THREADS {args.threads or os.environ.get('OMP_NUM_THREADS', 'unset')}")
        times = {}
        limit = () if args.limit is None else ("--limit", str(args.limit))
        times["exact"] = timed_eval(store, "exact", "--exact", *limit, threads=args.threads)
        times["PassUntil"] = timed_eval(store, "passuntil", "--k", str(args.k), "--max-samples", str(args.budget),
                                        "--batch-size", "4096", "--seed", "0", *limit,
                                        threads=args.threads)
        if not args.once:  # its own store: one exact run beside PassUntil's keeps `report`'s choice automatic
            after = store.with_name(store.stem + "-after.sqlite")
            times["exact (after)"] = timed_eval(after, "exact", "--exact", *limit, threads=args.threads)
    for name, (wall, info) in times.items():
        print(f"{name:>14}: {wall:7.1f} s  ({info['cells']} cells, {info['samples']:,} samples, "
              f"{info['exact']} exact probabilities; load average before {info['load before']}, "
              f"after {info['load after']})")
    exact = [w for name, (w, _) in times.items() if name.startswith("exact")]
    pu = times["PassUntil"][0]
    ratios = ", ".join(f"{w / pu:.3f}" for w in exact)
    worst = max(exact) / pu
    print(f"exact / PassUntil (K={args.k}, budget {args.budget:,}) wall time: {ratios} "
          f"(speed-up {pu / max(exact):.1f}x to {pu / min(exact):.1f}x); issue bound <= {BOUND:.0%}: "
          f"{'met' if worst <= BOUND else 'NOT met'}")
    if args.store:
        print(f"kept: {store} (runs 'exact' and 'passuntil'; `passuntil report {store}` builds the "
              "warning-before-tiny-7 table from them)")


if __name__ == "__main__":
    main()
