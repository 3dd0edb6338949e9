"""Wiring for `passuntil eval`: what the user asked -> a checked `RunSpec` -> a runner -> the store.

`build_spec` checks everything a run is made of (engine settings, the series and each backend's
options, the tasks, the sampler fingerprints) before anything is written, so a run that fails
to start never blocks a rerun under the same name. `prepare_run` records a new run, or reads a
recorded one for `--resume` and refuses to continue it on other settings, changed tasks or a
different sampler. `start_eval` is the one call behind the command; the runners
(`passuntil.runner.LocalRunner`, `passuntil.distributed.RayRunner`) do the sampling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from passuntil.backends import registry
from passuntil.distributed import RayRunner
from passuntil.engine import EngineConfig, InstanceResult, Progress
from passuntil.errors import UserError
from passuntil.runner import LocalRunner, RunOutcome, stored_outcome
from passuntil.runspec import RunSpec, TaskRef, add_note, task_source
from passuntil.series import ModelSpec, builtin_series, load_series
from passuntil.store import Store
from passuntil.tables import estimates_table, summary_table  # noqa: F401 - their former home
from passuntil.tasks.base import Task


def default_series(tasks: Sequence[str]) -> str:
    """The simulated series for the simulated tasks, the bundled series for everything else."""
    return "sim" if all(t.startswith("sim-") for t in tasks) else "tiny"


def sampler_fingerprints(models: Sequence[ModelSpec]) -> dict[str, dict]:
    return {m.name: registry.get_backend(m.backend).sampler_fingerprint(m) for m in models}


def isolation_mode(tasks: Sequence[Task]) -> str | None:
    """How code-execution checks will be isolated, where a task executes code (else None)."""
    if not any(getattr(t.check, "spec", "") == "unit_tests" for t in tasks):
        return None
    from passuntil.execution import isolation_mode as mode

    return mode()  # refuses (UserError) where only unsafe execution is possible and not opted in


def check_exact(exact: str, chosen: Sequence[ModelSpec], loaded: Sequence[Task], cfg: EngineConfig) -> None:
    """Refuse `--exact` (on) where some task or backend cannot be computed exactly, by one line
    naming the first reason; `--exact=auto` samples those with PassUntil instead."""
    from passuntil.reference import EXACT_MODES, exact_refusal

    if exact not in EXACT_MODES:
        raise UserError(f"exact must be one of {', '.join(EXACT_MODES)} (got {exact!r})")
    if exact != "on":
        return
    for m in chosen:
        for task in loaded:
            why = exact_refusal(task, m.backend, cfg)
            if why:
                raise UserError(f"--exact: {why}; use --exact=auto to sample it with PassUntil instead")


def build_spec(*, series: str | None, models: Sequence[str], tasks: Sequence[str],
               engine: Mapping, limit: int | None = None, reference_scores: bool = True,
               exact: str = "off", design: Mapping | None = None) -> RunSpec:
    """A new run's specification, every part checked; nothing is written. `design`: the
    options of `--design` (`sequential.DESIGN_OPTIONS`, and "design": "forecast" for a
    sequential design run; None or "passuntil": PassUntil's K-stop)."""
    from passuntil.sequential import check_design_options

    if not tasks:
        raise UserError("name at least one task (--task NAME); `passuntil tasks` lists them")
    design = dict(design or {})
    check_design_options(design.get("design"), design, engine, exact)
    cfg = EngineConfig(**{k: v for k, v in engine.items() if v is not None})
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"--limit must be >= 1 (got {limit!r})")
    series = series or default_series(tasks)
    chosen = load_series(series).select(models)
    settings = None
    if design.get("design") == "forecast":
        chosen, settings, cfg = _design_part(series, models, chosen, design, engine)
    series = _series_source(series)
    refs, loaded = [], []
    for name in tasks:
        ref = TaskRef(task_source(name))
        task = ref.load(limit=limit)
        refs.append(TaskRef.of(ref.source, task))
        loaded.append(task)
    names = [t.name for t in loaded]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:
        raise UserError(f"two of the tasks are named {clash!r}: a run stores results by task name")
    check_exact(exact, chosen, loaded, cfg)
    return RunSpec(tuple(refs), series, tuple(chosen), cfg, sampler_fingerprints(chosen), limit,
                   reference_scores, isolation_mode(loaded), exact,
                   design=None if settings is None else settings.to_dict())


def _series_source(series: str) -> str:
    """What a run records for the series the user named: a built-in name, or a file's absolute path."""
    return series if builtin_series(series) is not None else str(Path(series).resolve())


def _design_part(series: str, models: Sequence[str], chosen: Sequence[ModelSpec], design: Mapping,
                 engine: Mapping):
    """For `--design forecast`: the models to sample (without a target model), the checked
    `DesignSettings` and the engine settings (no K-stop: K = the per-cell cap)."""
    from passuntil.sequential import design_engine, resolve_settings

    target = design.get("target_model")
    if target is not None and models and target in models:
        raise UserError(f"--target-model {target!r} is the forecast's target and is not sampled: "
                        "leave it out of --model")
    sampled = tuple(m for m in chosen if m.name != target)
    settings = resolve_settings(design, series_models=load_series(series).models, sampled=sampled)
    return sampled, settings, EngineConfig(**design_engine(engine, settings))


def prepare_run(store: Store, run_id: str, *, resume: bool, series: str | None = None,
                models: Sequence[str] = (), tasks: Sequence[str] = (),
                engine_overrides: Mapping | None = None, limit: int | None = None,
                reference_scores: bool = True, spec: RunSpec | None = None,
                exact: str = "off", design: Mapping | None = None) -> RunSpec:
    """The run's specification: read from the store and checked when resuming, else built
    (or `spec` as given) and recorded."""
    engine_overrides = dict(engine_overrides or {})
    if resume:
        spec = _resumable(store, run_id, series=series, models=models, tasks=tasks,
                          engine=engine_overrides, limit=limit, reference_scores=reference_scores,
                          exact=exact)
        _check_design_unchanged(run_id, spec, design)
        return spec
    spec = spec or build_spec(series=series, models=models, tasks=tasks, engine=engine_overrides,
                              limit=limit, reference_scores=reference_scores, exact=exact, design=design)
    if store.run_exists(run_id):
        if not _is_empty(store, run_id):
            raise UserError(f"run {run_id!r} already exists in {store.path}; pass --resume to "
                            "continue it or --run NAME for a new one")
        store.delete_run(run_id)  # recorded, but it never sampled: it must not block a rerun
    store.create_run(run_id, spec.to_dict(), [m.to_dict() for m in spec.models])
    _note_exact(store, run_id, spec)
    _note_design(store, run_id, spec)
    return spec


def _note_design(store: Store, run_id: str, spec: RunSpec) -> None:
    """Record a design run's settings as a note (`passuntil show`), and where its target is not
    beyond the sampled sizes (then the forecast interpolates)."""
    from passuntil.sequential import DesignSettings

    if spec.design is None:
        return
    settings = DesignSettings.from_dict(spec.design)
    smallest, largest = min(m.n_params for m in spec.models), max(m.n_params for m in spec.models)
    where = "" if settings.target_n > largest else (
        f" (the target is below the smallest sampled size {smallest:.3g}: an extrapolation downward, where "
        "the law is least tested)" if settings.target_n < smallest else
        f" (the target is not beyond the largest sampled size {largest:.3g}: an interpolation, not a forecast)")
    add_note(store, run_id, model="*", stage="design", text=settings.describe() + where)


def _check_design_unchanged(run_id: str, spec: RunSpec, design: Mapping | None) -> None:
    """`--resume` continues a design run as it was started: refuse other design options."""
    from passuntil.sequential import DESIGN_OPTIONS

    design = dict(design or {})
    kind = "forecast" if spec.design is not None else "passuntil"
    asked = design.get("design") or ("forecast" if any(design.get(k) is not None for k in DESIGN_OPTIONS)
                                     else kind)
    if asked != kind:
        raise UserError(f"run {run_id!r} was made with --design {kind}, not {asked}; "
                        "--resume continues a run exactly as it was started")
    stored = dict(spec.design or {})
    stored["target_width"], stored["round_size"] = stored.get("halfwidth"), stored.get("first_round")
    stored["width_stop_after"] = stored.get("width_stop_after") or None
    for key in DESIGN_OPTIONS:
        if design.get(key) is not None and design[key] != stored.get(key):
            raise UserError(f"run {run_id!r} was made with --{key.replace('_', '-')} {stored.get(key)!r}, not "
                            f"{design[key]!r}; --resume continues a run exactly as it was started")


def _note_exact(store: Store, run_id: str, spec: RunSpec) -> None:
    """Record, per model computed exactly, what its exact probabilities are (docs/statistics.md)."""
    from passuntil.reference import EXACT_BACKENDS, exact_tasks, fallback_notes

    tasks = spec.load_tasks() if spec.exact != "off" else []
    by_model = {m.name: [t.name for t in exact_tasks(spec, m.backend, tasks)] for m in spec.models}
    for names in dict.fromkeys(tuple(v) for v in by_model.values() if v):
        models = [m.name for m in spec.models if tuple(by_model[m.name]) == names]
        kinds = sorted({EXACT_BACKENDS[spec.model(m).backend] for m in models})
        add_note(store, run_id, model=", ".join(models), stage="exact", text=(
            f"exact pass probabilities for {', '.join(names)}, no samples ({'; '.join(kinds)}): "
            "the probability that one sample is exactly a reference, a lower bound where the "
            "check also accepts a reference with other surrounding whitespace"))
    for model, text in fallback_notes(spec, tasks):
        add_note(store, run_id, model=model, stage="exact", text=text)


resolve_config = prepare_run  # the name of earlier versions


def _resumable(store: Store, run_id: str, *, series, models, tasks, engine, limit,
               reference_scores, exact="off") -> RunSpec:
    spec = RunSpec.from_store(store, run_id)
    stored = spec.engine.to_dict()
    clash = {k: v for k, v in engine.items() if v is not None and stored.get(k) != v}
    if limit is not None and limit != spec.limit:
        clash["limit"] = limit
    if not reference_scores and spec.reference_scores:
        clash["reference_scores"] = False
    if exact != "off" and exact != spec.exact:
        clash["exact"] = exact
    if clash:
        k, v = next(iter(clash.items()))
        was = stored.get(k, getattr(spec, k, None))
        raise UserError(f"run {run_id!r} was made with {k}={was!r}, not {v!r}; "
                        "--resume continues a run exactly as it was started")
    if series is not None and _series_source(series) != spec.series:
        raise UserError(f"run {run_id!r} was made with series {spec.series!r}, not {series!r}; "
                        "--resume continues a run exactly as it was started")
    sources = [t.source for t in spec.tasks]
    names = [m.name for m in spec.models]
    if (tasks and [task_source(t) for t in tasks] != sources) or (models and list(models) != names):
        raise UserError(f"run {run_id!r} covers tasks {sources} and models {names}; --resume "
                        "continues it as it was started (use --run NAME for other tasks or models)")
    _check_tasks_unchanged(store, run_id, spec)
    _check_samplers_unchanged(run_id, spec)
    if spec.isolation is not None:
        now = isolation_mode(spec.load_tasks())
        if now != spec.isolation:  # checks continue under another isolation: say so in the run
            add_note(store, run_id, model="*", stage="isolation",
                     text=f"resumed with code checks isolated by {now} (started with {spec.isolation})")
    return spec


def _check_tasks_unchanged(store: Store, run_id: str, spec: RunSpec) -> None:
    """Refuse to resume a run whose tasks changed since it started: by the fingerprints it
    stored, or, for runs made before fingerprints, by stored instance ids the task no longer has."""
    stored_ids = store.instance_ids(run_id)
    for ref in spec.tasks:
        task = ref.load(limit=spec.limit)
        if ref.digest is not None:
            changed = task.digest() != ref.digest
        else:
            changed = not stored_ids.get(task.name, set()) <= {x.id for x in task.instances}
        if changed:
            raise UserError(f"task {ref.source!r} has changed since run {run_id!r} was started (its "
                            "prompts, references, stops or check differ); its stored results belong "
                            "to the old task: start a new run with --run NAME")


def _check_samplers_unchanged(run_id: str, spec: RunSpec) -> None:
    """Refuse to resume on a sampler that may draw other samples for the same seeds."""
    now = sampler_fingerprints([m for m in spec.models if m.name in spec.samplers])
    for model, fp in now.items():
        diff = registry.fingerprint_mismatch(spec.samplers[model], fp)
        if diff:
            raise UserError(f"run {run_id!r} sampled model {model!r} with another sampler ({diff}); "
                            "resuming would mix samples of two samplers: start a new run with --run NAME")


def _is_empty(store: Store, run_id: str) -> bool:
    return not store.instance_ids(run_id) and not any(
        store.has_reference_scores(run_id, m["name"]) for m in store.models(run_id))


def _as_spec(spec: RunSpec | dict) -> RunSpec:
    return spec if isinstance(spec, RunSpec) else RunSpec.from_dict(spec)


def run_eval(store: Store, run_id: str, spec: RunSpec | dict, *, progress: Progress | None = None
             ) -> list[InstanceResult]:
    """Run (or continue) every model of the run over every task in this process."""
    return list(LocalRunner().run(store, run_id, _as_spec(spec), progress=progress).results)


def total_instances(spec: RunSpec | dict) -> int:
    spec = _as_spec(spec)
    return len(spec.models) * sum(len(t.instances) for t in spec.load_tasks())


def run_with_progress(store: Store, run_id: str, spec: RunSpec | dict, *, console=None,
                      ray: str | None = None, ray_workers: int | None = None) -> RunOutcome:
    """The run on the local runner (or, with `ray` = an address or "local", on Ray) with a
    progress bar (a log line every 30 s when the output is not a terminal)."""
    from passuntil.progress import RichProgress

    spec = _as_spec(spec)
    if spec.design is not None:
        return _run_design(store, run_id, spec, console=console, ray=ray, ray_workers=ray_workers)
    runner = RayRunner(ray, ray_workers) if ray else LocalRunner()
    with RichProgress(total_instances(spec), max_samples=spec.engine.max_samples,
                      console=console) as progress:
        return runner.run(store, run_id, spec, progress=progress)


def _run_design(store: Store, run_id: str, spec: RunSpec, *, console=None, ray: str | None = None,
                ray_workers: int | None = None) -> RunOutcome:
    """A `--design forecast` run (its cells sampled here, or on Ray), with samples spent of the
    budget as progress."""
    from passuntil.design_runner import DesignProgress, DesignRunner

    budget = spec.design.get("total_budget")
    spent = sum(c.samples for m in spec.models for c in store.counts(run_id, m.name).values())
    with DesignProgress(budget and budget * len(spec.tasks), spent=spent, console=console) as progress:
        return DesignRunner(ray, ray_workers).run(store, run_id, spec, progress=progress)


def start_eval(store_path: str, run_id: str, *, resume: bool, series: str | None,
               models: Sequence[str], tasks: Sequence[str], engine: Mapping,
               limit: int | None = None, reference_scores: bool = True,
               ray: str | None = None, ray_workers: int | None = None, console=None,
               exact: str = "off", design: Mapping | None = None) -> RunOutcome:
    """`passuntil eval`: check the request, record (or reopen) the run, run it to the end."""
    if ray_workers is not None and ray_workers < 1:
        raise UserError(f"--ray-workers must be >= 1 (got {ray_workers})")
    spec = None if resume else build_spec(series=series, models=models, tasks=tasks,
                                          engine=engine, limit=limit,
                                          reference_scores=reference_scores, exact=exact,
                                          design=design)
    if not resume:
        Path(store_path).parent.mkdir(parents=True, exist_ok=True)
    store = Store(store_path, create=not resume)
    spec = prepare_run(store, run_id, resume=resume, series=series, models=models, tasks=tasks,
                       engine_overrides=engine, limit=limit, reference_scores=reference_scores,
                       spec=spec, exact=exact, design=design)
    return run_with_progress(store, run_id, spec, console=console, ray=ray, ray_workers=ray_workers)


def stored_results(store: Store, run_id: str, spec: RunSpec | dict) -> list[InstanceResult]:
    """The run's per-instance results as the store holds them now."""
    return list(stored_outcome(store, run_id, _as_spec(spec)).results)
