"""Pre-registered forecasts, scoring, backtests and thresholds, end to end on the simulated series."""

import json

import numpy as np
import pytest

from passuntil.errors import UserError
from passuntil.scaling.forecast import (
    backtest,
    make_forecast,
    read_forecast,
    score_forecast,
    write_forecast,
)
from passuntil.scaling.task_law import fit_likelihood, threshold_n
from passuntil.tasks.simulated import law_probability, make_task
from tests.conftest import run_cli
from tests.test_scaling_task_law import N, simulated_series


def test_forecast_file_then_score_via_cli(tmp_path, capsys):
    store, fc = tmp_path / "s.sqlite", tmp_path / "f.json"
    small = [a for m in ("0.03B", "0.1B", "0.2B", "0.5B", "0.9B", "1.5B") for a in ("--model", m)]
    assert run_cli(capsys, "eval", "--task", "sim-scaling", "--store", str(store), "--k", "2",
                "--max-samples", "10000", *small)[0] == 0
    code, out, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-n", "2.45e9",
                          "--threshold", "0.5", "--out", str(fc))
    assert code == 0, err
    record = json.loads(fc.read_text())
    assert {"method", "data", "data_sha256", "forecast", "created_at", "package_version", "git_commit"} <= set(record)
    assert len(record["data"]["instance_ids"]) == 20 and len(record["data"]["n_params"]) == 6
    # pre-registration is never overwritten
    code, _, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-n", "2.45e9", "--out", str(fc))
    assert code == 2 and "never overwritten" in err
    # now evaluate the target and score
    assert run_cli(capsys, "eval", "--task", "sim-scaling", "--store", str(store), "--run", "big", "--k", "2",
                "--max-samples", "10000", "--model", "2.4B")[0] == 0
    code, out, err = run_cli(capsys, "score-forecast", str(fc), str(store), "--model", "2.4B", "--run", "big")
    assert code == 0, err
    score = json.loads(out)
    truth = np.mean([law_probability(x.meta["law"], 2.45e9) for x in make_task("sim-scaling").instances])
    assert score["low"] <= truth <= score["high"]
    assert abs(score["point"] - truth) / truth < 0.15
    # the MLE mean overstates the truth at K = 2; the score uses the unbiased mean
    assert score["observed_mean_pu_mle"] > score["observed_mean_pu"]
    # a forecast whose data was edited afterwards is refused
    record["data"]["passes"][0][0] += 1
    (tmp_path / "edited.json").write_text(json.dumps(record))
    code, _, err = run_cli(capsys, "score-forecast", str(tmp_path / "edited.json"), str(store), "--model", "2.4B",
                        "--run", "big")
    assert code == 2 and "edited" in err
    code, _, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-n", "2.45e9",
                           "--method", "bogus", "--out", str(tmp_path / "g.json"))
    assert code == 2 and "unknown fit method" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "forecast", str(store), "--run", "main", "--task", "sim-scaling",
                             "--target-n", "2.45e9", "--method", "loss-assisted", "--out", str(tmp_path / "h.json"))
    assert code == 0, err  # the simulated backend records reference losses too
    for cmd in ("backtest", "emergence"):
        code, out, err = run_cli(capsys, cmd, str(store), "--run", "main", "--task", "sim-scaling")
        assert code == 0, err


def test_backtest_rows_and_threshold():
    counts, p = simulated_series(np.random.default_rng(3))
    rows = backtest(counts)
    assert rows[0]["kind"] == "largest" and rows[0]["n_params"] == N[-1]
    assert len(rows) == N.size - 1  # the largest, then every inner size (never the smallest)
    fit = fit_likelihood(counts)
    n_half, lo, hi = threshold_n(fit, 0.3)
    assert lo <= n_half <= hi
    assert fit.predict(n_half * 1.02) >= 0.3 >= fit.predict(n_half / 1.02)
    with pytest.raises(ValueError):
        threshold_n(fit, 1.5)


def test_forecast_warns_on_accelerated_tasks(tmp_path):
    from passuntil.scaling.data import SeriesCounts
    from tests.test_emergence import series, truth

    rng = np.random.default_rng(4)
    c = series(truth("circuits", rng, instances=40), rng, budget=100_000)
    c = SeriesCounts(c.n_params, c.passes, c.samples, c.k_target, tuple(map(str, range(40))))
    record = make_forecast(c.select_models(np.arange(6)), N[-1], task="acc")
    assert any("accelerated emergence" in w for w in record["warnings"])
    path = write_forecast(record, tmp_path / "f.json")
    assert read_forecast(path)["forecast"] == record["forecast"]
    with pytest.raises(UserError):
        score_forecast(record, np.zeros(3), np.ones(3))


def test_score_prefers_the_exact_probability():
    counts, p = simulated_series(np.random.default_rng(6))
    from passuntil.scaling.data import SeriesCounts

    c = SeriesCounts(counts.n_params, counts.passes, counts.samples, 2, tuple(map(str, range(20))))
    record = make_forecast(c.select_models(np.arange(6)), N[-1], task="t")
    with_exact = score_forecast(record, c.passes[:, -1], c.samples[:, -1], p[:, -1])
    without = score_forecast(record, c.passes[:, -1], c.samples[:, -1])
    assert with_exact["observed_from"] == "exact_p" and with_exact["observed"] == pytest.approx(p[:, -1].mean())
    assert without["observed_from"] == "unbiased PU" and without["observed"] == without["observed_mean_pu"]
