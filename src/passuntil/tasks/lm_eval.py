"""lm-evaluation-harness generation tasks under PassUntil: `--task lm_eval:NAME[#FILTER[:METRIC]][@DIR]`.

    passuntil eval --task lm_eval:gsm8k_local --series tiny --k 1 --max-samples 100
    passuntil eval --task 'lm_eval:gsm8k_local#flexible-extract' ...
    passuntil eval --task lm_eval:my_task@path/to/yaml_dir ...     # like lm_eval --include_path
    passuntil tasks --lm-eval [--include-path DIR]

The task is built by lm_eval itself (`ConfigurableTask` from its YAML), so passuntil sends exactly
lm_eval's prompts: each document's `fewshot_context`, built in document order after
`set_fewshot_seed(1234)` as `lm_eval.evaluator.evaluate` builds them; its `until` stops and
`max_gen_toks` (lm_eval's default 256 where the task names none). A completion passes when the
task's own filter ensemble (the first one, or the one named after `#`) and `process_results` give
the full score (>= 1) on the chosen metric (the task's first, or the one named after `:`); the
completion is first cut at the task's stops by lm_eval's own `postprocess_generated_text`, as its
model backends cut a generation.

Greedy settings in a task (`do_sample: false`, `temperature: 0`) are replaced by the run's sampling
settings (PassUntil samples); the task's description says so. Tasks whose scoring is not a
per-sample pass are refused with one line: other output types (loglikelihood, multiple choice),
`repeats` > 1 (majority vote), corpus-level aggregations, lower-is-better metrics, groups and tags.

The task's fingerprint (`Task.digest`, through the check's `spec`) covers the lm_eval version, the
resolved config (functions by their source) and every document, so `--resume` refuses a changed task.

Where YAMLs are looked up: the `@DIR` folder (recorded absolute in the run), then passuntil's bundled
folder (`gsm8k_local`), then lm_eval's built-in tasks (whose data normally comes from the Hugging Face
hub; it is read offline, from the local cache only). Two passuntil conveniences on top of lm_eval's
YAML rules: a relative `include:` not found next to the YAML is looked up in lm_eval's own tasks folder
(`include: gsm8k/gsm8k.yaml` works wherever lm_eval is installed), and relative
`dataset_kwargs.data_files` are read relative to the YAML's folder, not the working directory.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from passuntil.errors import UserError
from passuntil.tasks.base import Instance, Task

PREFIX = "lm_eval:"
INSTALL = "pip install 'passuntil[lm-eval]'"
FEWSHOT_SEED = 1234  # lm_eval's default `fewshot_random_seed` (lm_eval.defaults.DEFAULT_OTHER_SEED)
DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's models' default where a task names no max_gen_toks
BUNDLED_DIR = Path(__file__).parents[1] / "bundled" / "lm_eval"
GREEDY_KEYS = ("do_sample", "temperature", "top_p", "top_k", "num_beams")


@dataclass(frozen=True)
class LmEvalSpec:
    """A parsed `lm_eval:NAME[#FILTER[:METRIC]][@DIR]`."""

    task: str
    filter: str | None = None
    metric: str | None = None
    include: str | None = None  # a folder of YAMLs (absolute once canonical)

    @classmethod
    def parse(cls, spec: str) -> LmEvalSpec:
        if not spec.startswith(PREFIX):
            raise UserError(f"not an lm_eval task spec: {spec!r} (use lm_eval:NAME)")
        head, at, folder = spec[len(PREFIX):].partition("@")
        name, _, selector = head.partition("#")
        flt, _, metric = selector.partition(":")
        if not name or (at and not folder):
            raise UserError(f"bad lm_eval task spec {spec!r}: use lm_eval:NAME[#FILTER[:METRIC]][@DIR]")
        return cls(name, flt or None, metric or None, folder or None)

    def canonical(self) -> LmEvalSpec:
        """The same spec with its folder absolute (what a run records, so --resume finds it)."""
        if self.include is None:
            return self
        folder = Path(self.include).expanduser().resolve()
        if not folder.is_dir():
            raise UserError(f"lm_eval include folder {self.include!r} is not a folder")
        return replace(self, include=str(folder))

    @property
    def name(self) -> str:
        """The name results are stored under: the spec without its folder."""
        sel = (f"#{self.filter or ''}" + (f":{self.metric}" if self.metric else "")
               if self.filter or self.metric else "")
        return f"{PREFIX}{self.task}{sel}"

    def __str__(self) -> str:
        return self.name + (f"@{self.include}" if self.include else "")


def canonical_source(name: str) -> str:
    """What a run records for `lm_eval:...`: the spec with an absolute `@DIR`."""
    return str(LmEvalSpec.parse(name).canonical())


# loading lm_eval and its tasks ----------------------------------------------------------------------

def lm_eval_module():
    """`lm_eval`, imported on first use, with the Hugging Face hub off (local data and cache only)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401  (the task manager and YAML loader)
    except ImportError:
        raise UserError(f"lm_eval tasks need lm-evaluation-harness: {INSTALL}") from None
    return lm_eval


def lm_eval_version() -> str:
    from importlib.metadata import version

    lm_eval_module()
    return version("lm_eval")


def search_dirs(include: str | None = None) -> list[Path]:
    """The folders of YAMLs searched before lm_eval's built-ins, first match wins."""
    return [*([Path(include)] if include else []), BUNDLED_DIR]


def _builtin_dir() -> Path:
    return Path(lm_eval_module().tasks.__file__).parent


def find_yaml(task: str, include: str | None = None) -> Path:
    """The YAML file that defines `task`: in `include`, the bundled folder, or lm_eval's built-ins."""
    from lm_eval.tasks._index import TaskIndex

    for folder in search_dirs(include):
        entry = TaskIndex.build([folder], resolve_includes=False).get(task)
        if entry is not None:
            return _entry_yaml(entry, task)
    entry = _builtin_index().get(task)
    if entry is None:
        where = ", ".join(str(d) for d in search_dirs(include))
        raise UserError(f"no lm_eval task {task!r} in {where} or lm_eval's built-in tasks "
                        "(`passuntil tasks --lm-eval` lists the local ones)")
    return _entry_yaml(entry, task)


@functools.lru_cache(maxsize=1)
def _builtin_index():
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.build([_builtin_dir()], resolve_includes=False)


def _entry_yaml(entry, task: str) -> Path:
    kind = str(getattr(entry.kind, "name", entry.kind)).lower()
    if kind != "task" or entry.yaml_path is None:
        raise UserError(f"lm_eval {task!r} is a {kind}, not a task: name one of its tasks "
                        "(PassUntil scores one task's samples)")
    return Path(entry.yaml_path)


def load_config(path: Path) -> dict[str, Any]:
    """A task YAML's config with includes merged (lm_eval's rules, plus the two conveniences in
    the module docstring) and `!function` tags resolved."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(path, resolve_func=True, recursive=False)
    includes = cfg.pop("include", None)
    merged: dict[str, Any] = {}
    for inc in [] if includes is None else includes if isinstance(includes, list) else [includes]:
        target = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        if not target.exists() and not Path(inc).is_absolute():
            target = _builtin_dir() / inc
        if not target.exists():
            raise UserError(f"{path}: include {inc!r} found neither next to it nor in lm_eval's tasks")
        sub = load_yaml(target, resolve_func=True, recursive=True)
        sub.pop("task_list", None)
        merged.update(sub)
    merged.update(cfg)
    kwargs = merged.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        merged["dataset_kwargs"] = {**kwargs, "data_files": _resolve_files(kwargs["data_files"], path.parent)}
    return merged


def _flat(files) -> list[str]:
    if isinstance(files, dict):
        return [f for v in files.values() for f in _flat(v)]
    if isinstance(files, list):
        return [f for v in files for f in _flat(v)]
    return [files] if isinstance(files, str) else []


def _resolve_files(files, base: Path):
    if isinstance(files, dict):
        return {k: _resolve_files(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_resolve_files(v, base) for v in files]
    if isinstance(files, str) and "://" not in files and not Path(files).is_absolute():
        return str(base / files)
    return files


_BUILT: dict[str, Any] = {}  # (spec, config, data files' stamps) -> lm_eval task, per process


def build(spec: LmEvalSpec):
    """lm_eval's task object for a canonical spec; cached per process while its resolved config
    and local data files stay the same (an edited YAML is read afresh)."""
    lm_eval_module()
    path = find_yaml(spec.task, spec.include)
    cfg = load_config(path)
    files = (cfg.get("dataset_kwargs") or {}).get("data_files") if isinstance(cfg.get("dataset_kwargs"), dict) else None
    stamps = [(f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in _flat(files) if os.path.isfile(f)]
    key = hashlib.sha256(json.dumps([str(spec), cfg, stamps], sort_keys=True, default=_stable).encode()).hexdigest()
    if key not in _BUILT:
        from lm_eval.tasks import TaskManager

        if "group" in cfg or "task" not in cfg:
            raise UserError(f"lm_eval {spec.task!r} ({path}) is a group: name one of its tasks")
        why = _refusal(cfg)  # before any data is read
        if why:
            raise UserError(f"lm_eval task {spec.task!r} cannot run under PassUntil: {why}")
        try:
            loaded = TaskManager(include_defaults=False).load([cfg])["tasks"]
        except UserError:
            raise
        except Exception as err:  # lm_eval and datasets fail in many ways on a bad YAML or data
            first = (str(err).splitlines() or [""])[0][:300]
            hint = ("; the Hugging Face hub is off here: point the task at local data "
                    "(docs/lm-eval.md)" if "Offline" in first or "Hub" in first else "")
            raise UserError(f"lm_eval could not load task {spec.task!r} from {path}: "
                            f"{type(err).__name__}: {first}{hint}") from None
        _BUILT[key] = next(iter(loaded.values()))
    return _BUILT[key]


# what a task may be under PassUntil --------------------------------------------------------------

@dataclass(frozen=True)
class Scoring:
    """How a completion of an lm_eval task is judged: one filter, one metric, the stops."""

    filter: str
    metric: str
    until: tuple[str, ...]
    max_gen_toks: int
    overridden: tuple[str, ...]  # greedy generation settings the sampler replaces


def scoring(task, spec: LmEvalSpec) -> Scoring:
    """The scoring of `task` under PassUntil, or a one-line UserError saying why there is none."""
    cfg = task.config
    kind = cfg.output_type
    if kind != "generate_until":
        raise UserError(f"lm_eval task {cfg.task!r} is a {kind} task: PassUntil needs generated "
                        "completions to check (generate_until tasks only)")
    if (cfg.repeats or 1) > 1:
        raise UserError(f"lm_eval task {cfg.task!r} scores a vote over repeats={cfg.repeats} "
                        "generations, not one sample: PassUntil cannot count its passes")
    filters = [f.name for f in task._filters]
    chosen = spec.filter or filters[0]
    if chosen not in filters:
        raise UserError(f"lm_eval task {cfg.task!r} has no filter {chosen!r} (filters: {', '.join(filters)})")
    metrics = [m["metric"] for m in cfg.metric_list] if cfg.metric_list else list(task._metric_fn_list)
    metrics = [m if isinstance(m, str) else m.__name__ for m in metrics]
    metric = spec.metric or metrics[0]
    if metric not in metrics:
        raise UserError(f"lm_eval task {cfg.task!r} has no metric {metric!r} (metrics: {', '.join(metrics)})")
    from lm_eval.api.metrics import mean

    agg = task.aggregation().get(metric)
    if agg is not None and agg is not mean:
        raise UserError(f"lm_eval task {cfg.task!r} aggregates {metric!r} over the corpus "
                        f"({getattr(agg, '__name__', agg)}), not per sample: no per-sample pass")
    if task.higher_is_better().get(metric) is False:
        raise UserError(f"lm_eval task {cfg.task!r}: lower {metric!r} is better, so it has no full score to pass")
    gen = dict(cfg.generation_kwargs or {})
    until = gen.get("until") or []
    until = (until,) if isinstance(until, str) else tuple(until)
    max_toks = next((int(gen[k]) for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                     if gen.get(k) is not None), DEFAULT_MAX_GEN_TOKS)
    return Scoring(chosen, metric, until, max_toks, tuple(k for k in GREEDY_KEYS if k in gen))


def fingerprint(task) -> str:
    """A hash of the lm_eval version, the task's resolved config and its documents."""
    cfg = task.dump_config()
    cfg.get("metadata", {}).pop("config_source", None)  # where the YAML lay, not what it says
    kwargs = cfg.get("dataset_kwargs") or {}
    kwargs.pop("data_files", None)  # paths: the documents themselves are hashed below
    h = hashlib.sha256(lm_eval_version().encode() + b"\0")
    h.update(json.dumps(cfg, sort_keys=True, default=_stable).encode() + b"\0")
    for doc in task.eval_docs:
        h.update(json.dumps(doc, sort_keys=True, default=_stable).encode() + b"\1")
    return h.hexdigest()[:16]


def _stable(value) -> str:
    if callable(value):
        try:
            return inspect.getsource(value)
        except (OSError, TypeError):
            return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(type(value)))}"
    return repr(value) if not hasattr(value, "__dict__") else type(value).__qualname__


_CHECKED: dict[tuple[str, str], Any] = {}  # (spec, fingerprint) -> the lm_eval task it checks with

# the check --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LmEvalCheck:
    """Pass = lm_eval's own filter + `process_results` give the full score on the chosen metric.

    Holds only strings, so it pickles into check workers and Ray actors; a process that has not
    built the lm_eval task yet builds it from `source` once and verifies its fingerprint."""

    source: str  # the canonical spec
    filter: str
    metric: str
    until: tuple[str, ...]
    task_fingerprint: str
    version: str
    overridden: tuple[str, ...] = ()  # the task's greedy settings the run's sampling replaces

    @property
    def spec(self) -> str:
        over = f" sampled (overrides {','.join(self.overridden)})" if self.overridden else " sampled"
        return f"lm_eval[{self.version}]:{self.filter}:{self.metric} config={self.task_fingerprint}{over}"

    def _task(self):
        key = (self.source, self.task_fingerprint)
        if key not in _CHECKED:
            task = build(LmEvalSpec.parse(self.source))
            if getattr(task, "_passuntil_fp", None) is None:
                task._passuntil_fp = fingerprint(task)
            if task._passuntil_fp != self.task_fingerprint:
                raise UserError(f"lm_eval task {self.source!r} changed while the run was going")
            _CHECKED[key] = task
        return _CHECKED[key]

    def scores(self, instance: Instance, texts: Sequence[str]) -> list[float]:
        """The chosen metric of each completion, computed by lm_eval's code path."""
        from lm_eval.api.instance import Instance as Request
        from lm_eval.models.utils import postprocess_generated_text

        task = self._task()
        doc = dict(instance.meta["doc"])
        ensemble = next(f for f in task._filters if f.name == self.filter)
        requests = []
        for text in texts:  # cut at the stops as lm_eval's model backends cut a generation
            text = postprocess_generated_text(text, list(self.until), None)
            req = Request(request_type="generate_until", doc=doc, arguments=(instance.prompt, {}),
                          idx=0, metadata=(task.config.task, instance.meta["doc_id"], 1))
            req.resps.append(text)
            requests.append(req)
        if requests:
            ensemble.apply(requests)
        return [float(task.process_results(doc, [r.filtered_resps[self.filter]])[self.metric])
                for r in requests]

    def check_many(self, instance: Instance, texts: list[str]) -> list[bool]:
        return [s >= 1.0 for s in self.scores(instance, texts)]

    def __call__(self, instance: Instance, text: str) -> bool:
        return self.check_many(instance, [text])[0]


# the passuntil task ---------------------------------------------------------------------------

def make_lm_eval_task(name: str) -> Task:
    """`lm_eval:NAME[#FILTER[:METRIC]][@DIR]` as a passuntil Task (see the module docstring)."""
    spec = LmEvalSpec.parse(name).canonical()
    task = build(spec)
    how = scoring(task, spec)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)  # then every prompt in document order, as lm_eval does
    shots = task.config.num_fewshot or 0
    instances = []
    for doc_id, doc in enumerate(task.eval_docs):
        prompt = task.fewshot_context(doc, num_fewshot=shots, gen_prefix=task.doc_to_prefix(doc))
        target = task.doc_to_target(doc)
        if isinstance(target, int) and task.config.doc_to_choice is not None:
            target = task.doc_to_choice(doc)[target]
        refs = tuple(str(t) for t in target) if isinstance(target, list) else (str(target),)
        instances.append(Instance(str(doc_id), prompt, refs, {"doc": dict(doc), "doc_id": doc_id}))
    if getattr(task, "_passuntil_fp", None) is None:
        task._passuntil_fp = fingerprint(task)
    check = LmEvalCheck(str(spec), how.filter, how.metric, how.until, task._passuntil_fp,
                        lm_eval_version(), how.overridden)
    try:  # a task's own process_results may name its metrics otherwise than its metric_list
        check.scores(instances[0], [""])
    except KeyError:
        raise UserError(f"lm_eval task {task.config.task!r}: its process_results gives no "
                        f"{how.metric!r} (name another metric after '#FILTER:')") from None
    override = (f"; the task's greedy settings ({', '.join(how.overridden)}) are replaced by the "
                "run's sampling settings" if how.overridden else "")
    return Task(spec.name, tuple(instances), check, stop=how.until, max_new_tokens=how.max_gen_toks,
                source=str(find_yaml(spec.task, spec.include)),
                description=(f"lm_eval {lm_eval_version()} task {task.config.task!r}, "
                             f"{shots}-shot (seed {FEWSHOT_SEED}); pass = filter {how.filter!r} "
                             f"scores {how.metric!r} = 1{override}"),
                answer_prefix=task.config.target_delimiter or "")


def list_lm_eval_tasks(include: Sequence[str] = ()) -> list[dict]:
    """The tasks in the bundled folder and `include` folders: name, output type, whether PassUntil
    can run it (and why not), and its YAML."""
    from lm_eval.tasks._index import TaskIndex

    lm_eval_module()
    rows = []
    folders = [Path(LmEvalSpec("x", include=d).canonical().include) for d in include]
    for folder in [*folders, BUNDLED_DIR]:
        for task, entry in sorted(TaskIndex.build([folder], resolve_includes=False).items()):
            kind = str(getattr(entry.kind, "name", entry.kind)).lower()
            if kind != "task":
                continue
            try:
                cfg = load_config(Path(entry.yaml_path))
                why = _refusal(cfg)
            except UserError as err:
                cfg, why = {}, str(err)
            rows.append({"task": f"{PREFIX}{task}" + (f"@{folder}" if folder != BUNDLED_DIR else ""),
                         "output_type": cfg.get("output_type", "generate_until" if cfg else "?"),
                         "runs": why is None,
                         "why_not": why or "", "yaml": str(entry.yaml_path)})
    return rows


def _refusal(cfg: dict) -> str | None:
    """Why a config cannot run under PassUntil, judged from the config alone (None: it can)."""
    kind = cfg.get("output_type", "generate_until")  # lm_eval's default
    if kind != "generate_until":
        return f"a {kind} task: PassUntil needs generated completions (generate_until tasks only)"
    if (cfg.get("repeats") or 1) > 1:
        return f"its score is a vote over repeats={cfg['repeats']} generations, not a per-sample pass"
    return None


def print_lm_eval_tasks(include: Sequence[str], console) -> None:
    """`passuntil tasks --lm-eval`: a table of the local lm_eval tasks and whether each can run."""
    from rich.table import Table

    table = Table(title="lm_eval tasks (bundled and --include-path; lm_eval's built-ins: `lm_eval ls tasks`)")
    for col in ("task", "output type", "PassUntil", "yaml"):
        table.add_column(col)
    for r in list_lm_eval_tasks(include):
        table.add_row(r["task"], r["output_type"], "runs" if r["runs"] else f"refused: {r['why_not']}",
                      r["yaml"])
    console.print(table)
