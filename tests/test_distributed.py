"""Scale-out on a local 2-worker Ray cluster: same counts as a local run, resumable, and the two
runners hand back their results the same way."""

from __future__ import annotations

import pytest

from passuntil.evaluate import estimates_table, prepare_run
from passuntil.runner import LocalRunner
from passuntil.store import Store

ray = pytest.importorskip("ray")

ENGINE = {"k_target": 2, "max_samples": 3000, "batch_size": 512, "seed": 3}


def _spec(store, run_id, series, tasks, models, engine=ENGINE):
    return prepare_run(store, run_id, resume=False, series=series, models=models, tasks=tasks,
                       engine_overrides=engine)


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
    from passuntil.distributed import RayRunner

    models = ["0.03B", "0.1B", "0.2B"]
    local = Store(tmp_path / "local.sqlite")
    here = LocalRunner().run(local, "r", _spec(local, "r", "sim", ["sim-scaling"], models))
    dist = Store(tmp_path / "ray.sqlite")
    spec = _spec(dist, "r", "sim", ["sim-scaling"], models)
    there = RayRunner(workers=2, shard_size=5).run(dist, "r", spec)
    assert _counts(dist, "r") == _counts(local, "r")
    # one interface: the same results in the same order (all but the overshoot past the K-th
    # pass, which depends on batching), and the same samples counted
    def counted(outcome):
        return [(r.model, r.task, r.instance_id, r.samples, r.passes, r.pass_indices, r.stopped)
                for r in outcome.results]

    assert counted(there) == counted(here) and there.samples == here.samples > 0
    # Lose part of the results (as after a crash) and resume on Ray: the same counts again.
    dist.db.execute("DELETE FROM results WHERE model='0.1B' AND instance_id < '10'")
    dist.db.execute("DELETE FROM completions WHERE model='0.1B' AND instance_id < '10'")
    assert len(_counts(dist, "r")) < len(_counts(local, "r"))
    RayRunner(workers=2, shard_size=5).run(dist, "r", spec)
    assert _counts(dist, "r") == _counts(local, "r")


@pytest.mark.slow
def test_ray_runs_the_bundled_torch_series(cluster, tmp_path):
    from passuntil.distributed import run_eval_ray

    engine = {**ENGINE, "max_samples": 40}
    store = Store(tmp_path / "t.sqlite")
    run_eval_ray(store, "t", _spec(store, "t", "tiny", ["arith"], ["tiny-2", "tiny-3"], engine),
                 workers=2, shard_size=10)
    local = Store(tmp_path / "l.sqlite")
    LocalRunner().run(local, "t", _spec(local, "t", "tiny", ["arith"], ["tiny-2", "tiny-3"], engine))
    assert _counts(store, "t") == _counts(local, "t")
    assert store.has_reference_scores("t", "tiny-3")


@pytest.mark.slow
def test_a_worker_on_another_sampler_is_refused_in_one_line(cluster, tmp_path):
    """Each actor checks its sampler against the fingerprint the run recorded (a worker on
    another CPU or package version would draw other samples); its UserError reaches the driver
    as itself, not as a remote traceback."""
    from dataclasses import replace

    from passuntil.distributed import RayRunner
    from passuntil.errors import UserError

    store = Store(tmp_path / "f.sqlite")
    spec = prepare_run(store, "f", resume=False, series="sim", models=["0.1B"], tasks=["sim-scaling"],
                       engine_overrides=ENGINE, limit=2)
    other = replace(spec, samplers={"0.1B": {**spec.samplers["0.1B"], "passuntil": "0.0.1"}})
    with pytest.raises(UserError, match=r"^a Ray worker would sample model '0.1B' with another "
                                        r"sampler than the run records \(passuntil: '0.0.1' ->"):
        RayRunner(workers=2).run(store, "f", other)
    assert store.lease_holder("f") is None  # the lease is given back
