import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

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
    assert code == 2 and "method 'magic'" in err
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


@pytest.mark.parametrize("bad, message", [
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top-p must lie in (0, 1]"),
    (["--top-p", "1.5"], "top-p must lie in (0, 1]"),
    (["--top-k", "-1"], "top-k must be >= 0"),
    (["--k", "0"], "K must be >= 1"),
    (["--k", "3", "--max-samples", "2"], "budget (2 samples) must be >= K (3)"),
    (["--batch-size", "0"], "batch size and first request must be >= 1"),
    (["--max-tokens", "0"], "max tokens must be an integer from 1 to"),
    (["--limit", "0"], "--limit must be >= 1"),
])
def test_invalid_options_leave_the_run_name_free(tmp_path, capsys, bad, message):
    """Every setting is checked before the run is recorded: one line, exit 2, and the same
    command with valid settings then succeeds under the same run name."""
    store = tmp_path / "v.sqlite"
    args = ["eval", "--task", "sim-scaling", "--store", str(store), "--run", "pilot", "--limit", "2",
            "--max-samples", "30"]
    code, _, err = run_cli(capsys, *args, *bad)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "run pilot" in out, err


def test_a_run_that_fails_to_start_does_not_block_a_rerun(tmp_path, capsys):
    """A model whose checkpoint cannot be loaded fails after the run is recorded; the run holds
    no results, so the corrected command starts it afresh under the same name."""
    broken = tmp_path / "broken"
    broken.mkdir()
    series = tmp_path / "s.toml"
    series.write_text(f'[[models]]\nname = "m"\nn_params = 23712\nbackend = "torch"\npath = "{broken}"\n')
    store = tmp_path / "f.sqlite"
    args = ["eval", "--task", "arith", "--series", str(series), "--store", str(store),
            "--max-samples", "2", "--limit", "1"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "is not a checkpoint folder" in err, err
    series.write_text(series.read_text().replace(str(broken), str(BUNDLED / "tiny-2")))
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "1 instance results" in out, err


def test_limit_and_no_reference_scores_are_recorded(tmp_path, capsys):
    store = tmp_path / "l.sqlite"
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--task", "sim-accelerated",
                           "--model", "0.5B", "--store", str(store), "--limit", "3",
                           "--max-samples", "40", "--no-reference-scores")
    assert code == 0, err
    con = sqlite3.connect(store)
    per_task = dict(con.execute("SELECT task, COUNT(*) FROM results GROUP BY task").fetchall())
    assert per_task == {"sim-scaling": 3, "sim-accelerated": 3}
    assert con.execute("SELECT COUNT(*) FROM reference_scores").fetchone()[0] == 0
    config = json.loads(con.execute("SELECT config_json FROM runs").fetchone()[0])
    assert config["limit"] == 3 and config["reference_scores"] is False
    code, _, err = run_cli(capsys, "eval", "--store", str(store), "--resume", "--limit", "5")
    assert code == 2 and "was made with limit=3, not 5" in err
    code, _, err = run_cli(capsys, "eval", "--store", str(store), "--resume")
    assert code == 0, err


def test_a_task_file_run_through_every_reading_command(tmp_path, capsys):
    """examples/capitals.yaml: the run stores the file's path, its results the task's name
    ('capitals'); every command that reads the run resolves the task from the run itself."""
    store = str(tmp_path / "c.sqlite")
    task = str(Path(__file__).parents[1] / "examples/capitals.yaml")
    code, out, err = run_cli(capsys, "eval", "--task", task, "--series", "tiny", "--model", "tiny-2",
                             "--model", "tiny-3", "--model", "tiny-4", "--store", store,
                             "--max-samples", "8", "--k", "1")
    assert code == 0, err
    assert "18 instance results" in out
    code, out, err = run_cli(capsys, "show", store)
    assert code == 0 and "capitals" in out, err
    code, out, err = run_cli(capsys, "metrics", store)
    assert code == 0 and "capitals" in out and "tiny-4" in out, err
    code, out, err = run_cli(capsys, "report", store, "--out", str(tmp_path / "rep"))
    assert code == 0 and (tmp_path / "rep" / "report.html").exists(), err
    code, out, err = run_cli(capsys, "export", store, "--out", str(tmp_path / "c.csv"))
    assert code == 0, err
    assert set(pd.read_csv(tmp_path / "c.csv")["task"]) == {"capitals"}
    code, out, err = run_cli(capsys, "fit", store, "--task", "capitals", "--json")
    assert code == 0, err
    assert json.loads(out)["models"] == ["tiny-2", "tiny-3", "tiny-4"]
    for command in (["forecast", store, "--task", "capitals", "--target-model", "tiny-4",
                     "--out", str(tmp_path / "f.json")],
                    ["backtest", store, "--task", "capitals"]):
        code, out, err = run_cli(capsys, *command)
        assert code in (0, 2) and "unknown task" not in err and "Traceback" not in err, err
        if code == 2:  # tiny budgets may leave too few passes to fit: one clear line then
            assert err.startswith("error: ") and err.count("\n") == 1, err


BUNDLED = Path(__file__).parents[1] / "src/passuntil/bundled/tiny"
PASSUNTIL = Path(sys.executable).with_name("passuntil")


def _passuntil(*args, env=None, **kw):
    return subprocess.run([str(PASSUNTIL), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kw)


@pytest.mark.slow
def test_resume_on_another_sampler_is_refused(tmp_path):
    """The sampler fingerprint (here: the compiled kernel switched off) is recorded per model;
    resuming on a different one would mix two samplers' draws and is refused in one line."""
    store = str(tmp_path / "k.sqlite")
    args = ("eval", "--task", "arith", "--model", "tiny-2", "--store", store, "--max-samples", "4",
            "--limit", "2")
    first = _passuntil(*args, env={"PASSUNTIL_NO_KERNEL": "0"})
    assert first.returncode == 0, first.stderr
    kernel = json.loads(sqlite3.connect(store).execute("SELECT config_json FROM runs").fetchone()[0]
                        )["samplers"]["tiny-2"]["kernel"]
    if kernel.startswith("pytorch"):
        pytest.skip(f"the compiled kernel is not available here ({kernel})")
    other = _passuntil("eval", "--store", store, "--resume", env={"PASSUNTIL_NO_KERNEL": "1"})
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert f"sampled model 'tiny-2' with another sampler (kernel: {kernel!r} ->" in other.stderr
    same = _passuntil("eval", "--store", store, "--resume", env={"PASSUNTIL_NO_KERNEL": "0"})
    assert same.returncode == 0, same.stderr


@pytest.mark.slow
def test_ctrl_c_prints_the_exact_resume_command(tmp_path):
    """Interrupted in the middle of a run, eval prints the command that continues it (with the
    store and run it was given), and that command, as printed, finishes the run."""
    series = tmp_path / "slow.toml"
    series.write_text('[[models]]\nname = "slow"\nn_params = 1e8\noptions = { latency_s = 0.5 }\n')
    store = tmp_path / "deep dir" / "i.sqlite"
    proc = subprocess.Popen([str(PASSUNTIL), "eval", "--task", "sim-scaling", "--series", str(series),
                             "--store", str(store), "--run", "pilot-1", "--k", "2",
                             "--max-samples", "3000", "--batch-size", "4096"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the first round is committed
        if store.exists():
            try:
                if sqlite3.connect(store).execute("SELECT COUNT(*) FROM results").fetchone()[0]:
                    break
            except sqlite3.Error:
                pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    expected = f"passuntil eval --store '{store}' --run pilot-1 --resume"
    assert f"interrupted; continue the run with: {expected}" in err
    command = shlex.split(expected)
    resumed = _passuntil(*command[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert "20 instance results" in resumed.stdout


def test_a_code_task_records_its_isolation(tmp_path, capsys):
    """A JSONL task checked by unit tests (examples/add_function.jsonl): the run records how
    its code checks were isolated, and the reading commands resolve it from the run."""
    from passuntil.execution import MODES

    store = tmp_path / "code.sqlite"
    task = str(Path(__file__).parents[1] / "examples/add_function.jsonl")
    code, out, err = run_cli(capsys, "eval", "--task", task, "--model", "tiny-2", "--store", str(store),
                             "--max-samples", "2", "--no-reference-scores")
    assert code == 0 and "3 instance results" in out, err
    isolation = json.loads(sqlite3.connect(store).execute("SELECT config_json FROM runs").fetchone()[0]
                           )["isolation"]
    assert isolation in MODES
    code, out, err = run_cli(capsys, "metrics", str(store))
    assert code == 0 and "add_function" in out, err
    code, _, err = run_cli(capsys, "eval", "--task", "arith", "--model", "tiny-2", "--store", str(store),
                           "--run", "plain", "--limit", "1", "--max-samples", "2", "--no-reference-scores")
    config = json.loads(sqlite3.connect(store).execute(
        "SELECT config_json FROM runs WHERE run_id = 'plain'").fetchone()[0])
    assert code == 0 and config["isolation"] is None  # no task executes code


def test_a_jsonl_unit_test_task_through_every_reading_command(tmp_path, capsys):
    """examples/add_function.jsonl over three sizes: show, forecast, report, metrics and export
    all resolve the task from the run; with no pass anywhere the forecast is refused in one line
    (no negative bound, no file) while the other commands work."""
    store = str(tmp_path / "code.sqlite")
    task = str(Path(__file__).parents[1] / "examples/add_function.jsonl")
    code, out, err = run_cli(capsys, "eval", "--task", task, "--series", "tiny", "--model", "tiny-5",
                             "--model", "tiny-6", "--model", "tiny-7", "--k", "1", "--max-samples", "8",
                             "--store", store)
    assert code == 0 and "9 instance results" in out, err
    code, out, err = run_cli(capsys, "show", store)
    assert code == 0 and out.count("add_function") == 3, err
    passes = sqlite3.connect(store).execute("SELECT SUM(passes) FROM results").fetchone()[0]
    code, out, err = run_cli(capsys, "forecast", store, "--task", "add_function", "--target-n", "5e6",
                             "--out", str(tmp_path / "f.json"))
    if passes == 0:
        assert code == 2 and err.startswith("error: no forecast for add_function: all-zero")
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "f.json").exists()
    else:
        assert code == 0 and (tmp_path / "f.json").exists(), err
    code, out, err = run_cli(capsys, "report", store, "--out", str(tmp_path / "rep"))
    assert code == 0 and (tmp_path / "rep" / "report.html").exists(), err
    code, out, err = run_cli(capsys, "metrics", store)
    assert code == 0 and "add_function" in out, err
    code, out, err = run_cli(capsys, "export", store, "--out", str(tmp_path / "x.csv"))
    assert code == 0 and len(pd.read_csv(tmp_path / "x.csv")) == 9, err
