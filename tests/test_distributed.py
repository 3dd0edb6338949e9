"""Scale-out on a local 2-worker Ray cluster: same counts as a local run, resumable."""

from __future__ import annotations

import pytest

from passuntil.evaluate import estimates_table, resolve_config, run_eval
from passuntil.store import Store

ray = pytest.importorskip("ray")

ENGINE = {"k_target": 2, "max_samples": 3000, "batch_size": 512, "seed": 3}


def _config(store, run_id, series, tasks, models):
    return resolve_config(store, run_id, resume=False, series=series, models=models, tasks=tasks,
                          engine_overrides=ENGINE)


def _counts(store, run_id):
    df = estimates_table(store, run_id)
    return sorted(zip(df["model"], df["task"], df["instance_id"], df["samples"], df["passes"]))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_run_matches_local_run_and_resumes(cluster, tmp_path):
    from passuntil.distributed import run_eval_ray

    models = ["0.03B", "0.1B", "0.2B"]
    local = Store(tmp_path / "local.sqlite")
    run_eval(local, "r", _config(local, "r", "sim", ["sim-scaling"], models))
    dist = Store(tmp_path / "ray.sqlite")
    config = _config(dist, "r", "sim", ["sim-scaling"], models)
    run_eval_ray(dist, "r", config, workers=2, shard_size=5)
    assert _counts(dist, "r") == _counts(local, "r")
    # Lose part of the results (as after a crash) and resume on Ray: the same counts again.
    dist.db.execute("DELETE FROM results WHERE model='0.1B' AND instance_id < '10'")
    dist.db.execute("DELETE FROM completions WHERE model='0.1B' AND instance_id < '10'")
    assert len(_counts(dist, "r")) < len(_counts(local, "r"))
    run_eval_ray(dist, "r", config, workers=2, shard_size=5)
    assert _counts(dist, "r") == _counts(local, "r")


@pytest.mark.slow
def test_ray_runs_the_bundled_torch_series(cluster, tmp_path):
    from passuntil.distributed import run_eval_ray

    store = Store(tmp_path / "t.sqlite")
    config = resolve_config(store, "t", resume=False, series="tiny", models=["tiny-2", "tiny-3"],
                            tasks=["arith"], engine_overrides={**ENGINE, "max_samples": 40})
    run_eval_ray(store, "t", config, workers=2, shard_size=10)
    local = Store(tmp_path / "l.sqlite")
    run_eval(local, "t", resolve_config(local, "t", resume=False, series="tiny",
                                        models=["tiny-2", "tiny-3"], tasks=["arith"],
                                        engine_overrides={**ENGINE, "max_samples": 40}))
    assert _counts(store, "t") == _counts(local, "t")
    assert store.has_reference_scores("t", "tiny-3")
