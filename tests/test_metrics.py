import numpy as np
import pandas as pd
import pytest

from passuntil.metrics import (
    analytic_metrics,
    edit_distance,
    metric_table,
    resolution_floor,
    sharpness,
)


def test_analytic_mirage():
    n = np.geomspace(1e6, 1e10, 9)
    m = analytic_metrics(n, c=1e6, alpha=0.5, answer_tokens=10)
    assert m["exact_match"] == pytest.approx(m["token_accuracy"] ** 10)
    assert m["edit_distance"] == pytest.approx(10 * (1 - m["token_accuracy"]))
    # the same model, two pictures: over the first three sizes exact match stays below 5%
    # ("nothing happens") while edit distance has already made most of its progress
    ed = m["edit_distance"]
    assert m["exact_match"][:3].max() < 0.05
    assert (ed[0] - ed[2]) / (ed[0] - ed[-1]) > 0.5


def test_sharpness_and_floor():
    assert sharpness([0, 0, 0, 1]) == 1.0
    assert sharpness([0, 1, 2, 3]) == pytest.approx(1 / 3)
    assert sharpness([5, 5]) == 0.0
    assert resolution_floor(40) == 0.025


@pytest.mark.parametrize("a, b, d", [("", "", 0), ("abc", "abc", 0), ("abc", "abd", 1), ("kitten", "sitting", 3),
                                     ("", "xyz", 3), ("flaw", "lawn", 2)])
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_metric_table_weights_by_count():
    comps = pd.DataFrame({"model": ["m"] * 3, "task": ["t"] * 3, "instance_id": ["0"] * 3,
                          "text": ["abc", "abd", "xyz"], "count": [1, 2, 1], "passed": [1, 0, 0]})
    t = metric_table(comps, {("t", "0"): "abc"}, {"m": 1e6})
    row = t.iloc[0]
    assert row["exact_match"] == 0.25
    assert row["edit_distance"] == pytest.approx((0 + 2 * 1 + 3) / 4)
    assert row["edit_similarity"] == pytest.approx(1 - (0 + 2 / 3 + 1) / 4)


def test_token_edit_distance_counts_words_and_punctuation():
    from passuntil.metrics import edit_distance, tokens

    assert tokens("the lion king.") == ["the", "lion", "king", "."]
    assert edit_distance(tokens("the lion king"), tokens("the lion queen")) == 1
    assert edit_distance("kitten", "sitting") == 3


class _FixedScores:
    """A sampler whose log-prob for a continuation is looked up in a table."""

    def __init__(self, table):
        self.table = table

    def score(self, prompts, continuations):
        from passuntil.backends.base import TokenScores

        return [TokenScores((self.table[c.strip()], 0.0)) for c in continuations]


def test_score_metrics_multiple_choice_grade_and_brier():
    import math

    from passuntil.metrics import score_metrics
    from passuntil.tasks.base import Instance, Task
    from passuntil.tasks.checks import Contains

    inst = (Instance("a", "Q", ("cat",), {"choices": ["cat", "dog"]}),
            Instance("b", "Q", ("dog",), {"choices": ["cat", "dog"]}),
            Instance("c", "Q", ("cow",)))
    task = Task("t", inst, Contains(), answer_prefix=" ")
    rows = score_metrics(_FixedScores({"cat": math.log(0.6), "dog": math.log(0.2),
                                       "cow": -3.0}), task)
    a, b, c = rows
    assert a["mc_grade"] == 1.0 and b["mc_grade"] == 0.0
    # probabilities normalised over the two choices: 0.75 / 0.25
    assert a["brier"] == pytest.approx(0.25**2 + 0.25**2)
    assert b["brier"] == pytest.approx(0.75**2 + 0.75**2)
    assert a["ref_logprob"] == pytest.approx(math.log(0.6)) and a["ref_loss"] == pytest.approx(-math.log(0.6) / 2)
    assert math.isnan(c["mc_grade"]) and c["ref_logprob"] == -3.0
