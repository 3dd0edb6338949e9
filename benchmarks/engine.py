"""Engine overhead: checked samples per second with an instant simulated sampler.

    .venv/bin/python benchmarks/engine.py

The sampler costs ~nothing, so this measures the engine itself (scheduling, verification
cache, counting, one SQLite transaction per round). Target: >= 100,000 checked samples/s on
a 2-core machine. Baseline, measured in the same run: the loop a user would otherwise write,
one sample at a time (generate n=1, check, repeat until K passes).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from passuntil.backends.base import SamplingParams
from passuntil.engine import EngineConfig, run_passuntil
from passuntil.series import ModelSpec, open_sampler
from passuntil.store import Store
from passuntil.tasks import get_task


def naive_loop(sampler, task, cfg: EngineConfig, time_limit: float) -> tuple[int, float]:
    """One sample at a time per instance; returns (samples, seconds)."""
    samples, t0 = 0, time.perf_counter()
    for inst in task.instances:
        prompt, passes, n = task.prompt(inst), 0, 0
        while passes < cfg.k_target and n < cfg.max_samples:
            comp = sampler.generate([prompt], [SamplingParams(n=1, seed=n, stop=task.stop)])[0][0]
            passes += task.check(inst, comp.text)
            n += 1
            if time.perf_counter() - t0 > time_limit:
                return samples + n, time.perf_counter() - t0
        samples += n
    return samples, time.perf_counter() - t0


def main() -> None:
    tasks = [get_task("sim-scaling"), get_task("sim-accelerated")]
    sampler = open_sampler(ModelSpec("0.03B", 3.6e7), tasks)  # small model: rare passes, many samples
    cfg = EngineConfig(k_target=2, max_samples=100_000, batch_size=16_384, seed=0)
    print(f"engine benchmark: {sum(len(t.instances) for t in tasks)} instances, K={cfg.k_target}, "
          f"budget {cfg.max_samples:,}, batch {cfg.batch_size:,}")

    t0 = time.perf_counter()
    results = run_passuntil(sampler, tasks, cfg, model="0.03B")
    mem_s = time.perf_counter() - t0
    drawn = sum(r.samples + r.overshoot for r in results)
    print(f"  engine, no store:   {drawn:>10,} samples in {mem_s:6.2f}s = {drawn / mem_s:>12,.0f} samples/s")

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.sqlite")
        store.create_run("bench", {"engine": cfg.to_dict()}, [{"name": "0.03B", "n_params": 3.6e7}])
        t0 = time.perf_counter()
        run_passuntil(sampler, tasks, cfg, model="0.03B",
                      commit=lambda u: store.commit_round("bench", "0.03B", u))
        store_s = time.perf_counter() - t0
        store.close()
    print(f"  engine + store:     {drawn:>10,} samples in {store_s:6.2f}s = {drawn / store_s:>12,.0f} samples/s")

    naive_n, naive_s = naive_loop(sampler, tasks[0], cfg, time_limit=5.0)
    naive_rate = naive_n / naive_s
    print(f"  naive 1-at-a-time:  {naive_n:>10,} samples in {naive_s:6.2f}s = {naive_rate:>12,.0f} samples/s")
    rate = drawn / store_s
    print(f"engine with store: {rate:,.0f} checked samples/s "
          f"({'meets' if rate >= 100_000 else 'MISSES'} the 100,000/s target); "
          f"{rate / naive_rate:.1f}x the naive loop")


if __name__ == "__main__":
    main()
