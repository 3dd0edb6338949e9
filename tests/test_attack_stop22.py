"""Attacks on `report`, `score-forecast`, task files and `--resume` through the CLI: inputs that
used to give a traceback, a refused legal file, a silently ignored option or a score about the
wrong model, each now a right answer or one `error:` line (exit 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from passuntil.store import Store
from passuntil.tables import estimates_table
from tests.conftest import run_cli

SIM_SIZES = ["0.03B", "0.1B", "0.2B", "0.5B", "0.9B", "1.5B"]

EMPTY_REF = """name: odd
template: "Say {w}:"
check: exact
max_new_tokens: 4
instances:
  - {id: nothing, w: "x", references: [""]}
  - {id: umlaut, w: "ü", references: ["ü"]}
"""


@pytest.mark.parametrize("exact", [False, True])
def test_an_empty_reference_on_the_builtin_sampler_is_scored_not_a_traceback(tmp_path, capsys, exact):
    """`references: [""]` is legal (the model says nothing); scoring it on the built-in sampler
    used to end `eval` in an IndexError traceback (an empty float tensor as an index), after the
    samples were stored, and `--exact` the same. Its test loss has no tokens (left out); its
    exact p is P(the sample ends at once), a probability."""
    task = tmp_path / "odd.yaml"
    task.write_text(EMPTY_REF, encoding="utf-8")
    store = tmp_path / "o.sqlite"
    args = ["--exact"] if exact else ["--k", "1", "--max-samples", "30"]
    code, out, err = run_cli(capsys, "eval", "--task", str(task), "--series", "tiny", "--model", "tiny-2",
                             *args, "--store", str(store))
    assert code == 0, err
    s = Store(store, create=False)
    df = estimates_table(s, "main").set_index("instance_id")
    assert set(df.index) == {"nothing", "umlaut"}
    assert 0 < df.loc["nothing", "exact_p"] <= 1 and 0 < df.loc["umlaut", "exact_p"] < 1
    assert df.loc["nothing", "ref_tokens"] == 0 and df.loc["umlaut", "ref_tokens"] == 2  # ü: two bytes
    code, out, err = run_cli(capsys, "show", str(store), "--instances")
    assert code == 0 and "nothing" in out, err


@pytest.fixture
def exact_store(tmp_path, capsys):
    """The sim series computed exactly (no samples), one run holding every size."""
    store = tmp_path / "ex.sqlite"
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--series", "sim", "--exact",
                           "--store", str(store), "--run", "exact")
    assert code == 0, err
    return store


def test_a_forecast_is_scored_against_an_exact_mode_target(tmp_path, capsys, exact_store):
    """The target's exact p for every instance is in the store (`eval --exact`): score-forecast
    used to refuse ("no finished result") and the report said "not evaluated yet". Now both score
    it by the exact rule: observed = exact = the mean exact p of the target."""
    fc = tmp_path / "f.json"
    code, _, err = run_cli(capsys, "forecast", str(exact_store), "--run", "exact", "--task", "sim-scaling",
                           "--target-model", "2.4B", "--out", str(fc))
    assert code == 0, err
    code, out, err = run_cli(capsys, "score-forecast", str(fc), str(exact_store), "--run", "exact")
    assert code == 0, err
    score = json.loads(out)
    df = estimates_table(Store(exact_store, create=False), "exact")
    truth = float(df.loc[(df["model"] == "2.4B") & (df["task"] == "sim-scaling"), "exact_p"].mean())
    assert score["against"] == "exact" and score["instances"] == 20
    assert score["exact"] == pytest.approx(truth, rel=1e-12)
    assert score["observed"] == pytest.approx(truth, rel=1e-12)
    assert score["observed_is"].startswith("mean over instances of the exact")
    record = json.loads(fc.read_text())
    fc_low, fc_high = record["forecast"]["low"], record["forecast"]["high"]
    assert score["inside_interval"] == (fc_low <= truth <= fc_high)
    code, out, err = run_cli(capsys, "report", str(exact_store), "--forecast", str(fc), "--out",
                             str(tmp_path / "rep"))
    assert code == 0, err
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    section = page[page.index("Forecasts against outcomes"):]
    assert "not evaluated yet" not in section and f"{truth:.4g}" in section


def test_score_forecast_refuses_a_model_of_another_size(tmp_path, capsys):
    """A forecast for N = 5e10 used to be scored, silently, against any model named with --model:
    one of the sizes it was fitted on, or a model 20x smaller than its target. Both are refused;
    the model at the forecast's size (within a typed N's slip) is scored."""
    store = tmp_path / "s.sqlite"
    for run, models in (("small", SIM_SIZES), ("big", ["2.4B"])):
        code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--series", "sim", "--exact",
                               *[a for m in models for a in ("--model", m)], "--store", str(store), "--run", run)
        assert code == 0, err
    far, near = tmp_path / "far.json", tmp_path / "near.json"
    for path, n in ((far, "5e10"), (near, "2.4e9")):
        code, _, err = run_cli(capsys, "forecast", str(store), "--run", "small", "--task", "sim-scaling",
                               "--target-n", n, "--out", str(path))
        assert code == 0, err
    code, out, err = run_cli(capsys, "score-forecast", str(far), str(store), "--run", "small", "--model", "0.1B")
    assert code == 2 and err.startswith("error: ") and "fitted on" in err and len(err.splitlines()) == 1
    code, out, err = run_cli(capsys, "score-forecast", str(far), str(store), "--run", "big", "--model", "2.4B")
    assert code == 2 and "N = 2.45e+09" in err and "N = 5e+10" in err and len(err.splitlines()) == 1
    code, out, err = run_cli(capsys, "score-forecast", str(near), str(store), "--run", "big", "--model", "2.4B")
    assert code == 0, err
    score = json.loads(out)
    assert score["model"] == "2.4B" and score["against"] == "exact" and score["instances"] == 20


def test_a_jsonl_instance_may_have_a_field_named_task(tmp_path, capsys):
    """docs/task-files.md: a record is the header only when its only key is `task`; any other
    field of an instance is kept as its meta. An instance with a `task` mapping used to be taken
    for a misplaced header and the file refused."""
    f = tmp_path / "meta.jsonl"
    f.write_text('{"id": "a", "prompt": "1+1=", "references": ["2"], "task": {"kind": "sum"}}\n'
                 '{"id": "b", "prompt": "2+2=", "references": ["4"], "task": {"kind": "sum"}}\n')
    code, out, err = run_cli(capsys, "prompts", "--task", str(f), "--jsonl")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["instance"] for r in rows] == ["a", "b"] and rows[0]["check"] == "exact"
    from passuntil.tasks import get_task

    assert get_task(str(f)).instances[1].meta["task"] == {"kind": "sum"}
    # a header with a stray key is still refused with its own line
    f.write_text('{"task": {"check": "exact"}, "name": "x"}\n{"id": "b", "prompt": "2+2=", "references": ["4"]}\n')
    code, out, err = run_cli(capsys, "prompts", "--task", str(f))
    assert code == 2 and "holds only 'task'" in err


def test_resume_refuses_another_series(tmp_path, capsys):
    """`--resume --series OTHER` used to be accepted and ignored (the run went on with the series it
    was started with while the command named another); now it is one line, like every other
    changed option. The same series, however spelled, still resumes."""
    series = tmp_path / "two.toml"
    series.write_text('name = "two"\n[[models]]\nname = "a"\nn_params = 1e8\n[[models]]\nname = "b"\nn_params = 1e9\n')
    store = tmp_path / "r.sqlite"
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--series", str(series), "--k", "1",
                           "--max-samples", "50", "--store", str(store))
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", "--store", str(store), "--resume", "--series", "sim")
    assert code == 2 and "was made with series" in err and len(err.splitlines()) == 1
    for same in (str(series), str(tmp_path / "." / "two.toml")):
        code, out, err = run_cli(capsys, "eval", "--store", str(store), "--resume", "--series", same)
        assert code == 0 and "0 samples drawn this session" in out, err
    df = estimates_table(Store(store, create=False), "main")
    assert sorted(df["model"].unique()) == ["a", "b"] and np.all(df["samples"] > 0)


def _summary_rows(page: str, caption: str) -> list[list[str]]:
    import html
    import re

    section = page[page.index('id="run-summary"'):]
    body = re.search(f"<caption>{re.escape(caption)}</caption>(.*?)</table>", section, re.S).group(1)
    return [[html.unescape(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body)]


def test_report_summary_counts_each_runs_own_cells(tmp_path, capsys, exact_store):
    """With an exact run and a PassUntil run over the same cells, the report draws the sampled row
    of each cell; its run summary used to count from those rows only, so it said the exact run
    had 0 instances done at every size (it computed all 20), and gave that run a K and a budget
    it never used."""
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--series", "sim", "--model", "0.5B",
                           "--model", "2.4B", "--k", "1", "--max-samples", "200", "--store", str(exact_store),
                           "--run", "pu")
    assert code == 0, err
    code, out, err = run_cli(capsys, "report", str(exact_store), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    models = _summary_rows(page, "models")
    head = models[0]
    done = {(r[head.index("run")], r[head.index("model")]): r[head.index("instances done")] for r in models[1:]}
    assert {done["exact", m] for m in [*SIM_SIZES, "2.4B"]} == {"20"}
    assert done["pu", "0.5B"] == "20" and done["pu", "2.4B"] == "20"
    settings = {r[0]: r[1:] for r in _summary_rows(page, "settings of each run")}
    assert settings["K (passes to stop at)"][0].startswith("none: exact") and settings["K (passes to stop at)"][1] == "1"


def test_report_does_not_take_a_design_run_for_passuntil(tmp_path, capsys, exact_store):
    """The report's "PassUntil (budget B) vs exact" table used to pick a `--design forecast` run as
    its PassUntil run, captioned "the budget of 20,000 samples per instance" (the design's budget
    per task; it has no K-stop). Unnamed, a design run is not taken; named, it is one line."""
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--series", "sim", "--model", "0.03B",
                           "--model", "0.1B", "--design", "forecast", "--target-model", "2.4B", "--total-budget",
                           "400", "--round-size", "400", "--store", str(exact_store), "--run", "design")
    assert code == 0, err
    code, out, err = run_cli(capsys, "report", str(exact_store), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    assert "warning before" not in out
    assert 'id="warning-before-target"' not in (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    code, out, err = run_cli(capsys, "report", str(exact_store), "--sampled-run", "design",
                             "--out", str(tmp_path / "rep2"))
    assert code == 2 and "--design forecast run" in err and len(err.splitlines()) == 1


DATES_WITH_A_SPACE = """name: datespace
check: exact
max_new_tokens: 16
shots: {n: 4, seed: 0, separator: "\\n"}
shots_from:
  - {prompt: "2024-01-27 ->", references: ["01/27/2024"]}
  - {prompt: "2014-05-24 ->", references: ["05/24/2014"]}
  - {prompt: "1981-01-01 ->", references: ["01/01/1981"]}
  - {prompt: "1934-10-28 ->", references: ["10/28/1934"]}
  - {prompt: "2071-03-15 ->", references: ["03/15/2071"]}
instances:
  - {id: d0, prompt: "2042-11-04 ->", references: ["11/04/2042"]}
  - {id: d1, prompt: "1957-06-12 ->", references: ["06/12/1957"]}
  - {id: d2, prompt: "2003-09-30 ->", references: ["09/30/2003"]}
"""


def test_an_exact_p_its_own_samples_rule_out_is_not_scored_as_the_truth(tmp_path, capsys):
    """The default shot template "{prompt} {answer}" teaches the model to answer " 11/04/2042";
    the exact check strips it and passes, so tiny-7 passes most samples, while the stored "exact p"
    (the reference without the space, then an end) is about 1e-21. score-forecast used to score
    against that number as the truth (against "exact", every forecast "outside"); the samples rule it
    out, so the cells are scored by their likelihood and the score says why."""
    from passuntil.scaling.data import SeriesCounts
    from passuntil.scaling.forecast import make_forecast, write_forecast

    task = tmp_path / "datespace.yaml"
    task.write_text(DATES_WITH_A_SPACE, encoding="utf-8")
    store = tmp_path / "d.sqlite"
    code, _, err = run_cli(capsys, "eval", "--task", str(task), "--series", "tiny", "--model", "tiny-7",
                           "--k", "2", "--max-samples", "40", "--store", str(store))
    assert code == 0, err
    df = estimates_table(Store(store, create=False), "main")
    assert (df["passes"] == 2).all() and (df["exact_p"] < 1e-12).all()  # the samples pass; the "exact p" says never
    counts = SeriesCounts(np.array([3.7e5, 6.4e5]), np.array([[1, 2], [0, 1], [1, 1]]),
                          np.array([200, 100] * 3).reshape(3, 2), 2, ("d0", "d1", "d2"), ("s", "m"))
    fc = write_forecast(make_forecast(counts, 1011472.0, task="datespace", target_model="tiny-7"),
                        tmp_path / "f.json")
    code, out, err = run_cli(capsys, "score-forecast", str(fc), str(store))
    assert code == 0, err
    score = json.loads(out)
    assert score["exact"] < 1e-12 and score["against"] == "likelihood" and score["z"] is not None
    assert "ruled out by their own samples" in score["exact_note"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_export_json_keeps_every_probability_in_full(tmp_path, capsys, exact_store, suffix):
    """`export --out x.json` went through pandas' JSON writer, which keeps 10 decimal places: an
    exact p or PU of 1.7e-14 came out as 0.0 and 6.26e-07 as 6.256e-07. Every number now comes
    back exactly as the tidy table holds it; missing values are null."""
    out = tmp_path / f"x{suffix}"
    code, _, err = run_cli(capsys, "export", str(exact_store), "--out", str(out))
    assert code == 0, err
    text = out.read_text(encoding="utf-8")
    rows = json.loads(text) if suffix == ".json" else [json.loads(line) for line in text.splitlines()]
    table = estimates_table(Store(exact_store, create=False), "exact")
    assert len(rows) == len(table) and table["exact_p"].min() < 1e-5
    for col in ("exact_p", "pu", "pu_unbiased", "ci_low", "ci_high", "n_params"):
        assert [r[col] for r in rows] == table[col].tolist(), col
    assert all(r["seed"] is None for r in rows)  # an exact row has no seed: null, not NaN


def test_report_takes_an_exact_p_only_from_a_run_that_sampled_alike(tmp_path, capsys, exact_store):
    """An exact run at temperature 1 beside a PassUntil run at 0.5 (no exact p of its own): the
    report used to fill the sampled rows' exact p from the exact run and score the forecast
    "against exact" on a probability of another sampling distribution, while score-forecast on the
    same run scored it by likelihood. Now both score by likelihood, and the warning table does not
    set the two runs side by side (named, it is one line)."""
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--series", "sim", "--temperature", "0.5",
                           "--no-reference-scores", "--k", "1", "--max-samples", "300", "--store", str(exact_store),
                           "--run", "cold")
    assert code == 0, err
    fc = tmp_path / "f.json"
    code, _, err = run_cli(capsys, "forecast", str(exact_store), "--run", "cold", "--task", "sim-scaling",
                           "--target-model", "2.4B", "--out", str(fc))
    assert code == 0, err
    code, out, err = run_cli(capsys, "score-forecast", str(fc), str(exact_store), "--run", "cold")
    assert code == 0 and json.loads(out)["against"] == "likelihood", err
    code, out, err = run_cli(capsys, "report", str(exact_store), "--run", "cold", "--run", "exact",
                             "--forecast", str(fc), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    assert "warning before" not in out
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    start = page.index("Forecasts against outcomes")
    section = page[start:page.index("</table>", start)]
    assert ">likelihood<" in section and ">exact<" not in section
    code, out, err = run_cli(capsys, "report", str(exact_store), "--sampled-run", "cold", "--out", str(tmp_path / "r2"))
    assert code == 2 and "other settings" in err and len(err.splitlines()) == 1


def test_report_and_metrics_after_the_task_file_moved_or_changed(tmp_path, capsys):
    """Once a run's task file was moved, `report` failed as a whole (its counts are all in the
    store) and `metrics` too; once it was edited, both judged the stored completions silently
    against the new references. Now the report is written without the metric panel and says why,
    and `metrics` refuses an edited task in one line."""
    task = tmp_path / "m.jsonl"
    task.write_text('{"id": "a", "prompt": "1+1=", "references": ["2"]}\n'
                    '{"id": "b", "prompt": "2+2=", "references": ["4"]}\n')
    store = tmp_path / "m.sqlite"
    code, _, err = run_cli(capsys, "eval", "--task", str(task), "--series", "tiny", "--model", "tiny-2",
                           "--model", "tiny-3", "--k", "1", "--max-samples", "20", "--store", str(store))
    assert code == 0, err
    code, out, err = run_cli(capsys, "metrics", str(store))
    assert code == 0, err
    task.write_text(task.read_text().replace('["2"]', '["two"]'))
    code, out, err = run_cli(capsys, "metrics", str(store))
    assert code == 2 and "has changed since run 'main'" in err and len(err.splitlines()) == 1
    task.unlink()
    code, out, err = run_cli(capsys, "report", str(store), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "No metric-choice panel or metric table" in page and "does not exist" in page
    assert 'id="fig2_passed_vs_samples"' in page and 'id="metric_choice"' not in page


@pytest.mark.parametrize("name", ["", "  ", "two\\nlines"])
def test_a_series_model_needs_a_visible_name(tmp_path, capsys, name):
    """A series file's model named "" or "  " was accepted: `show` then listed rows under no name
    and `--model`/`--target-model` could not tell them apart. Refused like a blank task name."""
    series = tmp_path / "s.toml"
    series.write_text(f'name = "s"\n[[models]]\nname = "{name}"\nn_params = 1e8\n'
                      '[[models]]\nname = "b"\nn_params = 1e9\n')
    code, _, err = run_cli(capsys, "eval", "--task", "sim-scaling", "--series", str(series),
                           "--store", str(tmp_path / "x.sqlite"))
    assert code == 2 and "model #1: 'name' must be a non-empty single-line string" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "x.sqlite").exists()
