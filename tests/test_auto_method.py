"""`--method auto` (forecast's and backtest's default) attacked as a user would meet it: the
cases an outside review found, each through the CLI on a simulated store (docs/statistics.md,
"The default fit: `--method auto`")."""

import re

import numpy as np

from passuntil.scaling.forecast import read_forecast
from tests.conftest import run_cli

SIZES = ("0.03B", "0.1B", "0.2B", "0.5B", "0.9B", "1.5B", "2.4B")


def _eval(capsys, store, *args):
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--series", "sim", "--store", str(store), *args)
    assert code == 0, err


def _models(*names):
    return [a for m in names for a in ("--model", m)]


def test_the_backtest_checks_the_forecast_a_user_would_have_made(tmp_path, capsys):
    """49% of the cells are empty on all seven sizes, 55% without 2.4B: `forecast --target-model
    2.4B` runs the Bayes fit, so the backtest's leave-largest-out row must too (auto resolved on
    all sizes chose the likelihood fit for every row), and print the same forecast."""
    store = tmp_path / "g.sqlite"
    _eval(capsys, store, "--seed", "1", "--k", "1", "--max-samples", "9")
    code, out, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-model", "2.4B",
                             "--out", str(tmp_path / "g.json"))
    assert code == 0 and "(90%, bayes)" in out, err
    point = re.search(r"mean PU (\S+);", out).group(1)
    code, out, err = run_cli(capsys, "backtest", str(store), "--task", "sim-scaling")
    assert code == 0, err
    assert "bayes without 2.4B" in out and "likelihood without 0.1B" in out  # per held-out size
    largest = next(line for line in out.splitlines() if "│ 2.4B" in line)
    assert f"│ {point}" in largest  # the same forecast as the pre-registered one
    assert "sizes held out (full-Bayes fit" in err  # progress while the slow fit is refitted

    # the Bayes forecast's pass@1 is the mean PU: same draws, same interval
    record = read_forecast(tmp_path / "g.json")
    k1 = next(q for q in record.pass_at_k if q.k == 1)
    assert np.isclose(k1.low, record.low, rtol=1e-12) and np.isclose(k1.high, record.high, rtol=1e-12)


def test_few_instances_keep_the_likelihood_fit_and_say_why(tmp_path, capsys):
    """Two instances passing at one size: the hierarchical fit's answer would be its priors'
    ([0.55, 0.95] for a true 0.39); auto keeps the likelihood fit and says so."""
    store = tmp_path / "l.sqlite"
    _eval(capsys, store, "--limit", "2", "--k", "1", "--max-samples", "3", *_models(*SIZES[:5]))
    code, out, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-model", "0.9B",
                             "--out", str(tmp_path / "l.json"))
    assert code == 0 and "(90%, likelihood)" in out, err
    assert "warning: method auto: 75% of the cells have no pass" in out and "2 instance(s) (< 5)" in out
    # a name that is no fit is one line and exit 2
    code, out, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-model", "0.9B",
                             "--method", "Auto", "--out", str(tmp_path / "x.json"))
    assert code == 2 and "unknown fit method 'Auto'" in err and len(err.strip().splitlines()) == 1


def test_on_a_design_run_forecast_and_backtest_default_to_the_fit_it_ended_on(tmp_path, capsys):
    store = tmp_path / "d.sqlite"
    _eval(capsys, store, "--design", "forecast", "--target-model", "2.4B", *_models(*SIZES[:4]),
          "--total-budget", "2000")
    code, out, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-model", "2.4B",
                             "--out", str(tmp_path / "d.json"))
    assert code == 0 and "(90%, likelihood)" in out, err
    code, out, err = run_cli(capsys, "backtest", str(store), "--task", "sim-scaling")
    assert code == 0 and "backtest (likelihood," in out, err


def test_a_bayes_backtest_on_partly_sampled_sizes_prints_its_forecasts_own_statistic(tmp_path, capsys):
    """A design run leaves cells empty; the backtest compares a held-out size on its sampled
    instances, its point by the forecast's own rule (the median of the same draws). The Bayes
    fit's `instance_draws` resampled its MCMC draws, so neither rule matched and the printed
    point was the mean of per-instance medians (7.8x too low at 0.1B in the review)."""
    from passuntil import analysis
    from passuntil.scaling.fitters import fit_task_law

    store = tmp_path / "p.sqlite"
    _eval(capsys, store, "--seed", "1", "--design", "forecast", "--target-model", "2.4B", *_models(*SIZES[:6]),
          "--total-budget", "600", "--round-size", "30")
    code, out, err = run_cli(capsys, "backtest", str(store), "--task", "sim-scaling", "--method", "bayes")
    assert code == 0 and "backtest (bayes," in out, err
    rows = analysis.backtest(str(store), task="sim-scaling", run_id=None, method="bayes")
    counts, _ = analysis.task_counts(analysis.RunTable.read(str(store), None), "sim-scaling")
    partial = [r for r in rows if r["instances"] < r["of"]]
    assert partial, "the design left no held-out size partly sampled"
    for r in partial:
        held = list(counts.models).index(r["held_out"])
        fit = fit_task_law(counts.select_models([j for j in range(len(SIZES) - 1) if j != held]), "bayes")
        cells = counts.samples[:, held] > 0
        draws = fit.instance_draws(counts.n_params[held])[:, cells].mean(axis=1)
        assert np.isclose(r["point"], np.median(draws), rtol=1e-9)
        assert f"{r['point']:.4g}" in out
