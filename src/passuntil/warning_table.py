"""The report's "warning before the target: PassUntil vs exact" table, from a run store.

Per task an exact-mode run (`passuntil eval --exact`) computed exactly: did the
accelerated-emergence warning fire before the target model was seen, from PassUntil's counts of
the smaller sizes (a sampled run; its forecast of the target, or a pre-registered file's) and
from the exact probabilities of the same sizes? `choose_comparison` picks the two runs and the
target for `passuntil report` (each can be named: `--exact-run`, `--sampled-run`,
`--target-model`; unnamed, the store's one exact-mode run, the first PassUntil run holding its
tasks over the same instances, and the exact run's largest model), `warning_comparison` makes
the rows, `report.warning_rows` formats them.
"""

from __future__ import annotations

from dataclasses import dataclass

from passuntil.analysis import (
    RunTable,
    exact_data,
    fired,
    forecast_run,
    open_run,
    open_runs,
    task_counts,
)
from passuntil.errors import UserError

ACCELERATION = "accelerated-emergence"


def _sampled_warnings(run: RunTable, task, target_model, target_n, record) -> tuple[str, list[str]]:
    """(class, warning codes) of PassUntil's forecast of the target from a sampled run: the
    given record (e.g. the demo's pre-registered one), else made now from the run's other sizes."""
    if record is None:
        _, df = task_counts(run, task)
        held = target_model if target_model in set(df["model"]) else None
        try:
            record = forecast_run(run, task=task, target_model=held, target_n=None if held else target_n,
                                  method="likelihood", level=0.9)
        except UserError as err:
            if "all-zero" not in str(err):
                raise
            return "undetermined", ["all-zero"]
    return record.emergence, fired(record.warnings)


def warning_comparison(store_path: str, *, sampled_run: str, exact_run: str, target_model: str,
                       tasks=None, sampled=None) -> list[dict]:
    """Per task computed exactly in `exact_run`: did a warning of accelerated emergence fire
    before `target_model` was seen, from PassUntil's counts (`sampled_run`, or the records in
    `sampled`: task -> ForecastRecord) and from the exact probabilities of the smaller sizes?
    With each side's class and warning codes, the exact forecast and the target's exact p."""
    exact, pu_run = RunTable.read(store_path, exact_run), None  # the sampled run: read when needed
    store, _ = open_run(store_path, sampled_run)
    budget = store.run_config(sampled_run)["engine"]["max_samples"]
    sampled = sampled or {}
    rows = []
    for task in tasks or sorted(set(exact.df["task"]) if not exact.df.empty else ()):
        whole = exact_data(exact, task)
        if whole is None or target_model not in whole[1]:
            continue
        n, names, _, p, _ = whole
        record = forecast_run(exact, task=task, target_model=target_model, target_n=None, method="likelihood",
                              level=0.9)
        if task not in sampled and pu_run is None:
            pu_run = RunTable.read(store_path, sampled_run)
        pu_class, pu_codes = _sampled_warnings(pu_run, task, target_model, record.target_n, sampled.get(task))
        codes = fired(record.warnings)
        rows.append({"task": task, "target": target_model, "budget": int(budget),
                     "PassUntil class": pu_class, "PassUntil warnings": ", ".join(pu_codes) or "none",
                     "PassUntil warned": ACCELERATION in pu_codes,
                     "exact class": record.emergence, "exact curvature z": record.curvature_z,
                     "exact warnings": ", ".join(codes) or "none", "exact warned": ACCELERATION in codes,
                     "exact forecast": record.point, "exact p at target": float(p[:, names.index(target_model)].mean())})
    return rows


@dataclass(frozen=True)
class Comparison:
    """What `passuntil report` compares in its "warning before the target" table: PassUntil's
    counts of `sampled_run` against the exact probabilities of `exact_run`, before `target`."""

    sampled_run: str
    exact_run: str
    target: str
    tasks: tuple[str, ...]
    named: bool = False  # some of it named by the user (then a failure is an error, not a skipped table)


def _mode(store, run_id: str) -> str:
    return str(store.run_config(run_id).get("exact", "off"))


def _sampling(store, run_id: str) -> tuple:
    eng = store.run_config(run_id).get("engine", {})
    return tuple(eng.get(k) for k in ("temperature", "top_p", "top_k", "max_tokens"))


def _is_passuntil(store, run_id: str) -> bool:
    """A run sampled with PassUntil's K-stop: not exact-mode, not a `--design forecast` run (no
    K-stop; its budget is per task, not per instance)."""
    return _mode(store, run_id) == "off" and store.run_config(run_id).get("design") is None


def choose_comparison(store_path: str, run_ids=(), *, exact_run: str | None = None,
                      sampled_run: str | None = None, target_model: str | None = None) -> Comparison | None:
    """The runs, target and tasks of the report's PassUntil-vs-exact table. Unnamed, each is
    chosen: the exact run is the store's one exact-mode run (`eval --exact`; none or several:
    no table), the sampled run the first PassUntil run (`--run`'s, else the store's) holding a
    task the exact run computed exactly over the same instances, the target the exact run's
    largest model. A named run
    or target that does not fit is one UserError line; an unnamed choice that finds nothing
    gives None (no table)."""
    from passuntil.tables import estimates_table

    store, runs = open_runs(store_path, ())
    named = exact_run is not None or sampled_run is not None or target_model is not None
    for r in (exact_run, sampled_run):
        if r is not None and r not in runs:
            raise UserError(f"no run {r!r} in {store_path} (runs: {', '.join(runs)})")
    if exact_run is None:
        exacts = [r for r in runs if _mode(store, r) != "off"]
        if len(exacts) != 1:
            if named:
                raise UserError(f"{store_path} holds {len(exacts)} exact-mode runs "
                                f"({', '.join(exacts) or 'none'}): name one with --exact-run")
            return None
        exact_run = exacts[0]
    elif _mode(store, exact_run) == "off":
        raise UserError(f"run {exact_run!r} is not an exact-mode run (made with `passuntil eval --exact`)")
    exact = RunTable.read(store_path, exact_run)
    exact_tasks = {t: ids for t, ids in _task_instances(exact.df).items()
                   if exact_data(exact, t) is not None}
    if sampled_run is not None and _mode(store, sampled_run) != "off":
        raise UserError(f"run {sampled_run!r} is an exact-mode run: compare a PassUntil run with it")
    if sampled_run is not None and not _is_passuntil(store, sampled_run):
        raise UserError(f"run {sampled_run!r} is a --design forecast run (no K-stop, a budget per task): "
                        "compare a PassUntil run with the exact one")
    sampling = _sampling(store, exact_run)
    if sampled_run is not None and _sampling(store, sampled_run) != sampling:
        raise UserError(f"run {sampled_run!r} sampled with other settings (temperature, top-p, top-k, max tokens) "
                        f"than the exact run {exact_run!r} computed: their pass probabilities differ")
    candidates = [sampled_run] if sampled_run else [r for r in (run_ids or runs) if _is_passuntil(store, r)
                                                    and _sampling(store, r) == sampling]
    pick = next(((r, shared) for r in candidates if (shared := [
        t for t, ids in _task_instances(estimates_table(store, r)).items() if exact_tasks.get(t) == ids])), None)
    if pick is None:
        if named:
            raise UserError(f"no PassUntil run{' ' + repr(sampled_run) if sampled_run else ''} holds a task that "
                            f"run {exact_run!r} computed exactly ({', '.join(exact_tasks) or 'none'}) over the "
                            "same instances")
        return None
    sizes = {m["name"]: float(m["n_params"]) for m in store.models(exact_run)}
    target = target_model or max(sizes, key=sizes.get)
    if target not in sizes:
        raise UserError(f"model {target!r} is not in the exact run {exact_run!r} (models: {', '.join(sizes)})")
    return Comparison(pick[0], exact_run, target, tuple(pick[1]), named)


def _task_instances(df) -> dict[str, frozenset]:
    """task -> the instance ids a run's table (`tables.estimates_table`) holds results for."""
    return {} if df.empty else {t: frozenset(map(str, g["instance_id"])) for t, g in df.groupby("task", sort=False)}


def report_comparison(store_path: str, comparison: Comparison | None, records=()) -> tuple[list[dict], str | None]:
    """(`warning_comparison`'s rows, None) for a chosen `Comparison`; ([], why) where a choice
    nobody named cannot be compared (e.g. too few sizes to fit): the report goes on without it.
    A PassUntil forecast file among `records` for the target (pre-registered) gives that task's
    PassUntil warnings; otherwise they come from a forecast made now from the sampled run."""
    if comparison is None:
        return [], None
    sampled = {r.task: r for r in records if r.target_model == comparison.target and r.data.exact_p is None}
    try:
        return warning_comparison(store_path, sampled_run=comparison.sampled_run, exact_run=comparison.exact_run,
                                  target_model=comparison.target, tasks=comparison.tasks, sampled=sampled), None
    except UserError as err:
        if comparison.named:
            raise
        return [], str(err)

