"""Fair scoring (scaling/scoring.py): exact probabilities where present, else the cells' own likelihood."""

import numpy as np
import pytest

from benchmarks.calibration import TARGET, law_series
from passuntil.errors import UserError
from passuntil.scaling.scoring import score_cells, score_draws
from passuntil.scaling.task_law import fit_likelihood


def test_a_zero_pass_cell_is_scored_by_its_probability_not_as_outside():
    """Forecast PU ~1e-3 per instance: zero passes in 100 samples is likely (inside); zero
    passes in 10^5 samples is not. The old rule called both "outside" (observed 0 < low)."""
    rng = np.random.default_rng(0)
    per = np.exp(rng.normal(np.log(1e-3), 0.1, (2000, 5)))  # (draws, instances)
    few = score_draws(per, np.zeros(5), np.full(5, 100))
    many = score_draws(per, np.zeros(5), np.full(5, 10**5))
    assert few.against == "likelihood" and few.inside and few.p_value > 0.3
    assert not many.inside and many.z < -10
    assert few.low > 0  # the observed mean PU (0) lies below the interval, yet the cells are likely
    assert few.log_score > many.log_score
    assert all(0 <= v <= 1 for v in few.instance_p_values)


def test_exact_probabilities_are_used_where_every_instance_has_one():
    rng = np.random.default_rng(1)
    per = np.exp(rng.normal(np.log(0.02), 0.1, (2000, 4)))
    k, n = np.array([0, 1, 0, 2]), np.array([50, 50, 50, 50])
    exact = score_draws(per, k, n, exact_p=[0.02, 0.021, 0.019, 0.02])
    assert exact.against == "exact" and exact.inside and exact.truth == pytest.approx(0.02)
    far = score_draws(per, k, n, exact_p=[0.2] * 4)
    assert not far.inside and far.log_ratio < -2
    partial = score_draws(per, k, n, exact_p=[0.02, np.nan, 0.02, 0.02])
    assert partial.against == "likelihood"
    with pytest.raises(UserError):
        score_draws(per, k[:3], n[:3])
    with pytest.raises(UserError):
        score_draws(per, k, np.zeros(4))


@pytest.mark.slow
def test_the_likelihood_rule_is_calibrated_on_held_out_cells(capsys):
    """Forecast the held-out 2.45B from the six smaller sizes; score its K = 2 PassUntil cells:
    "inside" in 80-98% of 40 law-following series at level 0.9."""
    rng = np.random.default_rng(2)
    inside = exact_inside = 0
    for _ in range(40):
        counts, p = law_series("ordinary", rng, k_target=2, budget=10**4)
        fit = fit_likelihood(counts.select_models(np.arange(6)))
        inside += score_cells(fit, TARGET, counts.passes[:, -1], counts.samples[:, -1]).inside
        exact_inside += score_cells(fit, TARGET, counts.passes[:, -1], counts.samples[:, -1], p[:, -1]).inside
    with capsys.disabled():
        print(f"\nheld-out cells inside at 90%: likelihood rule {inside}/40, exact rule {exact_inside}/40")
    assert 32 <= inside <= 40 and 32 <= exact_inside <= 40
