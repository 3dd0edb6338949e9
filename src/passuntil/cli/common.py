"""Shared pieces of the command line: the click group, the console, and opening a store's runs."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from passuntil import __version__
from passuntil.errors import UserError

console = Console(width=None if sys.stdout.isatty() else 160)  # no truncation in pipes and logs


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="passuntil")
def cli() -> None:
    """Predict the task performance of language models across scale (PassUntil)."""




def open_store(path: str, *, create: bool):
    from passuntil.store import Store

    return Store(path, create=create)



def pick_run(store, run_id):
    runs = store.runs()
    if run_id is None:
        if not runs:
            raise UserError(f"{store.path} holds no runs")
        return runs[-1]
    if run_id not in runs:
        raise UserError(f"no run {run_id!r} in {store.path} (runs: {', '.join(runs) or 'none'})")
    return run_id



def task_counts(store_path, run_id, task, exclude=()):
    """SeriesCounts of one task of a run, optionally without some models."""
    from passuntil.evaluate import estimates_table
    from passuntil.scaling.data import SeriesCounts

    store = open_store(store_path, create=False)
    run_id = pick_run(store, run_id)
    df = estimates_table(store, run_id)
    if task not in set(df["task"]):
        raise UserError(f"run {run_id!r} has no results for task {task!r} (tasks: {', '.join(sorted(set(df['task'])))})")
    df = df[(df["task"] == task) & df["done"]]
    unknown = set(exclude) - set(df["model"])
    if unknown:
        raise UserError(f"no model {sorted(unknown)[0]!r} in run {run_id!r}")
    k = store.run_config(run_id)["engine"]["k_target"]
    return SeriesCounts.from_table(df[~df["model"].isin(set(exclude))], k_target=k), df


