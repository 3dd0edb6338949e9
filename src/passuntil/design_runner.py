"""The runner of `passuntil eval --design forecast`: sequential sampling toward a forecast.

Round by round, for every task that has not stopped (one design per task, each with its own
budget; the tasks share the round so every model's sampler serves all of them at once):

1. build the task's `SeriesCounts` from the store and ask `scaling.design.target_interval`
   whether to stop (interval as narrow as asked, or the task's budget spent; with
   `--width-stop-method bayes` the width stop is decided on the full-Bayes fit's interval, and
   a task that ends by the cap gets that fit's interval too);
2. otherwise `scaling.design.next_round` decides each (instance, model) cell's quota, within
   the cell's headroom under `--max-samples` (a task whose informative cells are all at the cap
   stops "by cap"); the round's decisions (per cell: the count to reach) are recorded in the run
   *before* sampling;
3. each model's sampler draws its cells up to their counts through the engine
   (`engine.run_quotas`: sample j of a cell is draw j of its seed stream, no K-stop, the
   per-cell cap `--max-samples` holds), one store transaction per engine batch, by the store's
   compare-and-set on each cell's count.

A resumed run finishes the last recorded round first (drawing to recorded counts is idempotent),
then decides the next from the counts, so it ends with exactly the counts of an uninterrupted
run. With `--ray` the cells of each round are sampled on Ray actors (`distributed.RayCells`)
while this process decides the rounds and owns the store: the same counts as a local run. Samplers stay loaded across rounds when the models are small (`keep_all_open`); large local
weights are loaded one model at a time, i.e. once per model per round (rounds grow by half the
samples so far, so a run has about log(budget / first round) / log 1.5 rounds).
"""

from __future__ import annotations

import math

from passuntil import reference
from passuntil.engine import Progress, run_quotas
from passuntil.progress import RichProgress, duration
from passuntil.runner import RunOutcome, Tally, load_states, stored_outcome
from passuntil.runspec import RunSpec, add_note, record_sampler_warnings
from passuntil.sequential import (
    MAX_ROUNDS,
    DesignSettings,
    append_rounds,
    as_analysed,
    coverage_line,
    design_log,
    record_result,
    result_line,
    sampled_instances,
    series_counts,
)
from passuntil.series import open_sampler

KEEP_OPEN_PARAMS = 2e9  # local weights (parameters, all models together) kept loaded across rounds
STAGE = "design"


def keep_all_open(models) -> bool:
    """Whether every model's sampler stays loaded for the whole run: yes unless a model is served
    by vLLM (one engine per accelerator) or the local weights of all models exceed
    `KEEP_OPEN_PARAMS` parameters (then one at a time, reloaded each round)."""
    if any(m.backend == "vllm" for m in models):
        return False
    return sum(m.n_params for m in models if m.backend in ("torch", "transformers")) <= KEEP_OPEN_PARAMS


class LocalCells:
    """The cells of a round sampled in this process. Samplers by model name, opened on first
    use; all kept across rounds (`keep_all`), or only the latest one. The Ray counterpart is
    `passuntil.distributed.RayCells` (same methods)."""

    def __init__(self, spec: RunSpec, tasks, keep_all: bool):
        self.spec, self.tasks, self.keep_all = spec, tasks, keep_all
        self.open: dict[str, object] = {}

    def get(self, model: str):
        if model not in self.open:
            if not self.keep_all:
                self.open.clear()  # free the previous model's weights first
            self.open[model] = open_sampler(self.spec.model(model), self.tasks)
        return self.open[model]

    def sample(self, store, run_id: str, model: str, states, targets, progress: Progress) -> None:
        run_quotas(self.get(model), self.tasks, self.spec.engine, model=model, states=states, targets=targets,
                   progress=progress, commit=lambda updates: store.commit_round(run_id, model, updates))

    def warnings(self, model: str) -> list[str]:
        return list(getattr(self.open[model], "warnings", ())) if model in self.open else []

    def scores(self, model: str) -> reference.ReferenceScores:
        return reference.compute(self.get(model), self.spec, model, self.tasks)

    def close(self) -> None:
        self.open.clear()


class DesignProgress(RichProgress):
    """Samples spent of the run's budget (all tasks), the round, and the time left at the current
    rate (the design may stop earlier, at its target width)."""

    def __init__(self, budget: int | None, *, spent: int = 0, console=None):
        super().__init__(budget or 0, console=console)
        self.round = 0
        self.done = spent
        self.bar.update(self.task_id, advance=spent)

    def advance(self, *, instances: int = 0, samples: int = 0) -> None:
        self.samples += samples
        self.done += samples
        self._update(advance=samples)

    def description(self) -> str:
        return f"design round {self.round} · " + super().description()

    def eta(self) -> tuple[float, float]:
        rate = self.rate()
        if not self.total or rate <= 0:
            return math.inf, math.inf
        left = max(0, self.total - self.done) / rate
        return left, left

    def log_line(self) -> str:
        of = f"/{self.total:,} samples of the budget" if self.total else " samples (no total budget)"
        return (f"passuntil: {self.description()}: {self.done:,}{of}, {self.rate():,.0f}/s this session, "
                f"ETA at most {duration(self.eta()[1])}")


class DesignRunner:
    """`passuntil.runner.Runner` for a run whose spec has a design (`RunSpec.design`): the rounds
    are decided here; the cells are sampled here or, with `ray` (an address or "local"), on Ray
    actors (`distributed.RayCells`), with the same counts."""

    def __init__(self, ray: str | None = None, ray_workers: int | None = None):
        self.ray, self.ray_workers = ray, ray_workers

    def run(self, store, run_id: str, spec: RunSpec, *, progress: Progress | None = None) -> RunOutcome:
        tasks = spec.load_tasks()
        if self.ray:
            from passuntil.distributed import RayCells

            cells = RayCells(spec, self.ray, self.ray_workers)
        else:
            cells = LocalCells(spec, tasks, keep_all_open(spec.models))
        try:
            return self._run(store, run_id, spec, tasks, cells, progress)
        finally:
            cells.close()

    def _run(self, store, run_id, spec, tasks, cells, progress) -> RunOutcome:
        tally = Tally(progress)
        settings = DesignSettings.from_dict(spec.design)
        notes: list[str] = []
        with store.lease(run_id):  # one writer per run
            rounds, results = design_log(store, run_id)
            last = max((e["round"] for e in rounds), default=0)
            _set_round(progress, last)
            self._sample(store, run_id, spec, tasks, cells, [e for e in rounds if e["round"] == last
                                                           and e["task"] not in results], tally)
            for r in range(last + 1, MAX_ROUNDS + 2):
                _set_round(progress, r)
                entries = _decide_round(store, run_id, spec, tasks, r, results, settings)
                if not entries:
                    break
                append_rounds(store, run_id, entries)
                self._sample(store, run_id, spec, tasks, cells, entries, tally)
            for m in spec.models:
                notes += self._finish_model(store, run_id, spec, cells, m.name, tally)
        notes += [line for t, res in results.items()
                  for line in (result_line(t, res, settings), coverage_line(t, res)) if line]
        outcome = stored_outcome(store, run_id, spec, tasks=tasks, samples=tally.samples, notes=notes)
        return RunOutcome(outcome.results, outcome.samples, outcome.notes, outcome.exact, mode="forecast")

    def _sample(self, store, run_id, spec, tasks, cells, entries, tally) -> None:
        """Draw every model's cells of `entries` up to their recorded counts."""
        for m in spec.models:
            targets = {(e["task"], iid): n for e in entries for iid, n in e["targets"].get(m.name, {}).items()}
            if not targets:
                continue
            chosen = [t for t in tasks if any(e["task"] == t.name and m.name in e["targets"] for e in entries)]
            tally.set_model(m.name, [t.name for t in chosen])
            cells.sample(store, run_id, m.name, load_states(store, run_id, spec, chosen, m.name), targets, tally)

    def _finish_model(self, store, run_id, spec, cells, model, tally) -> list[str]:
        """What the sampler noticed, and the references' scores the model owes the run."""
        notes = record_sampler_warnings(store, run_id, model, cells.warnings(model))
        if reference.pending(store, run_id, spec, model):
            tally.stage(reference.STAGE)
            note = reference.record(store, run_id, model, cells.scores(model))
            notes += [note] if note else []
        return notes


def _set_round(progress, r: int) -> None:
    if isinstance(progress, DesignProgress):
        progress.round = r


def _decide_round(store, run_id: str, spec: RunSpec, tasks, r: int, results: dict, settings) -> list[dict]:
    """Round r's decisions, one entry per task that goes on; a task that stops (interval narrow
    enough, budget spent, every informative cell at the cap, or past `MAX_ROUNDS`) is recorded in
    `results` and in the run instead, with how many instances each size has samples of (a note
    where some have none: `coverage_line`)."""
    from passuntil.scaling.design import closing_interval, target_interval

    design, seed = settings.design(), spec.engine.seed
    stored = {m.name: store.counts(run_id, m.name) for m in spec.models}
    entries = []
    for task in tasks:
        if task.name in results:
            continue
        counts = series_counts(stored, spec.models, task)
        analysed = as_analysed(counts)
        verdict = target_interval(analysed, design, seed=seed)
        spent = int(counts.samples.sum())
        entry = None if verdict.stop or r > MAX_ROUNDS else _decide(counts, design, seed, spec.engine.max_samples)
        if entry is not None:
            entries.append({"round": r, "task": task.name, "spent": spent, "interval": verdict.to_dict(), **entry})
            continue
        verdict = closing_interval(analysed, design, verdict, seed=seed)
        reason = verdict.reason or ("max-rounds" if r > MAX_ROUNDS else
                                    "budget" if design.round_budget(spent) == 0 else "cap")
        results[task.name] = {"rounds": r - 1, "spent": spent, "reason": reason, "interval": verdict.to_dict(),
                              "cap": spec.engine.max_samples, "sampled": sampled_instances(counts)}
        record_result(store, run_id, task.name, results[task.name])
        for line in (result_line(task.name, results[task.name], settings), coverage_line(task.name, results[task.name])):
            if line:
                add_note(store, run_id, model="*", stage=STAGE, text=line)
    return entries


def _decide(counts, design, seed: int, cap: int) -> dict | None:
    """The round's decision for one task: samples per model and, per cell with a quota, the count
    to reach (the design keeps each cell within the cap); None when there is nothing to sample
    (budget spent, or every cell that could still inform the forecast at the cap)."""
    from passuntil.scaling.design import next_round

    quota = next_round(counts, design, seed=seed, cap=cap)  # within each cell's headroom
    goal = counts.samples + quota
    grow = goal > counts.samples
    if not grow.any():
        return None
    targets = {m: {counts.instance_ids[i]: int(goal[i, j]) for i in range(goal.shape[0]) if grow[i, j]}
               for j, m in enumerate(counts.models) if grow[:, j].any()}
    return {"samples": int((goal - counts.samples).sum()), "cells": int(grow.sum()),
            "by_model": {m: int((goal - counts.samples)[:, j].sum()) for j, m in enumerate(counts.models)},
            "targets": targets}
