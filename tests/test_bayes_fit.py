"""The full-Bayes task-law fit (`--method bayes`, scaling/bayes.py): it recovers a known truth,
its chains agree (split-R-hat) also where slopes are barely identified (the emergent regime, where
the former sampler's did not), its point lies inside its interval, and the CLI runs it."""

from __future__ import annotations

import numpy as np
import pytest

from passuntil.scaling.bayes import BayesFit, fit_bayes, split_rhat
from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.fitters import FITTERS
from passuntil.scaling.forecast import read_forecast
from passuntil.scaling.task_law import law_p
from tests.conftest import run_cli

SIZES = np.array([3.6e7, 1.09e8, 2.41e8, 4.99e8, 8.92e8, 1.542e9])
TARGET = 2.45e9


def _series(seed: int, instances: int = 20, samples: int = 2000):
    """Counts at the six sizes from known laws (a ~ N(1, 0.6), alpha ~ U(0.3, 0.7) about the
    mean log size) and the truth: each instance's PU at TARGET and the population's mean there."""
    rng = np.random.default_rng(seed)
    x = np.log(SIZES) - np.log(SIZES).mean()
    xt = np.log(TARGET) - np.log(SIZES).mean()
    a, alpha = rng.normal(1.0, 0.6, instances), rng.uniform(0.3, 0.7, instances)
    n = np.full((instances, SIZES.size), samples)
    counts = SeriesCounts(SIZES, rng.binomial(n, law_p(a[:, None] - alpha[:, None] * x)), n, 1)
    pa, palpha = rng.normal(1.0, 0.6, 200_000), rng.uniform(0.3, 0.7, 200_000)
    return counts, law_p(a - alpha * xt), float(law_p(pa - palpha * xt).mean())


def _emergent(seed: int, per_cell: int = 10**6, instances: int = 20):
    """The emergent regime (benchmarks/calibration.py's): every fitted cell PU < 1e-3, slopes
    U(1, 1.8), a fixed number of samples per cell; counts and the true mean PU at TARGET."""
    rng = np.random.default_rng(seed)
    x = np.log(SIZES) - np.log(SIZES).mean()
    xt = np.log(TARGET) - np.log(SIZES).mean()
    alpha = rng.uniform(1.0, 1.8, instances)
    a = np.log(-np.log(1e-3)) + rng.exponential(0.35, instances) + alpha * x[-1]
    n = np.full((instances, SIZES.size), per_cell)
    counts = SeriesCounts(SIZES, rng.binomial(n, law_p(a[:, None] - alpha[:, None] * x)), n, 1)
    return counts, float(law_p(a - alpha * xt).mean())


@pytest.fixture(scope="module")
def fitted():
    counts, truth, pop = _series(11)
    return fit_bayes(counts, seed=3), truth, pop


def test_recovers_known_truth(fitted):
    fit, truth, pop = fitted
    f = fit.forecast(TARGET, level=0.9)
    assert f.method == "bayes" and isinstance(fit, BayesFit)
    assert f.these_low <= truth.mean() <= f.these_high
    assert f.population_low <= pop <= f.population_high
    assert abs(np.log(f.point / truth.mean())) < 0.1
    # the population interval adds instance sampling to the "these instances" one
    assert f.population_high - f.population_low > f.these_high - f.these_low
    # per instance: most of the true PUs inside their own 90% intervals
    inside = (np.array(f.instance_low) <= truth) & (truth <= np.array(f.instance_high))
    assert inside.mean() >= 0.75
    # the fitted spread of slopes is off zero and of the truth's order (sd of U(0.3, 0.7) = 0.115)
    assert 0.03 < fit.extra["prior_sd"][1] < 0.4


def test_point_inside_interval_and_chains_agree(fitted):
    fit, _, _ = fitted
    for n in (SIZES[0] / 10, SIZES[-1], TARGET, 10 * TARGET):
        f = fit.forecast(n, level=0.5)
        assert f.low <= f.point <= f.high
        assert all(lo <= p <= hi for lo, p, hi in zip(f.instance_low, f.instance_point, f.instance_high))
    assert fit.rhat(TARGET) < 1.05 and fit.extra["rhat"] < 1.1
    assert not any("chains disagree" in w for w in fit.forecast(TARGET).warnings)
    assert fit.draws_ab.shape == (fit.chains * fit.extra["draws_per_chain"], 20, 2)


def test_converges_where_slopes_are_barely_identified():
    """Emergent regime (most cells without a pass): the chains of all five hyperparameters and
    the log mean at the target agree, each instance's importance sampling has effective draws,
    and the interval covers the true mean with a slope spread off zero (the EM's collapses)."""
    counts, truth = _emergent(4)
    assert (counts.passes == 0).mean() > 0.3
    fit = fit_bayes(counts, seed=0)
    assert max(fit.extra["rhat_hyper"]) < 1.05 and fit.rhat(TARGET) < 1.05
    assert min(fit.extra["is_ess"]) > 20
    f = fit.forecast(TARGET)
    assert not any("disagree" in w or "thin" in w for w in f.warnings)
    assert f.these_low <= truth <= f.these_high
    assert 0.05 < fit.extra["prior_sd"][1] < 0.6  # truth: sd of U(1, 1.8) = 0.23


def test_recovers_the_population_where_slopes_are_barely_identified():
    """40 emergent-regime instances at 1e7 samples per cell (most cells still without a pass):
    the 90% posterior intervals of the mean slope and of the slope spread contain the truth's
    (1.4 and 0.8 / sqrt(12) = 0.23), and the "these instances" interval the true mean."""
    counts, truth = _emergent(1, per_cell=10**7, instances=40)
    fit = fit_bayes(counts, seed=0)
    assert max(fit.extra["rhat_hyper"]) < 1.05
    lo, hi = np.quantile(fit.hyper_mu[:, 1], [0.05, 0.95])
    assert lo <= 1.4 <= hi
    lo, hi = np.quantile(np.sqrt(fit.hyper_cov[:, 1, 1]), [0.05, 0.95])
    assert lo <= 0.8 / np.sqrt(12) <= hi and lo > 0.05
    f = fit.forecast(TARGET)
    assert f.these_low <= truth <= f.these_high


def test_split_rhat_flags_disagreeing_chains():
    rng = np.random.default_rng(0)
    same = rng.standard_normal((4, 1000))
    assert split_rhat(same) < 1.01
    assert split_rhat(same + np.arange(4)[:, None]) > 1.5
    drift = same + np.linspace(0, 3, 1000)[None]  # each chain drifts: its halves disagree
    assert split_rhat(drift) > 1.2


def test_seeded():
    counts, _, _ = _series(5, instances=6, samples=500)
    one, two = (fit_bayes(counts, seed=1, warmup=200, keep=100) for _ in range(2))
    assert np.array_equal(one.draws_ab, two.draws_ab)


def test_forecast_method_bayes_through_cli(tmp_path, capsys):
    assert "bayes" in FITTERS
    store, out = str(tmp_path / "s.sqlite"), str(tmp_path / "f.json")
    models = [a for m in ("0.03B", "0.1B", "0.2B", "0.5B", "0.9B", "1.5B") for a in ("--model", m)]
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--store", store, "--k", "2",
                           "--max-samples", "300", *models)
    assert code == 0, err
    code, printed, err = run_cli(capsys, "forecast", store, "--task", "sim-scaling", "--target-n", "2.45e9",
                                 "--method", "bayes", "--out", out)
    assert code == 0, err
    assert "bayes" in printed
    rec = read_forecast(out)  # the verified record (hash checked), as score-forecast reads it
    assert rec.method == "bayes"
    assert 0 < rec.these_low <= rec.point <= rec.these_high < 1
    assert rec.population_low <= rec.point <= rec.population_high
