"""Runners: carry out a recorded run. One interface, two implementations.

`LocalRunner` samples every model in this process; `passuntil.distributed.RayRunner` shards the
same work over Ray actors. Both take the store, the run name and its `RunSpec`, hold the run's
lease while they sample (one writer per run), commit one transaction per engine round, score the
references (or note why not), and return a `RunOutcome` read back from the store, so the caller
cannot tell them apart by their results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from passuntil import reference
from passuntil.engine import InstanceResult, Progress, new_states, run_passuntil
from passuntil.runspec import RunSpec, record_sampler_warnings
from passuntil.series import open_sampler
from passuntil.tasks.base import Task


@dataclass(frozen=True)
class RunOutcome:
    """What a runner leaves: every instance result of the run as the store now holds it, the
    samples counted in this call, and the notes recorded in this call."""

    results: tuple[InstanceResult, ...]
    samples: int
    notes: tuple[str, ...] = ()
    exact: int = 0  # (model, instance) pairs whose exact pass probability is the data, unsampled
    mode: str = "passuntil"  # the run's design: "passuntil" (K-stop) or "forecast" (sequential)


class Runner(Protocol):
    def run(self, store, run_id: str, spec: RunSpec, *, progress: Progress | None = None
            ) -> RunOutcome:
        """Run (or continue) the recorded run `run_id` to the end."""
        ...


class Tally(Progress):
    """Counts the samples of this call and passes everything on to another progress."""

    def __init__(self, inner: Progress | None):
        self.inner = inner or Progress()
        self.samples = 0

    def advance(self, *, instances: int = 0, samples: int = 0) -> None:
        self.samples += samples
        self.inner.advance(instances=instances, samples=samples)

    def set_model(self, name: str, tasks: Sequence[str] = ()) -> None:
        self.inner.set_model(name, tasks)

    def stage(self, name: str) -> None:
        self.inner.stage(name)



def load_states(store, run_id: str, spec: RunSpec, tasks: Sequence[Task], model: str):
    states = new_states(tasks, model=model, seed=spec.engine.seed)
    store.load_states(run_id, model, states)
    return states


def sampled_tasks(spec: RunSpec, model: str, tasks: Sequence[Task]) -> list[Task]:
    """The tasks PassUntil samples for a model: all but those the exact mode computes."""
    exact = {t.name for t in reference.exact_tasks(spec, spec.model(model).backend, tasks)}
    return [t for t in tasks if t.name not in exact]


def stored_outcome(store, run_id: str, spec: RunSpec, *, tasks: Sequence[Task] | None = None,
                   samples: int = 0, notes: Sequence[str] = ()) -> RunOutcome:
    """The run's per-instance results as the store holds them now (sampled instances), and how
    many (model, instance) pairs the exact mode computed instead."""
    tasks = spec.load_tasks() if tasks is None else tasks
    results, exact = [], 0
    for m in spec.models:
        sampled = sampled_tasks(spec, m.name, tasks)
        exact += sum(len(t.instances) for t in tasks) - sum(len(t.instances) for t in sampled)
        results += [st.result(m.name) for st in load_states(store, run_id, spec, sampled, m.name)]
    return RunOutcome(tuple(results), samples, tuple(notes), exact)


class LocalRunner:
    """Every model in turn, in this process."""

    def run(self, store, run_id: str, spec: RunSpec, *, progress: Progress | None = None
            ) -> RunOutcome:
        tally = Tally(progress)
        tasks = spec.load_tasks()
        names = [t.name for t in tasks]
        notes = []
        with store.lease(run_id):  # one writer per run
            for m in spec.models:
                tally.set_model(m.name, names)
                sampled = sampled_tasks(spec, m.name, tasks)
                tally.advance(instances=sum(len(t.instances) for t in tasks if t not in sampled))
                states = load_states(store, run_id, spec, sampled, m.name)
                owes_scores = reference.pending(store, run_id, spec, m.name)
                if all(st.stopped for st in states) and not owes_scores:
                    tally.advance(instances=len(states))
                    continue
                tally.advance(instances=sum(bool(st.stopped) for st in states))
                sampler = open_sampler(m, tasks)
                if sampled:
                    run_passuntil(sampler, sampled, spec.engine, model=m.name, states=states, progress=tally,
                                  commit=lambda updates, name=m.name: store.commit_round(run_id, name, updates))
                notes += record_sampler_warnings(store, run_id, m.name, getattr(sampler, "warnings", ()))
                if owes_scores:
                    tally.stage(reference.STAGE)
                    note = reference.record(store, run_id, m.name,
                                            reference.compute(sampler, spec, m.name, tasks))
                    notes += [note] if note else []
        return stored_outcome(store, run_id, spec, tasks=tasks, samples=tally.samples, notes=notes)
