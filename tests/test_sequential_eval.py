"""`passuntil eval --design forecast`: sequential sampling toward a forecast, through the CLI.

On the simulated series (known truth, fast) and the bundled tiny series: the design gives cells
unequal quotas (most to the informative sizes), stops at the budget or at the target width, a
killed run resumed ends with the counts of an uninterrupted one, the analysis reads the counts
as plain binomial data, and bad inputs are one line.
"""

import json

import numpy as np
import pandas as pd
import pytest

from passuntil.scaling.forecast import read_forecast
from passuntil.store import Store
from tests.conftest import run_cli

SIM = ("--task", "sim-scaling", "--design", "forecast", "--target-model", "2.4B")


def _design(capsys, store, run, *extra):
    return run_cli(capsys, "eval", *SIM, "--store", str(store), "--run", run, *extra)


def _table(store, run):
    df = Store(store, create=False).results(run)
    return df[["model", "task", "instance_id", "samples", "passes", "pass_indices", "overshoot", "stopped"]]


def _log(store, run):
    config = Store(store, create=False).run_config(run)
    return config.get("design_rounds", []), config.get("design_results", {}), config


def test_run_quotas_counts_every_sample_and_sample_j_is_draw_j(toy_task, toy_sampler):
    """The engine's door for the design: each instance is drawn to its target with no K-stop
    (passes beyond K = 1 count, nothing is overshoot), whatever the batch size; drawing in two
    steps (a round, then a later one) gives the counts of one step to the final target; the cap
    holds ("budget"), a met quota is "design"."""
    from passuntil.engine import EngineConfig, new_states, run_quotas

    final = {("toy", x.id): 300 + 50 * j for j, x in enumerate(toy_task.instances)}
    half = {k: v // 2 for k, v in final.items()}

    def draw(steps, batch):
        cfg = EngineConfig(k_target=1, max_samples=600, batch_size=batch, seed=4)
        states = new_states([toy_task], model="m", seed=4)
        for targets in steps:
            run_quotas(toy_sampler, [toy_task], cfg, model="m", states=states, targets=targets)
        return [(st.samples, st.passes, tuple(st.pass_indices), st.overshoot, st.stopped) for st in states]

    once = draw([final], 1024)
    assert once == draw([half, final], 7) == draw([half, final], 1024)
    assert [c[0] for c in once] == [min(v, 600) for v in final.values()]
    assert once[0][1] > 100 and all(c[3] == 0 for c in once)  # p = 0.5: ~150 passes, all counted
    assert [c[4] for c in once] == ["design"] * 6 + ["budget"] * 2  # the last two reach the cap
    p = np.array([0.5, 0.2, 0.05, 0.01])
    k = np.array([c[1] for c in once[:4]])
    n = np.array([c[0] for c in once[:4]])
    assert np.all(np.abs(k - n * p) < 4 * np.sqrt(n * p * (1 - p)))


def test_design_spends_unequal_quotas_on_informative_cells_and_stops_at_the_budget(tmp_path, capsys, monkeypatch):
    """Budget 30,000 in rounds from 3,000: exactly the budget is spent, the target model is never
    sampled, the pilot is even and later rounds give most samples to the largest fitted sizes
    (information per sample ~ p log(p)^2), each model's sampler opens once for all rounds, and the
    run records K = the cap (K-stop off), every round's decision and its outcome."""
    import passuntil.design_runner as dr

    opened = []
    real_open = dr.open_sampler
    monkeypatch.setattr(dr, "open_sampler", lambda spec, tasks: opened.append(spec.name) or real_open(spec, tasks))
    store = tmp_path / "d.sqlite"
    code, out, err = _design(capsys, store, "d", "--total-budget", "3e4", "--round-size", "3000")
    assert code == 0, err
    assert "120 instance results" in out and "30,000 samples in all" in out and "stopped by budget" in out
    assert "of the budget" in err  # the progress line: samples spent of the budget, ETA
    df = _table(store, "d")
    assert df["samples"].sum() == 30_000 and "2.4B" not in set(df["model"])
    assert set(df["stopped"]) == {"design"}
    by_model = df.groupby("model")["samples"].sum()
    assert by_model["1.5B"] > 15_000 and by_model["0.03B"] < 1_500  # the pilot gave each size 500
    assert df["samples"].max() > 10 * df["samples"].min()  # unequal quotas per cell
    rounds, results, config = _log(store, "d")
    assert [r["round"] for r in rounds] == list(range(1, len(rounds) + 1)) and len(rounds) >= 4
    assert rounds[0]["samples"] == 3000 and rounds[0]["cells"] == 120  # the pilot: every cell
    assert sum(r["samples"] for r in rounds) == 30_000
    assert results["sim-scaling"]["reason"] == "budget" and results["sim-scaling"]["spent"] == 30_000
    assert config["engine"]["k_target"] == config["engine"]["max_samples"] == 30_000
    assert config["design"]["target_model"] == "2.4B" and config["design"]["target_n"] == 2.45e9
    # no --target-width: no width stop, so the likelihood fit throughout (the Bayes default is the width stop's)
    assert config["design"]["width_stop_method"] == "likelihood"
    assert results["sim-scaling"]["interval"]["method"] == "likelihood"
    assert sorted(opened) == sorted(set(opened)) and len(opened) == 6  # one load per model, all rounds
    code, out, _ = run_cli(capsys, "show", str(store), "--run", "d")
    assert code == 0 and "round 2 of sim-scaling" in out and "K-stop off" in out


def test_design_stops_at_the_target_width_before_the_budget(tmp_path, capsys):
    store = tmp_path / "w.sqlite"
    code, out, err = _design(capsys, store, "w", "--total-budget", "1e6", "--round-size", "4000",
                             "--target-width", "0.05")
    assert code == 0, err
    _, results, _ = _log(store, "w")
    res = results["sim-scaling"]
    assert res["reason"] == "halfwidth" and res["interval"]["log_halfwidth"] <= 0.05
    assert res["spent"] < 100_000 and _table(store, "w")["samples"].sum() == res["spent"]
    assert "stopped by halfwidth" in out


def test_no_width_stop_before_the_guard(tmp_path, capsys):
    """The same width as above, but --width-stop-after 60000: the design goes on past the round
    where it stopped before, and stops by width only once that many samples are spent."""
    store = tmp_path / "g.sqlite"
    code, out, err = _design(capsys, store, "g", "--total-budget", "1e6", "--round-size", "4000",
                             "--target-width", "0.05", "--width-stop-after", "6e4")
    assert code == 0, err
    _, results, _ = _log(store, "g")
    res = results["sim-scaling"]
    assert res["reason"] == "halfwidth" and res["spent"] >= 60_000
    assert "no width stop before 60,000 samples" in run_cli(capsys, "show", str(store), "--run", "g")[1]
    code, _, err = _design(capsys, tmp_path / "z.sqlite", "z", "--total-budget", "1e4", "--round-size", "4000",
                           "--target-width", "0.05", "--width-stop-after", "0")  # 0: the default, no guard
    assert code == 0, err


def test_a_width_stop_on_the_bayes_fit_is_recorded_and_kept_on_resume(tmp_path, capsys):
    """--width-stop-method bayes: the run finishes, records the setting (shown by `show`), decides
    and ends on the full-Bayes fit's interval (its split-R-hat recorded; a width stop only within
    the width and at R-hat <= 1.05), and a resume asking for the likelihood stop is refused in
    one line. Runs recorded before the setting read back as "likelihood"."""
    from passuntil.sequential import DesignSettings

    store = tmp_path / "bw.sqlite"
    code, out, err = _design(capsys, store, "bw", "--total-budget", "1e5", "--round-size", "4000",
                             "--target-width", "0.05", "--width-stop-method", "bayes")
    assert code == 0, err
    rounds, results, config = _log(store, "bw")
    assert config["design"]["width_stop_method"] == "bayes"
    res = results["sim-scaling"]
    iv = res["interval"]
    assert iv["method"] == "bayes" and iv["rhat"] is not None and "from the full-Bayes fit" in out
    if res["reason"] == "halfwidth":
        assert iv["log_halfwidth"] <= 0.05 and iv["rhat"] <= 1.05 and iv["refused"] == ""
    assert {e["interval"]["method"] for e in rounds} <= {"likelihood", "bayes"}
    assert any(e["interval"]["method"] == "bayes" for e in rounds)  # once two sizes have passes
    assert "the width stop on the full-Bayes fit's interval" in run_cli(capsys, "show", str(store), "--run", "bw")[1]
    # a forecast on the run uses, unless told, the fit the run stopped on: the same numbers
    code, out, err = run_cli(capsys, "forecast", str(store), "--run", "bw", "--task", "sim-scaling",
                             "--target-model", "2.4B", "--out", str(tmp_path / "bw.json"))
    rec = read_forecast(tmp_path / "bw.json")
    assert code == 0 and "bayes)" in out and rec.method == "bayes", err
    assert (rec.point, rec.these_low, rec.these_high) == pytest.approx((iv["point"], iv["low"], iv["high"]), rel=1e-9)
    code, _, err = run_cli(capsys, "eval", "--store", str(store), "--run", "bw", "--resume",
                           "--width-stop-method", "likelihood")
    assert code == 2 and "was made with --width-stop-method 'bayes', not 'likelihood'" in err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    old = {k: v for k, v in config["design"].items() if k != "width_stop_method"}
    assert DesignSettings.from_dict(old).width_stop_method == "likelihood"


def test_a_target_below_the_smallest_size_is_noted_as_a_downward_extrapolation(tmp_path, capsys):
    store = tmp_path / "low.sqlite"
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--series", "sim", "--design", "forecast",
                           "--target-n", "1e6", "--total-budget", "2000", "--store", str(store))
    assert code == 0, err
    shown = run_cli(capsys, "show", str(store))[1]
    assert "extrapolation downward" in shown and "interpolation" not in shown


def test_each_task_has_its_own_design_and_budget(tmp_path, capsys):
    """Two tasks in one run: one design each, sharing the rounds; each spends its own budget."""
    store = tmp_path / "two.sqlite"
    code, out, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--task", "sim-accelerated", "--design",
                             "forecast", "--target-model", "2.4B", "--total-budget", "6000", "--round-size", "2000",
                             "--store", str(store), "--run", "two")
    assert code == 0, err
    spent = _table(store, "two").groupby("task")["samples"].sum().to_dict()
    assert spent == {"sim-scaling": 6000, "sim-accelerated": 6000}
    rounds, results, _ = _log(store, "two")
    assert {r["task"] for r in rounds if r["round"] == 1} == {"sim-scaling", "sim-accelerated"}
    assert set(results) == {"sim-scaling", "sim-accelerated"} and out.count("stopped by budget") == 2


def _kill(real, n, *, after=False):
    """`real`, raising KeyboardInterrupt (a kill) at its n-th call: before it runs, or after."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n and not after:
            raise KeyboardInterrupt
        out = real(*args, **kwargs)
        if len(calls) == n:
            raise KeyboardInterrupt
        return out
    return wrapped


@pytest.mark.parametrize("where", ["mid-round commit", "after a decision is recorded"])
def test_a_killed_design_run_resumes_to_the_counts_of_an_uninterrupted_run(tmp_path, capsys, monkeypatch, where):
    """Killed inside a round (between two engine batches of it) or right after a round's decision
    was recorded and before it was sampled: `--resume` ends with exactly the counts, pass indices
    and recorded decisions of a run that was never interrupted."""
    import passuntil.design_runner as dr

    args = ("--total-budget", "1.2e4", "--round-size", "4000", "--batch-size", "256", "--seed", "3")
    store = tmp_path / "r.sqlite"
    code, _, err = _design(capsys, store, "whole", *args)
    assert code == 0, err
    if where == "mid-round commit":
        monkeypatch.setattr(Store, "commit_round", _kill(Store.commit_round, 25))
    else:
        monkeypatch.setattr(dr, "append_rounds", _kill(dr.append_rounds, 3, after=True))
    code, _, err = _design(capsys, store, "cut", *args)
    assert code == 130 and "--resume" in err
    monkeypatch.undo()
    cut = _table(store, "cut")
    assert 0 < cut["samples"].sum() < 12_000
    have = {(r.model, r.instance_id): r.samples for r in cut.itertuples()}
    rounds = _log(store, "cut")[0]
    last = [e for e in rounds if e["round"] == rounds[-1]["round"]]
    assert any(have.get((m, iid), 0) < n for e in last for m, t in e["targets"].items() for iid, n in t.items())
    code, _, err = run_cli(capsys, "eval", "--store", str(store), "--run", "cut", "--resume")
    assert code == 0, err
    whole, resumed = _table(store, "whole"), _table(store, "cut")
    pd.testing.assert_frame_equal(whole.reset_index(drop=True), resumed.reset_index(drop=True))
    assert _log(store, "whole")[:2] == _log(store, "cut")[:2]


def test_analysis_reads_a_design_run_as_binomial_counts(tmp_path, capsys):
    """No K-stop: the run's K is its per-cell cap, so every estimator is the binomial one (the
    'unbiased' PU is k/n, the interval Clopper-Pearson); `forecast` on the run gives the design's
    own final forecast (the same pooled likelihood fit of the same counts)."""
    from scipy import stats as sps

    store = tmp_path / "a.sqlite"
    code, _, err = _design(capsys, store, "a", "--total-budget", "2e4", "--round-size", "2000")
    assert code == 0, err
    out_csv = tmp_path / "a.csv"
    assert run_cli(capsys, "export", str(store), "--run", "a", "--out", str(out_csv))[0] == 0
    df = pd.read_csv(out_csv)
    k, n = df["passes"].to_numpy(), df["samples"].to_numpy()
    assert (k > 1).any()  # some cells passed more than once: a K = 1 reading would be wrong
    np.testing.assert_allclose(df["pu_unbiased"], k / n)
    cp_low = np.where(k > 0, sps.beta.ppf(0.025, np.maximum(k, 1), n - k + 1), 0.0)
    np.testing.assert_allclose(df["ci_low"], cp_low, rtol=1e-9)
    code, out, err = run_cli(capsys, "forecast", str(store), "--run", "a", "--task", "sim-scaling",
                             "--target-n", "2.45e9", "--out", str(tmp_path / "f.json"))
    assert code == 0, err
    record = json.loads((tmp_path / "f.json").read_text())
    stored = df.pivot_table(index="instance_id", columns="n_params", values="samples")
    assert record["data"]["samples"] == stored.to_numpy().astype(int).tolist()  # unequal n per cell, as stored
    design_point = _log(store, "a")[1]["sim-scaling"]["interval"]["point"]
    assert record["forecast"]["point"] == pytest.approx(design_point, rel=0.02)
    code, _, err = run_cli(capsys, "report", str(store), "--run", "a", "--out", str(tmp_path / "rep"))
    assert code == 0, err
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "off (sequential design toward N = 2.45e+09)" in page  # not the cap shown as K


@pytest.mark.slow
def test_a_design_run_on_ray_has_the_counts_of_a_local_run(tmp_path, capsys):
    """`--ray local`: the driver decides the rounds, actors sample the cells (shards of 8), the
    counts, pass indices and decisions equal the local run's."""
    ray = pytest.importorskip("ray")
    args = ("--total-budget", "1e4", "--round-size", "2000", "--seed", "5")
    store = tmp_path / "ray.sqlite"
    assert _design(capsys, store, "local", *args)[0] == 0
    ray.shutdown()  # a Ray left by another test would be taken over with its own settings
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        code, _, err = _design(capsys, store, "ray", *args, "--ray", "local", "--ray-workers", "2")
    finally:
        ray.shutdown()
    assert code == 0, err
    pd.testing.assert_frame_equal(_table(store, "local").reset_index(drop=True),
                                  _table(store, "ray").reset_index(drop=True))
    assert _log(store, "local")[:2] == _log(store, "ray")[:2]


@pytest.mark.slow
def test_the_bundled_tiny_series_runs_a_design_toward_tiny_7(tmp_path, capsys, monkeypatch):
    """The real sampler (the bundled series): two sampled sizes, tiny-7 the unsampled target, a
    tiny budget spent exactly, each sampler loaded once and kept over every round (a small series)."""
    import passuntil.design_runner as dr

    opened = []
    real_open = dr.open_sampler
    monkeypatch.setattr(dr, "open_sampler", lambda spec, tasks: opened.append(spec.name) or real_open(spec, tasks))
    store = tmp_path / "t.sqlite"
    code, out, err = run_cli(capsys, "eval", "--task", "arith", "--design", "forecast", "--target-model", "tiny-7",
                             "--model", "tiny-5", "--model", "tiny-6", "--limit", "3", "--total-budget", "1500",
                             "--round-size", "250", "--store", str(store), "--run", "t", "--no-reference-scores")
    assert code == 0, err
    df = _table(store, "t")
    assert df["samples"].sum() == 1500 and set(df["model"]) == {"tiny-5", "tiny-6"}
    rounds, results, _ = _log(store, "t")
    assert results["arith"]["reason"] == "budget" and len(rounds) >= 4
    assert opened == ["tiny-5", "tiny-6"]
    assert df["samples"].max() > 1.5 * df["samples"].min()


@pytest.mark.parametrize("extra, message", [
    ((), "needs a target: --target-n SIZE or --target-model NAME"),
    (("--target-n", "1e9", "--target-model", "2.4B"), "needs a target"),
    (("--target-model", "7B", "--total-budget", "100"), "--target-model '7B' is not in the series"),
    (("--target-n", "-1", "--total-budget", "100"), "--target-n must be a positive number"),
    (("--target-n", "1e9"), "needs --total-budget SAMPLES, --target-width HALFWIDTH, or both"),
    (("--target-n", "1e9", "--total-budget", "0"), "--total-budget must be a whole number of samples >= 1"),
    (("--target-n", "1e9", "--total-budget", "-5"), "--total-budget must be a whole number"),
    (("--target-n", "1e9", "--total-budget", "10.5"), "--total-budget must be a whole number"),
    (("--target-n", "1e9", "--target-width", "0"), "--target-width must be a positive half-width"),
    (("--target-n", "1e9", "--target-width", "-0.1"), "--target-width must be a positive half-width"),
    (("--target-n", "1e9", "--total-budget", "100", "--round-size", "0"), "--round-size must be a whole number"),
    (("--target-n", "1e9", "--total-budget", "100", "--k", "2"), "--k does not apply to --design forecast"),
    (("--target-n", "1e9", "--total-budget", "100", "--width-stop-after", "1e4"), "it needs --target-width"),
    (("--target-n", "1e9", "--target-width", "0.1", "--width-stop-after", "-1"),
     "--width-stop-after must be a whole number"),
    (("--target-n", "1e9", "--total-budget", "100", "--width-stop-method", "bayes"), "it needs --target-width"),
    (("--target-n", "1e9", "--total-budget", "100", "--exact"), "--exact does not combine with --design"),
    (("--target-model", "2.4B", "--total-budget", "100", "--model", "0.03B", "--model", "2.4B"),
     "is the forecast's target and is not sampled"),
    (("--target-model", "2.4B", "--total-budget", "100", "--model", "0.03B"),
     "needs at least two sampled model sizes to fit a slope"),
])
def test_bad_design_inputs_are_one_line(tmp_path, capsys, extra, message):
    code, out, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--design", "forecast",
                             "--store", str(tmp_path / "b.sqlite"), *extra)
    assert code == 2 and message in err and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.sqlite").exists() or not Store(tmp_path / "b.sqlite").runs()


def test_design_options_need_the_design_and_resume_keeps_them(tmp_path, capsys):
    store = tmp_path / "o.sqlite"
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--target-n", "1e9", "--store", str(store))
    assert code == 2 and "--target-n needs --design forecast" in err
    assert _design(capsys, store, "o", "--total-budget", "2000", "--round-size", "1000")[0] == 0
    code, _, err = run_cli(capsys, "eval", "--store", str(store), "--run", "o", "--resume", "--total-budget", "5000")
    assert code == 2 and "was made with --total-budget 2000, not 5000.0" in err
    plain = ("--task", "sim-scaling", "--model", "0.03B", "--max-samples", "20", "--store", str(store), "--run", "p")
    assert run_cli(capsys, "eval", *plain)[0] == 0
    code, _, err = run_cli(capsys, "eval", "--store", str(store), "--run", "p", "--resume", "--target-n", "1e9")
    assert code == 2 and "was made with --design passuntil, not forecast" in err


def test_the_design_keeps_within_the_per_cell_cap_and_spends_the_budget(tmp_path, capsys):
    """--max-samples 600 under a budget of 30,000 that the uncapped design (above) spends with
    over 15,000 on 1.5B's 20 cells: no cell passes the cap, every round spends its whole budget
    (what a full cell cannot take goes to the next-best cells instead of being lost), and the run
    stops by budget, not by the cap."""
    from passuntil.sequential import DesignSettings

    store = tmp_path / "cap.sqlite"
    code, out, err = _design(capsys, store, "c", "--total-budget", "3e4", "--round-size", "3000",
                             "--max-samples", "600")
    assert code == 0, err
    df = _table(store, "c")
    assert df["samples"].max() == 600 and (df["samples"] == 600).sum() >= 10  # the cap binds
    assert df["samples"].sum() == 30_000 and "stopped by budget" in out
    rounds, results, config = _log(store, "c")
    assert results["sim-scaling"]["reason"] == "budget" and config["engine"]["max_samples"] == 600
    design = DesignSettings.from_dict(config["design"]).design()
    assert [r["samples"] for r in rounds] == [design.round_budget(r["spent"]) for r in rounds]
    assert all(n <= 600 for r in rounds for t in r["targets"].values() for n in t.values())


def test_a_design_whose_informative_cells_are_full_stops_by_the_cap(tmp_path, capsys):
    """A cap of 100 per cell and a budget of 100,000 that the 120 cells cannot take: every round
    but the last spends its whole round budget, the cells fill up to the cap (on `sim-scaling`
    every size informs the forecast; that hopeless cells are not filled instead is
    tests/test_design.py), and the run stops by the cap and says so, with the budget left; the
    design's own next decision on the final counts is empty. (Before the design knew the cap,
    this run took 111 rounds and stopped by cap after 10,586 samples with cells below the cap.)"""
    from passuntil.design_runner import series_counts
    from passuntil.runspec import RunSpec
    from passuntil.scaling.design import next_round
    from passuntil.sequential import DesignSettings

    store = tmp_path / "full.sqlite"
    code, out, err = _design(capsys, store, "f", "--total-budget", "1e5", "--round-size", "2000",
                             "--max-samples", "100")
    assert code == 0, err
    rounds, results, config = _log(store, "f")
    res = results["sim-scaling"]
    assert res["reason"] == "cap" and res["spent"] == 12_000 and (_table(store, "f")["samples"] == 100).all()
    assert "stopped by cap (every cell that could still inform the forecast is at the per-cell cap, " \
           "--max-samples 100, 88,000 of the budget left)" in out
    design = DesignSettings.from_dict(config["design"]).design()
    assert [r["samples"] for r in rounds[:-1]] == [design.round_budget(r["spent"]) for r in rounds[:-1]]
    st = Store(store, create=False)
    spec = RunSpec.from_store(st, "f")
    counts = series_counts({m.name: st.counts("f", m.name) for m in spec.models}, spec.models,
                           spec.load_tasks()[0])
    assert not next_round(counts, design, seed=spec.engine.seed, cap=100).any()


def _table_rows(out: str) -> dict[str, list[str]]:
    """The rows of a printed table, by their first cell."""
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│")]
    return {r[0]: r for r in rows}


def test_show_and_backtest_compare_like_with_like_where_a_design_left_cells_empty(tmp_path, capsys):
    """Rounds from 60 samples over 120 cells: the pilot reaches half of them and later rounds go
    where the forecast gains, so some sizes have samples of only some instances. `show` says, per
    such size, how many instances its mean covers of how many; `backtest` compares a held-out size
    on the instances sampled there: its observed mean (k/n), the exact mean (the simulated truth)
    and the forecast all cover the same instances (the forecast's interval holds the mean of the
    per-instance forecasts `forecast --target-model` gives for them; its point is not that
    command's forecast of all 20). (The backtest used to count an unsampled instance as PU 0 in
    "observed" and forecast the mean over all of them.)"""
    store = tmp_path / "cov.sqlite"
    code, _, err = _design(capsys, store, "cov", "--total-budget", "3000", "--round-size", "60")
    assert code == 0, err
    assert run_cli(capsys, "export", str(store), "--run", "cov", "--out", str(tmp_path / "cov.csv"))[0] == 0
    df = pd.read_csv(tmp_path / "cov.csv", dtype={"instance_id": str})
    sizes = df.groupby("model")["n_params"].first().sort_values()
    per = df.groupby("model")["instance_id"].nunique()[sizes.index]
    partial = [m for m in sizes.index if per[m] < 20]
    assert partial and set(per[sizes.index[-1]:]) == {20}
    code, shown, err = run_cli(capsys, "show", str(store), "--run", "cov")
    assert code == 0, err
    assert "not every instance has samples at every size (" + ", ".join(f"{m}: {per[m]} of 20" for m in partial) \
        + "): `show`'s mean PU at such a size is over the instances sampled there only" in shown
    code, out, err = run_cli(capsys, "backtest", str(store), "--run", "cov", "--task", "sim-scaling")
    assert code == 0, err
    rows = _table_rows(out)
    held = [m for m in partial if m != sizes.index[0]]  # the smallest size is never held out
    assert held
    for m in held:
        g = df[df["model"] == m]
        row = rows[m]
        assert row[3] == f"{(g['passes'] / g['samples']).mean():.4g}"  # observed: the sampled instances
        assert row[6] == f"exact p {g['exact_p'].mean():.4g}"
        f = tmp_path / f"{m}.json"
        assert run_cli(capsys, "forecast", str(store), "--run", "cov", "--task", "sim-scaling",
                       "--target-model", m, "--out", str(f))[0] == 0
        record = json.loads(f.read_text())
        ids = record["data"]["instance_ids"]
        assert sorted(ids) == sorted(df["instance_id"].unique())  # the instances of the backtest's fit
        point = dict(zip(ids, record["forecast"]["instances"]["point"], strict=True))
        low, high = (float(v) for v in row[5].strip("[]").split(","))
        assert low <= float(row[4]) <= high
        assert low <= np.mean([point[i] for i in g["instance_id"]]) <= high  # those instances' forecasts
        assert row[4] != f"{record['forecast']['point']:.4g}"  # not the forecast of all 20
