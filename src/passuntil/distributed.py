"""Scale-out on Ray: (model x instance) shards over actors that each hold a sampler.

The driver owns the run store. Each actor runs the ordinary PassUntil engine on a shard and
puts every round's updates on a Ray queue; the driver commits them one transaction per round,
exactly as a local run does, so an interrupted distributed run resumes from the store (locally
or on Ray) and, because every sample's seed depends only on (seed, model, task, instance,
sample index), ends with the same counts as a local run.
"""

from __future__ import annotations

import os
from dataclasses import fields

from passuntil.engine import EngineConfig, Progress, new_states, run_passuntil
from passuntil.errors import UserError
from passuntil.series import ModelSpec, open_sampler
from passuntil.store import Store
from passuntil.tasks import get_task


class ShardWorker:
    """A Ray actor: opens samplers on demand (one per model, kept) and runs shards."""

    def __init__(self, config: dict, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        self.cfg = _engine_config(config)
        self.tasks = [get_task(name) for name in config["tasks"]]
        self.specs = {m["name"]: ModelSpec(**m) for m in config["models"]}
        self.samplers = {}

    def _sampler(self, model: str):
        if model not in self.samplers:
            self.samplers = {model: open_sampler(self.specs[model], self.tasks)}  # one at a time
        return self.samplers[model]

    def run_shard(self, model: str, states, queue) -> int:
        run_passuntil(self._sampler(model), self.tasks, self.cfg, model=model, states=states,
                      commit=lambda updates: queue.put((model, updates)))
        return len(states)

    def reference_scores(self, model: str) -> list[tuple]:
        from passuntil.evaluate import reference_scores

        return reference_scores(self._sampler(model), self.tasks, self.cfg)


def _engine_config(config: dict) -> EngineConfig:
    return EngineConfig(**{f.name: config["engine"][f.name] for f in fields(EngineConfig)
                           if f.name in config["engine"]})


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


def run_eval_ray(store: Store, run_id: str, config: dict, *, address: str = "local",
                 workers: int | None = None, shard_size: int = 8,
                 progress: Progress | None = None) -> None:
    """Run (or continue) a stored run on Ray; the store is written only here, by the driver."""
    ray = connect(address, workers)
    from ray.util.queue import Queue

    progress = progress or Progress()
    n_actors = workers or max(1, int(ray.available_resources().get("CPU", 1)))
    remote = ray.remote(num_cpus=1)(ShardWorker)
    actors = [remote.remote(config) for _ in range(n_actors)]
    queue = Queue()
    cfg = _engine_config(config)
    tasks = [get_task(name) for name in config["tasks"]]
    work, seen = [], {}
    for m in config["models"]:
        states = new_states(tasks, model=m["name"], seed=cfg.seed)
        store.load_states(run_id, m["name"], states)
        for st in states:
            seen[(m["name"], st.key)] = st.samples
        todo = [st for st in states if not st.stopped]
        progress.advance(instances=len(states) - len(todo))
        work += [(m["name"], todo[i:i + shard_size]) for i in range(0, len(todo), shard_size)]

    def drain(block: bool):
        while not queue.empty() or block:
            block = False
            try:
                model, updates = queue.get(timeout=0.2)
            except Exception:  # noqa: BLE001 - ray.util.queue.Empty: nothing arrived yet
                return
            store.commit_round(run_id, model, updates)
            for u in updates:
                key = (model, u.state.key)
                progress.advance(samples=u.state.samples - seen[key],
                                 instances=int(u.state.stopped is not None))
                seen[key] = u.state.samples

    running = {}
    idle = list(actors)
    while work or running:
        while work and idle:
            actor = idle.pop()
            model, shard = work.pop(0)
            running[actor.run_shard.remote(model, shard, queue)] = actor
        ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
        drain(block=False)
        for ref in ready:
            ray.get(ref)  # re-raises a worker's error here
            idle.append(running.pop(ref))
    drain(block=False)
    for m in config["models"]:
        if not store.has_reference_scores(run_id, m["name"]):
            rows = ray.get(actors[0].reference_scores.remote(m["name"]))
            store.save_reference_scores(run_id, m["name"], rows)
    for a in actors:
        ray.kill(a)
