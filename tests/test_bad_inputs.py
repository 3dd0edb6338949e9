"""A sweep of malformed inputs through the real command line (issue 14, finding 6).

Every case runs `passuntil.cli.main([...])` (the console script's entry point, so `UserError`
and click's usage errors are mapped exactly as for a user) and must end with exit status 2,
exactly one non-empty line on stderr starting with `error:`, and no traceback. A case that
touches the session's run store must leave its content (every table, row for row) unchanged:
a rejected command records nothing. A few cases also run as a subprocess of the installed
`passuntil` script.

Categories: corrupt stores, task files (a few: tests/test_task_files.py has the rest), BIG-bench
data caches, series files, train-series configs, bad numbers on every numeric option, unknown
names, forecast files (malformed or tampered), unwritable outputs, and data no law can be fitted
to (one size, no passes). `test_documented_acceptances` lists extreme but valid inputs.

The store is made once per session (`eval --series sim --task sim-scaling --k 1 --max-samples
200`, about two seconds) together with a pre-registered forecast file; each case works on
copies of both in its own temporary directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import shutil
import sqlite3
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

DEGENERATE_STORES = {  # one size only; three sizes without a single pass
    "one": ["--task", "sim-scaling", "--model", "0.5B", "--k", "1", "--max-samples", "50"],
    "zero": ["--task", "sim-accelerated", "--model", "0.03B", "--model", "0.1B", "--model", "0.2B",
             "--k", "1", "--max-samples", "1"],
}
SESSION_ARGS = ["--series", "sim", "--task", "sim-scaling", "--k", "1", "--max-samples", "200"]
# an eval that records a new run on the session store, small enough to finish in a second when
# a bad option is (wrongly) accepted
FRESH_EVAL = ["eval", "--store", "{store}", "--run", "bad", "--series", "sim", "--task", "sim-scaling",
              "--model", "0.03B", "--k", "1", "--max-samples", "200"]  # a later option overrides these


def run_main(args: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `passuntil ARGS` run in-process, as the script runs it."""
    from passuntil.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # what the console script would print as a traceback
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


def store_dump(path: Path) -> list[str]:
    """Every table of a store, row for row (independent of WAL and page layout)."""
    con = sqlite3.connect(path)
    try:
        return list(con.iterdump())
    finally:
        con.close()


def copy_store(src: Path, dst: Path) -> None:
    """A consistent single-file copy (SQLite's backup API: includes what is still in the WAL)."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="session")
def session_files(tmp_path_factory):
    """A small real run store and a forecast file made from it (once per session)."""
    d = tmp_path_factory.mktemp("bad-inputs-session")
    store, fc = d / "runs.sqlite", d / "forecast.json"
    code, _, err = run_main(["eval", "--store", str(store), *SESSION_ARGS])
    assert code == 0, err
    code, _, err = run_main(["forecast", str(store), "--task", "sim-scaling", "--target-model", "2.4B",
                             "--out", str(fc)])
    assert fc.is_file(), err
    for name, args in DEGENERATE_STORES.items():  # data a law cannot be fitted to
        code, _, err = run_main(["eval", "--store", str(d / f"{name}.sqlite"), "--series", "sim", *args])
        assert code == 0, err
    return store, fc


@pytest.fixture
def env(session_files, tmp_path):
    """Copies of the session store and forecast in a fresh directory, and the path mapping."""
    store, fc = session_files
    copy_store(store, tmp_path / "runs.sqlite")
    shutil.copy(fc, tmp_path / "forecast.json")
    (tmp_path / "afile").write_text("a plain file\n")
    (tmp_path / "adir").mkdir()
    return tmp_path


# --- file contents used by the cases ---------------------------------------------------------

RANDOM = random.Random(0).randbytes(8192)
GOOD_MODEL = 'name = "m"\nn_params = 1e8\nbackend = "simulated"\n'


def series_toml(*models: str, head: str = 'name = "s"\n') -> str:
    return head + "".join(f"[[models]]\n{m}" for m in models)


def tampered_forecast(edit):
    def make(d: Path) -> None:
        record = json.loads((d / "forecast.json").read_text())
        edit(record)
        (d / "forecast.json").write_text(json.dumps(record))
    return make


def sql(*statements: str):
    def make(d: Path) -> None:
        con = sqlite3.connect(d / "runs.sqlite")
        for s in statements:
            con.execute(s)
        con.commit()
        con.close()
    return make


def truncated_store(d: Path) -> None:
    data = (d / "runs.sqlite").read_bytes()
    (d / "runs.sqlite").write_bytes(data[: len(data) // 3])


def foreign_store(d: Path) -> None:
    con = sqlite3.connect(d / "other.sqlite")
    con.execute("CREATE TABLE moz_places (id INTEGER PRIMARY KEY, url TEXT)")
    con.execute("INSERT INTO moz_places (url) VALUES ('https://example.org')")
    con.commit()
    con.close()


def files(**contents):
    """Write `name=content` files (str or bytes; `__` in a name stands for `.`)."""
    def make(d: Path) -> None:
        for name, content in contents.items():
            p = d / name.replace("__", ".")
            if isinstance(content, bytes):
                p.write_bytes(content)
            else:
                p.write_text(content)
    return make


def C(case_id, args, setup=None):
    """One case. `args` may name {store} and {fc} (the case's copies of the session store and
    forecast), {t} (the case's folder), {one} and {zero} (the session's degenerate stores).
    `setup(folder)` writes the case's files and may return environment variables to set."""
    return pytest.param(args, setup, id=case_id)


# --- the cases -------------------------------------------------------------------------------

STORE_READERS = {  # a command line per command that opens an existing store ({s}: the store)
    "show": ["show", "{s}"],
    "show-instances": ["show", "{s}", "--instances"],
    "export": ["export", "{s}", "--out", "{t}/x.csv"],
    "metrics": ["metrics", "{s}"],
    "fit": ["fit", "{s}", "--task", "sim-scaling"],
    "forecast": ["forecast", "{s}", "--task", "sim-scaling", "--target-n", "1e9", "--out", "{t}/f2.json"],
    "backtest": ["backtest", "{s}", "--task", "sim-scaling"],
    "emergence": ["emergence", "{s}", "--task", "sim-scaling"],
    "plan": ["plan", "--store", "{s}", "--task", "sim-scaling", "--model", "0.1B"],
    "report": ["report", "{s}", "--out", "{t}/rep"],
    "score-forecast": ["score-forecast", "{fc}", "{s}"],
    "resume": ["eval", "--store", "{s}", "--resume"],
}


def _readers(kind, path, setup, commands):
    return [C(f"{kind}-{name}", [a.replace("{s}", path) for a in STORE_READERS[name]], setup)
            for name in commands]



CORRUPT_STORES = [
    *_readers("random-bytes", "{t}/rnd.sqlite", files(rnd__sqlite=RANDOM), list(STORE_READERS)),
    *_readers("truncated", "{store}", truncated_store, ["show", "metrics", "fit", "resume", "report"]),
    *_readers("foreign-sqlite", "{t}/other.sqlite", foreign_store, ["show", "fit", "report", "resume"]),
    *_readers("empty-file", "{t}/empty.sqlite", files(empty__sqlite=""),
              ["show", "export", "report", "resume", "metrics"]),
    *_readers("directory", "{t}/adir", None, ["show", "export", "fit"]),
    *_readers("missing", "{t}/nope.sqlite", None, ["show", "fit", "report", "score-forecast", "resume"]),
    *_readers("no-results-table", "{store}", sql("DROP TABLE results"), ["show", "fit", "export"]),
    *_readers("no-runs-table", "{store}", sql("DROP TABLE reference_scores", "DROP TABLE completions",
                                              "DROP TABLE results", "DROP TABLE models",
                                              "DROP TABLE runs"), ["show", "resume"]),
    *_readers("no-completions-table", "{store}", sql("DROP TABLE completions"), ["metrics"]),
    *_readers("config-garbage", "{store}", sql("UPDATE runs SET config_json = '{not json'"),
              ["show", "fit", "metrics", "report", "resume", "forecast"]),
    *_readers("config-wrong-shape", "{store}", sql("UPDATE runs SET config_json = '[1, 2]'"),
              ["show", "fit", "resume"]),
    *_readers("row-passes-over-samples", "{store}",
              sql("UPDATE results SET passes = samples + 5 WHERE instance_id = '03'"),
              ["show", "fit", "export", "report", "forecast", "emergence"]),
    *_readers("row-negative-samples", "{store}", sql("UPDATE results SET samples = -3 WHERE instance_id = '04'"),
              ["show", "fit"]),
    *_readers("row-text-passes", "{store}", sql("UPDATE results SET passes = 'many' WHERE instance_id = '05'"),
              ["show", "fit"]),
    C("eval-store-is-directory", ["eval", "--store", "{t}/adir", *SESSION_ARGS]),
    C("eval-store-under-a-file", ["eval", "--store", "{t}/afile/x.sqlite", *SESSION_ARGS]),
    C("eval-store-unwritable", ["eval", "--store", "/proc/passuntil-x.sqlite", *SESSION_ARGS]),
    C("eval-store-random-bytes", ["eval", "--store", "{t}/rnd.sqlite", *SESSION_ARGS],
      files(rnd__sqlite=RANDOM)),
]

def _task(case_id, fname, content):
    setup = None if content is None else files(**{fname.replace(".", "__"): content})
    return C(f"task-{case_id}", [*FRESH_EVAL[:5], "--series", "tiny", "--model", "tiny-2",
                                 "--task", f"{{t}}/{fname}"], setup)


TASK_FILES = [  # a few; tests/test_task_files.py covers task files in depth
    _task("yaml-not-a-mapping", "t.yaml", "- a\n- b\n"),
    _task("yaml-syntax", "t.yaml", "name: [unclosed\n"),
    _task("yaml-no-instances", "t.yaml", "name: t\ntemplate: '{x}'\n"),
    _task("yaml-unknown-check", "t.yaml", "name: t\ncheck: magic\ninstances:\n  - {id: a, prompt: q, references: [r]}\n"),
    _task("jsonl-bad-line", "t.jsonl", '{"id": "a", "prompt": "q", "references": ["r"]}\n{oops\n'),
    _task("jsonl-empty", "t.jsonl", ""),
    _task("yaml-missing-file", "nope.yaml", None),
]


def bigbench_data(**task_files):
    """A `$PASSUNTIL_DATA` folder whose BIG-bench cache holds these task.json contents."""
    def make(d: Path) -> dict:
        root = d / "data" / "bigbench-1.0.0"
        (root / "bigbench" / "benchmark_tasks").mkdir(parents=True)
        (root / "MANIFEST.json").write_text("{}")
        for task_dir, content in task_files.items():
            f = root / "bigbench" / "benchmark_tasks" / task_dir.replace("__", "/") / "task.json"
            f.parent.mkdir(parents=True)
            f.write_bytes(content if isinstance(content, bytes) else content.encode())
        return {"PASSUNTIL_DATA": str(d / "data")}
    return make


def _bigbench(case_id, task, **task_files):
    return C(f"bigbench-{case_id}", ["eval", "--store", "{t}/bb.sqlite", "--series", "tiny", "--model",
                                     "tiny-2", "--task", task], bigbench_data(**task_files))


BIGBENCH_DATA = [
    _bigbench("not-fetched", "bigbench/date_understanding"),
    _bigbench("not-json", "bigbench/emoji_movie", emoji_movie="not json"),
    _bigbench("binary", "bigbench/emoji_movie", emoji_movie=RANDOM),
    _bigbench("no-examples", "bigbench/uicl/identity", unnatural_in_context_learning__identity='{"name": "x"}'),
    _bigbench("examples-not-records", "bigbench/uicl/identity",
              unnatural_in_context_learning__identity='{"examples": [1, 2]}'),
    _bigbench("too-few-examples", "bigbench/uicl/dates",
              unnatural_in_context_learning__dates='{"examples": [{"input": "a", "target": "b"}]}'),
    _bigbench("list", "bigbench/modified_arithmetic/three_digit_addition_control",
              modified_arithmetic__three_digit_addition_control="[]"),
    C("bigbench-tasks-listing-corrupt", ["tasks"], bigbench_data(emoji_movie="{")),
]


def _series(case_id, content, suffix="toml"):
    return C(f"series-{case_id}", [*FRESH_EVAL[:5], "--series", f"{{t}}/s.{suffix}", "--task", "sim-scaling"],
             files(**{f"s__{suffix}": content}))


SERIES_FILES = [
    _series("toml-syntax", "name = \n[[models]\n"),
    _series("yaml-syntax", "models: [unclosed\n", "yaml"),
    _series("yaml-not-a-table", "- a\n- b\n", "yaml"),
    _series("yaml-scalar", "42\n", "yaml"),
    _series("empty", ""),
    _series("no-models", 'name = "s"\n'),
    _series("models-not-a-list", 'name = "s"\nmodels = 3\n'),
    _series("model-not-a-table", 'name = "s"\nmodels = ["a", "b"]\n'),
    _series("missing-n-params", series_toml('name = "m"\nbackend = "simulated"\n')),
    _series("missing-name", series_toml('n_params = 1e8\nbackend = "simulated"\n')),
    _series("n-params-abc", series_toml('name = "m"\nn_params = "abc"\nbackend = "simulated"\n')),
    _series("n-params-negative", series_toml('name = "m"\nn_params = -1\nbackend = "simulated"\n')),
    _series("n-params-zero", series_toml('name = "m"\nn_params = 0\nbackend = "simulated"\n')),
    _series("n-params-inf", series_toml('name = "m"\nn_params = inf\nbackend = "simulated"\n')),
    _series("n-params-nan", series_toml('name = "m"\nn_params = nan\nbackend = "simulated"\n')),
    _series("n-params-1e400", series_toml('name = "m"\nn_params = 1e400\nbackend = "simulated"\n')),
    _series("n-params-bool", series_toml('name = "m"\nn_params = true\nbackend = "simulated"\n')),
    _series("yaml-n-params-nan", "models:\n  - {name: m, n_params: .nan, backend: simulated}\n", "yaml"),
    _series("yaml-n-params-inf", "models:\n  - {name: m, n_params: .inf, backend: simulated}\n", "yaml"),
    _series("duplicate-names", series_toml(GOOD_MODEL, GOOD_MODEL)),
    _series("unknown-model-field", series_toml(GOOD_MODEL + "colour = 'red'\n")),
    _series("unknown-series-field", series_toml(GOOD_MODEL, head='name = "s"\nflavour = 1\n')),
    _series("unknown-backend", series_toml('name = "m"\nn_params = 1e8\nbackend = "quantum"\n')),
    _series("torch-bad-path", series_toml('name = "m"\nn_params = 1e8\nbackend = "torch"\npath = "no/such/dir"\n')),
    _series("torch-no-path", series_toml('name = "m"\nn_params = 1e8\nbackend = "torch"\n')),
    _series("options-not-a-table", series_toml(GOOD_MODEL + "options = 3\n")),
    _series("train-tokens-nan", series_toml(GOOD_MODEL + "train_tokens = nan\n")),
    _series("unknown-suffix", GOOD_MODEL, "txt"),
    C("series-file-is-directory", [*FRESH_EVAL[:5], "--series", "{t}/adir", "--task", "sim-scaling"]),
]


def _train(case_id, setting):
    """A small train-series config (one 2-step size, written into the case's folder) with one bad
    `key = value` line replacing that key's default."""
    base = {"out": '"{out}"', "indices": "[2]", "steps": "2"}
    key, value = (part.strip() for part in setting.split("=", 1))
    toml = "".join(f"{k} = {v}\n" for k, v in {**base, key: value}.items())
    return C(f"train-series-{case_id}", ["train-series", "{t}/c.toml"], files(c__toml=toml))


TRAIN_CONFIGS = [
    C("train-series-missing", ["train-series", "{t}/nope.toml"]),
    C("train-series-not-toml", ["train-series", "{t}/c.toml"], files(c__toml="indices = [2\n")),
    C("train-series-directory", ["train-series", "{t}/adir"]),
    _train("unknown-key", "colour = 1"),
    _train("index-below-2", "indices = [1]"),
    _train("indices-empty", "indices = []"),
    _train("indices-not-ints", 'indices = ["a"]'),
    _train("indices-not-a-list", "indices = 3"),
    _train("steps-zero", "steps = 0"),
    _train("steps-negative", "steps = -5"),
    _train("steps-float", "steps = 1.5"),
    _train("lr-nan", "lr = nan"),
    _train("lr-negative", "lr = -0.01"),
    _train("lr-string", 'lr = "fast"'),
    _train("tokens-per-param-zero", "tokens_per_param = 0"),
    _train("tokens-per-param-inf", "tokens_per_param = inf"),
    _train("seq-len-zero", "seq_len = 0"),
    _train("head-dim-zero", "head_dim = 0"),
    _train("warmup-negative", "warmup_steps = -1"),
    _train("min-lr-ratio-2", "min_lr_ratio = 2.0"),
    _train("threads-negative", "threads = -1"),
    _train("hidden-act-unknown", 'hidden_act = "sparkle"'),
    _train("out-under-a-file", 'out = "{afile}/x"'),
    _train("indices-duplicate", "indices = [2, 2]"),
    _train("indices-float", "indices = [2.5]"),
    _train("name-not-a-string", "name = 3"),
    _train("seed-negative", "seed = -1"),
    _train("seed-float", "seed = 1.5"),
    _train("eval-every-zero", "eval_every = 0"),
    _train("save-every-nan", "save_every_s = nan"),
    _train("ffn-ratio-zero", "ffn_ratio = 0"),
    _train("weight-decay-negative", "weight_decay = -1"),
    _train("extra-not-a-table", "extra = 3"),
    _train("steps-bool", "steps = true"),
]


EVAL_OPTIONS = [
    C(f"eval-{flag.strip('-')}-{value}", [*FRESH_EVAL, flag, value])
    for flag, value in [
        ("--k", "0"), ("--k", "-1"), ("--k", "nan"), ("--k", "1.5"),
        ("--max-samples", "0"), ("--max-samples", "-1"), ("--max-samples", "nan"),
        ("--max-samples", str(10**30)),
        ("--batch-size", "0"), ("--batch-size", "-1"),
        ("--seed", str(10**30)), ("--seed", "abc"),
        ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
        ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--top-p", "-0.5"),
        ("--top-k", "-1"),
        ("--check-workers", "-1"),
        ("--max-tokens", "0"), ("--max-tokens", "-1"), ("--max-tokens", str(10**30)),
        ("--limit", "0"), ("--limit", "-1"),
        ("--ray-workers", "0"),
    ]
] + [
    C("eval-unknown-task", [*FRESH_EVAL[:5], "--task", "no-such-task"]),
    C("eval-unknown-series", [*FRESH_EVAL[:5], "--series", "no-such-series", "--task", "sim-scaling"]),
    C("eval-unknown-model", [*FRESH_EVAL[:5], "--series", "sim", "--task", "sim-scaling", "--model", "9T"]),
    C("eval-resume-unknown-run", ["eval", "--store", "{store}", "--resume", "--run", "ghost"]),
    C("eval-existing-run-without-resume", ["eval", "--store", "{store}", *SESSION_ARGS]),
    C("eval-resume-with-other-budget", ["eval", "--store", "{store}", "--resume", "--max-samples", "999"]),
    C("eval-unknown-option", ["eval", "--store", "{store}", "--bogus"]),
    C("unknown-command", ["evaluate", "{store}"]),
    C("prompts-unknown-task", ["prompts", "--task", "no-such-task"]),
    C("prompts-limit-0", ["prompts", "--task", "arith", "--limit", "0"]),
    C("prompts-limit-negative", ["prompts", "--task", "arith", "--limit", "-3"]),
    C("prompts-bad-task-file", ["prompts", "--task", "{t}/t.yaml"], files(t__yaml="- just\n- a list\n")),
]

ANALYSIS_OPTIONS = [
    *[C(f"show-confidence-{v}", ["show", "{store}", "--confidence", v])
      for v in ["1.5", "0", "-1", "nan", "1", "inf"]],
    C("show-unknown-run", ["show", "{store}", "--run", "ghost"]),
    *[C(f"fit-{flag.strip('-')}-{v}", ["fit", "{store}", "--task", "sim-scaling", flag, v])
      for flag, v in [("--target-n", "0"), ("--target-n", "-1"), ("--target-n", "nan"),
                         ("--target-n", "inf"), ("--level", "1.5"), ("--level", "0"),
                         ("--level", "nan"), ("--method", "bogus"), ("--model", "ghost"),
                         ("--run", "ghost")]],
    C("fit-unknown-task", ["fit", "{store}", "--task", "ghost"]),
    *[C(f"forecast-{flag.strip('-')}-{v}",
        ["forecast", "{store}", "--task", "sim-scaling", "--out", "{t}/f2.json",
         *([] if flag in ("--target-n", "--target-model") else ["--target-model", "2.4B"]), flag, v])
      for flag, v in [("--target-n", "0"), ("--target-n", "-1"), ("--target-n", "nan"),
                         ("--target-n", "inf"), ("--level", "0"), ("--level", "1"),
                         ("--level", "1.5"), ("--level", "nan"), ("--threshold", "0"),
                         ("--threshold", "1.5"), ("--threshold", "nan"),
                         ("--threshold", "-1"), ("--method", "bogus"),
                         ("--target-model", "ghost")]],
    C("forecast-no-target", ["forecast", "{store}", "--task", "sim-scaling", "--out", "{t}/f2.json"]),
    C("forecast-out-exists", ["forecast", "{store}", "--task", "sim-scaling", "--target-model", "2.4B",
                              "--out", "{fc}"]),
    C("forecast-out-unwritable", ["forecast", "{store}", "--task", "sim-scaling", "--target-model", "2.4B",
                                  "--out", "/proc/passuntil-f.json"]),
    C("forecast-out-under-a-file", ["forecast", "{store}", "--task", "sim-scaling", "--target-model", "2.4B",
                                    "--out", "{t}/afile/f.json"]),
    *[C(f"plan-{flag.strip('-')}-{v}", ["plan", *([] if flag == "--pu" else ["--pu", "0.01"]), flag, v])
      for flag, v in [("--pu", "2"), ("--pu", "-0.1"), ("--pu", "nan"),
                         ("--pu", "inf"), ("--k", "0"), ("--k", "-1"),
                         ("--max-samples", "0"), ("--max-samples", "-1"),
                         ("--samples-per-s", "0"),
                         ("--samples-per-s", "-1"), ("--samples-per-s", "nan"),
                         ("--samples-per-s", "inf")]],
    C("plan-nothing", ["plan"]),
    C("plan-store-without-model", ["plan", "--store", "{store}", "--task", "sim-scaling"]),
    C("plan-unknown-model", ["plan", "--store", "{store}", "--task", "sim-scaling", "--model", "ghost"]),
    C("backtest-unknown-method", ["backtest", "{store}", "--task", "sim-scaling", "--method", "bogus"]),
    C("backtest-unknown-task", ["backtest", "{store}", "--task", "ghost"]),
    C("emergence-unknown-task", ["emergence", "{store}", "--task", "ghost"]),
    C("emergence-unknown-run", ["emergence", "{store}", "--task", "sim-scaling", "--run", "ghost"]),
    C("metrics-unknown-run", ["metrics", "{store}", "--run", "ghost"]),
    C("export-unknown-run", ["export", "{store}", "--out", "{t}/x.csv", "--run", "ghost"]),
    C("export-unknown-suffix", ["export", "{store}", "--out", "{t}/x.xlsx"]),
    C("export-no-suffix", ["export", "{store}", "--out", "{t}/x"]),
    C("export-unwritable", ["export", "{store}", "--out", "/proc/passuntil-x.csv"]),
    C("export-out-is-directory", ["export", "{store}", "--out", "{t}/adir.csv"],
      lambda d: (d / "adir.csv").mkdir()),
    C("export-out-under-a-file", ["export", "{store}", "--out", "{t}/afile/x.csv"]),
    C("report-out-is-a-file", ["report", "{store}", "--out", "{t}/afile"]),
    C("report-unknown-run", ["report", "{store}", "--run", "ghost", "--out", "{t}/rep"]),
    C("report-missing-forecast", ["report", "{store}", "--forecast", "{t}/nope.json", "--out", "{t}/rep"]),
    C("report-garbage-forecast", ["report", "{store}", "--forecast", "{t}/afile", "--out", "{t}/rep"]),
    C("demo-unknown-series", ["demo", "--series", "bogus", "--out", "{t}/demo"]),
]

SCORE = ["score-forecast", "{fc}", "{store}"]
FORECAST_FILES = [
    C("forecast-file-not-json", SCORE, files(forecast__json="not json {")),
    C("forecast-file-empty", SCORE, files(forecast__json="")),
    C("forecast-file-binary", SCORE, files(forecast__json=RANDOM)),
    C("forecast-file-list", SCORE, files(forecast__json="[1, 2, 3]")),
    C("forecast-file-string", SCORE, files(forecast__json='"forecast"')),
    C("forecast-file-missing", ["score-forecast", "{t}/nope.json", "{store}"]),
    C("forecast-file-directory", ["score-forecast", "{t}/adir", "{store}"]),
    C("forecast-file-wrong-schema", SCORE, tampered_forecast(lambda r: r.update(schema="other/9"))),
    C("forecast-file-no-data", SCORE, tampered_forecast(lambda r: r.pop("data"))),
    C("forecast-file-no-forecast", SCORE, tampered_forecast(lambda r: r.pop("forecast"))),
    C("forecast-file-no-target", SCORE, tampered_forecast(lambda r: r.pop("target"))),
    C("forecast-file-no-task", SCORE, tampered_forecast(lambda r: r.pop("task"))),
    C("forecast-file-tampered-data", SCORE,
      tampered_forecast(lambda r: r["data"]["passes"][0].__setitem__(0, 0))),
    C("forecast-file-tampered-point", SCORE, tampered_forecast(lambda r: r["forecast"].update(point=0.5))),
    C("forecast-file-tampered-interval", SCORE,
      tampered_forecast(lambda r: r["forecast"].update(low=0.0, high=1.0))),
    C("forecast-file-tampered-method", SCORE, tampered_forecast(lambda r: r.update(method="dataset"))),
    C("forecast-file-nan-point", SCORE,
      tampered_forecast(lambda r: r["forecast"].update(point=math.nan))),
    C("forecast-file-data-wrong-type", SCORE,
      tampered_forecast(lambda r: r["data"].update(instance_ids=5))),
    C("forecast-file-unknown-task", SCORE, tampered_forecast(lambda r: r.update(task="ghost"))),
    C("forecast-unknown-model", ["score-forecast", "{fc}", "{store}", "--model", "ghost"]),
    C("forecast-unknown-run", ["score-forecast", "{fc}", "{store}", "--run", "ghost"]),
]

DEGENERATE_DATA = [
    C("one-size-forecast", ["forecast", "{one}", "--task", "sim-scaling", "--target-n", "1e10", "--out", "{t}/f.json"]),
    C("one-size-threshold", ["forecast", "{one}", "--task", "sim-scaling", "--target-n", "1e10",
                             "--threshold", "0.5", "--out", "{t}/f.json"]),
    *[C(f"one-size-fit-{m}", ["fit", "{one}", "--task", "sim-scaling", "--method", m, "--target-n", "1e10"])
      for m in ("likelihood", "instance-ls", "dataset")],
    C("one-size-backtest", ["backtest", "{one}", "--task", "sim-scaling"]),
    C("fit-subset-of-one-model", ["fit", "{store}", "--task", "sim-scaling", "--model", "0.9B",
                                  "--method", "likelihood"]),
    C("zero-passes-forecast", ["forecast", "{zero}", "--task", "sim-accelerated", "--target-n", "1e10",
                               "--out", "{t}/f.json"]),
    *[C(f"zero-passes-fit-{m}", ["fit", "{zero}", "--task", "sim-accelerated", "--method", m])
      for m in ("likelihood", "instance-ls", "dataset")],
]

CASES = CORRUPT_STORES + TASK_FILES + BIGBENCH_DATA + SERIES_FILES + TRAIN_CONFIGS + EVAL_OPTIONS + ANALYSIS_OPTIONS + FORECAST_FILES + DEGENERATE_DATA


def _format(args, d: Path, session: Path | None = None) -> list[str]:
    names = {"store": str(d / "runs.sqlite"), "fc": str(d / "forecast.json"), "t": str(d),
             **{name: str((session or d) / f"{name}.sqlite") for name in DEGENERATE_STORES}}
    return [a.format(**names) for a in args]


def test_the_sweep_is_large_and_unique():
    ids = [p.id for p in CASES]
    assert len(ids) >= 120 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("args, setup", CASES)
def test_bad_input_is_one_line_and_exit_2(env, session_files, args, setup, monkeypatch):
    for key, value in ((setup(env) if setup is not None else None) or {}).items():
        monkeypatch.setenv(key, value)
    train = env / "c.toml"
    if train.exists():  # the config's own placeholders: where it would write
        train.write_text(train.read_text().replace("{out}", str(env / "series-out"))
                         .replace("{afile}", str(env / "afile")))
    check_store = setup is None and any("{store}" in a for a in args)
    before = store_dump(env / "runs.sqlite") if check_store else None
    code, out, err = run_main(_format(args, env, session_files[0].parent))
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}; stdout: {out[-400:]!r}; stderr: {err[-400:]!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    if check_store:
        assert store_dump(env / "runs.sqlite") == before, "a rejected command changed the store"
    assert not (env / "series-out").exists() or not any((env / "series-out").rglob("*.safetensors"))


@pytest.mark.parametrize("args", [
    ["show", "{t}/rnd.sqlite"],
    ["eval", "--series", "{t}/s.toml", "--task", "sim-scaling", "--store", "{t}/new.sqlite"],
    ["score-forecast", "{t}/rnd.sqlite", "{store}"],
    ["plan", "--pu", "0.01", "--k", "abc"],
], ids=["show-random-bytes", "series-n-params-nan", "forecast-file-binary", "plan-k-not-int"])
def test_bad_input_through_the_installed_script(env, args):
    """The same contract through a real process: the console script, not the in-process main."""
    (env / "rnd.sqlite").write_bytes(RANDOM)
    (env / "s.toml").write_text(series_toml('name = "m"\nn_params = nan\nbackend = "simulated"\n'))
    script = Path(sys.executable).with_name("passuntil")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "passuntil"]
    proc = subprocess.run(cmd + _format(args, env), capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("args, expected", [
    # a budget no run will reach is still a budget: the plan is about K/p samples (2/0.01)
    (["plan", "--pu", "0.01", "--k", "2", "--max-samples", str(10**30)], "expected 200 samples in total"),
    # a guess of 0 (the instance never passes): it ends at the budget
    (["plan", "--pu", "0", "--pu", "0.5", "--k", "2", "--max-samples", "5000"],
     "1 instance(s) will probably end at the budget"),
], ids=["plan-unreachable-budget", "plan-pu-zero"])
def test_documented_acceptances(args, expected):
    """Inputs that look extreme but are valid: accepted, with a correct answer."""
    code, out, err = run_main(args)
    assert code == 0, err
    assert expected in out
