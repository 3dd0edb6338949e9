"""Scale-out on Ray: (model x instance) shards over actors that each hold a sampler.

`RayRunner` is the second implementation of `passuntil.runner.Runner`. The driver owns the run
store and the run's lease. Each actor runs the ordinary PassUntil engine on a shard and puts every
round's updates on a Ray queue; the driver commits them one transaction per round, exactly as a
local run does, so an interrupted distributed run resumes from the store (locally or on Ray) and,
because every sample's seed depends only on (seed, model, task, instance, sample index), ends
with the same counts as a local run. `RayCells` does the same for the rounds of a
`--design forecast` run (`passuntil.design_runner`): the driver decides each round, the actors
draw the cells to their counts (`engine.run_quotas`).
"""

from __future__ import annotations

import os

from passuntil import reference
from passuntil.backends import registry
from passuntil.engine import Progress, run_passuntil, run_quotas
from passuntil.errors import UserError
from passuntil.runner import RunOutcome, Tally, load_states, sampled_tasks, stored_outcome
from passuntil.runspec import RunSpec, record_sampler_warnings
from passuntil.series import open_sampler


class ShardWorker:
    """A Ray actor: opens samplers on demand (one per model, kept) and runs shards."""

    def __init__(self, spec_json: str, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        self.spec = RunSpec.from_json(spec_json)
        self.tasks = self.spec.load_tasks()
        self.samplers = {}

    def _sampler(self, model: str):
        if model not in self.samplers:  # one model at a time
            spec = self.spec.model(model)
            recorded = self.spec.samplers.get(model)
            here = registry.get_backend(spec.backend).sampler_fingerprint(spec)
            diff = recorded and registry.fingerprint_mismatch(recorded, here)
            if diff:  # e.g. a worker on another CPU or package version than the driver
                raise UserError(f"a Ray worker would sample model {model!r} with another sampler "
                                f"than the run records ({diff})")
            self.samplers = {model: open_sampler(spec, self.tasks)}
        return self.samplers[model]

    def run_shard(self, model: str, states, queue) -> tuple[str, list[str]]:
        """Run one shard; returns the model and what its sampler noticed about itself."""
        sampler = self._sampler(model)
        run_passuntil(sampler, self.tasks, self.spec.engine, model=model, states=states,
                      commit=lambda updates: queue.put((model, updates)))
        return model, list(getattr(sampler, "warnings", ()))

    def run_quota_shard(self, model: str, states, targets, queue) -> tuple[str, list[str]]:
        """Draw one shard's cells up to their counts of a `--design forecast` round."""
        sampler = self._sampler(model)
        run_quotas(sampler, self.tasks, self.spec.engine, model=model, states=states, targets=targets,
                   commit=lambda updates: queue.put((model, updates)))
        return model, list(getattr(sampler, "warnings", ()))

    def reference_scores(self, model: str) -> reference.ReferenceScores:
        return reference.compute(self._sampler(model), self.spec, model, self.tasks)


def connect(address: str, workers: int | None):
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs `pip install ray`") from None
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        else:
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as err:
                raise UserError(f"cannot join the Ray cluster at {address}: {err}") from None
    return ray


def _get(ray, ref):
    """`ray.get`, with a worker's UserError raised as itself (one line, not a remote traceback)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, UserError):
            raise err.cause from None
        raise


def start_actors(ray, spec: RunSpec, workers: int | None) -> list:
    """One `ShardWorker` actor per worker asked for (default: one per CPU of the cluster)."""
    n_actors = workers or max(1, int(ray.available_resources().get("CPU", 1)))
    remote = ray.remote(num_cpus=1)(ShardWorker)
    return [remote.remote(spec.to_json()) for _ in range(n_actors)]


def run_shards(ray, actors: list, jobs: list, submit, commit, found: dict[str, dict[str, None]]) -> None:
    """Run every job on the next idle actor (`submit(actor, job, queue)` starts it and returns its
    ref) while committing, in this process, each engine batch the actors put on the queue
    (`commit(model, updates)`) as it arrives; the sampler warnings each job returns are gathered
    in `found[model]`. A worker's error is raised here (`_get`)."""
    from ray.util.queue import Queue

    queue = Queue()

    def drain():
        while not queue.empty():
            try:
                model, updates = queue.get(timeout=0.2)
            except Exception:  # noqa: BLE001 - ray.util.queue.Empty: nothing arrived yet
                return
            commit(model, updates)

    jobs, running, idle = list(jobs), {}, list(actors)
    while jobs or running:
        while jobs and idle:
            actor = idle.pop()
            running[submit(actor, jobs.pop(0), queue)] = actor
        ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
        drain()
        for ref in ready:
            model, warned = _get(ray, ref)
            found.setdefault(model, {}).update(dict.fromkeys(warned))
            idle.append(running.pop(ref))
    drain()


class RayRunner:
    """Shards of `shard_size` instances over `workers` actors (default: one per CPU)."""

    def __init__(self, address: str = "local", workers: int | None = None, shard_size: int = 8):
        self.address, self.workers, self.shard_size = address, workers, shard_size

    def run(self, store, run_id: str, spec: RunSpec, *, progress: Progress | None = None
            ) -> RunOutcome:
        with store.lease(run_id):  # one writer per run
            tally = Tally(progress)
            notes = self._run(store, run_id, spec, tally)
        return stored_outcome(store, run_id, spec, samples=tally.samples, notes=notes)

    def _run(self, store, run_id: str, spec: RunSpec, progress: Tally) -> list[str]:
        ray = connect(self.address, self.workers)
        actors = start_actors(ray, spec, self.workers)
        tasks = spec.load_tasks()
        work, seen = [], {}
        progress.set_model(", ".join(m.name for m in spec.models), [t.name for t in tasks])
        progress.stage("sampling")
        for m in spec.models:
            states = load_states(store, run_id, spec, sampled_tasks(spec, m.name, tasks), m.name)
            for st in states:
                seen[(m.name, st.key)] = st.samples
            todo = [st for st in states if not st.stopped]
            progress.advance(instances=len(states) - len(todo))
            size = self.shard_size
            work += [(m.name, todo[i:i + size]) for i in range(0, len(todo), size)]

        def commit(model, updates):
            store.commit_round(run_id, model, updates)
            for u in updates:
                key = (model, u.state.key)
                progress.advance(samples=u.state.samples - seen[key],
                                 instances=int(u.state.stopped is not None))
                seen[key] = u.state.samples

        warnings = {}
        try:
            run_shards(ray, actors, work, lambda actor, job, queue: actor.run_shard.remote(*job, queue),
                       commit, warnings)
            notes = [note for model, found in warnings.items()
                     for note in record_sampler_warnings(store, run_id, model, list(found))]
            progress.stage(reference.STAGE)
            for m in spec.models:
                if reference.pending(store, run_id, spec, m.name):
                    scores = _get(ray, actors[0].reference_scores.remote(m.name))
                    note = reference.record(store, run_id, m.name, scores)
                    notes += [note] if note else []
            return notes
        finally:
            for a in actors:
                ray.kill(a)


def run_eval_ray(store, run_id: str, spec: RunSpec | dict, *, address: str = "local",
                 workers: int | None = None, shard_size: int = 8,
                 progress: Progress | None = None) -> RunOutcome:
    """`RayRunner(address, workers, shard_size).run(...)` (a spec or a stored config dict)."""
    spec = spec if isinstance(spec, RunSpec) else RunSpec.from_dict(spec)
    return RayRunner(address, workers, shard_size).run(store, run_id, spec, progress=progress)


class RayCells:
    """The cells of a `--design forecast` round sampled on Ray actors (the driver decides the
    rounds and owns the store, as for `RayRunner`): each model's cells of a round in shards of
    `shard_size`, every engine batch committed by the driver. Counts equal a local run's, since
    every sample's seed depends only on (seed, model, task, instance, sample index)."""

    def __init__(self, spec: RunSpec, address: str = "local", workers: int | None = None,
                 shard_size: int = 8):
        self.ray = connect(address, workers)
        self.actors = start_actors(self.ray, spec, workers)
        self.shard_size = shard_size
        self.found: dict[str, dict[str, None]] = {}

    def sample(self, store, run_id: str, model: str, states, targets, progress: Progress) -> None:
        seen = {st.key: st.samples for st in states}
        todo = [st for st in states if targets.get(st.key, 0) > st.samples]
        shards = [todo[i:i + self.shard_size] for i in range(0, len(todo), self.shard_size)]

        def commit(name, updates):
            store.commit_round(run_id, name, updates)
            for u in updates:
                progress.advance(samples=u.state.samples - seen[u.state.key])
                seen[u.state.key] = u.state.samples

        def submit(actor, shard, queue):
            goal = {st.key: targets[st.key] for st in shard}
            return actor.run_quota_shard.remote(model, shard, goal, queue)

        run_shards(self.ray, self.actors, shards, submit, commit, self.found)

    def warnings(self, model: str) -> list[str]:
        return list(self.found.get(model, {}))

    def scores(self, model: str) -> reference.ReferenceScores:
        return _get(self.ray, self.actors[0].reference_scores.remote(model))

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
