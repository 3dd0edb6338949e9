"""The exact mode: `passuntil eval --exact` stores exact pass probabilities as the run's data,
and fit / forecast / emergence use them with zero sampling variance (`scaling/exact.py`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from passuntil.cli import cli
from passuntil.engine import EngineConfig
from passuntil.runspec import RunSpec, TaskRef
from passuntil.scaling.exact import exact_curvature, fit_exact, forecast_exact
from passuntil.series import load_series
from passuntil.store import Store
from passuntil.tasks.simulated import law_probability
from tests.conftest import run_cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# the run specification ---------------------------------------------------------------------------

def test_runspec_records_and_round_trips_exact():
    spec = RunSpec((TaskRef("sim-scaling", "sim-scaling", "d"),), "sim", tuple(load_series("sim").models),
                   EngineConfig(), exact="auto")
    assert RunSpec.from_json(spec.to_json()).exact == "auto"
    old = spec.to_dict()
    del old["exact"]  # a run of an older version: sampled
    assert RunSpec.from_dict(old).exact == "off"


# eval --exact -----------------------------------------------------------------------------------

def test_eval_exact_stores_exact_probabilities_and_draws_no_samples(tmp_path):
    """On the simulated series the exact probability is the known true law, at every size."""
    db = tmp_path / "s.sqlite"
    r = invoke("eval", "--exact", "--task", "sim-scaling", "--series", "sim", "--store", db)
    assert r.exit_code == 0, r.output
    assert "0 samples drawn" in r.output and "exact pass probabilities" in r.output
    assert RunSpec.from_store(Store(db, create=False), "main").exact == "on"
    out = tmp_path / "e.csv"
    assert invoke("export", db, "--out", out).exit_code == 0
    df = pd.read_csv(out, dtype={"instance_id": str})
    assert (df["samples"] == 0).all() and (df["stopped"] == "exact").all()
    from passuntil.tasks import get_task

    laws = {x.id: x.meta["law"] for x in get_task("sim-scaling").instances}
    truth = [law_probability(laws[i], n) for i, n in zip(df["instance_id"], df["n_params"])]
    assert len(df) == 20 * len(load_series("sim").models)
    np.testing.assert_allclose(df["exact_p"], truth, rtol=1e-12)
    np.testing.assert_allclose(df["pu"], df["exact_p"])
    shown = invoke("show", db, "--instances")
    assert shown.exit_code == 0 and "exact" in shown.output


@pytest.mark.parametrize("task, reason", [
    ("code", "'unit_tests' check"), (EXAMPLES / "capitals.yaml", "'contains' check")])
def test_eval_exact_refuses_a_check_that_cannot_be_exact(capsys, tmp_path, task, reason):
    db = tmp_path / "s.sqlite"
    code, out, err = run_cli(capsys, "eval", "--exact", "--task", "arith", "--task", str(task),
                             "--model", "tiny-2", "--store", str(db))
    assert code == 2 and not out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --exact:") and reason in lines[0]
    assert "--exact=auto" in lines[0]
    assert not db.exists() or "main" not in Store(db, create=False).runs()  # nothing recorded


def test_eval_exact_refuses_a_backend_that_cannot_compute_it(capsys, tmp_path):
    series = tmp_path / "served.toml"
    series.write_text('name = "served"\n[[models]]\nname = "m"\nn_params = 1e6\nbackend = "openai"\n'
                      'path = "http://127.0.0.1:9/v1"\n')
    code, _, err = run_cli(capsys, "eval", "--exact", "--task", "arith", "--series", str(series),
                           "--temperature", "0.7", "--store", str(tmp_path / "s.sqlite"))
    assert code == 2 and "the openai backend returns the model's raw log-probs" in err  # at temperature 1 it can


def test_eval_exact_auto_samples_what_cannot_be_exact(tmp_path):
    """--exact=auto: arith exactly, the contains task with PassUntil, in one run."""
    db = tmp_path / "s.sqlite"
    r = invoke("eval", "--exact=auto", "--task", "arith", "--task", EXAMPLES / "capitals.yaml",
               "--model", "tiny-2", "--limit", "2", "--max-samples", "8", "--batch-size", "16",
               "--store", db)
    assert r.exit_code == 0, r.output
    out = tmp_path / "e.csv"
    invoke("export", db, "--out", out)
    df = pd.read_csv(out, dtype={"instance_id": str}).set_index("task")
    assert (df.loc["arith", "samples"] == 0).all() and df.loc["arith", "exact_p"].notna().all()
    assert (df.loc["capitals", "samples"] > 0).all()
    assert RunSpec.from_store(Store(db, create=False), "main").exact == "auto"


def test_exact_run_resumes_as_started_and_refuses_another_mode(capsys, tmp_path):
    db = tmp_path / "s.sqlite"
    assert invoke("eval", "--exact", "--task", "sim-scaling", "--series", "sim", "--store", db).exit_code == 0
    again = invoke("eval", "--resume", "--store", db)
    assert again.exit_code == 0 and "0 samples drawn" in again.output
    code, _, err = run_cli(capsys, "eval", "--resume", "--exact=auto", "--store", str(db))
    assert code == 2 and "exact='on', not 'auto'" in err


@pytest.mark.slow
def test_eval_exact_agrees_with_passuntil_on_the_cli(tmp_path):
    """arith on tiny-4: `eval --exact` and a PassUntil run (K = 2) in one store; the exact
    probability lies in PassUntil's 99.9% interval on every instance with >= 2 passes."""
    from passuntil import stats
    from passuntil.tables import estimates_table

    db = tmp_path / "s.sqlite"
    common = ("--task", "arith", "--model", "tiny-4", "--store", db)
    assert invoke("eval", "--exact", *common).exit_code == 0
    assert invoke("eval", "--run", "pu", "--k", "2", "--max-samples", "3000", "--seed", "1", *common).exit_code == 0
    store = Store(db, create=False)
    exact = estimates_table(store, "main").set_index("instance_id")["exact_p"]
    pu = estimates_table(store, "pu").set_index("instance_id")
    low, high = stats.interval(pu["passes"].to_numpy(), pu["samples"].to_numpy(), k_target=2, confidence=0.999)
    e = exact.loc[pu.index].to_numpy()
    counted = pu["passes"].to_numpy() >= 2
    assert counted.sum() >= 20
    assert np.all((low <= e) & (e <= high) | ~counted)
    np.testing.assert_allclose(pu["exact_p"], e, rtol=1e-9)  # the reference score is the same number


@pytest.mark.slow
def test_ray_runner_computes_the_same_exact_run(tmp_path):
    ray = pytest.importorskip("ray")
    from passuntil.distributed import RayRunner
    from passuntil.evaluate import prepare_run
    from passuntil.runner import LocalRunner
    from passuntil.tables import estimates_table

    def run(runner, name):
        store = Store(tmp_path / f"{name}.sqlite")
        spec = prepare_run(store, "r", resume=False, series="sim", models=["0.03B", "0.1B"],
                           tasks=["sim-scaling"], engine_overrides={}, exact="on")
        outcome = runner.run(store, "r", spec)
        assert outcome.samples == 0 and outcome.exact == 40
        return estimates_table(store, "r")[["model", "instance_id", "exact_p", "samples"]]

    local = run(LocalRunner(), "local")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        there = run(RayRunner(workers=2), "ray")
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(there, local)


# fits from exact probabilities -------------------------------------------------------------------

def test_exact_line_recovers_a_noise_free_law_with_a_vanishing_interval():
    n = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    a, b = np.array([[2.0], [1.5]]), np.array([[-0.4], [-0.3]])
    p = np.exp(-np.exp(a + b * (np.log(n) - np.log(n).mean())))
    fit = fit_exact(n, p)
    np.testing.assert_allclose(fit.b, b.ravel(), atol=1e-9)
    fc = forecast_exact(fit, 3e6)
    truth = np.exp(-np.exp(a + b * (np.log(3e6) - np.log(n).mean()))).mean()
    assert fc.point == pytest.approx(truth, rel=1e-6) and fc.high - fc.low < 1e-6


def simulate(series: int, instances: int, sigma: float, seed: int, tau: float = 0.0):
    """Exact laws F = a + b log N plus a known lack of fit: sd `tau` shared by the instances at
    a size, sd `sigma` per (instance, size); five fitted sizes and a held-out sixth (the truth)."""
    rng = np.random.default_rng(seed)
    x = np.log([2e4, 8e4, 2e5, 4e5, 6e5, 1e6])
    xc = x - x[:5].mean()
    a = rng.normal(1.0, 0.4, (series, instances, 1))
    b = rng.normal(-0.6, 0.15, (series, instances, 1))
    f = a + b * xc + rng.normal(0, sigma, (series, instances, 6)) + rng.normal(0, tau, (series, 1, 6))
    return np.exp(x), np.exp(-np.exp(f))


def test_lack_of_fit_interval_covers_the_held_out_size_at_its_level():
    """The 90% interval from noise-free points covers the next size's true mean PU in 85-95% of
    300 simulated series (measured: 0.880; the line through the mean p: 0.893)."""
    n, p = simulate(300, 12, 0.15, seed=7, tau=0.1)
    covered, dataset = [], []
    for s in range(p.shape[0]):
        fc = forecast_exact(fit_exact(n[:5], p[s, :, :5]), n[5], level=0.9, draws=2000, seed=s)
        truth = p[s, :, 5].mean()
        covered.append(fc.low <= truth <= fc.high)
        dataset.append(fc.dataset_low <= truth <= fc.dataset_high)
        assert fc.low <= fc.point <= fc.high
    assert 0.85 <= np.mean(covered) <= 0.95
    assert 0.85 <= np.mean(dataset) <= 0.95


def test_population_interval_covers_a_fresh_test_set_where_these_instances_does_not():
    """The population interval (instances resampled, Hesterberg-widened) covers the mean of 12
    fresh instances of the same task at the held-out size in 85-95% of 300 simulated series
    (measured: 0.91); the "these instances" interval, which is for the fitted 12, covers it far
    less often (measured: 0.77). Per instance, the intervals cover each truth at about their
    level (measured: 0.93 with the 12 instances of `simulate`)."""
    n, p = simulate(300, 24, 0.15, seed=7, tau=0.1)  # the same shared misfit for all 24 of a series
    pop, these, inst = [], [], []
    for s in range(p.shape[0]):
        fc = forecast_exact(fit_exact(n[:5], p[s, :12, :5]), n[5], level=0.9, draws=2000, seed=s)
        fresh, own = p[s, 12:, 5].mean(), p[s, :12, 5]
        pop.append(fc.population_low <= fresh <= fc.population_high)
        these.append(fc.low <= fresh <= fc.high)
        inst.append(np.mean((np.array(fc.instance_low) <= own) & (own <= np.array(fc.instance_high))))
    assert 0.85 <= np.mean(pop) <= 0.95 and np.mean(these) < 0.82
    assert 0.85 <= np.mean(inst) <= 0.96


def test_exact_pass_at_k_is_the_closed_form_on_a_noise_free_law():
    """Where the law fits exactly, the pass@k profile is mean_i 1 - (1 - p_i)^k of the law's own
    p_i at N (an interval of zero width), k = 1 gives the point, and an instance that never
    passes counts as 0 in every mean and as 0 in its own forecast."""
    n = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    a, b = np.array([[2.0], [1.5], [0.5]]), np.array([[-0.4], [-0.3], [-0.2]])
    p = np.exp(-np.exp(a + b * (np.log(n) - np.log(n).mean())))
    p = np.vstack([p, np.zeros((1, n.size))])  # a reference the model never produces
    fc = forecast_exact(fit_exact(n, p), 3e6, ks=(1, 10, 1000))
    truth = np.append(np.exp(-np.exp(a + b * (np.log(3e6) - np.log(n).mean()))).ravel(), 0.0)
    for k, mid, low, high in fc.pass_at_k:
        expected = np.mean(1 - (1 - truth) ** k)
        assert mid == pytest.approx(expected, rel=1e-6) and high - low < 1e-6, k
    assert fc.pass_at_k[0][1] == pytest.approx(fc.point, rel=1e-12)
    np.testing.assert_allclose(fc.instance_point, truth, rtol=1e-9)
    assert fc.instance_low[3] == fc.instance_high[3] == 0.0 and np.isnan(fc.dispersion[3])
    assert fc.population_low < fc.point < fc.population_high  # instance resampling is never zero-width


def test_an_unfitted_instance_round_trips_as_null_in_the_record_hash():
    """An exact-ls record's unfitted instance is NaN in memory, null in the file, and the file
    still verifies (schema-3 files without nulls read as before: `_floats` only adds None)."""
    from passuntil.scaling.forecast_record import ForecastData, ForecastRecord

    data = ForecastData(("a", "b"), ("m1", "m2", "m3"), (1e4, 1e5, 1e6), 0, ((0,) * 3,) * 2, ((0,) * 3,) * 2,
                        ((0.1, 0.2, 0.3), (0.0, 1.0, 1.0)))
    record = ForecastRecord(task="t", method="exact-ls", level=0.9, target_n=1e7, target_model=None, point=0.4,
                            low=0.3, high=0.5, data=data, instance_point=(0.4, float("nan")),
                            instance_low=(0.3, float("nan")), instance_high=(0.5, float("nan")),
                            dispersion=(1.0, float("nan")))
    d = json.loads(record.to_json())
    assert d["forecast"]["instances"]["point"] == [0.4, None]
    back = ForecastRecord.from_dict(d)
    assert np.isnan(back.instance_point[1]) and back.content_hash() == record.content_hash()


def test_exact_curvature_sees_a_concave_law():
    n = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    x = (np.log(n) - np.log(n).mean()) / np.log(n).std()
    rng = np.random.default_rng(0)
    f = 1.0 - 0.5 * x - rng.uniform(0.2, 0.4, (10, 1)) * x * x
    out = exact_curvature(n, np.exp(-np.exp(f)))
    assert out["curvature"] < 0 and out["z"] < -5


# the bundled series, through the CLI --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_exact(tmp_path_factory):
    db = tmp_path_factory.mktemp("exact") / "s.sqlite"
    r = invoke("eval", "--exact", "--task", "dates", "--task", "reverse", "--task", "arith",
               "--series", "tiny", "--store", db)
    assert r.exit_code == 0, r.output
    return db


@pytest.mark.slow
def test_tiny_series_warns_of_accelerated_emergence_before_tiny7(tiny_exact, tmp_path):
    """The issue's table from the CLI: from tiny-2..6 alone, dates and reverse are flagged as
    accelerating (the forecast's emergence class), arith is not; arith's lack-of-fit interval
    covers tiny-7's exact truth."""
    rows = {}
    for task in ("dates", "reverse", "arith"):
        out = tmp_path / f"{task}.json"
        r = invoke("forecast", tiny_exact, "--task", task, "--target-model", "tiny-7", "--out", out)
        assert r.exit_code == 0, r.output
        rows[task] = json.loads(out.read_text())
        assert rows[task]["method"] == "exact-ls" and "tiny-7" not in rows[task]["data"]["models"]
        assert "exact pass probabilities" in rows[task]["warnings"][0]
    assert rows["dates"]["emergence"]["category"] in ("concave", "mixed")
    assert rows["dates"]["emergence"]["curvature_z"] < -2.5
    assert rows["reverse"]["emergence"]["category"] in ("concave", "mixed")
    assert rows["reverse"]["emergence"]["curvature_z"] < -2.5
    assert rows["arith"]["emergence"]["category"] == "linear"
    assert not any("accelerated" in w for w in rows["arith"]["warnings"])
    truth = pd.read_csv(_export(tiny_exact, tmp_path)).query("model == 'tiny-7'").groupby("task")["exact_p"].mean()
    fc = rows["arith"]["forecast"]
    assert fc["low"] <= truth["arith"] <= fc["high"]
    assert truth["dates"] > 10 * rows["dates"]["forecast"]["high"]  # why the warning matters
    em = invoke("emergence", tiny_exact, "--task", "dates")
    assert em.exit_code == 0 and json.loads(em.output)["category"] in ("concave", "mixed")
    fit = invoke("fit", tiny_exact, "--task", "arith", "--json")
    assert json.loads(fit.output)["fits"]["exact-ls"]["instances"] == 26
    back = invoke("backtest", tiny_exact, "--task", "arith")
    assert back.exit_code == 0 and "exact-ls" in back.output and back.output.count(" yes ") == 5


def _export(db, tmp_path) -> Path:
    out = tmp_path / "all.csv"
    invoke("export", db, "--out", out)
    return out


# exact vs PassUntil: the warning before the target, in the report ---------------------------------

SMALL = ("--model", "tiny-2", "--model", "tiny-3", "--model", "tiny-4", "--model", "tiny-5", "--model", "tiny-6")


def _sampled_run(db, *tasks, limit=None, budget=30):
    """PassUntil on tiny-2..6 at a small budget, in the same store as the exact run."""
    args = [a for t in tasks for a in ("--task", t)] + (["--limit", limit] if limit else [])
    r = invoke("eval", *args, "--series", "tiny", *SMALL, "--k", 2, "--max-samples", budget, "--batch-size", 4096,
               "--no-reference-scores", "--store", db, "--run", "pu")
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """An exact run (tiny-2..7) and a PassUntil run at budget 30 (tiny-2..6) of dates and reverse,
    8 instances each: small enough for seconds."""
    db = tmp_path_factory.mktemp("pair") / "s.sqlite"
    r = invoke("eval", "--exact", "--task", "dates", "--task", "reverse", "--series", "tiny", "--limit", 8,
               "--store", db, "--run", "exact")
    assert r.exit_code == 0, r.output
    _sampled_run(db, "dates", "reverse", limit=8)
    return db


def test_report_shows_the_warning_before_the_target_passuntil_vs_exact(small_pair, tmp_path):
    """At budget 30 PassUntil sees no pass of dates at tiny-2..6 (no warning can fire); the
    exact probabilities of the same sizes flag accelerated emergence; the report's table says so."""
    from passuntil.report import load_report_data, write_report
    from passuntil.warning_table import warning_comparison

    rows = warning_comparison(str(small_pair), sampled_run="pu", exact_run="exact", target_model="tiny-7")
    by = {r["task"]: r for r in rows}
    assert set(by) == {"dates", "reverse"}
    assert by["dates"]["exact warned"] and "accelerated-emergence" in by["dates"]["exact warnings"]
    assert by["dates"]["exact class"] in ("concave", "mixed") and by["dates"]["exact curvature z"] < -2.5
    assert not by["dates"]["PassUntil warned"] and not by["reverse"]["PassUntil warned"]
    assert by["dates"]["PassUntil warnings"] == "all-zero" and by["dates"]["budget"] == 30
    assert by["dates"]["exact p at target"] > 100 * by["dates"]["exact forecast"]
    store = Store(small_pair, create=False)
    page = write_report(load_report_data(store, ["pu"], warnings_before_target=rows), tmp_path / "r").read_text()
    section = page[page.index('id="warning-before-target"'):]
    section = section[:section.index("</section>")]
    assert "Warning before tiny-7: PassUntil (budget 30) vs exact" in section
    assert "<caption>warning before tiny-7: whether the accelerated-emergence warning fired" in section
    assert section.count("<tr>") == 3 and ">dates<" in section and ">reverse<" in section
    dates_row = section[section.index(">dates<"):].split("</tr>")[0]
    assert re.findall(r'<td class="n">(yes|no)</td>', dates_row) == ["no", "yes"]  # PassUntil no, exact yes


def test_exact_forecast_warnings_use_the_forecast_codes(small_pair, tmp_path):
    """The exact record's warnings are `code: message` lines like the sampled ones."""
    out = tmp_path / "f.json"
    r = invoke("forecast", small_pair, "--run", "exact", "--task", "dates", "--target-model", "tiny-7", "--out", out)
    assert r.exit_code == 0, r.output
    warnings = json.loads(out.read_text())["warnings"]
    assert warnings[0].startswith("data: exact pass probabilities")
    assert [w.split(":", 1)[0] for w in warnings[1:]] == ["accelerated-emergence"]
    far = invoke("forecast", small_pair, "--run", "exact", "--task", "dates", "--target-n", 1e12,
                 "--out", tmp_path / "far.json")
    assert far.exit_code == 0, far.output
    codes = [w.split(":", 1)[0] for w in json.loads((tmp_path / "far.json").read_text())["warnings"]]
    assert codes == ["data", "extrapolation", "accelerated-emergence"]


def test_exact_forecast_file_carries_what_a_sampled_one_does(small_pair, tmp_path):
    """`forecast` on an exact run writes the population interval, each instance's forecast and
    the pass@k profile on the sampled forecasts' k grid, prints them, and the file verifies."""
    from passuntil.scaling.forecast import PASS_AT_K_GRID, read_forecast

    out = tmp_path / "f.json"
    r = invoke("forecast", small_pair, "--run", "exact", "--task", "reverse", "--target-model", "tiny-7",
               "--out", out)
    assert r.exit_code == 0, r.output
    assert "; population [" in r.output and "pass@k at the target" in r.output and "k=1e6" in r.output
    record = read_forecast(out)
    assert record.method == "exact-ls"
    pop = record.pop_interval
    assert pop is not None and pop[0] < record.low <= record.point <= record.high < pop[1]
    assert [q.k for q in record.pass_at_k] == list(PASS_AT_K_GRID)
    assert record.pass_at_k[0].mean == pytest.approx(record.point, rel=1e-12)
    means = [q.mean for q in record.pass_at_k]
    assert means == sorted(means) and all(q.low <= q.mean <= q.high for q in record.pass_at_k)
    assert len(record.instance_point) == len(record.data.instance_ids) == 8 == len(record.dispersion)
    assert all(lo <= pt <= hi for lo, pt, hi in zip(record.instance_low, record.instance_point,
                                                    record.instance_high))
    assert np.mean(record.dispersion) == pytest.approx(1.0, abs=0.5)  # relative to the pooled misfit


def _warning_section(page: str) -> str:
    section = page[page.index('id="warning-before-target"'):]
    return section[:section.index("</section>")]


def test_report_cli_builds_the_warning_table_passuntil_vs_exact(small_pair, tmp_path, capsys):
    """`passuntil report` of a store holding a PassUntil run and an exact run of the same tasks
    and instances: the table is built without naming anything (the store's one exact run, the
    first PassUntil run of --run, the exact run's largest model), dates warned from the exact
    probabilities and not from PassUntil's counts at budget 30; a named run or model that does
    not fit is one error line."""
    from passuntil.warning_table import choose_comparison

    code, out, err = run_cli(capsys, "report", str(small_pair), "--run", "pu", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert "warning before tiny-7: PassUntil run 'pu' vs exact run 'exact' (dates, reverse)" in out
    section = _warning_section((tmp_path / "r" / "report.html").read_text())
    assert "Warning before tiny-7: PassUntil (budget 30) vs exact" in section
    assert section.count("<tr>") == 3 and ">dates<" in section and ">reverse<" in section
    dates = section[section.index('<td class="t">dates<'):].split("</tr>")[0]
    cells = re.findall(r'<td class="[nt]">([^<]*)</td>', dates)
    # task, PassUntil warned, class, warnings, exact warned, class, z, warnings, forecast, p at tiny-7
    assert cells[:5] == ["dates", "no", "undetermined", "all-zero", "yes"] and cells[7] == "accelerated-emergence"
    assert cells[5] in ("concave", "mixed") and float(cells[6]) < -2.5
    assert float(cells[9]) > 100 * float(cells[8])  # the truth at tiny-7 dwarfs the law's forecast
    assert choose_comparison(str(small_pair), ("exact",)) is None  # no PassUntil run chosen: no table
    for args, message in ((("--exact-run", "pu"), "run 'pu' is not an exact-mode run"),
                          (("--sampled-run", "exact"), "run 'exact' is an exact-mode run"),
                          (("--target-model", "tiny-9"), "model 'tiny-9' is not in the exact run 'exact'"),
                          (("--exact-run", "nope"), "no run 'nope' in")):
        code, out, err = run_cli(capsys, "report", str(small_pair), *args, "--out", str(tmp_path / "x"))
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (args, err)


def test_a_pre_registered_passuntil_forecast_gives_its_recorded_warnings(small_pair):
    """Given a PassUntil forecast file for the target (`report --forecast`), the table shows the
    warnings recorded in it, not those of a forecast made afresh from the sampled run."""
    import dataclasses

    from passuntil.analysis import forecast
    from passuntil.warning_table import choose_comparison, report_comparison

    chosen = choose_comparison(str(small_pair))
    # at budget 30 no PassUntil forecast can be made (all-zero): a stand-in for a filed one
    some = forecast(str(small_pair), task="reverse", run_id="exact", target_model="tiny-7", target_n=None,
                    method="likelihood", level=0.9)
    filed = dataclasses.replace(some, data=dataclasses.replace(some.data, exact_p=None),
                                warnings=("accelerated-emergence: recorded",))
    rows, skipped = report_comparison(str(small_pair), chosen, [filed])
    by = {r["task"]: r for r in rows}
    assert skipped is None and by["reverse"]["PassUntil warned"] and not by["dates"]["PassUntil warned"]
    assert by["reverse"]["PassUntil warnings"] == "accelerated-emergence"


def test_report_classifies_an_exact_run_from_its_exact_probabilities(small_pair, tmp_path):
    """No samples in an exact run: the report uses classify_exact (the sampled classify warned
    "Mean of empty slice" on the empty cells)."""
    import warnings

    from passuntil.report import load_report_data, write_report

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        page = write_report(load_report_data(Store(small_pair, create=False), ["exact"]), tmp_path / "r")
    cls = page.read_text().split("Emergence classes</h2>")[1].split("</table>")[0]
    assert re.search(r'>dates</td><td class="t">mixed<', cls)


@pytest.mark.slow
def test_warning_before_tiny7_on_every_instance(tiny_exact):
    """The issue's claim on the whole tasks: from tiny-2..6, the exact probabilities flag dates
    and reverse (not arith); PassUntil at a budget of 100 flags none of them."""
    from passuntil.warning_table import warning_comparison

    _sampled_run(tiny_exact, "dates", "reverse", "arith", budget=100)
    rows = {r["task"]: r for r in warning_comparison(str(tiny_exact), sampled_run="pu", exact_run="main",
                                                      target_model="tiny-7")}
    assert {t: r["exact warned"] for t, r in rows.items()} == {"arith": False, "dates": True, "reverse": True}
    assert not any(r["PassUntil warned"] for r in rows.values())


# the transformers backend -------------------------------------------------------------------------

def test_transformers_exact_probability_equals_the_builtin_samplers(tmp_path):
    """`eval --exact` on a series whose models run through transformers (the bundled tiny-3 and
    tiny-7 checkpoints, which it loads as Llama) stores the exact probabilities the built-in
    sampler computes, to 1e-5, at temperature 1 and under top-k / top-p truncation."""
    pytest.importorskip("transformers")
    bundled = Path(__file__).resolve().parents[1] / "src/passuntil/bundled/tiny"
    series = tmp_path / "hf.toml"
    series.write_text("".join(f'[[models]]\nname = "{m}"\nn_params = {n}\nbackend = "transformers"\n'
                              f'path = "{bundled / m}"\n' for m, n in (("tiny-3", 1e4), ("tiny-7", 1e6))))
    tables = {}
    for name, flags in (("hf", ("--series", series)), ("builtin", ("--series", "tiny", "--model", "tiny-3",
                                                                   "--model", "tiny-7"))):
        db = tmp_path / f"{name}.sqlite"
        r = invoke("eval", "--exact", "--task", "dates", "--task", "reverse", "--limit", 4, *flags,
                   "--temperature", 0.7, "--top-k", 20, "--top-p", 0.9, "--store", db)
        assert r.exit_code == 0, r.output
        assert "16 exact pass probabilities" in r.output
        df = pd.read_csv(_export(db, tmp_path), dtype={"instance_id": str})
        tables[name] = df.set_index(["model", "task", "instance_id"])["exact_p"].sort_index()
    assert tables["hf"].index.equals(tables["builtin"].index)
    np.testing.assert_allclose(tables["hf"], tables["builtin"], atol=1e-5, rtol=0)
    small = (tables["builtin"] > 0) & (tables["builtin"] < 1e-2)
    assert tables["builtin"].max() > 0.5 and small.any()  # from near-certain to rare, not only zeros
    np.testing.assert_allclose(tables["hf"][small], tables["builtin"][small], rtol=1e-4)  # the rare ones too


def test_a_sampled_transformers_run_stores_no_exact_probability(tmp_path):
    """Beside sampling, only a sampler whose number is exact (the built-in one: byte-level) stores
    `exact_p`; a transformers model's may be a BPE lower bound, which scoring would take for the
    truth, so a sampled run leaves it empty (an `--exact` run computes it, noted as what it is)."""
    pytest.importorskip("transformers")
    bundled = Path(__file__).resolve().parents[1] / "src/passuntil/bundled/tiny"
    series = tmp_path / "hf.toml"
    series.write_text(f'[[models]]\nname = "tiny-3"\nn_params = 1e4\nbackend = "transformers"\n'
                      f'path = "{bundled / "tiny-3"}"\n')
    stored = {}
    for name, flags in (("hf", ("--series", series)), ("builtin", ("--series", "tiny", "--model", "tiny-3"))):
        db = tmp_path / f"{name}.sqlite"
        r = invoke("eval", "--task", "dates", "--limit", 2, "--k", 1, "--max-samples", 4, *flags, "--store", db)
        assert r.exit_code == 0, r.output
        stored[name] = pd.read_csv(_export(db, tmp_path))["exact_p"]
    assert stored["hf"].isna().all() and stored["builtin"].notna().all()
