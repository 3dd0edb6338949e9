"""Before-the-fact warnings (scaling/warnings.py) on simulated series with a known truth (seeded)."""

import numpy as np
import pytest

from benchmarks.calibration import TARGET, circuit_series, law_series
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.fitters import FITTERS
from passuntil.scaling.task_law import fit_likelihood
from passuntil.scaling.warnings import Warning, forecast_warnings

N = np.array([3.6e7, 1.09e8, 2.41e8, 4.99e8, 8.92e8, 1.542e9, 2.45e9])


def codes(counts, target=TARGET, **kw):
    fit = fit_likelihood(counts) if counts.passes.sum() else None
    return {w.code for w in forecast_warnings(counts, fit, target, **kw)}


def test_all_zero_task_warns_and_is_not_forecast():
    """An all-zero task (examples/capitals.yaml on the tiny series forecast 0.0985 [-0.027, 0.455]
    with no warning): one clear warning, the fitters refuse it, and the raw fit's interval stays
    inside [0, 1]."""
    zero = SeriesCounts(N[:6], np.zeros((8, 6), dtype=np.int64), np.full((8, 6), 500))
    warns = forecast_warnings(zero, None, TARGET)
    assert [w.code for w in warns] == ["all-zero"] and isinstance(warns[0], Warning)
    assert "no instance passed" in warns[0].message and "3000" not in warns[0].message
    with pytest.raises(ValueError, match="no instance passed"):
        FITTERS["likelihood"](zero)
    f = fit_likelihood(zero).forecast(TARGET)
    assert 0.0 <= f.low <= f.high <= 1.0 and 0.0 <= f.population_low <= f.population_high <= 1.0


def test_mostly_zero_data_warns():
    rng = np.random.default_rng(0)
    counts, _ = law_series("hard", rng, k_target=2, budget=10**3)
    train = counts.select_models(np.arange(6))
    assert np.mean(train.passes == 0) > 0.5
    assert "mostly-zero" in codes(train)
    plain, _ = law_series("ordinary", rng, k_target=2, budget=10**4)
    assert "mostly-zero" not in codes(plain.select_models(np.arange(6)))


def test_extrapolation_distance_warns_for_target_and_threshold_sizes():
    """A target 2,000x beyond the largest fitted size (or a threshold size there) warns; the
    paper's own step (1.54B -> 2.45B, 1.6x) does not."""
    counts, _ = law_series("ordinary", np.random.default_rng(1), k_target=2, budget=10**4)
    train = counts.select_models(np.arange(6))
    assert "extrapolation" not in codes(train)
    assert "extrapolation" in codes(train, target=2000 * N[5])
    assert "extrapolation" in codes(train, thresholds_n=(3e12,))
    msg = [w.message for w in forecast_warnings(train, fit_likelihood(train), 2000 * N[5])
           if w.code == "extrapolation"][0]
    assert "2e+03x the largest fitted size" in msg


def test_inverse_and_non_scaling_tasks_warn():
    """PU that falls with N (formerly classified "linear") and PU that does not move."""
    x = np.log(N[:6]) - np.log(N[:6]).mean()
    rng = np.random.default_rng(2)
    a = rng.normal(1.0, 0.3, 20)
    for slope, code in ((+0.5, "inverse-scaling"), (0.0, "non-scaling")):
        p = np.exp(-np.exp(a[:, None] + slope * x[None]))
        n = np.full(p.shape, 5000)
        counts = SeriesCounts(N[:6], rng.binomial(n, p), n)
        got = codes(counts)
        assert code in got, (slope, got)
        assert "accelerated-emergence" not in got


def test_underdetermined_comparisons_are_flagged():
    """Four sizes: two circuits (5 parameters) and two steps (4) are not fitted, and say so."""
    counts, _ = law_series("ordinary", np.random.default_rng(3), k_target=10, budget=10**4)
    got = [w for w in forecast_warnings(counts.select_models(np.arange(2, 6)), None, TARGET)
           if w.code == "underdetermined-comparison"]
    assert len(got) == 1 and "two circuits" in got[0].message and "two steps" in got[0].message
    assert "underdetermined-comparison" not in codes(counts.select_models(np.arange(6)))


def test_lack_of_fit_warns_on_paper_instance_24_only():
    from tests.test_paper_b1 import counts as paper

    assert "lack-of-fit" in codes(paper("24"))
    assert "lack-of-fit" not in codes(paper("20"))
    msg = [w.message for w in forecast_warnings(paper("24"), fit_likelihood(paper("24")), 2.45e9)
           if w.code == "lack-of-fit"][0]
    assert "24" in msg and "dispersion" in msg


@pytest.mark.slow
def test_accelerated_emergence_fires_before_the_fact(capsys):
    """Two-circuit series whose steep circuit takes over between the two largest fitted sizes
    (0.89B, 1.54B), the target 2.45B held out: flagged in >= 12/15; plain-law series: <= 1/15
    (benchmarks/calibration.py runs 100 of each)."""
    rng = np.random.default_rng(11)
    hits = sum("accelerated-emergence" in codes(circuit_series(rng, k_target=2, budget=10**4)[0]
                                                  .select_models(np.arange(6))) for _ in range(15))
    false = sum("accelerated-emergence" in codes(law_series("ordinary", rng, k_target=2, budget=10**4)[0]
                                                   .select_models(np.arange(6))) for _ in range(15))
    with capsys.disabled():
        print(f"\naccelerated emergence flagged: two circuits {hits}/15, plain law {false}/15")
    assert hits >= 12 and false <= 1
