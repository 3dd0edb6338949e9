"""Task-law fits on simulated series with a known true law per instance (seeded)."""

import numpy as np
import pytest

from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.task_law import fit_dataset, fit_instances_ls, fit_likelihood, law_p
from passuntil.simulation import simulate_counts

N = np.array([3.6e7, 1.09e8, 2.41e8, 4.99e8, 8.92e8, 1.542e9, 2.45e9])  # the paper's sizes


def simulated_series(rng, *, instances=20, k_target=2, budget=10_000, a_mean=1.0):
    x0 = np.log(N[:-1]).mean()
    a = rng.normal(a_mean, 0.6, instances)
    alpha = rng.uniform(0.3, 0.7, instances)
    p = law_p(a[:, None] - alpha[:, None] * (np.log(N)[None] - x0))
    k = np.zeros(p.shape, dtype=np.int64)
    n = np.zeros(p.shape, dtype=np.int64)
    for i in range(instances):
        for m in range(N.size):
            (k[i, m],), (n[i, m],) = simulate_counts(p[i, m], k_target=k_target, max_samples=budget, runs=1, rng=rng)
    return SeriesCounts(N, k, n, k_target), p


def test_likelihood_recovers_the_law_with_plenty_of_data():
    counts, p = simulated_series(np.random.default_rng(0), k_target=200, budget=10**8)
    fit = fit_likelihood(counts.select_models(np.arange(6)))
    assert fit.predict(N[-1]) == pytest.approx(p[:, -1].mean(), rel=0.03)
    f = fit.forecast(N[-1], level=0.9)
    assert f.low < f.point < f.high
    noise_only = fit.sample_means(N[-1], resample_instances=False)  # parameter uncertainty alone
    assert noise_only.std() < 0.02 * f.point < (f.high - f.low)


def test_likelihood_beats_least_squares_when_small_models_have_zero_passes(capsys):
    """Hard series (many zero-pass cells at the small sizes): forecast the held-out largest model."""
    rng = np.random.default_rng(7)
    errors = {"likelihood": [], "instance-ls": [], "dataset": []}
    zero_cells = []
    for _ in range(40):
        counts, p = simulated_series(rng, a_mean=1.6)
        train = counts.select_models(np.arange(6))
        zero_cells.append(np.mean(train.passes[:, :3] == 0))
        truth = p[:, -1].mean()
        for name, fit in (("likelihood", fit_likelihood), ("instance-ls", fit_instances_ls),
                          ("dataset", fit_dataset)):
            errors[name].append(abs(fit(train).forecast(N[-1]).point - truth) / truth)
    mae = {k: float(np.mean(v)) for k, v in errors.items()}
    with capsys.disabled():
        print(f"\nzero-pass cells among the 3 smallest sizes: {np.mean(zero_cells):.0%}; "
              f"mean abs relative forecast error: " + ", ".join(f"{k} {v:.3f}" for k, v in mae.items()))
    assert np.mean(zero_cells) > 0.3
    assert mae["likelihood"] < mae["instance-ls"] and mae["likelihood"] < mae["dataset"]


def test_counts_from_tidy_table():
    import pandas as pd

    df = pd.DataFrame({"model": ["b", "a", "b", "a"], "n_params": [2e6, 1e6, 2e6, 1e6],
                       "instance_id": ["x", "x", "y", "y"], "passes": [1, 0, 2, 1],
                       "samples": [10, 100, 5, 50], "ref_logprob": [-2.0, -4.0, -1.0, -3.0],
                       "ref_tokens": [2, 2, 1, 1]})
    c = SeriesCounts.from_table(df, k_target=2)
    assert c.models == ("a", "b") and c.instance_ids == ("x", "y")
    assert c.passes.tolist() == [[0, 1], [1, 2]] and c.samples.tolist() == [[100, 10], [50, 5]]
    assert c.ref_loss.tolist() == [[2.0, 1.0], [3.0, 1.0]]


def test_interval_coverage_for_the_task_population(capsys):
    """90% intervals (sampling noise + instance resampling) for the held-out largest model cover the
    task's population mean PU (what a fresh test set would measure) in 85-95% of 200 series."""
    rng = np.random.default_rng(5)
    x0 = np.log(N[:-1]).mean()
    big = np.random.default_rng(99)
    population = law_p(big.normal(1.0, 0.6, 200_000) - big.uniform(0.3, 0.7, 200_000) * (np.log(N[-1]) - x0)).mean()
    hits = 0
    series = 200
    for _ in range(series):
        counts, _ = simulated_series(rng)
        f = fit_likelihood(counts.select_models(np.arange(6))).forecast(N[-1], level=0.9)
        hits += f.low <= population <= f.high
    with capsys.disabled():
        print(f"\n90% interval coverage of the population mean PU at the held-out size: "
              f"{hits}/{series}")
    assert 0.85 * series <= hits <= 0.95 * series


def test_loss_assisted_helps_hard_instances(capsys):
    """Hard instances (zero passes at the small sizes) forecast from their reference test loss
    beat the paper's least-squares path, which must drop them."""
    from passuntil.scaling.task_law import fit_loss_assisted

    rng = np.random.default_rng(7)
    errors = {"loss-assisted": [], "instance-ls": []}
    hard = 0
    for _ in range(20):
        counts, p = simulated_series(rng, a_mean=1.6)
        loss = -np.log(p) / 4 * np.exp(0.03 * rng.standard_normal(p.shape))  # a 4-token answer's mean loss
        counts = SeriesCounts(counts.n_params, counts.passes, counts.samples, counts.k_target, ref_loss=loss)
        train, truth = counts.select_models(np.arange(6)), p[:, -1].mean()
        fit = fit_loss_assisted(train)
        hard += fit.extra["hard"]
        errors["loss-assisted"].append(abs(fit.forecast(N[-1]).point - truth) / truth)
        errors["instance-ls"].append(abs(fit_instances_ls(train).forecast(N[-1]).point - truth) / truth)
    mae = {k: float(np.mean(v)) for k, v in errors.items()}
    with capsys.disabled():
        print(f"\nloss-assisted vs least squares, mean abs relative error: {mae}")
    assert hard >= 10  # hard instances do occur (15 in these 20 series)
    assert mae["loss-assisted"] < 0.6 * mae["instance-ls"]
