import json
import sqlite3

import pandas as pd
import pytest

from tests.conftest import run_cli


def _eval(capsys, store, *extra):
    return run_cli(capsys, "eval", "--task", "sim-scaling", "--model", "0.03B", "--model", "0.5B",
                   "--store", str(store), "--k", "2", "--max-samples", "2000", *extra)


def test_eval_show_export_round_trip(tmp_path, capsys):
    store = tmp_path / "runs.sqlite"
    code, out, err = _eval(capsys, store)
    assert code == 0, err
    assert "40 instance results" in out
    code, out, _ = run_cli(capsys, "show", str(store))
    assert code == 0 and "0.03B" in out and "sim-scaling" in out
    code, out, _ = run_cli(capsys, "show", str(store), "--instances")
    assert code == 0 and "k_passes" in out
    for suffix in ("csv", "parquet", "json", "jsonl"):
        path = tmp_path / f"out.{suffix}"
        code, _, err = run_cli(capsys, "export", str(store), "--out", str(path))
        assert code == 0, err
    df = pd.read_parquet(tmp_path / "out.parquet")
    assert len(df) == 40 and {"n_params", "pu", "ci_low", "ci_high", "pu_unbiased"} <= set(df.columns)
    assert (df["ci_low"] <= df["pu"]).all() and (df["pu"] <= df["ci_high"]).all()
    assert len(json.loads((tmp_path / "out.json").read_text())) == 40
    code, _, _ = run_cli(capsys, "export", str(store), "--out", str(tmp_path / "c.csv"), "--completions")
    assert code == 0 and pd.read_csv(tmp_path / "c.csv")["count"].sum() == df["samples"].sum() - df["overflow"].sum()


def test_resume_of_finished_run_changes_nothing(tmp_path, capsys):
    store = tmp_path / "runs.sqlite"
    assert _eval(capsys, store)[0] == 0
    before = pd.read_sql("SELECT * FROM results", sqlite3.connect(store))
    code, _, err = run_cli(capsys, "eval", "--store", str(store), "--resume")
    assert code == 0, err
    after = pd.read_sql("SELECT * FROM results", sqlite3.connect(store))
    pd.testing.assert_frame_equal(before.drop(columns="updated_at"), after.drop(columns="updated_at"))


@pytest.mark.parametrize("args, message", [
    (["eval", "--task", "nope"], "unknown task 'nope'"),
    (["eval", "--task", "sim-scaling", "--model", "7B"], "model '7B' is not in series 'sim'"),
    (["eval", "--task", "sim-scaling", "--k", "0"], "K must be >= 1"),
    (["eval", "--task", "sim-scaling", "--k", "5", "--max-samples", "3"], "budget (3 samples) must be >= K"),
    (["eval", "--task", "sim-scaling", "--series", "nofile.toml"], "no built-in series"),
    (["eval"], "name at least one task"),
    (["eval", "--resume", "--run", "ghost", "--store", "{store}"], "no run 'ghost'"),
    (["show", "{missing}"], "no run store"),
    (["show", "{junk}"], "not a readable run store"),
    (["show", "{foreign}"], "not a passuntil run store"),
    (["export", "{store}", "--out", "x.xlsx"], "use .csv, .parquet"),
])
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    store = tmp_path / "runs.sqlite"
    assert _eval(capsys, store)[0] == 0
    junk = tmp_path / "junk.db"
    junk.write_text("not a database" * 200)
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE x (y)").connection.commit()
    paths = {"missing": tmp_path / "nope.sqlite", "junk": junk, "foreign": foreign, "store": store}
    args = [a.format(**paths) for a in args]
    if args[0] == "eval" and "--store" not in args:
        args += ["--store", str(tmp_path / "fresh.sqlite")]
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_existing_run_needs_resume(tmp_path, capsys):
    store = tmp_path / "runs.sqlite"
    assert _eval(capsys, store)[0] == 0
    code, _, err = _eval(capsys, store)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(capsys, "eval", "--store", str(store), "--resume", "--k", "3")
    assert code == 2 and "was made with k_target=2" in err
    code, _, err = run_cli(capsys, "eval", "--store", str(store), "--resume", "--task", "sim-accelerated")
    assert code == 2 and "continues it as it was started" in err


def test_series_file(tmp_path, capsys):
    series = tmp_path / "series.toml"
    series.write_text('name = "mine"\n[[models]]\nname = "small"\nn_params = 1e7\n'
                      '[[models]]\nname = "big"\nn_params = 1e9\n')
    code, out, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--series", str(series),
                             "--store", str(tmp_path / "s.sqlite"), "--max-samples", "500")
    assert code == 0, err
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: a\n    n_params: -1\n")
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--series", str(bad),
                           "--store", str(tmp_path / "t.sqlite"))
    assert code == 2 and "n_params must be > 0" in err


def test_resume_refuses_a_task_that_changed(tmp_path, capsys):
    """A run remembers a fingerprint of each task; resuming after the task file was edited (same
    ids, new references) is one clear error, and the stored results are kept as they were."""
    task = tmp_path / "caps.yaml"
    body = ('name: caps\ntemplate: "Capital of {country}:"\ncheck: exact\nmax_new_tokens: 4\n'
            "instances:\n  - {id: fr, country: France, references: [%s]}\n")
    task.write_text(body % "Paris")
    store = tmp_path / "c.sqlite"
    args = ("eval", "--task", str(task), "--model", "tiny-2", "--store", str(store), "--max-samples", "8")
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err  # unchanged: resumes
    task.write_text(body % "Lyon")
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 2 and "has changed since run 'main'" in err and "Traceback" not in err
    df = pd.read_sql("SELECT * FROM results", sqlite3.connect(store))
    assert len(df) == 1 and df["samples"].iloc[0] == 8
    # a run made before fingerprints: a stored instance id the task no longer has is refused too
    db = sqlite3.connect(store)
    config = json.loads(db.execute("SELECT config_json FROM runs").fetchone()[0])
    del config["task_digests"]
    db.execute("UPDATE runs SET config_json = ?", (json.dumps(config),))
    db.commit()
    task.write_text((body % "Paris").replace("id: fr", "id: france"))
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 2 and "has changed" in err


def test_tasks_lists_builtin_tasks(capsys):
    code, out, _ = run_cli(capsys, "tasks")
    assert code == 0 and "sim-scaling" in out and "20" in out


def test_bundled_task_runs_on_the_bundled_series_by_default(tmp_path, capsys):
    store = tmp_path / "b.sqlite"
    code, out, err = run_cli(capsys, "eval", "--task", "arith", "--model", "tiny-2", "--store", str(store),
                             "--max-samples", "20", "--k", "1")
    assert code == 0, err
    code, out, _ = run_cli(capsys, "show", str(store), "--instances")
    assert code == 0 and "tiny-2" in out and "exact p" in out
    df = pd.read_sql("SELECT * FROM reference_scores", sqlite3.connect(store))
    assert len(df) == 26 and (df["exact_p"] > 0).all()  # one row per arith instance


def test_fit_and_report_commands(tmp_path, capsys):
    store = str(tmp_path / "s.sqlite")
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--store", store, "--k", "2",
                           "--max-samples", "3000", "--model", "0.03B", "--model", "0.1B",
                           "--model", "0.2B", "--model", "0.5B")
    assert code == 0, err
    code, out, err = run_cli(capsys, "fit", store, "--task", "sim-scaling", "--target-n", "2.45e9",
                             "--json")
    assert code == 0, err
    fits = json.loads(out)["fits"]
    assert {"likelihood", "dataset", "instance-ls"} <= set(fits)
    fc = fits["likelihood"]["forecast"]
    assert 0 < fc["low"] <= fc["point"] <= fc["high"] < 1
    code, out, _ = run_cli(capsys, "fit", store, "--task", "sim-scaling", "--model", "0.1B",
                           "--model", "0.5B", "--model", "0.2B", "--method", "likelihood")
    assert code == 0 and "likelihood" in out
    code, _, err = run_cli(capsys, "fit", store, "--task", "sim-scaling", "--method", "magic")
    assert code == 2 and "unknown method" in err
    code, out, err = run_cli(capsys, "report", store, "--out", str(tmp_path / "rep"))
    assert code == 0, err
    assert (tmp_path / "rep" / "report.html").exists() and (tmp_path / "rep" / "fig4_forecast.svg").exists()


def test_metrics_with_log_prob_scores(tmp_path, capsys):
    store = str(tmp_path / "m.sqlite")
    code, _, err = run_cli(capsys, "eval", "--task", "arith", "--model", "tiny-2", "--model",
                           "tiny-3", "--store", store, "--max-samples", "16", "--k", "1")
    assert code == 0, err
    code, out, err = run_cli(capsys, "metrics", store, "--scores")
    assert code == 0, err
    assert "ref log-prob" in out and "tiny-3" in out and "token" not in err
