"""Follow-ups of the stop-22 attack, through the CLI: a checkpoint retrained in place is not
resumed into the same run, a forecast fitted on a half-finished model says so, a design run's
own (never sampled) target model can be named, and two models of one size stay two points."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

from passuntil.series import BUNDLED
from tests.conftest import run_cli

ONE_MODEL = """name = "one"
[[models]]
name = "m"
backend = "torch"
path = "m"
n_params = 24000
"""


def _retrain(folder: Path) -> None:
    """Change the weights in place, as a second training run into the same folder would."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[3]
    weights[name] = weights[name] * 1.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_resume_after_the_checkpoint_was_retrained_in_place_is_refused(tmp_path, capsys):
    """The sampler fingerprint carries a digest of the weights: the same files (re-touched) resume,
    changed weights give one line naming them, and nothing is added to the run."""
    shutil.copytree(BUNDLED / "tiny" / "tiny-2", tmp_path / "m")
    (tmp_path / "s.toml").write_text(ONE_MODEL)
    store = str(tmp_path / "r.sqlite")
    base = ["--store", store]
    code, _, err = run_cli(capsys, "eval", "--series", str(tmp_path / "s.toml"), "--task", "arith",
                           "--limit", "2", "--k", "1", "--max-samples", "20", *base)
    assert code == 0, err
    for f in (tmp_path / "m").iterdir():
        os.utime(f, (1e9, 1e9))  # same content, other times: still the same model
    code, _, err = run_cli(capsys, "eval", "--resume", *base)
    assert code == 0, err
    before = sqlite3.connect(store).execute("SELECT SUM(samples) FROM results").fetchone()[0]
    _retrain(tmp_path / "m")
    code, _, err = run_cli(capsys, "eval", "--resume", *base)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "weights:" in err, err
    assert sqlite3.connect(store).execute("SELECT SUM(samples) FROM results").fetchone()[0] == before


def _forecast(capsys, store, out, *args):
    code, _, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", *args, "--out", str(out))
    assert code == 0, err
    return json.loads(Path(out).read_text())


def test_a_forecast_on_a_half_finished_model_says_so(tmp_path, capsys):
    """A run killed while 0.9B was sampled (its rows present, 12 of 20 not stopped): the fit uses
    the finished cells and the record carries an `unfinished` warning naming the model."""
    store = tmp_path / "r.sqlite"
    code, _, err = run_cli(capsys, "eval", "--series", "sim", "--task", "sim-scaling", "--k", "2",
                           "--max-samples", "2000", "--seed", "1", "--store", str(store))
    assert code == 0, err
    clean = _forecast(capsys, store, tmp_path / "a.json", "--target-model", "2.4B")
    assert not [w for w in clean["warnings"] if w.startswith("unfinished")]
    con = sqlite3.connect(store)
    ids = [r[0] for r in con.execute("SELECT instance_id FROM results WHERE model='0.9B' ORDER BY instance_id")]
    con.executemany("UPDATE results SET stopped=NULL WHERE model='0.9B' AND instance_id=?", [(i,) for i in ids[:12]])
    con.commit()
    con.close()
    half = _forecast(capsys, store, tmp_path / "b.json", "--target-model", "2.4B")
    notes = [w for w in half["warnings"] if w.startswith("unfinished")]
    assert len(notes) == 1 and "'0.9B' has 12 of 20 instances unfinished" in notes[0], half["warnings"]


def test_a_design_runs_own_target_model_can_be_forecast_by_name(tmp_path, capsys):
    """`--design forecast --target-model 2.4B` never samples 2.4B; `forecast --target-model 2.4B`
    then forecasts its size (as --target-n would) instead of "no finished model"."""
    store = tmp_path / "d.sqlite"
    code, _, err = run_cli(capsys, "eval", "--series", "sim", "--task", "sim-scaling", "--design", "forecast",
                           "--target-model", "2.4B", "--total-budget", "6000", "--seed", "2", "--store", str(store))
    assert code == 0, err
    by_name = _forecast(capsys, store, tmp_path / "a.json", "--target-model", "2.4B")
    assert by_name["target"] == {"n_params": 2.45e9, "model": "2.4B"}
    by_size = _forecast(capsys, store, tmp_path / "b.json", "--target-n", "2.45e9")
    assert [by_name["forecast"][k] for k in ("point", "low", "high")] == [
        by_size["forecast"][k] for k in ("point", "low", "high")]
    code, _, err = run_cli(capsys, "forecast", str(store), "--task", "sim-scaling", "--target-model", "9B",
                           "--out", str(tmp_path / "c.json"))
    assert code == 2 and "no model '9B'" in err and len(err.strip().splitlines()) == 1, err


DUP = """name = "dup"
[[models]]
name = "a"
n_params = 1e8
[[models]]
name = "b"
n_params = 1e8
[[models]]
name = "c"
n_params = 1e9
[[models]]
name = "d"
n_params = 5e9
"""


def test_two_models_of_one_size_stay_two_points_in_an_exact_forecast(tmp_path, capsys):
    """Exact data were pivoted by size: two models of one N were averaged into one point
    ("3 sizes" for 4 models). Now each model is its own column."""
    (tmp_path / "dup.toml").write_text(DUP)
    store = tmp_path / "x.sqlite"
    code, _, err = run_cli(capsys, "eval", "--series", str(tmp_path / "dup.toml"), "--task", "sim-scaling",
                           "--exact", "--store", str(store))
    assert code == 0, err
    rec = _forecast(capsys, store, tmp_path / "f.json", "--target-n", "2e10")
    assert rec["data"]["models"] == ["a", "b", "c", "d"], rec["data"]["models"]
    assert len(rec["data"]["exact_p"][0]) == 4
    assert rec["data"]["n_params"] == [1e8, 1e8, 1e9, 5e9]
