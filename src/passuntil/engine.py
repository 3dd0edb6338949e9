"""The PassUntil engine: sample each instance until K passes or the budget is spent.

Each round the engine asks every unfinished instance for a number of samples: a first small
request, then geometric growth while it has no passes (so the overshoot past the K-th pass
stays within a constant factor of what was needed), and about (K - passes) / PU once it has
some. Requests share one batch; when they exceed it, small requests are served whole and
large ones split the rest, so a finished instance frees its share for the others.

Sample j of an instance always uses draw j of the stream `derive_seed(seed, model, task,
instance)`, and counting stops exactly at the K-th pass (samples drawn past it are recorded
as overshoot, not counted). The result of an instance is therefore a function of the seed
alone: batching, pipelining, sharding over workers and resuming after a crash cannot change
it.

`run_quotas` is the engine's other mode, for a sequential design (`passuntil.design_runner`):
each instance is drawn to a given count, every sample counted (no K-stop), with the same
per-sample seeds.

Checks of round r run in a background worker (a thread, or a process pool with
`check_workers > 0`) while round r + 1 is sampled. A completion text is checked once per
instance (verification cache). Each round's results are committed to the store in one
transaction.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace

from passuntil.backends.base import Sampler, SamplingParams
from passuntil.errors import UserError
from passuntil.seeding import derive_seed
from passuntil.tasks.base import Check, Instance, Task


@dataclass(frozen=True)
class EngineConfig:
    """How to run PassUntil. Everything here is recorded with the run."""

    k_target: int = 1
    max_samples: int = 10_000
    batch_size: int = 1024
    first_request: int = 4
    growth: float = 2.0
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = None  # None: the task's max_new_tokens
    completions_cap: int = 64  # distinct completion texts stored per instance
    check_workers: int = 0  # 0: one background thread; N > 0: a pool of N processes

    def __post_init__(self):
        _validate(self)

    @classmethod
    def from_dict(cls, d: dict) -> EngineConfig:
        """The settings a run recorded (keys of older versions that are gone are ignored)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict:
        return asdict(self)


MAX_INT = 2**62
MAX_TOKENS = 1 << 20  # new tokens per sample: far beyond any model's context


def _validate(cfg: EngineConfig) -> None:
    """Every setting checked before a run is recorded: one clear line, never a late crash."""
    for name in ("k_target", "max_samples", "batch_size", "first_request", "seed", "top_k",
                 "completions_cap", "check_workers"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{name} must be an integer (got {value!r})")
        if abs(value) >= MAX_INT:  # counts and seeds are stored as SQLite's 64-bit integers
            raise UserError(f"{name.replace('_', '-')} must be below 2**62 (got {value})")
    if cfg.seed < 0:
        raise UserError(f"seed must be >= 0 (got {cfg.seed})")
    if cfg.max_tokens is not None and (not isinstance(cfg.max_tokens, int)
                                       or not 1 <= cfg.max_tokens <= MAX_TOKENS):
        raise UserError(f"max tokens must be an integer from 1 to {MAX_TOKENS:,} "
                        f"(got {cfg.max_tokens!r})")
    for name in ("temperature", "top_p", "growth"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"{name.replace('_', '-')} must be a finite number (got {value!r})")
    if cfg.k_target < 1:
        raise UserError(f"K must be >= 1 (got {cfg.k_target})")
    if cfg.max_samples < cfg.k_target:
        raise UserError(f"the budget ({cfg.max_samples} samples) must be >= K ({cfg.k_target})")
    if cfg.batch_size < 1 or cfg.first_request < 1:
        raise UserError("batch size and first request must be >= 1")
    if cfg.growth <= 1:
        raise UserError(f"growth must be > 1 (got {cfg.growth})")
    if cfg.temperature < 0:
        raise UserError(f"temperature must be >= 0 (got {cfg.temperature})")
    if not 0 < cfg.top_p <= 1:
        raise UserError(f"top-p must lie in (0, 1] (got {cfg.top_p})")
    if cfg.top_k < 0:
        raise UserError(f"top-k must be >= 0, 0 = off (got {cfg.top_k})")
    if cfg.check_workers < 0 or cfg.completions_cap < 0:
        raise UserError("check workers and completions cap must be >= 0")


@dataclass(frozen=True)
class InstanceResult:
    """Final PassUntil counts for one instance on one model."""

    model: str
    task: str
    instance_id: str
    samples: int
    passes: int
    pass_indices: tuple[int, ...]
    overshoot: int
    stopped: str  # "k_passes", "budget", or "design" (a quota met: `run_quotas`)
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class InstanceState:
    """Mutable per-instance bookkeeping (also what the store saves and restores)."""

    task: str
    instance: Instance
    prompt: str
    seed: int
    samples: int = 0  # counted samples (up to and including the K-th pass)
    passes: int = 0
    pass_indices: list[int] = field(default_factory=list)
    overshoot: int = 0
    stopped: str | None = None
    completions: dict[str, int] = field(default_factory=dict)  # capped distinct texts
    overflow: int = 0  # counted samples whose text fell outside the cap
    verdicts: dict[str, bool] = field(default_factory=dict)  # verification cache
    next_index: int = 0  # samples + in flight
    last_request: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return self.task, self.instance.id

    def result(self, model: str) -> InstanceResult:
        return InstanceResult(model, self.task, self.instance.id, self.samples, self.passes,
                              tuple(self.pass_indices), self.overshoot, self.stopped or "", self.seed)


@dataclass
class RoundUpdate:
    """What one round changed for one instance: new totals plus completion-count deltas."""

    state: InstanceState
    new_completions: dict[str, int]  # text -> count added this round (within the cap)


class Progress:
    """Receives progress; the CLI shows it as a bar with an ETA. The default does nothing.

    The run layer names the model and its tasks (`set_model`); the engine names the stage it
    is in (`stage`: "sampling", or "checking" while it waits on a round's checks)."""

    def advance(self, *, instances: int = 0, samples: int = 0) -> None:
        pass

    def set_model(self, name: str, tasks: Sequence[str] = ()) -> None:
        pass

    def stage(self, name: str) -> None:
        pass


def request_size(st: InstanceState, cfg: EngineConfig) -> int:
    """How many samples this instance asks for in the next round."""
    remaining = cfg.max_samples - st.next_index
    if remaining <= 0:
        return 0
    grown = math.ceil(st.last_request * cfg.growth)
    if st.last_request == 0:
        want = cfg.first_request
    elif st.passes == 0:
        want = grown
    else:
        need = math.ceil((cfg.k_target - st.passes) * st.samples / st.passes)
        want = min(need, grown)
    return max(1, min(want, remaining))


def share_batch(wants: Sequence[int], batch_size: int) -> list[int]:
    """Water-filling: small requests are served whole, large ones split what is left."""
    alloc = [0] * len(wants)
    capacity, left = batch_size, len(wants)
    for i in sorted(range(len(wants)), key=wants.__getitem__):
        fair = capacity // left if capacity >= left else (1 if capacity > 0 else 0)
        alloc[i] = min(wants[i], fair)
        capacity -= alloc[i]
        left -= 1
    return alloc


def _check_texts(check: Check, instance: Instance, texts: list[str]) -> dict[str, bool]:
    many = getattr(check, "check_many", None)
    if many is not None and len(texts) > 1:
        return {t: bool(ok) for t, ok in zip(texts, many(instance, texts))}
    return {t: bool(check(instance, t)) for t in texts}


class _Checker:
    """Runs the checks of one round in the background, skipping texts already verified."""

    def __init__(self, checks: dict[str, Check], workers: int):
        self.checks = checks
        self.pool: Executor | None = ProcessPoolExecutor(workers) if workers > 0 else None
        self.background = ThreadPoolExecutor(1, thread_name_prefix="passuntil-check")

    def submit(self, batch: list[tuple[InstanceState, list[str]]]) -> Future:
        return self.background.submit(self._run, batch)

    def _run(self, batch):
        jobs = []
        for st, texts in batch:
            new = [t for t in dict.fromkeys(texts) if t not in st.verdicts]
            jobs.append((st, new))
        if self.pool is None:
            return [_check_texts(self.checks[st.task], st.instance, new) for st, new in jobs]
        futures = [self.pool.submit(_check_texts, self.checks[st.task], st.instance, new)
                   if new else None for st, new in jobs]
        return [f.result() if f else {} for f in futures]

    def close(self):
        self.background.shutdown(wait=True)
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _apply(st: InstanceState, texts: list[str], cfg: EngineConfig) -> RoundUpdate | None:
    """Count one round's samples for an instance, stopping exactly at the K-th pass."""
    if st.stopped:
        st.overshoot += len(texts)
        return None
    verdicts = st.verdicts
    flags = [verdicts[t] for t in texts]
    positions = [j for j, ok in enumerate(flags) if ok]
    need = cfg.k_target - st.passes
    cut = positions[need - 1] + 1 if len(positions) >= need else len(texts)
    counted = texts[:cut]
    st.overshoot += len(texts) - cut
    st.pass_indices.extend(st.samples + j for j in positions[:need])
    st.passes += min(need, len(positions))
    st.samples += cut
    if st.passes >= cfg.k_target:
        st.stopped = "k_passes"
    elif st.samples >= cfg.max_samples:
        st.stopped = "budget"
    new: dict[str, int] = {}
    for text, n in Counter(counted).items():
        if text in st.completions or len(st.completions) < cfg.completions_cap:
            st.completions[text] = st.completions.get(text, 0) + n
            new[text] = n
        else:
            st.overflow += n
    return RoundUpdate(st, new)


def new_states(tasks: Iterable[Task], *, model: str, seed: int) -> list[InstanceState]:
    """Fresh state for every instance of every task."""
    return [InstanceState(task.name, inst, task.prompt(inst), derive_seed(seed, model, task.name, inst.id))
            for task in tasks for inst in task.instances]


def run_passuntil(
    sampler: Sampler,
    tasks: Sequence[Task],
    cfg: EngineConfig,
    *,
    model: str,
    states: list[InstanceState] | None = None,
    commit: Callable[[list[RoundUpdate]], None] | None = None,
    progress: Progress | None = None,
) -> list[InstanceResult]:
    """Run PassUntil for one model over the instances of `tasks`.

    `states` resumes earlier work (from the store); `commit` receives each round's updates
    (the store writes them in one transaction).
    """
    progress = progress or Progress()
    states = states if states is not None else new_states(tasks, model=model, seed=cfg.seed)
    by_task = {t.name: t for t in tasks}
    for st in states:
        st.next_index = st.samples
    active = [st for st in states if not st.stopped]
    checker = _Checker({t.name: t.check for t in tasks}, cfg.check_workers)
    pending: tuple[list[tuple[InstanceState, list[str]]], Future] | None = None
    try:
        while active or pending:
            progress.stage("sampling" if active else "checking")
            batch = _sample_round(sampler, active, by_task, cfg) if active else []
            if pending:
                _finish_round(*pending, cfg, commit, progress)
            pending = (batch, checker.submit(batch)) if batch else None
            active = [st for st in active if not st.stopped and st.next_index < cfg.max_samples]
    finally:
        checker.close()
    return [st.result(model) for st in states]


def run_quotas(
    sampler: Sampler,
    tasks: Sequence[Task],
    cfg: EngineConfig,
    *,
    model: str,
    states: list[InstanceState],
    targets: Mapping[tuple[str, str], int],
    commit: Callable[[list[RoundUpdate]], None] | None = None,
    progress: Progress | None = None,
) -> None:
    """Draw samples for each instance until it has counted `targets[key]` of them (capped at
    `cfg.max_samples`): fixed quotas, no K-stop (every sample counts), for a sequential design
    that decides the quotas between calls (`passuntil.sequential`).

    Sample j of an instance is draw j of its stream, as in `run_passuntil`, so the counts after a
    call depend only on the seed and the targets, never on batching or interruption. An instance
    that reaches its target is marked `stopped = "design"` (its counts are final for this
    round; a later call with a higher target reopens it); one at the cap is `"budget"`."""
    progress = progress or Progress()
    cfg = replace(cfg, k_target=cfg.max_samples)  # K = the cap: nothing stops before it
    by_task = {t.name: t for t in tasks}
    goal = {st.key: min(int(targets.get(st.key, 0)), cfg.max_samples) for st in states}
    active = []
    for st in states:
        st.next_index = st.samples
        if goal[st.key] > st.samples:
            st.stopped = None  # reopened by this round's quota
            active.append(st)
    checker = _Checker({t.name: t.check for t in tasks}, cfg.check_workers)
    pending: tuple[list[tuple[InstanceState, list[str]]], Future] | None = None
    try:
        while active or pending:
            progress.stage("sampling" if active else "checking")
            wants = [goal[st.key] - st.next_index for st in active]
            batch = _sample_round(sampler, active, by_task, cfg, wants) if active else []
            if pending:
                _finish_round(*pending, cfg, commit, progress, goal)
            pending = (batch, checker.submit(batch)) if batch else None
            active = [st for st in active if st.next_index < goal[st.key]]
    finally:
        checker.close()


def _sample_round(sampler, active, by_task, cfg, wants=None) -> list[tuple[InstanceState, list[str]]]:
    wants = [request_size(st, cfg) for st in active] if wants is None else wants
    alloc = share_batch(wants, cfg.batch_size)
    chosen = [(st, n) for st, n in zip(active, alloc) if n > 0]
    params = [
        SamplingParams(
            n=n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            max_tokens=cfg.max_tokens or by_task[st.task].max_new_tokens,
            stop=by_task[st.task].stop, seed=st.seed, first_sample=st.next_index)
        for st, n in chosen
    ]
    outputs = sampler.generate([st.prompt for st, _ in chosen], params)
    batch = []
    for (st, n), comps in zip(chosen, outputs, strict=True):
        if len(comps) != n:
            raise RuntimeError(f"sampler {sampler.name!r} returned {len(comps)} completions, asked {n}")
        st.next_index += n
        st.last_request = n
        batch.append((st, [c.text for c in comps]))
    return batch


def _finish_round(batch, future: Future, cfg, commit, progress, goal=None) -> None:
    if not future.done():
        progress.stage("checking")
    verdicts = future.result()
    updates, finished, samples = [], 0, 0
    for (st, texts), new in zip(batch, verdicts, strict=True):
        st.verdicts.update(new)
        was_open = not st.stopped
        before = st.samples
        update = _apply(st, texts, cfg)
        if goal is not None and not st.stopped and st.samples >= goal[st.key]:
            st.stopped = "design"  # read by the commit below: the round's quota is met
        samples += st.samples - before
        if update:
            updates.append(update)
        finished += was_open and bool(st.stopped)
    if commit and updates:
        commit(updates)
    progress.advance(instances=finished, samples=samples)
