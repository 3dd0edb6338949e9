import numpy as np
import pytest

from passuntil.scaling import fit_loss_law


def test_recovers_known_law_by_simulation():
    n = np.array([2.4e4, 8e4, 1.9e5, 3.7e5, 6.4e5, 1.0e6])
    rng = np.random.default_rng(0)
    alphas, l0s = [], []
    for _ in range(100):
        loss = ((2e3 / n) ** 0.35 + 1.1) * np.exp(0.002 * rng.standard_normal(n.size))
        fit = fit_loss_law(n, loss)
        alphas.append(fit.alpha)
        l0s.append(fit.l0)
        assert fit.rmse < 0.01
    assert np.median(alphas) == pytest.approx(0.35, rel=0.1)
    assert np.median(l0s) == pytest.approx(1.1, rel=0.05)


def test_fit_record():
    n = [1e4, 1e5, 1e6, 1e7]
    loss = [(1e3 / x) ** 0.5 + 0.5 for x in n]
    fit = fit_loss_law(n, loss)
    assert fit.predict(1e8) == pytest.approx((1e3 / 1e8) ** 0.5 + 0.5, rel=1e-3)
    d = fit.to_dict()
    assert set(d) >= {"c", "alpha", "l0", "stderr", "residuals", "rmse"}
    with pytest.raises(ValueError):
        fit_loss_law([1, 2], [3, 2])
