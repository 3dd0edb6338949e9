"""Pre-registered forecasts, scoring, backtests and thresholds, end to end on the simulated series."""

import json

import numpy as np
import pytest

from passuntil.errors import UserError
from passuntil.jsonio import loads
from passuntil.scaling.forecast import (
    OBSERVED,
    ForecastRecord,
    backtest,
    make_forecast,
    read_forecast,
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
    # both interval kinds labelled, the pass@k profile, and the warnings' codes
    assert "these instances [" in out and "population [" in out and "pass@k at the target" in out
    assert "k=1 " in out and "k=1e6 " in out
    assert all(line.split(": ")[1] in ("extrapolation", "lack-of-fit", "mostly-zero")
               for line in out.splitlines() if line.startswith("warning:")), out
    record = loads(fc.read_text())  # strict JSON: no NaN or Infinity
    assert {"method", "data", "sha256", "forecast", "created_at", "package_version", "git_commit"} <= set(record)
    assert len(record["data"]["instance_ids"]) == 20 and len(record["data"]["n_params"]) == 6
    # pre-registration is never overwritten
    code, _, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-n", "2.45e9", "--out", str(fc))
    assert code == 2 and "never overwritten" in err
    # now evaluate the target and score
    assert run_cli(capsys, "eval", "--task", "sim-scaling", "--store", str(store), "--run", "big", "--k", "2",
                "--max-samples", "10000", "--model", "2.4B")[0] == 0
    code, out, err = run_cli(capsys, "score-forecast", str(fc), str(store), "--model", "2.4B", "--run", "big")
    assert code == 0, err
    score = loads(out)
    assert score["observed_is"] == OBSERVED
    assert score["against"] in ("exact", "likelihood") and score["refit_method"] == "likelihood"
    assert score["inside_interval"] is True
    truth = np.mean([law_probability(x.meta["law"], 2.45e9) for x in make_task("sim-scaling").instances])
    assert score["low"] <= truth <= score["high"]
    assert abs(score["point"] - truth) / truth < 0.15
    # the MLE mean overstates the truth at K = 2; the score uses the unbiased mean
    assert score["observed_mle"] > score["observed"]
    # a forecast edited afterwards is refused: its data, and (new) its point, interval or thresholds
    edits = {"data": lambda r: r["data"]["passes"][0].__setitem__(0, r["data"]["passes"][0][0] + 1),
             "point": lambda r: r["forecast"].__setitem__("point", truth),
             "interval": lambda r: r["forecast"].update(low=0.0, high=1.0),
             "threshold": lambda r: r["thresholds"][0].__setitem__("n_params", 1e9)}
    for name, edit in edits.items():
        edited = json.loads(fc.read_text())
        edit(edited)
        (tmp_path / f"edited-{name}.json").write_text(json.dumps(edited))
        code, out, err = run_cli(capsys, "score-forecast", str(tmp_path / f"edited-{name}.json"), str(store),
                                 "--model", "2.4B", "--run", "big")
        assert code == 2 and "edited after it was made" in err and out == "", name
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    code, _, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-n", "2.45e9",
                           "--method", "bogus", "--out", str(tmp_path / "g.json"))
    assert code == 2 and "unknown fit method" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "forecast", str(store), "--run", "main", "--task", "sim-scaling",
                             "--target-n", "2.45e9", "--method", "loss-assisted", "--out", str(tmp_path / "h.json"))
    assert code == 0, err  # the simulated backend records reference losses too
    # a file holds no reference losses: its score refits the same data by likelihood, and says so
    code, out, err = run_cli(capsys, "score-forecast", str(tmp_path / "h.json"), str(store), "--model", "2.4B",
                             "--run", "big")
    assert code == 0 and loads(out)["refit_method"] == "likelihood", err
    for cmd in ("backtest", "emergence"):
        code, out, err = run_cli(capsys, cmd, str(store), "--run", "main", "--task", "sim-scaling")
        assert code == 0, err


def test_backtest_rows_and_threshold():
    counts, p = simulated_series(np.random.default_rng(3))
    rows = backtest(counts)
    assert rows[0]["kind"] == "largest" and rows[0]["n_params"] == N[-1]
    assert len(rows) == N.size - 1  # the largest, then every inner size (never the smallest)
    # no exact probabilities: each held-out size scored by its cells' own likelihood
    assert all(r["against"] == "likelihood" and r["covered"] == (abs(r["z"]) <= 1.6449) for r in rows)
    exact = backtest(counts, exact_p=p)  # with them: against their mean
    assert all(r["against"] == "exact" and r["covered"] == (r["low"] <= r["exact"] <= r["high"]) for r in exact)
    assert exact[0]["exact"] == pytest.approx(p[:, -1].mean())
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
    assert any(w.startswith("accelerated-emergence: ") for w in record.warnings)
    path = write_forecast(record, tmp_path / "f.json")
    assert read_forecast(path) == record  # one JSON round trip, every field
    with pytest.raises(UserError):
        record.score(np.zeros(3), np.ones(3))


def test_observed_is_the_unbiased_mean_and_exact_p_is_reported_beside_it():
    counts, p = simulated_series(np.random.default_rng(6))
    from passuntil.scaling.data import SeriesCounts

    c = SeriesCounts(counts.n_params, counts.passes, counts.samples, 2, tuple(map(str, range(20))))
    record = make_forecast(c.select_models(np.arange(6)), N[-1], task="t")
    k, n = c.passes[:, -1], c.samples[:, -1]
    with_exact = record.score(k, n, p[:, -1])
    without = record.score(k, n)
    unbiased = np.where(k >= 2, 1 / (n - 1), k / n).mean()
    assert with_exact.observed == without.observed == pytest.approx(unbiased)  # one meaning of "observed"
    assert with_exact.exact == pytest.approx(p[:, -1].mean()) and without.exact is None
    assert with_exact.exact_inside_interval == (record.low <= p[:, -1].mean() <= record.high)
    assert without.exact_inside_interval is None
    # one scoring rule: the exact mean where every instance has one, else the cells' own likelihood
    assert with_exact.against == "exact" and with_exact.inside_interval == with_exact.exact_inside_interval
    assert without.against == "likelihood" and without.z is not None
    partial = record.score(k, n, np.where(np.arange(20) == 3, np.nan, p[:, -1]))
    assert partial.exact is None and partial.against == "likelihood"  # partial: not used
    # "these instances" (the default, parameter uncertainty only) sits inside the population interval
    assert record.population_low <= record.low <= record.point <= record.high <= record.population_high
    assert record.these_low == record.low and record.pop_interval == (record.population_low, record.population_high)


def _record(tmp_path):
    counts, _ = simulated_series(np.random.default_rng(7))
    from passuntil.scaling.data import SeriesCounts

    c = SeriesCounts(counts.n_params, counts.passes, counts.samples, 2, tuple(map(str, range(20))),
                     tuple(f"m{j}" for j in range(N.size)))
    return make_forecast(c.select_models(np.arange(6)), N[-1], task="t", target_model="m6",
                         thresholds=(0.5, 1 - 1e-9))


def test_forecast_file_is_strict_json_and_every_scored_field_is_hashed(tmp_path):
    record = _record(tmp_path)
    assert record.thresholds[1].n_params == np.inf  # never reached within the searched range
    path = write_forecast(record, tmp_path / "f.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    d = loads(text)
    assert d["schema"] == "passuntil-forecast/3" and d["thresholds"][1]["n_params"] is None
    assert d["forecast"]["interval"] == "these instances" and len(d["forecast"]["instances"]["point"]) == 20
    assert read_forecast(path) == record
    for key, value in [("task", "other"), ("method", "dataset"), ("target", {"n_params": 1e12, "model": "m6"}),
                       ("warnings", ["edited"]), ("emergence", {"category": "concave", "curvature_z": -9.0})]:
        edited = {**d, key: value}
        with pytest.raises(UserError, match="edited after it was made"):
            ForecastRecord.from_dict(edited, source="f.json")
    for field, value in [("point", 0.5), ("low", 0.0), ("high", 1.0), ("level", 0.5),
                         ("population", {"low": 0.0, "high": 1.0}),
                         ("pass_at_k", [{**q, "mean": 0.99} for q in d["forecast"]["pass_at_k"]]),
                         ("instances", {**d["forecast"]["instances"], "point": [0.5] * 20})]:
        with pytest.raises(UserError, match="edited after it was made"):
            ForecastRecord.from_dict({**d, "forecast": {**d["forecast"], field: value}}, source="f.json")
    (tmp_path / "nan.json").write_text(text.replace(str(d["forecast"]["point"]), "NaN", 1))
    with pytest.raises(UserError, match="not strict JSON"):
        read_forecast(tmp_path / "nan.json")
    (tmp_path / "cut.json").write_text(json.dumps({**d, "forecast": {"point": 0.1}}))
    with pytest.raises(UserError, match="not a valid forecast file"):
        read_forecast(tmp_path / "cut.json")


def test_old_schema_1_files_give_one_clear_line(capsys, tmp_path):
    """passuntil 0.1 wrote schema-1 files (hash over the data only)."""
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": "passuntil-forecast/1", "task": "arith", "forecast": {"point": 0.1},
                               "data": {}, "sha256": "0" * 64}))
    code, out, err = run_cli(capsys, "score-forecast", str(old), str(tmp_path / "none.sqlite"))
    assert code == 2 and out == "" and "schema-1" in err and "passuntil forecast" in err
    assert len(err.strip().splitlines()) == 1


def _c6(seed=6):
    from passuntil.scaling.data import SeriesCounts

    counts, p = simulated_series(np.random.default_rng(seed))
    c = SeriesCounts(counts.n_params, counts.passes, counts.samples, 2, tuple(map(str, range(20))),
                     tuple(f"m{j}" for j in range(N.size)))
    return c, p


def test_a_zero_pass_target_cell_is_scored_by_its_likelihood_not_as_outside():
    """A backcast to the smallest size (forecast ~0.012) against targets with no pass at all:
    the old rule called every one "outside" (observed 0 below the interval); by the cells' own
    likelihood 5 samples each with no pass are what the forecast expects, 1000 each are not."""
    c, _ = _c6()
    record = make_forecast(c.select_models(np.arange(1, 6)), N[0], task="t")
    assert 0 < record.low < record.point < 0.02
    few = record.score(np.zeros(20, int), np.full(20, 5))
    many = record.score(np.zeros(20, int), np.full(20, 1000))
    assert few.observed == 0.0 < record.low  # outside the interval, as the old rule scored it
    assert few.against == "likelihood" and few.inside_interval and -1.5 < few.z < -0.5
    assert not many.inside_interval and many.z < -1.645


def test_pass_at_k_profile_from_the_per_instance_forecasts():
    from passuntil.scaling.forecast import PASS_AT_K_GRID, pass_at_k_profile

    c, p = _c6()
    record = make_forecast(c.select_models(np.arange(6)), N[-1], task="t")
    ks = [q.k for q in record.pass_at_k]
    assert ks == list(PASS_AT_K_GRID) and ks[0] == 1 and ks[-1] == 10**6
    means = [q.mean for q in record.pass_at_k]
    assert np.all(np.diff(means) >= 0)
    assert record.low <= means[0] <= record.high  # pass@1 is the mean PU: its posterior mean (the
    # point may be the posterior median of the same draws, task_law.TaskFit.forecast)
    assert all(0 <= q.low <= q.high <= 1 and 0 <= q.mean <= 1 for q in record.pass_at_k)
    assert all(q.low <= q.mean <= q.high for q in record.pass_at_k if q.k <= 100)  # (beyond: all ~1)
    # the same draws that give the interval: recomputed from the fit, k = 100
    fit = fit_likelihood(c.select_models(np.arange(6)))
    per = fit.instance_draws(N[-1])
    assert pass_at_k_profile(fit, N[-1], ks=(100,))[0].mean == pytest.approx(
        (1 - (1 - per) ** 100).mean(axis=1).mean())
    assert means[0] == pytest.approx(per.mean())  # k = 1: the posterior mean of the mean PU
    # the truth's pass@100 (the simulated laws at the target) lies in the interval
    truth = (1 - (1 - p[:, -1]) ** 100).mean()
    q100 = pass_at_k_profile(fit, N[-1], ks=(100,))[0]
    assert q100.low <= truth <= q100.high


def test_all_zero_task_is_refused_with_the_all_zero_warning(capsys, tmp_path):
    """Issue 16 Must-show: no negative bound (there is no forecast) and one clear line."""
    store = tmp_path / "s.sqlite"
    assert run_cli(capsys, "eval", "--task", "sim-scaling", "--store", str(store), "--k", "1",
                   "--max-samples", "1", "--model", "0.03B", "--model", "0.1B")[0] == 0
    code, out, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-n", "1e9",
                             "--out", str(tmp_path / "f.json"))
    assert code == 2 and out == "" and "all-zero: no instance passed at any of the 2 sizes" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "f.json").exists()


def test_schema_2_files_are_still_read_verified_and_scored(tmp_path):
    """Schema 2 stored the population interval as low/high and "these instances" as test_set."""
    from dataclasses import replace

    from passuntil.scaling.forecast_record import SCHEMA_2

    c, _ = _c6()
    new = make_forecast(c.select_models(np.arange(6)), N[-1], task="t", target_model="m6")
    old = replace(new, schema=SCHEMA_2, low=new.population_low, high=new.population_high,
                  test_set_low=new.low, test_set_high=new.high, population_low=None, population_high=None,
                  instance_point=(), instance_low=(), instance_high=(), dispersion=(), pass_at_k=())
    d = loads(old.to_json())
    assert set(d["forecast"]) == {"point", "low", "high", "level", "test_set"}
    path = tmp_path / "old.json"
    path.write_text(old.to_json())
    back = read_forecast(path)
    assert back == old and (back.these_low, back.these_high) == (new.low, new.high)
    assert back.pop_interval == (new.population_low, new.population_high)
    k, n = c.passes[:, -1], c.samples[:, -1]
    assert back.score(k, n) == new.score(k, n)  # one scoring: the same refit, whatever the schema
    d["forecast"]["test_set"]["low"] = 0.0
    with pytest.raises(UserError, match="edited after it was made"):
        ForecastRecord.from_dict(d, source="old.json")


def test_backtest_compares_a_partly_sampled_size_on_its_sampled_instances():
    """A design leaves the hopeless cells of a size empty: here the 8 instances with the lowest
    true p at 0.5B have no samples there (binomial counts, 2,000 per other cell). The held-out
    row covers the 12 sampled instances alone: observed is their mean k/n, and the forecast is of
    their mean, close to their true mean (0.264) rather than to the mean over all 20 (0.182), which
    the full data's backtest forecasts. A size with no samples at all is not scored."""
    from passuntil.scaling.data import SeriesCounts
    from passuntil.scaling.forecast import _over

    _, p = simulated_series(np.random.default_rng(0), budget=10)
    n = np.full(p.shape, 2000)
    k = np.random.default_rng([0, 1]).binomial(n, p)
    drop = np.argsort(p[:, 3])[:8]
    keep = np.setdiff1d(np.arange(20), drop)
    k2, n2 = k.copy(), n.copy()
    k2[drop, 3] = n2[drop, 3] = 0
    row = {r["n_params"]: r for r in backtest(SeriesCounts(N, k2, n2, 2000))}[N[3]]
    full = {r["n_params"]: r for r in backtest(SeriesCounts(N, k, n, 2000))}[N[3]]
    truth, everyone = p[keep, 3].mean(), p[:, 3].mean()
    assert (row["instances"], row["of"], full["instances"]) == (12, 20, 20)
    assert row["observed"] == pytest.approx((k[keep, 3] / 2000).mean())
    assert abs(np.log(row["point"] / truth)) < 0.03 < abs(np.log(everyone / truth)) / 10
    assert row["low"] <= row["point"] <= row["high"] and row["covered"]
    assert abs(np.log(full["point"] / everyone)) < 0.03
    fit = fit_likelihood(SeriesCounts(N, k2, n2, 2000).select_models([0, 1, 2, 4, 5, 6]))
    f = fit.forecast(N[3], level=0.9)  # over every instance: the restriction keeps its rule
    assert _over(f, fit.instance_draws(N[3], seed=0), np.ones(20, bool), 0.9) == pytest.approx((f.point, f.low, f.high), rel=1e-12)
    k2[:, 3] = n2[:, 3] = 0
    assert N[3] not in {r["n_params"] for r in backtest(SeriesCounts(N, k2, n2, 2000))}


def test_auto_runs_the_full_bayes_fit_on_zero_heavy_data_via_cli(tmp_path, capsys):
    """`--method auto` (forecast's and backtest's default): the full-Bayes fit where over half
    the cells have no pass (here 56%: K = 1, 30 samples, the four smallest sizes), the
    likelihood fit when named; the file records the fit that ran, and scoring refits it."""
    store = tmp_path / "s.sqlite"
    sizes = [a for m in ("0.03B", "0.1B", "0.2B", "0.5B") for a in ("--model", m)]
    assert run_cli(capsys, "eval", "--task", "sim-scaling", "--store", str(store), "--k", "1",
                   "--max-samples", "30", *sizes)[0] == 0
    code, out, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-n", "1.5e9",
                             "--out", str(tmp_path / "auto.json"))
    assert code == 0, err
    assert "(90%, bayes)" in out and "warning: mostly-zero: 56% of the cells have no pass" in out
    record = read_forecast(tmp_path / "auto.json")
    assert record.method == "bayes"
    fit, method = record.refit()
    assert method == "bayes" and fit.method == "bayes"
    code, out, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-n", "1.5e9",
                             "--method", "likelihood", "--out", str(tmp_path / "lik.json"))
    assert code == 0 and "(90%, likelihood)" in out, err
    code, out, err = run_cli(capsys, "backtest", str(store), "--task", "sim-scaling")
    assert code == 0 and "backtest (bayes," in out, err
    assert "passuntil: backtest of sim-scaling: 2/3 sizes held out (full-Bayes fit" in err  # progress, ETA
    code, out, err = run_cli(capsys, "fit", str(store), "--task", "sim-scaling", "--method", "auto", "--json")
    assert code == 0 and list(loads(out)["fits"]) == ["auto (bayes)"], err


def test_auto_falls_back_to_the_likelihood_fit_and_says_so(monkeypatch):
    """Zero-heavy data with more instances than AUTO_BAYES_MAX_INSTANCES, or a Bayes fit that
    cannot run: the likelihood fit, and the forecast carries a note saying why."""
    from passuntil.scaling import fitters
    from passuntil.scaling.data import SeriesCounts

    c = _c6()[0].select_models(np.arange(6))
    zero_heavy = SeriesCounts(c.n_params, np.where(np.arange(6) < 4, 0, c.passes), c.samples, 2,
                              c.instance_ids, c.models)
    assert zero_heavy.zero_share > 0.5 and c.zero_share <= 0.5
    assert fitters.auto_method(c) == ("likelihood", "")
    assert fitters.auto_method(zero_heavy)[0] == "bayes"
    most = fitters.AUTO_BAYES_MAX_INSTANCES
    monkeypatch.setattr(fitters, "AUTO_BAYES_MAX_INSTANCES", 19)
    method, note = fitters.auto_method(zero_heavy)
    assert method == "likelihood" and "20 instances (> 19)" in note
    record = make_forecast(zero_heavy, N[-1], task="t")
    assert record.method == "likelihood" and any(w.startswith("method auto: ") for w in record.warnings)
    monkeypatch.setattr(fitters, "AUTO_BAYES_MAX_INSTANCES", most)

    def refuse(counts):
        raise ValueError("made to fail")
    monkeypatch.setitem(fitters.FITTERS, "bayes", refuse)
    record = make_forecast(zero_heavy, N[-1], task="t")
    assert record.method == "likelihood"
    assert any("the full-Bayes fit cannot run on this data (made to fail)" in w for w in record.warnings)
