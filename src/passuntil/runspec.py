"""The run specification: everything a run was started with, frozen, with one JSON round trip.

A `RunSpec` names the tasks (each with the name its results are stored under, where it was
loaded from — a registry name or a task file's absolute path — and its fingerprint), the model
series and models, the engine settings, each model's sampler fingerprint, and the options
(`limit`, reference scores on or off, the code-execution isolation, and for `--design forecast`
the sequential design's settings). It is written into the store when the run starts (`to_dict`
is a superset of the configuration dicts older versions wrote, which `from_dict` still reads),
so `--resume`, `report`, `metrics` and the rest rebuild the run's tasks from the run itself,
never from a bare name.

Notes recorded while a run goes (e.g. "this backend cannot score references") are kept beside
the specification (`add_note`, `run_notes`), not in it: the specification never changes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from passuntil.engine import EngineConfig
from passuntil.errors import UserError
from passuntil.series import ModelSpec
from passuntil.tasks.base import Task

SPEC_VERSION = 2


@dataclass(frozen=True)
class TaskRef:
    """One task of a run: where it comes from, and what it was when the run started."""

    source: str  # a registry name, or a task file's absolute path
    name: str | None = None  # the name results are stored under (None: a run of an old version)
    digest: str | None = None  # Task.digest() of the task as run (None: an old run)

    @classmethod
    def of(cls, source: str, task: Task) -> TaskRef:
        return cls(source, task.name, task.digest())

    def load(self, *, limit: int | None = None) -> Task:
        """The task as the run ran it: loaded from its source, cut to the first `limit` instances."""
        from passuntil.tasks import get_task

        task = get_task(self.source)
        if limit is not None:
            task = replace(task, instances=task.instances[:limit])
        return task


@dataclass(frozen=True)
class RunSpec:
    """What a run was started with (see the module docstring)."""

    tasks: tuple[TaskRef, ...]
    series: str
    models: tuple[ModelSpec, ...]
    engine: EngineConfig
    samplers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # model -> fingerprint
    limit: int | None = None  # only the first N instances of each task (a pilot)
    reference_scores: bool = True
    isolation: str | None = None  # how code-execution checks were isolated (None: no such task)
    exact: str = "off"  # "off" | "on" | "auto": exact pass probabilities instead of samples
    design: Mapping[str, Any] | None = None  # `sequential.DesignSettings` of a --design forecast run

    def load_tasks(self) -> list[Task]:
        """The run's tasks, loaded from their recorded sources (in the run's order)."""
        return [ref.load(limit=self.limit) for ref in self.tasks]

    def tasks_by_name(self) -> dict[str, Task]:
        """The run's tasks keyed by the names its results and completions are stored under."""
        return {t.name: t for t in self.load_tasks()}

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    # the one JSON form -------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"spec_version": SPEC_VERSION, "engine": self.engine.to_dict(),
                "tasks": [t.source for t in self.tasks],
                "task_names": {t.source: t.name for t in self.tasks},
                "task_digests": {t.source: t.digest for t in self.tasks},
                "series": self.series, "models": [m.to_dict() for m in self.models],
                "samplers": {k: dict(v) for k, v in self.samplers.items()},
                "limit": self.limit, "reference_scores": self.reference_scores,
                "isolation": self.isolation, "exact": self.exact,
                **({"design": dict(self.design)} if self.design is not None else {})}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping) -> RunSpec:
        """Read a spec, or the configuration dict a run of an older version stored."""
        try:
            names = d.get("task_names", {})
            digests = d.get("task_digests", {})
            tasks = tuple(TaskRef(s, names.get(s), digests.get(s)) for s in d["tasks"])
            models = tuple(ModelSpec(**{**m, "options": dict(m.get("options") or {})})
                           for m in d["models"])
            return cls(tasks, d.get("series", ""), models, EngineConfig.from_dict(d["engine"]),
                       dict(d.get("samplers", {})), d.get("limit"),
                       bool(d.get("reference_scores", True)), d.get("isolation"),
                       str(d.get("exact", "off")), d.get("design"))
        except (KeyError, TypeError, AttributeError) as err:
            raise UserError(f"the stored run configuration is not readable ({err!r})") from None

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_store(cls, store, run_id: str) -> RunSpec:
        return cls.from_dict(store.run_config(run_id))


def task_source(name: str) -> str:
    """What a run records for a task the user named: a file's absolute path, or the name."""
    from passuntil.tasks.files import is_task_file

    if name.startswith("lm_eval:"):  # its @DIR recorded absolute
        from passuntil.tasks.lm_eval import canonical_source

        return canonical_source(name)
    return str(Path(name).resolve()) if is_task_file(name) else name


def run_tasks(store, run_ids: str | Sequence[str]) -> dict[str, Task]:
    """The tasks of one or more runs, keyed by the names their results are stored under; a task
    that changed since its run was made (its recorded fingerprint) is refused, since the run's
    stored completions would be judged against references they were not sampled for."""
    out: dict[str, Task] = {}
    for run_id in [run_ids] if isinstance(run_ids, str) else run_ids:
        spec = RunSpec.from_store(store, run_id)
        for ref in spec.tasks:
            task = ref.load(limit=spec.limit)
            if ref.digest is not None and task.digest() != ref.digest:
                raise UserError(f"task {ref.source!r} has changed since run {run_id!r} was made (its prompts, "
                                "references, stops or check differ); the run's stored completions belong to "
                                "the old task")
            out[task.name] = task
    return out


# notes recorded while a run goes ------------------------------------------------------------------

def add_note(store, run_id: str, *, model: str, stage: str, text: str) -> None:
    """Record something a person reading the run must know (shown by `passuntil show` and the
    report). Notes live in a list beside the spec in the run's stored configuration, appended in
    one statement (atomic under SQLite's write lock); the spec itself never changes."""
    note = {"model": model, "stage": stage, "note": text}
    store.db.execute(
        "UPDATE runs SET config_json = json_set(config_json, '$.notes', json(?)) WHERE run_id = ?",
        (json.dumps([*run_notes(store, run_id), note]), run_id))


def run_notes(store, run_id: str) -> list[dict]:
    """The notes recorded with a run: {"model", "stage", "note"} each."""
    return list(store.run_config(run_id).get("notes", []))


SAMPLER_STAGE = "sampler"


def record_sampler_warnings(store, run_id: str, model: str, warnings: Sequence[str]) -> list[str]:
    """Store what a sampler noticed about itself (a server that ignores temperature, seed, n or
    logprobs), each warning once per model; returns the notes newly added."""
    known = {n["note"] for n in run_notes(store, run_id)
             if n["model"] == model and n["stage"] == SAMPLER_STAGE}
    added = []
    for text in dict.fromkeys(warnings):
        if text not in known:
            add_note(store, run_id, model=model, stage=SAMPLER_STAGE, text=text)
            added.append(f"{model}: {text}")
    return added
