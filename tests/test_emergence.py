"""Emergence classes on simulated series with known per-instance truths (seeded)."""

import numpy as np

from passuntil.emergence import classify, classify_exact
from passuntil.scaling.data import SeriesCounts
from passuntil.simulation import simulate_counts

N = np.array([3.6e7, 1.09e8, 2.41e8, 4.99e8, 8.92e8, 1.542e9, 2.45e9])
X = np.log(N) - np.log(N).mean()


def _law(a, alpha):
    return np.exp(-np.exp(a[:, None] - alpha[:, None] * X[None]))


def truth(kind, rng, instances=20):
    a, alpha = rng.normal(1.0, 0.5, instances), rng.uniform(0.35, 0.6, instances)
    if kind == "linear":
        return _law(a, alpha)
    # slow circuit + a steep one that takes over in the upper half: accelerated emergence
    return 0.5 * _law(a + 0.5, alpha * 0.4) + 0.5 * _law(a + 1.82, alpha * 3.0)


def series(p, rng, k_target=2, budget=10_000):
    k, n = np.zeros(p.shape, dtype=np.int64), np.zeros(p.shape, dtype=np.int64)
    for i in range(p.shape[0]):
        for m in range(p.shape[1]):
            (k[i, m],), (n[i, m],) = simulate_counts(p[i, m], k_target=k_target, max_samples=budget, runs=1, rng=rng)
    return SeriesCounts(N, k, n, k_target)


def test_linear_series_are_classified_linear():
    rng = np.random.default_rng(0)
    got = [classify(series(truth("linear", rng), rng), compare=False).category for _ in range(60)]
    assert got.count("linear") >= 57  # >= 95%


def test_accelerated_series_are_flagged():
    rng = np.random.default_rng(1)
    results = [classify(series(truth("circuits", rng), rng), compare=False) for _ in range(60)]
    assert sum(r.accelerated for r in results) >= 54  # >= 90% concave or mixed
    assert all(r.curvature < 0 for r in results if r.accelerated)


def test_two_circuit_model_beats_the_plain_law_on_accelerated_series():
    rng = np.random.default_rng(2)
    r = classify(series(truth("circuits", rng, instances=40), rng, budget=100_000))
    aic = {c.name: c.aic for c in r.comparisons}
    assert aic["two circuits"] < aic["scaling law"]
    assert set(r.to_dict()) >= {"category", "curvature", "curvature_se", "comparisons"}


def test_too_few_sizes_is_undetermined():
    rng = np.random.default_rng(3)
    c = series(truth("linear", rng), rng).select_models(np.arange(3))
    assert classify(c).category == "undetermined"


def _curved(rng, curvature, instances=20):
    """F_i = a_i - alpha_i x + curvature x^2 (x: centred log N): clearly convex (> 0) or
    clearly concave (< 0) across the whole range, no saturation."""
    a, alpha = rng.normal(1.0, 0.5, instances), rng.uniform(0.35, 0.6, instances)
    f = a[:, None] - alpha[:, None] * X[None] + curvature * X[None] ** 2
    return np.exp(-np.exp(f))


def test_clearly_concave_and_convex_series_are_recovered(capsys):
    """>= 95% of series with a clearly concave (accelerated) or clearly convex (sub-scaling)
    truth get exactly that class, at the paper's noise level (20 instances, budgets 10^4)."""
    rng = np.random.default_rng(4)
    concave = [classify(series(_curved(rng, -0.12), rng), compare=False).category for _ in range(60)]
    convex = [classify(series(_curved(rng, +0.12), rng), compare=False).category for _ in range(60)]
    with capsys.disabled():
        print(f"\nconcave truth -> concave {concave.count('concave')}/60; "
              f"convex truth -> convex {convex.count('convex')}/60")
    assert concave.count("concave") >= 57 and convex.count("convex") >= 57


def test_exact_probabilities_give_the_true_class():
    """With exact probabilities (no sampling noise) the class is the truth's, every time."""
    rng = np.random.default_rng(5)
    for _ in range(10):
        assert classify_exact(N, truth("linear", rng), compare=False).category == "linear"
        assert classify_exact(N, _curved(rng, -0.12), compare=False).category == "concave"
        assert classify_exact(N, _curved(rng, +0.12), compare=False).category == "convex"
        assert classify_exact(N, truth("circuits", rng), compare=False).accelerated


def test_falling_and_flat_tasks_are_not_linear():
    """A task whose PU falls with N was classified "linear"; now "inverse". One whose PU does
    not move is "flat". Plain scaling series stay "linear" (checked above)."""
    rng = np.random.default_rng(6)
    a = rng.normal(1.0, 0.5, 20)
    for slope, expected in ((+0.4, "inverse"), (0.0, "flat")):
        got = []
        for _ in range(10):
            f = a[:, None] + slope * X[None]
            got.append(classify(series(np.exp(-np.exp(f)), rng), compare=False).category)
        assert got.count(expected) >= 9, (slope, got)
    r = classify(series(truth("linear", rng), rng), compare=False)
    assert r.slope < 0 and r.slope / r.slope_se < -2


def test_models_with_as_many_parameters_as_points_are_refused():
    """With 4 sizes, two circuits (5 parameters) and two steps (4) interpolate the points; they
    are not fitted or compared but listed as refused. With 6 sizes both are fitted."""
    from passuntil.emergence import compare_hypotheses, refused_hypotheses

    rng = np.random.default_rng(7)
    c = series(truth("circuits", rng), rng, budget=100_000)
    r4 = classify(c.select_models(np.arange(3, 7)))
    assert {m.name for m in r4.comparisons} == {"scaling law"}
    assert set(r4.refused) == {"two circuits", "two steps"} and r4.to_dict()["refused"] == list(r4.refused)
    r5 = classify(c.select_models(np.arange(2, 7)))
    assert set(r5.refused) == {"two circuits"} and "two steps" in {m.name for m in r5.comparisons}
    assert classify(c.select_models(np.arange(1, 7))).refused == ()
    assert refused_hypotheses(6) == ()
    x = np.log(N[:5])
    assert all(len(m.params) < 5 for m in compare_hypotheses(x, np.linspace(1, -1, 5), np.full(5, 0.01)))


def test_a_size_no_instance_was_sampled_at_is_left_out_without_a_warning():
    """A design run leaves whole sizes unsampled: classify skips them silently (numpy's "Mean of
    empty slice" warning reached users' stderr from the report) and classifies the rest."""
    import warnings

    rng = np.random.default_rng(0)
    full = series(truth("linear", rng), rng)
    samples = full.samples.copy()
    samples[:, 0] = 0
    gap = SeriesCounts(N, np.where(samples > 0, full.passes, 0), samples, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = classify(gap, compare=False)
    assert got.category == classify(gap.select_models(np.arange(1, N.size)), compare=False).category
