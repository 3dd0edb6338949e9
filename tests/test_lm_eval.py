"""lm-evaluation-harness tasks under PassUntil (`passuntil.tasks.lm_eval`).

Parity is checked against lm_eval's own code path: `lm_eval.simple_evaluate` with a stand-in model
that answers each request with a crafted completion (cut at the stops by lm_eval's own
`postprocess_generated_text`, as its model backends do) and logs every sample's metrics. Four
built-in generate_until tasks with different filters run on local JSONL made here: gsm8k
(strict-match and flexible-extract regex filters), triviaqa (remove_whitespace, several targets),
BIG-bench Hard boolean_expressions, chain of thought (look-behind regex; inline first_n shots) and
unscramble anagrams1 (no filter: lm_eval's default take_first).
"""

from __future__ import annotations

import json
import pickle
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.model import LM  # noqa: E402

from passuntil.cli import cli  # noqa: E402
from passuntil.errors import UserError  # noqa: E402
from passuntil.tasks import get_task  # noqa: E402
from passuntil.tasks.lm_eval import LmEvalSpec, make_lm_eval_task  # noqa: E402

BUILTIN = Path(lm_eval.__file__).parent / "tasks"
N_DOCS = 24


# crafted documents and completions -------------------------------------------------------------

def _gsm8k_docs():
    docs = []
    for i in range(N_DOCS):
        a, b = 3 + 7 * i, 2 + 5 * i * i
        c = a * b if i % 3 else a + b
        op = "*" if i % 3 else "+"
        q = f"A crate holds {a} jars and a shop has {b} crates. How many jars in all?" if op == "*" \
            else f"Ann has {a} stamps and gets {b} more. How many stamps does she have?"
        docs.append({"question": q, "answer": f"{a} {op} {b} = <<{a}{op}{b}={c}>>{c}\n#### {c}"})
    return docs


def _gsm8k_outputs(doc, i):
    c = int(doc["answer"].split("#### ")[-1])
    variants = [
        f" {doc['answer']}", f"#### {c}", f"#### {c}\n\nQuestion: what is 1 + 1?\nAnswer: #### 2",
        f"#### {c + 1}", "", f"The answer is {c}.", f"#### ${c}", f"#### {c:,}", f"#### {c}.00",
        f"#### {c}.", f"{c} jars, no wait, {c + 3}", f"#### {c} and then #### {c + 1}",
        f"  #### {c}  ", f"####{c}", f"#### -{c}", f"Answer: {c}\n", f"#### {c}</s>#### 0",
        f"{c}", f"#### {c}<|im_end|>", f"It is {c} in total. #### {c}", f"#### {c}.5",
        f"#### 0{c}", "Question: #### 1", f"#### {c}\n#### {c + 1}",
    ]
    return variants[i % len(variants)]


def _trivia_docs():
    cities = [("France", ["Paris", "paris", "City of Light"]), ("Italy", ["Rome", "Roma"]),
              ("Japan", ["Tokyo", "Tōkyō"]), ("Peru", ["Lima"]), ("Kenya", ["Nairobi"]),
              ("Norway", ["Oslo", "Christiania"])]
    return [{"question": f"What is the capital of {cities[i % 6][0]} (item {i})",
             "answer": {"aliases": cities[i % 6][1], "value": cities[i % 6][1][0]}}
            for i in range(N_DOCS)]


def _trivia_outputs(doc, i):
    gold = doc["answer"]["aliases"]
    variants = [
        gold[0], f" {gold[0]}", gold[0].lower(), gold[0].upper() + "!", f"{gold[0]}, of course",
        f"{gold[0]}. It is big", f"The city of {gold[0]}", "", "Lyon", f" {gold[0]}\nmore",
        gold[0][:2] + " " + gold[0][2:], f"{gold[0]}?", f"  {gold[0]}  ", gold[-1], f"'{gold[0]}'",
        f"{gold[0]} {gold[0]}", f"\t{gold[0]}", "Paris", f"{gold[0]}s", f"({gold[0]})",
        f"{gold[-1].lower()}", f"{gold[0]};", f"{gold[0]}-", ",",
    ]
    return variants[i % len(variants)]


def _bool_docs():
    exprs = ["True and not False", "not True or False", "( True ) and False", "not not True",
             "False or not False", "True and ( False or True )"]
    vals = {e: str(eval(e)) for e in exprs}
    return [{"input": f"{exprs[i % 6]} {'and True ' * (i // 6)}is",
             "target": str(eval(vals[exprs[i % 6]] + " and True" * (i // 6)))} for i in range(N_DOCS)]


def _bool_outputs(doc, i):
    t = doc["target"]
    f = "False" if t == "True" else "True"
    variants = [
        f"We evaluate it. So the answer is {t}.", f"So the answer is {f}.", f"the answer is {t}",
        f"The answer is {t}.", f"So the answer is {t}.\n\nQ: junk", "", f"So the answer is {t}.x",
        f"the answer is {t}!!", f"the answer is  {t}.", f"the answer is {t.lower()}.",
        f"the answer is {t}. Then the answer is {f}.", f"{t}", f"the answer is ({t}).",
        f"Let's think. Quick: the answer is {t}.", f"So the answer is {t}\n\n.", f"the answer is {t}..",
        f"the answer is {t} .", "So the answer is .", f"the answer is {t}.</s>", f"so the answer is {t}. ",
        f"the answer is {f}{t}.", f"the answer is {t}.Q", f"the answer is{t}.", f"the answer is {t}\n.",
    ]
    return variants[i % len(variants)]


def _anagram_docs():
    words = ["planet", "garden", "silver", "bridge", "candle", "winter"]
    return [{"context": f"Please unscramble the letters into a word, and write that word:\n"
                        f"{w[0]}{w[2]}{w[1]}{w[3:]} ({i}) =", "completion": f" {w}"}
            for i, w in enumerate(words[i % 6] for i in range(N_DOCS))]


def _anagram_outputs(doc, i):
    w = doc["completion"].strip()
    variants = [
        f" {w}", w, f" {w.upper()}", f" {w}\nnext", "", f" {w} ", f" {w}.", f"  {w}", f" {w}s",
        f" {w[::-1]}", f" {w.capitalize()}", f" {w}\n", "\n", f" {w}{w}", f"\t{w}", f" {w[:-1]}",
        f" {w}!", f" {w},", f" '{w}'", f" {w} {w}", f" the word is {w}", f" {w}\r", " x", f"{w}\n",
    ]
    return variants[i % len(variants)]


# name: (built-in YAML, split -> docs, crafted outputs, lm_eval task name, filters)
SUITE = {
    "gsm8k_parity": ("gsm8k/gsm8k.yaml", {"train": _gsm8k_docs()[:8], "test": _gsm8k_docs()},
                     _gsm8k_outputs, ("strict-match", "flexible-extract")),
    "triviaqa_parity": ("triviaqa/default.yaml", {"train": _trivia_docs()[:4],
                                                  "validation": _trivia_docs()},
                        _trivia_outputs, ("remove_whitespace",)),
    "bbh_bool_parity": ("bbh/cot_fewshot/boolean_expressions.yaml", {"test": _bool_docs()},
                        _bool_outputs, ("get-answer",)),
    "anagrams_parity": ("unscramble/anagrams1.yaml", {"validation": _anagram_docs()},
                        _anagram_outputs, ("none",)),
}


@pytest.fixture(scope="module")
def yaml_dir(tmp_path_factory) -> Path:
    """lm_eval-native YAMLs (absolute include and data paths) that run built-ins on local data."""
    d = tmp_path_factory.mktemp("lm_eval_yamls")
    for name, (builtin, splits, _, _) in SUITE.items():
        files = {}
        for split, docs in splits.items():
            path = d / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(x) + "\n" for x in docs))
            files[split] = str(path)
        (d / f"{name}.yaml").write_text(
            f"include: {BUILTIN / builtin}\ntask: {name}\ntag: []\ndataset_path: json\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files: {json.dumps(files)}\n")
    return d


class CraftedLM(LM):
    """Answers each request with its crafted completion, cut at the stops like lm_eval's models."""

    def __init__(self):
        super().__init__()
        self.requests: dict[tuple[str, int], tuple[str, dict]] = {}

    def generate_until(self, requests, disable_tqdm: bool = False):
        from lm_eval.models.utils import postprocess_generated_text

        out = []
        for r in requests:
            self.requests[(r.task_name, r.doc_id)] = r.args[0], r.args[1]
            raw = SUITE[r.task_name][2](r.doc, r.doc_id)
            out.append(postprocess_generated_text(raw, r.args[1]["until"], None))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise AssertionError("generation tasks only")

    loglikelihood_rolling = loglikelihood


@pytest.fixture(scope="module")
def harness(yaml_dir):
    """lm_eval's own run of the suite: per-sample metrics per (task, filter, doc) and the requests."""
    from lm_eval.tasks import TaskManager

    lm = CraftedLM()
    res = lm_eval.simple_evaluate(model=lm, tasks=list(SUITE),
                                  task_manager=TaskManager(include_path=str(yaml_dir), include_defaults=False),
                                  log_samples=True, bootstrap_iters=0)
    scores = {(name, s["filter"], s["doc_id"]): s["exact_match"]
              for name, samples in res["samples"].items() for s in samples}
    return scores, lm.requests


@pytest.fixture(scope="module")
def tasks(yaml_dir):
    return {(name, flt): make_lm_eval_task(f"lm_eval:{name}#{flt}@{yaml_dir}")
            for name, (*_, filters) in SUITE.items() for flt in filters}


# parity ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,flt", [(n, f) for n, (*_, fs) in SUITE.items() for f in fs])
def test_verdicts_equal_lm_eval_scores(harness, tasks, name, flt):
    """>= 20 crafted completions per task and filter: pass exactly where lm_eval scores 1."""
    scores, _ = harness
    task = tasks[(name, flt)]
    outputs = [SUITE[name][2](x.meta["doc"], int(x.id)) for x in task.instances]
    assert len(outputs) == N_DOCS >= 20
    ours = task.check.check_many(task.instances[0], outputs[:1]) + [
        task.check(x, out) for x, out in zip(task.instances[1:], outputs[1:])]
    theirs = [scores[(name, flt, int(x.id))] == 1.0 for x in task.instances]
    assert ours == theirs
    assert 0 < sum(theirs) < len(theirs)  # the crafted outputs pass and fail


def test_gsm8k_filters_disagree_where_expected(harness):
    """The two gsm8k filters differ on the crafted set (so the filter choice is really applied)."""
    scores, _ = harness
    strict = [scores[("gsm8k_parity", "strict-match", i)] for i in range(N_DOCS)]
    flexible = [scores[("gsm8k_parity", "flexible-extract", i)] for i in range(N_DOCS)]
    assert strict != flexible
    assert strict[5] == 0 and flexible[5] == 1  # "The answer is C." has no "#### C"


@pytest.mark.parametrize("name", list(SUITE))
def test_prompts_stops_equal_lm_eval_requests(harness, tasks, name):
    """Each prompt is the context lm_eval sent for the doc (few-shot, seed 1234); stops are its until."""
    _, requests = harness
    task = tasks[(name, SUITE[name][3][0])]
    for x in task.instances:
        context, gen = requests[(name, int(x.id))]
        assert task.prompt(x) == context
        assert list(task.stop) == list(gen["until"])
    assert task.max_new_tokens == int(dict(gen).get("max_gen_toks", 256))


def test_prompts_equal_fewshot_context(tasks, yaml_dir):
    """The prompt equals lm_eval's `fewshot_context` for the same doc, in order after the seed."""
    from lm_eval.tasks import TaskManager

    lm_task = TaskManager(include_path=str(yaml_dir), include_defaults=False).load(
        ["gsm8k_parity"])["tasks"]["gsm8k_parity"]
    lm_task.set_fewshot_seed(seed=1234)
    ours = tasks[("gsm8k_parity", "strict-match")]
    for x, doc in zip(ours.instances, lm_task.eval_docs):
        assert ours.prompt(x) == lm_task.fewshot_context(doc, num_fewshot=5)
    assert ours.prompt(ours.instances[0]).count("Question:") == 6  # 5 shots + the question


# the check and the task record --------------------------------------------------------------------

def test_check_pickles_and_scores_in_another_process(tasks):
    """The check holds only strings; a fresh process rebuilds the lm_eval task and agrees."""
    import multiprocessing as mp

    task = tasks[("gsm8k_parity", "flexible-extract")]
    check = pickle.loads(pickle.dumps(task.check))
    assert check == task.check
    x = task.instances[3]
    texts = [_gsm8k_outputs(x.meta["doc"], i) for i in range(N_DOCS)]
    with mp.get_context("spawn").Pool(1) as pool:
        theirs = pool.apply(check.check_many, (x, texts))
    assert theirs == task.check.check_many(x, texts)


def test_digest_covers_version_config_and_docs(yaml_dir, tmp_path, tasks):
    task = tasks[("gsm8k_parity", "strict-match")]
    assert "lm_eval[0.4" in task.check.spec and "overrides do_sample,temperature" in task.check.spec
    assert "do_sample, temperature" in task.describe()["description"]
    # the same YAML with only the metric's settings changed (same prompts, stops and references)
    other = tmp_path / "d"
    other.mkdir()
    (other / "gsm8k_parity.yaml").write_text(_with_case_sensitive_metric(yaml_dir / "gsm8k_parity.yaml"))
    changed = make_lm_eval_task(f"lm_eval:gsm8k_parity#strict-match@{other}")
    assert [changed.prompt(x) for x in changed.instances] == [task.prompt(x) for x in task.instances]
    assert changed.stop == task.stop
    assert changed.check.task_fingerprint != task.check.task_fingerprint
    assert changed.digest() != task.digest()


def _with_case_sensitive_metric(path: Path) -> str:
    return path.read_text() + ("metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
                               "    higher_is_better: true\n    ignore_case: false\n")


@pytest.mark.parametrize("spec,message", [
    ("lm_eval:gsm8k_parity#nope", "has no filter 'nope'"),
    ("lm_eval:gsm8k_parity#strict-match:bleu", "has no metric 'bleu'"),
    pytest.param("lm_eval:no_such_task_here", "no lm_eval task 'no_such_task_here'",
                 marks=pytest.mark.slow),  # looked up in lm_eval's built-ins too: ~10 s
    ("lm_eval:", "bad lm_eval task spec"),
])
def test_bad_specs_are_one_line_errors(yaml_dir, spec, message):
    at = f"@{yaml_dir}" if spec.startswith("lm_eval:gsm8k") else ""
    with pytest.raises(UserError, match=message):
        get_task(spec + at)


@pytest.mark.parametrize("body,why", [
    ("include: {b}/gsm8k/gsm8k-cot-self-consistency.yaml\n", "vote over repeats=64"),
    ("include: {b}/gsm8k/gsm8k.yaml\noutput_type: loglikelihood\n", "loglikelihood task"),
    ("include: {b}/gsm8k/gsm8k.yaml\nmetric_list:\n  - metric: bleu\n    aggregation: bleu\n"
     "    higher_is_better: true\n", "over the corpus"),
])
def test_unscorable_tasks_are_refused(tmp_path, yaml_dir, body, why):
    data = json.dumps({"train": str(yaml_dir / "gsm8k_parity_train.jsonl"),
                       "test": str(yaml_dir / "gsm8k_parity_test.jsonl")})
    (tmp_path / "t.yaml").write_text(body.format(b=BUILTIN) + "task: refused_t\ntag: []\n"
                                     f"dataset_path: json\ndataset_name: null\n"
                                     f"dataset_kwargs:\n  data_files: {data}\n")
    with pytest.raises(UserError, match=why):
        get_task(f"lm_eval:refused_t@{tmp_path}")


def test_spec_records_an_absolute_folder(yaml_dir, monkeypatch):
    from passuntil.runspec import task_source

    monkeypatch.chdir(yaml_dir.parent)
    spec = task_source(f"lm_eval:gsm8k_parity#flexible-extract@{yaml_dir.name}")
    assert spec == f"lm_eval:gsm8k_parity#flexible-extract@{yaml_dir}"
    assert LmEvalSpec.parse(spec).name == "lm_eval:gsm8k_parity#flexible-extract"


# the bundled local-data gsm8k through the CLI ---------------------------------------------------

def test_bundled_gsm8k_local_is_lm_evals_gsm8k_on_local_data():
    task = get_task("lm_eval:gsm8k_local")
    assert len(task.instances) == 8 and task.stop == ("Question:", "</s>", "<|im_end|>")
    x = task.instances[0]
    assert task.prompt(x).endswith(f"Question: {x.meta['doc']['question']}\nAnswer:")
    assert task.check(x, " 6 * 8 = 48, 48 - 29 = 19\n#### 19\n\nQuestion: more")
    assert not task.check(x, "The answer is 19.")  # strict-match needs "#### 19"
    flexible = get_task("lm_eval:gsm8k_local#flexible-extract")
    assert flexible.check(flexible.instances[0], "The answer is 19.")


@pytest.mark.slow
def test_cli_eval_show_export_report_resume(tmp_path, monkeypatch):
    """eval on the bundled series (tiny budgets, a check worker process), then show, export, report;
    --resume finds the task again from the run alone."""
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke
    args = ["eval", "--task", "lm_eval:gsm8k_local#flexible-extract", "--series", "tiny",
            "--model", "tiny-2", "--k", "1", "--max-samples", "4", "--max-tokens", "8",
            "--check-workers", "1", "--store", "r.sqlite", "--no-reference-scores"]
    res = run(cli, args)
    assert res.exit_code == 0, res.output
    assert "8 instance results" in res.output
    res = run(cli, ["show", "r.sqlite"])
    assert res.exit_code == 0 and "lm_eval:gsm8k_local#flexible-extract" in res.output
    res = run(cli, ["export", "r.sqlite", "--out", "t.csv"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    df = pd.read_csv("t.csv")
    assert len(df) == 8 and set(df["task"]) == {"lm_eval:gsm8k_local#flexible-extract"}
    assert ((df["passes"] == 1) | (df["samples"] == 4)).all() and df["samples"].max() == 4
    res = run(cli, ["report", "r.sqlite", "--out", "rep"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "report.html").exists()
    spec = sqlite3.connect("r.sqlite").execute("SELECT config_json FROM runs").fetchone()[0]
    assert "lm_eval:gsm8k_local#flexible-extract" in spec
    res = run(cli, ["eval", "--store", "r.sqlite", "--resume"])
    assert res.exit_code == 0, res.output
    assert "0 samples drawn" in res.output


def test_cli_tasks_lm_eval_lists_local_generation_tasks(yaml_dir):
    res = CliRunner().invoke(cli, ["tasks", "--lm-eval", "--include-path", str(yaml_dir)])
    assert res.exit_code == 0, res.output
    assert "gsm8k_local" in res.output and "gsm8k_parity" in res.output


@pytest.mark.slow
def test_resume_from_elsewhere_and_refused_after_the_task_changed(yaml_dir, tmp_path, monkeypatch):
    """A relative @DIR is recorded absolute: --resume works from another folder without flags; a
    changed YAML (only its metric settings) makes --resume refuse in one line."""
    import shutil

    folder = tmp_path / "tasks"
    folder.mkdir()
    for f in yaml_dir.glob("gsm8k_parity*"):
        shutil.copy(f, folder)
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke
    res = run(cli, ["eval", "--task", "lm_eval:gsm8k_parity@tasks", "--series", "tiny", "--model",
                    "tiny-2", "--limit", "2", "--k", "1", "--max-samples", "2", "--max-tokens", "4",
                    "--store", "r.sqlite", "--no-reference-scores"])
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(folder)
    res = run(cli, ["eval", "--store", "../r.sqlite", "--resume"])
    assert res.exit_code == 0 and "0 samples drawn" in res.output, res.output
    (folder / "gsm8k_parity.yaml").write_text(_with_case_sensitive_metric(folder / "gsm8k_parity.yaml"))
    res = run(cli, ["eval", "--store", "../r.sqlite", "--resume"])
    assert isinstance(res.exception, UserError) and "has changed since run" in str(res.exception)


def test_lm_eval_is_imported_lazily_with_an_install_line(monkeypatch):
    import subprocess
    import sys

    probe = "import sys, passuntil.tasks, passuntil.cli; print('lm_eval' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install 'passuntil\[lm-eval\]'"):
        get_task("lm_eval:gsm8k_local")


@pytest.mark.slow
def test_ray_run_of_an_lm_eval_task_equals_the_local_run(tmp_path, monkeypatch):
    """The check crosses into Ray actors (pickled, rebuilt there) and gives the same counts as a
    local run with a check worker process."""
    pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)
    run = CliRunner().invoke
    base = ["eval", "--task", "lm_eval:gsm8k_local#flexible-extract", "--series", "tiny",
            "--model", "tiny-2", "--k", "1", "--max-samples", "4", "--max-tokens", "8",
            "--no-reference-scores"]
    res = run(cli, [*base, "--check-workers", "1", "--store", "local.sqlite"])
    assert res.exit_code == 0, res.output
    import ray

    try:
        res = run(cli, [*base, "--ray", "local", "--ray-workers", "1", "--store", "ray.sqlite"])
    finally:
        ray.shutdown()  # the run started Ray in this process: leave none for later tests
    assert res.exit_code == 0, res.output

    def counts(path):
        return sqlite3.connect(path).execute(
            "SELECT task, instance_id, samples, passes, pass_indices FROM results ORDER BY 1, 2").fetchall()

    assert counts("ray.sqlite") == counts("local.sqlite") and len(counts("local.sqlite")) == 8
