import numpy as np
import pytest

from passuntil.scaling.planner import plan_budget
from passuntil.simulation import simulate_counts


def test_plan_matches_simulated_passuntil_cost():
    ps = [0.2, 1e-2, 1e-3, 1e-4, 0.0]
    plan = plan_budget(ps, k_target=2, max_samples=5000, samples_per_s=1000)
    rng = np.random.default_rng(0)
    for p, expected, stop in zip(ps, plan.expected_samples, plan.p_budget_stop):
        k, n = simulate_counts(p, k_target=2, max_samples=5000, runs=20_000, rng=rng)
        assert expected == pytest.approx(n.mean(), rel=0.03)
        assert stop == pytest.approx(np.mean(k < 2), abs=0.01)
    assert plan.expected_samples[-1] == 5000 and plan.p_budget_stop[-1] == 1.0
    assert plan.hours == pytest.approx(plan.total_samples / 1000 / 3600)
    with pytest.raises(ValueError):
        plan_budget([0.1], k_target=3, max_samples=2)


def test_plan_cli(capsys):
    from passuntil.cli import main

    main(["plan", "--pu", "1e-3", "--pu", "1e-9", "--k", "2", "--max-samples", "10000", "--samples-per-s", "100"])
    out = capsys.readouterr().out
    assert "2 instances" in out and "1 instance(s) will probably end at the budget" in out and "min at 100" in out


def test_allocation_beats_an_even_split_when_guesses_are_right():
    """With the true pass probabilities as guesses, the allocation's forecast variance (delta
    method) is below the even split's, cells that cannot buy passes are starved, and the total
    is respected. (benchmarks/efficiency.py measures the real forecast errors.)"""
    import numpy as np

    from passuntil.scaling.planner import allocate_budget
    from passuntil.scaling.task_law import law_p

    rng = np.random.default_rng(0)
    n = np.array([3.6e7, 1.09e8, 2.41e8, 4.99e8, 8.92e8, 1.542e9])
    x = np.log(n) - np.log(n).mean()
    p = law_p(rng.normal(1.4, 0.6, 20)[:, None] - rng.uniform(0.3, 0.7, 20)[:, None] * x)
    alloc = allocate_budget(p, n, 2.45e9, 60_000, min_samples=8)
    assert alloc.total <= 60_000 and alloc.samples.min() >= 8
    assert alloc.efficiency > 1.5
    hopeless = p < 1e-6
    assert hopeless.any() and (alloc.samples[hopeless] == 8).all()
