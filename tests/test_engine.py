import numpy as np
import pytest

from passuntil import stats
from passuntil.engine import EngineConfig, InstanceState, request_size, run_passuntil, share_batch
from passuntil.errors import UserError
from passuntil.tasks.base import Instance
from tests.conftest import TRUE_P, make_sampler


def _counts(results):
    return {r.instance_id: (r.samples, r.passes, r.pass_indices, r.stopped) for r in results}


def test_results_do_not_depend_on_batching(toy_task, toy_sampler):
    base = dict(k_target=2, max_samples=3000, seed=7)
    ref = _counts(run_passuntil(toy_sampler, [toy_task], EngineConfig(**base, batch_size=4096), model="m"))
    for bs, first, growth in [(1, 1, 2.0), (37, 3, 1.5), (100_000, 64, 4.0)]:
        cfg = EngineConfig(**base, batch_size=bs, first_request=first, growth=growth)
        assert _counts(run_passuntil(toy_sampler, [toy_task], cfg, model="m")) == ref


def test_process_pool_checks_give_the_same_counts(toy_task, toy_sampler):
    cfg = EngineConfig(k_target=2, max_samples=5000, seed=3)
    ref = _counts(run_passuntil(toy_sampler, [toy_task], cfg, model="m"))
    pooled = EngineConfig(k_target=2, max_samples=5000, seed=3, check_workers=2)
    assert _counts(run_passuntil(toy_sampler, [toy_task], pooled, model="m")) == ref


def test_stops_exactly_at_kth_pass_and_at_budget(toy_task, toy_sampler):
    cfg = EngineConfig(k_target=3, max_samples=3000, batch_size=512, seed=1)
    results = run_passuntil(toy_sampler, [toy_task], cfg, model="m")
    for r in results:
        assert r.samples <= 3000
        assert list(r.pass_indices) == sorted(r.pass_indices) and len(r.pass_indices) == r.passes
        if r.stopped == "k_passes":
            assert r.passes == 3 and r.pass_indices[-1] == r.samples - 1  # last counted sample passed
        else:
            assert r.stopped == "budget" and r.passes < 3 and r.samples == 3000
    by_id = {r.instance_id: r for r in results}
    assert by_id["i7"].passes == 0 and by_id["i7"].stopped == "budget"  # p = 0 never passes
    assert by_id["i0"].stopped == "k_passes"


def test_pass_indices_are_the_sampler_draws(toy_task, toy_sampler):
    """Pass j of the engine is exactly the j-th passing draw of the instance's seed stream."""
    cfg = EngineConfig(k_target=2, max_samples=2000, batch_size=64, seed=5)
    results = run_passuntil(toy_sampler, [toy_task], cfg, model="m")
    from passuntil.backends.base import SamplingParams

    for r, inst in zip(results, toy_task.instances):
        comps = toy_sampler.generate([toy_task.prompt(inst)], [SamplingParams(n=2000, seed=r.seed)])[0]
        passing = [c.index for c in comps if c.text == inst.references[0]][:2]
        assert tuple(passing) == r.pass_indices


def test_estimates_cover_true_p_across_seeds(toy_task):
    """Over many seeds, the exact interval of every instance covers its true p about 95% of the time."""
    sampler = make_sampler(toy_task)
    hits, total = 0, 0
    for seed in range(60):
        cfg = EngineConfig(k_target=2, max_samples=50_000, batch_size=8192, seed=seed)
        for r, p in zip(run_passuntil(sampler, [toy_task], cfg, model="m"), TRUE_P):
            if p == 0:
                continue
            low, high = stats.interval(r.passes, r.samples, k_target=2)
            hits += low <= p <= high
            total += 1
    assert 0.92 <= hits / total <= 0.99


def test_verification_cache_checks_each_text_once(toy_task):
    calls = []

    def counting_check(instance, text):
        calls.append((instance.id, text))
        return text == instance.references[0]

    task = type(toy_task)(**{**toy_task.__dict__, "check": counting_check})
    sampler = make_sampler(task, n_wrong=5)
    run_passuntil(sampler, [task], EngineConfig(k_target=2, max_samples=4000, batch_size=256), model="m")
    assert len(calls) == len(set(calls))  # never twice
    assert len(calls) <= len(task.instances) * 6


def test_overshoot_is_bounded_by_growth(toy_task, toy_sampler):
    cfg = EngineConfig(k_target=1, max_samples=100_000, batch_size=1_000_000, growth=2.0, first_request=1)
    for r in run_passuntil(toy_sampler, [toy_task], cfg, model="m"):
        if r.stopped == "k_passes":
            # requests double, and one extra round may be in flight: drawn <= ~6x what was needed
            assert r.samples + r.overshoot <= 6 * r.samples + 8


def test_share_batch_water_fills():
    assert share_batch([5, 100, 100], 105) == [5, 50, 50]
    assert share_batch([1, 2, 3], 100) == [1, 2, 3]
    assert sum(share_batch([10] * 7, 4)) == 4
    assert share_batch([], 10) == []


def test_request_size_grows_then_targets_k():
    cfg = EngineConfig(k_target=2, max_samples=1000, first_request=4, growth=2.0)
    st = InstanceState("t", Instance("a", "p", ("r",)), "p", seed=0)
    assert request_size(st, cfg) == 4
    st.last_request, st.next_index, st.samples = 4, 4, 4
    assert request_size(st, cfg) == 8  # no passes: geometric growth
    st.passes, st.samples, st.next_index, st.last_request = 1, 100, 100, 64
    assert request_size(st, cfg) == 100  # one more pass expected in ~100 samples
    st.next_index = 990
    assert request_size(st, cfg) == 10  # never past the budget


@pytest.mark.parametrize("kwargs", [{"k_target": 0}, {"k_target": 5, "max_samples": 4},
                                    {"growth": 1.0}, {"batch_size": 0}])
def test_config_errors_are_user_errors(kwargs):
    with pytest.raises(UserError):
        EngineConfig(**kwargs)


def test_seeds_differ_by_model_and_instance(toy_task, toy_sampler):
    cfg = EngineConfig(k_target=1, max_samples=100)
    a = run_passuntil(toy_sampler, [toy_task], cfg, model="a")
    b = run_passuntil(toy_sampler, [toy_task], cfg, model="b")
    seeds = [r.seed for r in a] + [r.seed for r in b]
    assert len(set(seeds)) == len(seeds)
    assert np.mean([x.samples == y.samples for x, y in zip(a, b)]) < 1
