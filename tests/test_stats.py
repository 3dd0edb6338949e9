import math

import numpy as np
import pytest
from scipy import special

from passuntil import stats
from passuntil.simulation import coverage_markdown, coverage_table, simulate_counts


def test_coverage_and_bias_by_simulation(capsys):
    """The issue's table: p x K, 2,000 runs each, budget binding in a few runs."""
    rows = coverage_table(runs=2000, seed=1)
    with capsys.disabled():
        print("\n" + coverage_markdown(rows))
    for r in rows:
        # exact intervals never under-cover beyond Monte Carlo noise (sd ~0.5% at 2,000 runs)
        assert r["coverage"] >= 0.935, r
        # where n is nearly continuous (small p) they are also close to nominal
        if r["p"] <= 0.01:
            assert r["coverage"] <= 0.965, r
        # the unbiased estimator's mean is within Monte Carlo error of p (|z| < 3.5 over 18 cells)
        assert abs(r["bias_z"]) < 3.5, r


def test_mle_is_biased_high_for_small_k():
    # K/n overestimates p on average (E[1/n] for a geometric is p log(1/p) / (1 - p)):
    rng = np.random.default_rng(0)
    k, n = simulate_counts(1e-3, k_target=1, max_samples=10**9, runs=20000, rng=rng)
    expected = 1e-3 * math.log(1e3) / (1 - 1e-3)
    assert stats.pu_mle(k, n).mean() == pytest.approx(expected, rel=0.1)


def test_interval_edges():
    low, high = stats.interval(0, 1000, k_target=2)
    assert low == 0.0
    assert high == pytest.approx(1 - 0.025 ** (1 / 1000))
    low, high = stats.interval(1, 1, k_target=1)  # first sample passed: upper end is 1
    assert high == 1.0 and 0 < low < 0.05
    low, high = stats.interval(2, 10, k_target=2)
    assert 0 < low < 0.2 < high < 1
    with pytest.raises(ValueError):
        stats.interval(3, 2, k_target=5)
    with pytest.raises(ValueError):
        stats.interval(1, 10, k_target=1, method="wald")


def test_k_stop_interval_inverts_the_negative_binomial():
    # At the interval ends, the probability of an outcome at least as extreme is alpha/2.
    k, n = 3, 400
    low, high = stats.interval(k, n, k_target=k, confidence=0.9)
    from scipy.stats import binom

    assert binom.sf(k - 1, n, low) == pytest.approx(0.05, rel=1e-6)  # P(N <= n | low)
    assert binom.cdf(k - 1, n - 1, high) == pytest.approx(0.05, rel=1e-6)  # P(N >= n | high)


def test_midp_is_inside_exact():
    for k, n, kt in [(2, 50, 2), (1, 7, 2), (0, 300, 1), (5, 5000, 5)]:
        lo_e, hi_e = stats.interval(k, n, k_target=kt)
        lo_m, hi_m = stats.interval(k, n, k_target=kt, method="midp")
        assert lo_e <= lo_m + 1e-12 and hi_m <= hi_e + 1e-12


def test_unbiased_values():
    assert stats.pu_unbiased(2, 11, k_target=2) == pytest.approx(0.1)
    assert stats.pu_unbiased(1, 1, k_target=1) == 1.0
    assert stats.pu_unbiased(1, 5, k_target=1) == 0.0
    assert stats.pu_unbiased(1, 100, k_target=2) == pytest.approx(0.01)  # budget stop


def test_pass_at_k_matches_combinatorics():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 3), (15, 14, 2), (5, 5, 5)]:
        exact = 1 - special.comb(n - c, k, exact=True) / special.comb(n, k, exact=True)
        assert stats.pass_at_k(n, c, k) == pytest.approx(exact)
    assert stats.pass_at_k(100_000, 1, 1) == pytest.approx(1e-5)
    with pytest.raises(ValueError):
        stats.pass_at_k(3, 1, 5)


def test_resolution_floor_and_expected_samples():
    floor = stats.resolution_floor(10_000)
    assert floor == pytest.approx(2.9953e-4, rel=1e-3)  # about 3 / budget
    # at p = floor, P(no pass in the budget) = 5%
    assert (1 - floor) ** 10_000 == pytest.approx(0.05, rel=1e-6)
    rng = np.random.default_rng(3)
    for p, k, budget in [(0.01, 2, 10_000), (1e-3, 1, 500), (0.3, 5, 1000)]:
        _, n = simulate_counts(p, k_target=k, max_samples=budget, runs=20000, rng=rng)
        assert stats.expected_samples(p, k_target=k, max_samples=budget) == pytest.approx(n.mean(), rel=0.03)


def test_bootstrap_se_matches_standard_error():
    rng = np.random.default_rng(0)
    v = rng.exponential(size=400)
    b = stats.bootstrap_mean(v, n_boot=4000, seed=1)
    assert b.mean == pytest.approx(v.mean())
    assert b.se == pytest.approx(v.std(ddof=1) / math.sqrt(v.size), rel=0.1)
    assert b.low < b.mean < b.high
    assert set(b.to_dict()) == {"mean", "se", "low", "high", "n_boot"}


def test_estimate_record():
    e = stats.estimate(2, 50, k_target=2)
    assert e.stopped == "k_passes" and e.pu == 0.04 and e.pu_unbiased == pytest.approx(1 / 49)
    assert stats.estimate(1, 50, k_target=2).stopped == "budget"
