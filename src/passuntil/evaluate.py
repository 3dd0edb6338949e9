"""Wiring for `passuntil eval`: tasks x models -> PassUntil engine -> run store.

A run is named; its resolved configuration (engine settings, tasks, series) is written to the
store when it starts, and `resume=True` continues it from the store alone, so an interrupted
run picks up where its last committed round ended and produces exactly the counts an
uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np

from passuntil import stats
from passuntil.engine import EngineConfig, InstanceResult, Progress, new_states, run_passuntil
from passuntil.errors import UserError
from passuntil.series import ModelSpec, load_series, open_sampler
from passuntil.store import Store
from passuntil.tasks import get_task
from passuntil.tasks.files import is_task_file


def resolve_config(
    store: Store,
    run_id: str,
    *,
    resume: bool,
    series: str | None,
    models: Sequence[str],
    tasks: Sequence[str],
    engine_overrides: dict,
) -> dict:
    """The run's full configuration: from the store when resuming, else from the arguments."""
    if resume:
        config = store.run_config(run_id)
        given = {k: v for k, v in engine_overrides.items() if v is not None}
        clash = {k: v for k, v in given.items() if config["engine"].get(k) != v}
        if clash:
            k, v = next(iter(clash.items()))
            raise UserError(f"run {run_id!r} was made with {k}={config['engine'][k]!r}, not {v!r}; "
                            "--resume continues a run exactly as it was started")
        stored_models = [m["name"] for m in config["models"]]
        if (tasks and list(tasks) != config["tasks"]) or (models and list(models) != stored_models):
            raise UserError(f"run {run_id!r} covers tasks {config['tasks']} and models {stored_models}; "
                            "--resume continues it as it was started (use --run NAME for other tasks or models)")
        _check_tasks_unchanged(store, run_id, config)
        return config
    if store.run_exists(run_id):
        raise UserError(f"run {run_id!r} already exists in {store.path}; pass --resume to continue it "
                        "or --run NAME for a new one")
    if not tasks:
        raise UserError("name at least one task (--task NAME); `passuntil tasks` lists them")
    cfg = EngineConfig(**{k: v for k, v in engine_overrides.items() if v is not None})
    series = series or default_series(tasks)
    chosen = load_series(series).select(models)
    tasks = [str(Path(t).resolve()) if is_task_file(t) else t for t in tasks]
    digests = {name: get_task(name).digest() for name in tasks}
    config = {"engine": cfg.to_dict(), "tasks": tasks, "series": series,
              "models": [m.to_dict() for m in chosen], "task_digests": digests}
    store.create_run(run_id, config, config["models"])
    return config


def _check_tasks_unchanged(store: Store, run_id: str, config: dict) -> None:
    """Refuse to resume a run whose tasks changed since it started: by the fingerprints it
    stored, or, for runs made before fingerprints, by stored instance ids the task no longer has."""
    stored_ids = None if "task_digests" in config else store.instance_ids(run_id)
    for name in config["tasks"]:
        task = get_task(name)
        if stored_ids is None:
            changed = task.digest() != config["task_digests"].get(name)
        else:
            changed = not stored_ids.get(task.name, set()) <= {x.id for x in task.instances}
        if changed:
            raise UserError(f"task {name!r} has changed since run {run_id!r} was started (its prompts, "
                            "references, stops or check differ); its stored results belong to the old "
                            "task: start a new run with --run NAME")


def default_series(tasks: Sequence[str]) -> str:
    """The simulated series for the simulated tasks, the bundled series for everything else."""
    return "sim" if all(t.startswith("sim-") for t in tasks) else "tiny"


def run_eval(store: Store, run_id: str, config: dict, *, progress: Progress | None = None
             ) -> list[InstanceResult]:
    """Run (or continue) every model of the run over every task, committing each round."""
    cfg = EngineConfig(**{f.name: config["engine"][f.name] for f in fields(EngineConfig)
                          if f.name in config["engine"]})
    tasks = [get_task(name) for name in config["tasks"]]
    specs = [ModelSpec(**m) for m in config["models"]]
    results: list[InstanceResult] = []
    for spec in specs:
        if hasattr(progress, "set_model"):
            progress.set_model(spec.name)
        states = new_states(tasks, model=spec.name, seed=cfg.seed)
        store.load_states(run_id, spec.name, states)
        if all(st.stopped for st in states) and store.has_reference_scores(run_id, spec.name):
            results.extend(st.result(spec.name) for st in states)
            continue
        sampler = open_sampler(spec, tasks)
        results.extend(run_passuntil(
            sampler, tasks, cfg, model=spec.name, states=states, progress=progress,
            commit=lambda updates, name=spec.name: store.commit_round(run_id, name, updates)))
        if not store.has_reference_scores(run_id, spec.name):
            store.save_reference_scores(run_id, spec.name, reference_scores(sampler, tasks, cfg))
    return results


def run_with_progress(store: Store, run_id: str, config: dict, *, console=None,
                      ray: str | None = None, ray_workers: int | None = None
                      ) -> tuple[list[InstanceResult], int]:
    """`run_eval` (or, with `ray` = an address or "local", `run_eval_ray`) with a progress bar
    (ETA) over every model x instance of the run; returns the results and the number of samples
    drawn in this call."""
    from passuntil.progress import RichProgress

    with RichProgress(total_instances(config), console=console) as progress:
        if ray:
            from passuntil.distributed import run_eval_ray

            run_eval_ray(store, run_id, config, address=ray, workers=ray_workers,
                         progress=progress)
            results = stored_results(store, run_id, config)
        else:
            results = run_eval(store, run_id, config, progress=progress)
    return results, progress.samples


def stored_results(store: Store, run_id: str, config: dict) -> list[InstanceResult]:
    """The run's per-instance results as the store holds them now."""
    tasks = [get_task(name) for name in config["tasks"]]
    seed = config["engine"].get("seed", 0)
    out = []
    for m in config["models"]:
        states = new_states(tasks, model=m["name"], seed=seed)
        store.load_states(run_id, m["name"], states)
        out += [st.result(m["name"]) for st in states]
    return out


def reference_scores(sampler, tasks, cfg: EngineConfig) -> list[tuple]:
    """Per instance: the reference answer's teacher-forced log-prob and token count (the paper's
    test loss), and, where the backend computes it and the check is exact match, the exact
    probability that one sample is exactly a reference."""
    from passuntil.backends.base import SamplingParams
    from passuntil.tasks.checks import Exact

    rows = []
    for task in tasks:
        prompts = [task.prompt(x) for x in task.instances]
        scores = sampler.score(prompts, [task.answer_prefix + x.references[0] for x in task.instances])
        exact_fn = getattr(sampler, "exact_pass_probability", None)
        for inst, prompt, sc in zip(task.instances, prompts, scores):
            exact = None
            if exact_fn is not None and isinstance(task.check, Exact):
                exact = exact_fn(prompt, inst.references, SamplingParams(
                    temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    max_tokens=cfg.max_tokens or task.max_new_tokens, stop=task.stop))
            rows.append((task.name, inst.id, sc.logprob, len(sc.token_logprobs), exact))
    return rows


def total_instances(config: dict) -> int:
    return len(config["models"]) * sum(len(get_task(t).instances) for t in config["tasks"])


def estimates_table(store: Store, run_id: str, *, confidence: float = 0.95):
    """The tidy table of a run with PU, unbiased PU and exact interval per row."""
    df = store.results(run_id)
    k = store.run_config(run_id)["engine"]["k_target"]
    df = df[df["samples"] > 0].copy()
    if df.empty:
        return df
    df["pu"] = stats.pu_mle(df["passes"], df["samples"])
    df["pu_unbiased"] = stats.pu_unbiased(df["passes"], df["samples"], k_target=k)
    low, high = stats.interval(df["passes"].to_numpy(), df["samples"].to_numpy(), k_target=k,
                               confidence=confidence)
    df["ci_low"], df["ci_high"] = low, high
    df["done"] = df["stopped"].notna()
    return df


def summary_table(df, *, n_boot: int = 1000, seed: int = 0):
    """Per model x task: mean PU over instances with its bootstrap SE, and non-zero count."""
    import pandas as pd

    rows = []
    for (model, n_params, task), g in df.groupby(["model", "n_params", "task"], sort=False):
        boot = stats.bootstrap_mean(g["pu"].to_numpy(), n_boot=n_boot, seed=seed)
        rows.append({"model": model, "n_params": n_params, "task": task, "instances": len(g),
                     "nonzero": int(np.sum(g["passes"] > 0)), "mean_pu": boot.mean, "se": boot.se,
                     "samples": int(g["samples"].sum()), "done": int(g["done"].sum())})
    return pd.DataFrame(rows)
