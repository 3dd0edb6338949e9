"""Reference scores: the test loss of each instance's reference answer, and its exact pass
probability where the backend can compute one. Optional: a run started with
`--no-reference-scores` skips them, and a backend that cannot score (`ScoringUnavailable`, e.g. a
server without echo + logprobs) leaves a note with the run instead of failing it.

The exact mode (`passuntil eval --exact`, `RunSpec.exact`): for a (model, task) that admits it
(`exact_refusal` is None: an `Exact` check, a backend in `EXACT_BACKENDS` and, for a backend
that returns raw log-probs (vLLM, OpenAI-compatible servers), temperature 1 with no top-k or
top-p), the exact pass probability is the run's data and no sample is drawn; these rows are always
computed, and a backend that cannot compute them fails the run with one line.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from passuntil.backends.base import SamplingParams, ScoringUnavailable
from passuntil.engine import EngineConfig
from passuntil.errors import UserError
from passuntil.runspec import RunSpec, add_note, run_notes
from passuntil.tasks.base import Task
from passuntil.tasks.checks import Exact

STAGE = "reference scores"

# backends whose sampler computes P(one sample passes an Exact check) under its own sampling
# distribution -> what the number is (see docs/statistics.md, "Exact pass probabilities")
EXACT_BACKENDS = {"torch": "byte-level tokenizer: every text has one token sequence",
                  "transformers": "each reference and stop in the tokenizer's own encoding only: exact where "
                                  "a text has one token sequence (a byte-level tokenizer), a lower bound with BPE",
                  "simulated": "the simulated truth",
                  "vllm": "vLLM's raw prompt log-probs at temperature 1, top-p 1, no top-k; each reference and "
                          "stop in the tokenizer's own encodings only, ended by the tokenizer's and the "
                          "generation config's end-of-sequence tokens: a lower bound with BPE",
                  "openai": "the server's echo log-probs at temperature 1, top-p 1, no top-k; each reference "
                            "and stop in the server's own tokenization only: a lower bound with BPE, and a "
                            "lower bound where the end-of-text token is not among the server's top log-probs "
                            "(noted with the run)"}
# backends whose log-probs are the model's raw distribution: the sampling distribution only at
# temperature 1 with no truncation (they cannot return a truncated or tempered distribution)
RAW_LOGPROB_BACKENDS = frozenset({"vllm", "openai"})
EXACT_MODES = ("off", "on", "auto")


def exact_refusal(task: Task, backend: str, engine: EngineConfig) -> str | None:
    """Why this task cannot be computed exactly on this backend at the run's sampling settings
    (`engine`: temperature, top-p, top-k); None: it can."""
    if not isinstance(task.check, Exact):
        return (f"task {task.name!r} has a {task.check.spec.split(':')[0]!r} check: only an exact-match "
                "check accepts a finite set of strings whose probabilities can be summed")
    if backend not in EXACT_BACKENDS:
        return (f"the {backend} backend cannot compute exact pass probabilities (only "
                f"{', '.join(sorted(EXACT_BACKENDS))} reproduce the sampling distribution over a reference)")
    if backend in RAW_LOGPROB_BACKENDS:
        return settings_refusal(backend, engine.temperature, engine.top_p, engine.top_k)
    return None


def settings_refusal(backend: str, temperature: float, top_p: float, top_k: int) -> str | None:
    """Why a backend that returns raw log-probs cannot reproduce these sampling settings."""
    off = [f"{name} {value!r}" for name, value, ok in (
        ("temperature", temperature, temperature == 1), ("top-p", top_p, top_p == 1),
        ("top-k", top_k, not top_k)) if not ok]
    if not off:
        return None
    return (f"the {backend} backend returns the model's raw log-probs, which are the sampling "
            f"distribution only at temperature 1, top-p 1 and no top-k (this run: {', '.join(off)})")


def exact_tasks(spec: RunSpec, backend: str, tasks: Sequence[Task]) -> list[Task]:
    """The tasks this run computes exactly for a model on `backend` (none when exact is off)."""
    if spec.exact == "off":
        return []
    return [t for t in tasks if exact_refusal(t, backend, spec.engine) is None]


def fallback_notes(spec: RunSpec, tasks: Sequence[Task]) -> list[tuple[str, str]]:
    """(model, note) for each model that `--exact=auto` samples some tasks of, and why."""
    if spec.exact != "auto":
        return []
    notes = []
    for m in spec.models:
        why = {t.name: exact_refusal(t, m.backend, spec.engine) for t in tasks}
        refused = {name: r for name, r in why.items() if r is not None}
        if refused:
            notes.append((m.name, "--exact=auto sampled with PassUntil instead: " + "; ".join(
                f"{name} ({r})" for name, r in refused.items())))
    return notes


@dataclass(frozen=True)
class ReferenceScores:
    """What scoring one model gave: the rows to store, or why there are none (`exact`: some were
    the run's exact data, so their absence fails the run); `notes`: what the sampler noticed while
    scoring (e.g. an end-of-text probability it could not see: a lower bound)."""

    rows: tuple[tuple, ...] = ()
    unavailable: str | None = None
    exact: bool = False
    notes: tuple[str, ...] = ()


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
    known = len(getattr(sampler, "warnings", ()))
    try:
        rows = tuple(reference_scores(sampler, for_model(spec, model, tasks), spec.engine,
                                      exact_for=exact_for))
    except ScoringUnavailable as err:
        return ReferenceScores(unavailable=str(err), exact=bool(exact_for))
    return ReferenceScores(rows, notes=tuple(getattr(sampler, "warnings", ())[known:]))


def pending(store, run_id: str, spec: RunSpec, model: str) -> bool:
    """Whether this model still owes the run its reference scores."""
    if store.has_reference_scores(run_id, model):
        return False
    if not spec.reference_scores and not exact_tasks(spec, spec.model(model).backend, spec.load_tasks()):
        return False
    return not any(n["model"] == model and n["stage"] == STAGE for n in run_notes(store, run_id))


def record(store, run_id: str, model: str, scores: ReferenceScores) -> str | None:
    """Store the rows (and what the sampler noticed while scoring), or a note saying why there
    are none; returns the notes as one line. Exact data the backend cannot compute is an error
    (`UserError`: one line, exit 2), not a note: the run would hold nothing."""
    if scores.unavailable is not None:
        if scores.exact:
            raise UserError(f"--exact: {scores.unavailable}; sample with PassUntil instead (without --exact)")
        text = f"no reference scores: {scores.unavailable}"
        add_note(store, run_id, model=model, stage=STAGE, text=text)
        return f"{model}: {text}"
    store.save_reference_scores(run_id, model, list(scores.rows))
    for text in scores.notes:
        add_note(store, run_id, model=model, stage="exact", text=text)
    return f"{model}: {'; '.join(scores.notes)}" if scores.notes else None
