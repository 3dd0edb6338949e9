"""Reference scores: the test loss of each instance's reference answer, and its exact pass
probability where the backend can compute one. Optional: a run started with
`--no-reference-scores` skips them, and a backend that cannot score (`ScoringUnavailable`, e.g. a
server without echo + logprobs) leaves a note with the run instead of failing it.

The exact mode (`passuntil eval --exact`, `RunSpec.exact`): for a (model, task) that admits it
(`exact_refusal` is None: an `Exact` check and a backend in `EXACT_BACKENDS`), the exact pass
probability is the run's data and no sample is drawn; these rows are always computed.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from passuntil.backends.base import SamplingParams, ScoringUnavailable
from passuntil.engine import EngineConfig
from passuntil.runspec import RunSpec, add_note, run_notes
from passuntil.tasks.base import Task
from passuntil.tasks.checks import Exact

STAGE = "reference scores"

# backends whose sampler computes P(one sample passes an Exact check) under its own sampling
# distribution -> what the number is (see docs/statistics.md, "Exact pass probabilities")
EXACT_BACKENDS = {"torch": "byte-level tokenizer: every text has one token sequence",
                  "transformers": "each reference and stop in the tokenizer's own encoding only: exact where "
                                  "a text has one token sequence (a byte-level tokenizer), a lower bound with BPE",
                  "simulated": "the simulated truth"}
EXACT_MODES = ("off", "on", "auto")


def exact_refusal(task: Task, backend: str) -> str | None:
    """Why this task cannot be computed exactly on this backend (None: it can)."""
    if not isinstance(task.check, Exact):
        return (f"task {task.name!r} has a {task.check.spec.split(':')[0]!r} check: only an exact-match "
                "check accepts a finite set of strings whose probabilities can be summed")
    if backend not in EXACT_BACKENDS:
        return (f"the {backend} backend cannot compute exact pass probabilities (only "
                f"{', '.join(sorted(EXACT_BACKENDS))} reproduce the sampling distribution over a reference)")
    return None


def exact_tasks(spec: RunSpec, backend: str, tasks: Sequence[Task]) -> list[Task]:
    """The tasks this run computes exactly for a model on `backend` (none when exact is off)."""
    if spec.exact == "off":
        return []
    return [t for t in tasks if exact_refusal(t, backend) is None]


@dataclass(frozen=True)
class ReferenceScores:
    """What scoring one model gave: the rows to store, or why there are none."""

    rows: tuple[tuple, ...] = ()
    unavailable: str | None = None


def reference_scores(sampler, tasks: Sequence[Task], cfg: EngineConfig, *,
                     exact_for: Collection[str] = ()) -> list[tuple]:
    """Per instance: the reference answer's teacher-forced log-prob and token count (the paper's
    test loss), and, for exact-match tasks, the probability that one sample is exactly a
    reference: always for the tasks the run computes exactly (`exact_for`), and beside sampling
    only where the sampler's number is exact (`exact_is_exact`: not a BPE lower bound that
    scoring would take for the truth)."""
    rows = []
    for task in tasks:
        prompts = [task.prompt(x) for x in task.instances]
        scores = sampler.score(prompts, [task.answer_prefix + x.references[0] for x in task.instances])
        exact_fn = getattr(sampler, "exact_pass_probability", None)
        wanted = task.name in exact_for or getattr(sampler, "exact_is_exact", False)
        for inst, prompt, sc in zip(task.instances, prompts, scores):
            exact = None
            if exact_fn is not None and wanted and isinstance(task.check, Exact):
                exact = exact_fn(prompt, inst.references, SamplingParams(
                    temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    max_tokens=cfg.max_tokens or task.max_new_tokens, stop=task.stop))
            rows.append((task.name, inst.id, sc.logprob, len(sc.token_logprobs), exact))
    return rows


def for_model(spec: RunSpec, model: str, tasks: Sequence[Task]) -> list[Task]:
    """The tasks whose reference scores this model owes: all with reference scores on, else
    only the tasks the exact mode computes (their exact probabilities are the run's data)."""
    exact = exact_tasks(spec, spec.model(model).backend, tasks)
    return list(tasks) if spec.reference_scores else exact


def compute(sampler, spec: RunSpec, model: str, tasks: Sequence[Task]) -> ReferenceScores:
    """Score what one model owes the run (`for_model`), turning a backend's `ScoringUnavailable`
    into a reason (it can cross a process boundary, e.g. from a Ray actor, as plain data)."""
    exact_for = {t.name for t in exact_tasks(spec, spec.model(model).backend, tasks)}
    try:
        return ReferenceScores(tuple(reference_scores(sampler, for_model(spec, model, tasks),
                                                      spec.engine, exact_for=exact_for)))
    except ScoringUnavailable as err:
        return ReferenceScores(unavailable=str(err))


def pending(store, run_id: str, spec: RunSpec, model: str) -> bool:
    """Whether this model still owes the run its reference scores."""
    if store.has_reference_scores(run_id, model):
        return False
    if not spec.reference_scores and not exact_tasks(spec, spec.model(model).backend, spec.load_tasks()):
        return False
    return not any(n["model"] == model and n["stage"] == STAGE for n in run_notes(store, run_id))


def record(store, run_id: str, model: str, scores: ReferenceScores) -> str | None:
    """Store the rows, or a note saying why there are none; returns the note."""
    if scores.unavailable is not None:
        text = f"no reference scores: {scores.unavailable}"
        add_note(store, run_id, model=model, stage=STAGE, text=text)
        return f"{model}: {text}"
    store.save_reference_scores(run_id, model, list(scores.rows))
    return None
