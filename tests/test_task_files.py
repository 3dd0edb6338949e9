"""Task files through the doors a user types: `passuntil prompts` and `passuntil eval`.

Malformed files (YAML and JSONL) each give one `error:` line naming the file (and, for JSONL,
the line) and exit 2; well-formed ones give exactly the options they state, JSONL as YAML.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from passuntil.tasks import get_task
from passuntil.tasks.humaneval import STOP as CODE_STOP
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ONE = "instances: [{prompt: a, references: [b]}]\n"
TWO = "instances: [{prompt: a, references: [b]}, {prompt: c, references: [d]}]\n"
REC = '{"prompt": "a", "references": ["b"]}\n'
CODE = ('{"id": "inc", "prompt": "def inc(x):\\n", "references": ["    return x + 1\\n"], '
        '"test": "def check(candidate):\\n    assert candidate(1) == 2\\n", "entry_point": "inc"}\n')

# (file name, its content, what the error line says, where it points: a regex on the line).
# Extra files a case needs (pools, instance files) are in AUX; a name ending in "/" is a directory.
BAD = [
    # -- YAML: the shape of the file
    ("bad.yaml", "- a\n- b\n", "expected a mapping of task fields", r"bad\.yaml:"),
    ("bad.yaml", "just words\n", "expected a mapping of task fields", r"bad\.yaml:"),
    ("bad.yaml", "", "the task file is empty", r"bad\.yaml:"),
    ("bad.yaml", "# only a comment\n", "the task file is empty", r"bad\.yaml:"),
    ("bad.yaml", "name: [t\n", "not valid YAML", r"bad\.yaml:2:"),
    ("bad.yaml", "instances:\n\t- x\n", "not valid YAML", r"bad\.yaml:2:"),
    ("bad.yaml", "a: 1\n---\nb: 2\n", "not valid YAML", r"bad\.yaml:2:"),
    ("bad.yaml", "name: a\nname: b\n" + ONE, "key 'name' is given twice", r"bad\.yaml:2:"),
    ("bad.yaml", "name: " + "[" * 1000 + "\n", "nested too deeply", r"bad\.yaml:"),
    ("bad.yaml", b"name: caf\xe9\n" + ONE.encode(), "not UTF-8 text (byte 0xe9)", r"bad\.yaml:1:"),
    ("bad.yaml/", None, "is a directory, not a file", r"bad\.yaml"),
    ("nope.yaml", None, "does not exist", r"nope\.yaml"),
    # -- YAML: fields
    ("bad.yaml", "max_tokens: 5\n" + ONE, "unknown field(s) 'max_tokens' (did you mean "
     "'max_new_tokens'?)", r"bad\.yaml:"),
    ("bad.yaml", "name: t\n", "give exactly one of 'instances' or 'instances_file'", r"bad\.yaml:"),
    ("bad.yaml", ONE + "instances_file: x.jsonl\n", "give exactly one of", r"bad\.yaml:"),
    ("bad.yaml", "instances: []\n", "'instances' must be a non-empty list", r"bad\.yaml:"),
    ("bad.yaml", "instances: abc\n", "'instances' must be a non-empty list", r"bad\.yaml:"),
    ("bad.yaml", "name: [a]\n" + ONE, "'name' must be a string", r"bad\.yaml:"),
    ("bad.yaml", "name: ''\n" + ONE, "'name' must be a non-empty single-line string", r"bad\.yaml:"),
    ("bad.yaml", "name: 2020-01-01\n" + ONE, "'name' must be a string", r"bad\.yaml:"),
    ("bad.yaml", "description: 5\n" + ONE, "'description' must be a string", r"bad\.yaml:"),
    ("bad.yaml", "preamble: {a: 1}\n" + ONE, "'preamble' must be a string", r"bad\.yaml:"),
    ("bad.yaml", "answer_prefix: [x]\n" + ONE, "'answer_prefix' must be a string", r"bad\.yaml:"),
    ("bad.yaml", "stop: 5\n" + ONE, "'stop' must be a string or a list", r"bad\.yaml:"),
    ("bad.yaml", "stop: ['']\n" + ONE, "'stop' must be a string or a list", r"bad\.yaml:"),
    ("bad.yaml", "max_new_tokens: -5\n" + ONE, "'max_new_tokens' must be an integer from 1 to "
     "100,000, got -5", r"bad\.yaml:"),
    ("bad.yaml", "max_new_tokens: 0\n" + ONE, "'max_new_tokens' must be an integer", r"bad\.yaml:"),
    ("bad.yaml", "max_new_tokens: '16'\n" + ONE, "got '16'", r"bad\.yaml:"),
    ("bad.yaml", "max_new_tokens: true\n" + ONE, "got True", r"bad\.yaml:"),
    ("bad.yaml", "max_new_tokens: 1.5\n" + ONE, "got 1.5", r"bad\.yaml:"),
    ("bad.yaml", "max_new_tokens: .inf\n" + ONE, "got inf", r"bad\.yaml:"),
    ("bad.yaml", "max_new_tokens: 99999999999999999999999\n" + ONE, "got a huge integer", r"bad\.yaml:"),
    ("bad.yaml", "max_new_tokens: " + "9" * 5000 + "\n" + ONE, "more than 4300 digits", r"bad\.yaml:"),
    ("bad.yaml", "template: 'Q {'\n" + ONE, "'template' is not a valid template", r"bad\.yaml:"),
    ("bad.yaml", "template: 'Q {}'\n" + ONE, "'template' uses {}", r"bad\.yaml:"),
    ("bad.yaml", "template: 'Q {a.__class__}'\n" + ONE, "'template' uses {a.__class__}", r"bad\.yaml:"),
    ("bad.yaml", "template: 5\n" + ONE, "'template' must be a string", r"bad\.yaml:"),
    ("bad.yaml", "template: '{q}'\ninstances: [{x: a, references: [b]}]\n", "the template needs "
     "field(s) ['q']", r"bad\.yaml: instance 1:"),
    ("bad.yaml", "template: '{n:d}'\ninstances: [{n: x, references: [b]}]\n", "cannot fill the "
     "template", r"bad\.yaml: instance 1:"),
    # -- YAML: checks
    ("bad.yaml", "check: fuzzy\n" + ONE, "unknown check 'fuzzy'", r"bad\.yaml:"),
    ("bad.yaml", "check: [exact]\n" + ONE, "'check' must be a string", r"bad\.yaml:"),
    ("bad.yaml", "check: 'regex:(\\d+'\n" + ONE, "invalid regex", r"bad\.yaml:"),
    ("bad.yaml", "check: 'python:no_such_module_xyz:f'\n" + ONE, "cannot load check", r"bad\.yaml:"),
    ("bad.yaml", "check: unit_tests\n" + ONE, "the unit_tests check needs a 'test' string",
     r"bad\.yaml: instance 1:"),
    ("bad.yaml", "check: unit_tests\ninstances: [{prompt: a, references: [b], test: 'def check(c): pass', "
     "entry_point: 'not a name'}]\n", "needs an 'entry_point'", r"bad\.yaml: instance 1:"),
    ("bad.yaml", "check: unit_tests\ninstances: [{prompt: a, references: [b], test: 'def check(c):', "
     "entry_point: f}]\n", "'test' is not valid Python (line 1:", r"bad\.yaml: instance 1:"),
    ("bad.yaml", "check: unit_tests\ninstances: [{prompt: a, references: [b], test: 'assert f(1)', "
     "entry_point: f}]\n", "'test' must define check(candidate)", r"bad\.yaml: instance 1:"),
    ("bad.yaml", "check: exact\ninstances: [{prompt: a, references: [b], test: t, entry_point: f}]\n",
     "its unit tests would be ignored; use check: unit_tests", r"bad\.yaml: instance 1:"),
    ("bad.yaml", "check: multiple_choice\n" + ONE, "needs 'choices'", r"bad\.yaml: instance 1:"),
    ("bad.yaml", "check: multiple_choice\ninstances: [{prompt: a, references: [b], choices: [x, y]}]\n",
     "reference 'b' is not one of its choices", r"bad\.yaml: instance 1:"),
    # -- YAML: instances
    ("bad.yaml", "instances: [a]\n", "expected a mapping of instance fields, got 'a'",
     r"bad\.yaml: instance 1:"),
    ("bad.yaml", "instances: [{prompt: a}]\n", "missing 'references'", r"bad\.yaml: instance 1:"),
    ("bad.yaml", "instances: [{references: [b]}]\n", "needs a 'prompt' string",
     r"bad\.yaml: instance 1:"),
    ("bad.yaml", "instances: [{prompt: 5, references: [b]}]\n", "needs a 'prompt' string",
     r"bad\.yaml: instance 1:"),
    ("bad.yaml", "instances: [{prompt: a, references: [1]}]\n", "(quote numbers), got [1]",
     r"bad\.yaml: instance 1:"),
    ("bad.yaml", "instances: [{prompt: a, references: []}]\n", "'references' must be a non-empty list",
     r"bad\.yaml: instance 1:"),
    ("bad.yaml", "instances: [{prompt: a, references: [b], answer: b}]\n", "not both",
     r"bad\.yaml: instance 1:"),
    ("bad.yaml", "instances: [{id: [1], prompt: a, references: [b]}]\n", "'id' must be",
     r"bad\.yaml: instance 1:"),
    ("bad.yaml", "instances: [{id: true, prompt: a, references: [b]}]\n", "'id' must be",
     r"bad\.yaml: instance 1:"),
    ("bad.yaml", "instances: [{id: 1, prompt: a, references: [b]}, {id: 1, prompt: c, "
     "references: [d]}]\n", "duplicate id '1'", r"bad\.yaml: instance 2:"),
    ("bad.yaml", "instances: [{prompt: a, references: [b]}, {id: '0', prompt: c, "
     "references: [d]}]\n", "duplicate id '0'", r"bad\.yaml: instance 2:"),
    ("bad.yaml", "instances_file: items.jsonl\n", "does not exist", r"items\.jsonl"),
    ("bad.yaml", "instances_file: dir.jsonl\n", "is a directory", r"dir\.jsonl"),
    ("bad.yaml", "instances_file: items.csv\n", "'instances_file' must name a .jsonl file", r"bad\.yaml:"),
    ("bad.yaml", "instances_file: header.jsonl\n", "belongs in a task file", r"header\.jsonl:1:"),
    ("bad.yaml", "instances_file: broken.jsonl\n", "not valid JSON", r"broken\.jsonl:2:"),
    # -- YAML: shots
    ("bad.yaml", "shots: 2\n" + TWO, "'shots' must be a mapping", r"bad\.yaml:"),
    ("bad.yaml", "shots: {n: 1, count: 2}\n" + TWO, "unknown shots field(s) 'count'", r"bad\.yaml:"),
    ("bad.yaml", "shots: {n: 5}\n" + TWO, "shots.n is 5, but each instance draws its shots from "
     "the other 1 instance(s)", r"bad\.yaml:"),
    ("bad.yaml", "shots: {n: 0}\n" + TWO, "'shots.n' must be an integer from 1 to 10,000", r"bad\.yaml:"),
    ("bad.yaml", "shots: {n: 1, seed: " + "7" * 400 + "}\n" + TWO, "got a huge integer", r"bad\.yaml:"),
    ("bad.yaml", "shots: {n: 1, seed: x}\n" + TWO, "'shots.seed' must be an integer", r"bad\.yaml:"),
    ("bad.yaml", "shots: {n: 1, template: '{question}'}\n" + TWO, "'shots.template' uses {question}",
     r"bad\.yaml:"),
    ("bad.yaml", "shots_from: pool.jsonl\n" + TWO, "'shots_from' needs 'shots'", r"bad\.yaml:"),
    ("bad.yaml", "shots: {n: 1}\nshots_from: missing.jsonl\n" + TWO, "does not exist",
     r"missing\.jsonl"),
    ("bad.yaml", "shots: {n: 1}\nshots_from: dir.jsonl\n" + TWO, "is a directory", r"dir\.jsonl"),
    ("bad.yaml", "shots: {n: 1}\nshots_from: 5\n" + TWO, "'shots_from' must name a .jsonl file",
     r"bad\.yaml:"),
    ("bad.yaml", "shots: {n: 1}\nshots_from: pool.yaml\n" + TWO, "must name a .jsonl file",
     r"bad\.yaml:"),
    ("bad.yaml", "shots: {n: 3}\nshots_from: pool.jsonl\n" + TWO, "the shots_from pool has only 2",
     r"bad\.yaml:"),
    ("bad.yaml", "shots: {n: 1}\nshots_from: broken.jsonl\n" + TWO, "not valid JSON", r"broken\.jsonl:2:"),
    ("bad.yaml", "shots: {n: 1}\nshots_from: [{prompt: p}]\n" + TWO, "missing 'references'",
     r"bad\.yaml: shots_from item 1:"),
    # -- JSONL: the shape of the file
    ("bad.jsonl", "", "no instances (the file is empty)", r"bad\.jsonl:"),
    ("bad.jsonl", "\n\n  \n", "no instances", r"bad\.jsonl:"),
    ("bad.jsonl", REC + "{oops\n", "not valid JSON", r"bad\.jsonl:2:"),
    ("bad.jsonl", '{"prompt": "a",\n "references": ["b"]}\n', "not valid JSON", r"bad\.jsonl:1:"),
    ("bad.jsonl", '["a", "b"]\n', "expected a mapping of instance fields", r"bad\.jsonl:1:"),
    ("bad.jsonl", REC + "42\n", "expected a mapping of instance fields, got 42", r"bad\.jsonl:2:"),
    ("bad.jsonl", REC + '{"prompt": "a"}\n', "missing 'references'", r"bad\.jsonl:2:"),
    ("bad.jsonl", '{"references": ["b"]}\n', "needs a 'prompt' string", r"bad\.jsonl:1:"),
    ("bad.jsonl", '{"prompt": "a", "references": [NaN]}\n', "got [nan]", r"bad\.jsonl:1:"),
    ("bad.jsonl", '{"prompt": "a", "references": "b", "id": null}\n', "'id' must be", r"bad\.jsonl:1:"),
    ("bad.jsonl", '{"id": "x", "prompt": "a", "references": ["b"]}\n\n{"id": "x", "prompt": "c", '
     '"references": ["d"]}\n', "duplicate id 'x' (first used at", r"bad\.jsonl:3:"),
    ("bad.jsonl", (REC + REC).encode() + b'{"prompt": "\xff", "references": ["b"]}\n', "not UTF-8 text (byte 0xff)",
     r"bad\.jsonl:3:"),
    ("bad.jsonl", '{"prompt": "a", "references": ["b"], "n": ' + "9" * 5000 + "}\n",
     "more than 4300 digits", r"bad\.jsonl:1:"),
    ("bad.jsonl", "[" * 100000 + "\n", "nested too deeply", r"bad\.jsonl:1:"),
    ("bad.jsonl", '{"prompt": "a", "prompt": "c", "references": ["b"]}\n', "key 'prompt' is given twice",
     r"bad\.jsonl:1:"),
    ("bad.jsonl/", None, "is a directory, not a file", r"bad\.jsonl"),
    ("bad.jsonl", REC + CODE.replace('"inc"', '"dec"'), "has no 'test' and 'entry_point' while 1 other",
     r"bad\.jsonl:1:"),
    # -- JSONL: the header record
    ("bad.jsonl", REC + '{"task": {"check": "contains"}}\n', "must be the first record", r"bad\.jsonl:2:"),
    ("bad.jsonl", '{"task": {"check": "contains"}, "id": 1}\n' + REC, "holds only 'task'",
     r"bad\.jsonl:1:"),
    ("bad.jsonl", '{"task": {"maxtokens": 4}}\n' + REC, "unknown field(s) 'maxtokens' (did you mean "
     "'max_new_tokens'?)", r"bad\.jsonl:1:"),
    ("bad.jsonl", '{"task": {"instances": []}}\n' + REC, "does not belong in a JSONL header",
     r"bad\.jsonl:1:"),
    ("bad.jsonl", '{"task": {"check": "fuzzy"}}\n' + REC, "unknown check 'fuzzy'", r"bad\.jsonl:1:"),
    ("bad.jsonl", '{"task": {"check": "regex:[a-"}}\n' + REC, "invalid regex", r"bad\.jsonl:1:"),
    ("bad.jsonl", '\n{"task": {"max_new_tokens": -1}}\n' + REC, "'max_new_tokens' must be an integer "
     "from 1 to 100,000, got -1", r"bad\.jsonl:2:"),
    ("bad.jsonl", '{"task": {"max_new_tokens": 1e30}}\n' + REC, "got 1e+30", r"bad\.jsonl:1:"),
    ("bad.jsonl", '{"task": {"stop": [1]}}\n' + REC, "'stop' must be a string or a list",
     r"bad\.jsonl:1:"),
    ("bad.jsonl", '{"task": {"shots": {"n": 2}}}\n' + REC + REC.replace('"a"', '"c"'),
     "shots.n is 2, but each instance draws its shots from the other 1", r"bad\.jsonl:1:"),
    ("bad.jsonl", '{"task": {"shots": {"n": 1}, "shots_from": "missing.jsonl"}}\n' + REC,
     "does not exist", r"missing\.jsonl"),
    ("bad.jsonl", '{"task": {"shots": {"n": 1}, "shots_from": "header.jsonl"}}\n' + REC,
     "belongs in a task file, not in a shots_from pool", r"header\.jsonl:1:"),
    ("bad.jsonl", '{"task": {"check": "exact"}}\n' + CODE, "its unit tests would be ignored",
     r"bad\.jsonl:2:"),
    ("bad.jsonl", '{"task": {"check": "unit_tests"}}\n' + REC, "the unit_tests check needs a 'test'",
     r"bad\.jsonl:2:"),
    ("bad.jsonl", '{"task": {}}\n', "no instances", r"bad\.jsonl:"),
]
AUX = {"pool.jsonl": '{"prompt": "p1", "references": ["r1"]}\n{"prompt": "p2", "references": ["r2"]}\n',
       "pool.yaml": "- {prompt: p1, references: [r1]}\n",
       "header.jsonl": '{"task": {"check": "exact"}}\n' + REC,
       "broken.jsonl": REC + "{oops\n",
       "dir.jsonl/": None}


def _write(folder: Path, name: str, content) -> Path:
    path = folder / name.rstrip("/")
    if name.endswith("/"):
        path.mkdir()
    elif content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.fixture
def bad_folder(tmp_path) -> Path:
    for name, content in AUX.items():
        _write(tmp_path, name, content)
    return tmp_path


def _assert_one_line(code, err, message, where, path):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert re.search(where, err), err
    assert str(path.parent) in err  # the full path of the file at fault


@pytest.mark.parametrize("name, content, message, where", BAD, ids=[f"{k}-{c[0]}" for k, c in enumerate(BAD)])
def test_malformed_task_file_is_one_line_naming_the_file(bad_folder, capsys, name, content, message, where):
    path = _write(bad_folder, name, content)
    code, out, err = run_cli(capsys, "prompts", "--task", str(path))
    _assert_one_line(code, err, message, where, path)
    assert out == ""


EVAL_CASES = list(range(0, len(BAD), 10))  # a spread over BAD: shapes, fields, checks, shots, JSONL


@pytest.mark.parametrize("case", EVAL_CASES, ids=[f"{k}-{BAD[k][0]}" for k in EVAL_CASES])
def test_eval_of_a_malformed_task_file_records_nothing(bad_folder, capsys, case):
    name, content, message, where = BAD[case]
    path = _write(bad_folder, name, content)
    store = bad_folder / "runs.sqlite"
    code, _, err = run_cli(capsys, "eval", "--task", str(path), "--series", "tiny", "--model", "tiny-2",
                           "--k", "1", "--max-samples", "2", "--store", str(store))
    _assert_one_line(code, err, message, where, path)
    if store.exists():  # the store may be made, but no run that would block a rerun
        code, _, err = run_cli(capsys, "show", str(store))
        assert code == 2 and "holds no runs" in err


def test_a_fixed_file_runs_under_the_name_a_failed_eval_tried(tmp_path, capsys):
    path, store = tmp_path / "t.jsonl", tmp_path / "runs.sqlite"
    args = ["eval", "--task", str(path), "--series", "tiny", "--model", "tiny-2", "--k", "1",
            "--max-samples", "2", "--store", str(store), "--run", "pilot"]
    path.write_text('{"task": {"max_new_tokens": 0}}\n' + REC)
    assert run_cli(capsys, *args)[0] == 2
    path.write_text('{"task": {"max_new_tokens": 2}}\n' + REC)
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "1 instance results" in out


# -- what well-formed files mean -------------------------------------------------------------

@pytest.fixture
def code_checks(monkeypatch):
    """Unit-test checks run in the sandbox as root; without root they need the explicit opt-in
    (these tests run only the project's own reference solutions and small completions)."""
    if os.geteuid() != 0:
        monkeypatch.setenv("PASSUNTIL_UNSAFE_LOCAL_EXECUTION", "1")


def _prompts(capsys, *args) -> list[dict]:
    code, out, err = run_cli(capsys, "prompts", "--jsonl", *args)
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_jsonl_header_gives_the_yaml_options(tmp_path, capsys):
    """The same task as YAML and as JSONL with a header: identical prompts, stops, limits, check."""
    options = {"name": "sums", "check": "regex:(-?\\d+)", "stop": ["\n\n"], "max_new_tokens": 7,
               "preamble": "Add.\n", "answer_prefix": " ", "shots": {"n": 1, "seed": 4, "separator": "\n"}}
    items = [{"id": f"s{j}", "prompt": f"{j}+{j}=", "references": [str(2 * j)]} for j in range(4)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [{"task": options}, *items]))
    import yaml

    (tmp_path / "sums.yaml").write_text(yaml.safe_dump({**options, "instances": items}))
    as_jsonl, as_yaml = (_prompts(capsys, "--task", str(tmp_path / f)) for f in ("sums.jsonl", "sums.yaml"))
    assert as_jsonl == as_yaml
    first = as_jsonl[0]
    assert first["check"] == "regex:(-?\\d+)" and first["stop"] == ["\n\n"] and first["max_tokens"] == 7
    assert len(first["shots"]) == 1 and first["shots"][0] != "s0"
    shot = next(r for r in items if r["id"] == first["shots"][0])
    assert first["prompt"] == f"Add.\n{shot['prompt']} {shot['references'][0]}\n0+0="
    task = get_task(str(tmp_path / "sums.jsonl"))
    assert task.answer_prefix == " " and task.check(task.instances[3], "It is 6.")


def test_jsonl_without_header_keeps_exact_match_and_its_fingerprint(tmp_path):
    """Unchanged task files keep their digest, so `eval --resume` of older runs still works."""
    (tmp_path / "b.jsonl").write_text('{"prompt": "a", "references": ["b"]}\n'
                                      '{"id": "k", "prompt": "c", "answer": "d"}\n')
    (tmp_path / "items.jsonl").write_text('{"q": "a", "references": ["b"]}\n')
    (tmp_path / "c.yaml").write_text("template: 'Q {q} A:'\ninstances_file: items.jsonl\n")
    (tmp_path / "a.yaml").write_text(
        "name: a\ncheck: regex:(\\d+)\nstop: [';']\nmax_new_tokens: 9\npreamble: 'P\\n'\n"
        "shots: {n: 1, seed: 3}\ninstances:\n - {prompt: x, references: ['1']}\n"
        " - {id: q, prompt: y, answer: '2'}\n - {prompt: z, references: ['3', '4'], extra: 1}\n")
    plain = get_task(str(tmp_path / "b.jsonl"))
    assert plain.check.spec == "exact" and plain.stop == ("\n",) and plain.max_new_tokens == 32
    # Digests measured on the loader before this change (same files, same content).
    assert get_task(str(EXAMPLES / "capitals.yaml")).digest() == "89d185347e40d50c"
    assert plain.digest() == "d872f94137317187"
    assert get_task(str(tmp_path / "c.yaml")).digest() == "0ebfbcd54f140f2f"
    assert get_task(str(tmp_path / "a.yaml")).digest() == "65820287f900ba12"


def test_records_with_unit_tests_are_checked_in_the_sandbox(tmp_path, capsys, code_checks):
    """No header, every record carries `test` and `entry_point`: the unit tests decide."""
    path = tmp_path / "code.jsonl"
    path.write_text(CODE)
    (rec,) = _prompts(capsys, "--task", str(path))
    assert rec["check"] == "unit_tests" and rec["stop"] == list(CODE_STOP) and rec["max_tokens"] == 512
    task = get_task(str(path))
    x = task.instances[0]
    assert task.check(x, "    return x + 1\n")
    assert not task.check(x, "    return x + 2\n")
    # judged by behaviour, not by text: an exact match on the reference would fail this one
    assert task.check(x, "    y = 1\n    return y + x\n")


def test_shots_from_a_file_and_inline_give_the_same_prompts(tmp_path, capsys):
    pool = [{"prompt": f"Q{j}:", "references": [f"A{j}"]} for j in range(5)] + [
        {"prompt": "Q-test-0:", "references": ["leak"]}]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    tests = "".join(json.dumps({"id": f"t{j}", "prompt": f"Q-test-{j}:", "references": [f"T{j}"]}) + "\n"
                    for j in range(3))
    (tmp_path / "from_file.jsonl").write_text(
        json.dumps({"task": {"shots": {"n": 5}, "shots_from": "pool.jsonl"}}) + "\n" + tests)
    (tmp_path / "inline.jsonl").write_text(
        json.dumps({"task": {"shots": {"n": 5}, "shots_from": pool}}) + "\n" + tests)
    by_file = _prompts(capsys, "--task", str(tmp_path / "from_file.jsonl"))
    assert by_file == [dict(r, task="from_file") for r in _prompts(capsys, "--task", str(tmp_path / "inline.jsonl"))]
    first = by_file[0]["prompt"]
    # the pool example with the instance's own prompt is never a shot; the test items never are
    assert "leak" not in first and first.count("Q-test-") == 1 and first.endswith("Q-test-0:")
    assert "Q-test-0: leak" in by_file[1]["prompt"] or "Q-test-0: leak" in by_file[2]["prompt"]
    assert sorted(first.count(f"Q{j}: A{j}") for j in range(5)) == [1] * 5


def test_prompts_command_selects_and_prints_exact_text(capsys):
    caps = str(EXAMPLES / "capitals.yaml")
    task = get_task(caps)
    records = _prompts(capsys, "--task", caps)
    assert [r["prompt"] for r in records] == [task.prompt(x) for x in task.instances]
    assert [r["instance"] for r in _prompts(capsys, "--task", caps, "--limit", "2")] == ["fr", "de"]
    assert [r["instance"] for r in _prompts(capsys, "--task", caps, "--instance", "it", "--instance", "fr")] \
        == ["it", "fr"]
    code, out, _ = run_cli(capsys, "prompts", "--task", caps, "--instance", "de")
    assert code == 0
    assert "check: contains   stop: [\"\\n\"]   max tokens: 16" in out
    assert task.prompt(task.instances[1]) + "\n--- end of prompt" in out
    for args, message in ((["--instance", "xx"], "task 'capitals' has no instance 'xx'"),
                          (["--limit", "0"], "--limit must be >= 1"),
                          ([], None)):
        if message:
            code, _, err = run_cli(capsys, "prompts", "--task", caps, *args)
            assert code == 2 and message in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "prompts", "--task", "no-such-task")
    assert code == 2 and "unknown task 'no-such-task'" in err


def test_add_function_jsonl_through_eval_show_export(tmp_path, capsys, monkeypatch, code_checks):
    """The README's JSONL unit-test task with the tiny model: sane counts, unit tests used."""
    monkeypatch.chdir(ROOT)
    store = tmp_path / "code.sqlite"
    code, out, err = run_cli(capsys, "eval", "--task", "examples/add_function.jsonl", "--series", "tiny",
                             "--model", "tiny-2", "--k", "1", "--max-samples", "4", "--store", str(store))
    assert code == 0, err
    assert "3 instance results" in out
    code, out, err = run_cli(capsys, "show", str(store), "--instances")
    assert code == 0, err
    assert "add_function" in out and "tiny-2" in out
    assert run_cli(capsys, "export", str(store), "--out", str(tmp_path / "r.json"))[0] == 0
    rows = pd.read_json(tmp_path / "r.json")
    assert sorted(rows["instance_id"]) == ["add", "double", "inc"]
    assert (rows["samples"] >= 1).all() and (rows["samples"] <= 4).all()
    assert ((rows["passes"] >= 0) & (rows["passes"] <= 1)).all()
    assert ((rows["passes"] == 1) | (rows["samples"] == 4)).all()  # stopped at K = 1 or the budget
    assert run_cli(capsys, "export", str(store), "--out", str(tmp_path / "c.csv"), "--completions")[0] == 0
    comps = pd.read_csv(tmp_path / "c.csv", keep_default_na=False)
    assert comps["count"].sum() == rows["samples"].sum() - rows.get("overflow", 0 * rows["samples"]).sum()
    # each stored verdict is the unit test's verdict on that text, and the task's check is the unit test
    task = get_task("examples/add_function.jsonl")
    by_id = {x.id: x for x in task.instances}
    assert [bool(task.check(by_id[r.instance_id], r.text)) for r in comps.itertuples()] == \
        [bool(p) for p in comps["passed"]]
    assert {r["check"] for r in _prompts(capsys, "--task", "examples/add_function.jsonl")} == {"unit_tests"}
    assert task.describe()["check"] == "unit_tests"


# -- docs/task-files.md: every example is a real file or is extracted and loaded ---------------

DOC = ROOT / "docs" / "task-files.md"
_BLOCK = re.compile(r"(?:<!-- (?P<kind>example|extract|console)(?:: (?P<name>\S+))? -->\n)?"
                    r"```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def _doc_blocks() -> list[tuple[str | None, str | None, str]]:
    return [(m["kind"], m["name"], m["body"]) for m in _BLOCK.finditer(DOC.read_text())]


def test_every_block_of_the_task_file_page_is_checked():
    blocks = _doc_blocks()
    assert len(blocks) >= 10 and all(kind for kind, _, _ in blocks), \
        [body[:40] for kind, _, body in blocks if not kind]
    for kind, name, body in blocks:
        if kind == "example":
            assert (ROOT / name).read_text() == body, f"{name} differs from its copy in {DOC.name}"
    from passuntil.tasks.fields import SHOT_FIELDS, TASK_FIELDS

    text = DOC.read_text()
    assert all(f"| `{f}` |" in text for f in TASK_FIELDS)
    assert all(f"`{f}`" in text for f in SHOT_FIELDS)


def test_every_task_on_the_page_loads_and_its_references_pass(tmp_path, capsys, monkeypatch, code_checks):
    """Each example and extracted task loads through `prompts`; each reference passes its own check;
    together they show every kind of check."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(tmp_path))
    blocks, files = _doc_blocks(), []
    for kind, name, body in blocks:
        if kind == "extract":
            (tmp_path / name).write_text(body)
        named_by_another = any(Path(name or "-").name in other for k, _, other in blocks
                               if other != body and k in ("example", "extract"))
        if kind in ("example", "extract") and name.endswith((".yaml", ".jsonl")) and not named_by_another:
            files.append(str(ROOT / name) if kind == "example" else str(tmp_path / name))
    kinds = set()
    for path in files:
        records = _prompts(capsys, "--task", path)
        task = get_task(path)
        assert [r["prompt"] for r in records] == [task.prompt(x) for x in task.instances]
        for x in task.instances:
            assert task.check(x, x.references[0]), (path, x.id)
        kinds.add(task.check.spec.split(":")[0])
    assert kinds == {"exact", "contains", "normalized", "regex", "multiple_choice", "unit_tests", "python"}
    assert len(files) == 8  # capitals, add_function, plurals, colours, sums, planets, facts, lookup
    # what the page and the files' comments promise of each check
    for name, instance, text, passes in (("capitals.yaml", 0, " Paris, of course.", True),
                                         ("colours.yaml", 0, " The blue.", True),
                                         ("colours.yaml", 0, " light blue", False),
                                         ("sums.yaml", 0, " The answer is 19.", True),
                                         ("sums.yaml", 0, " 1 + 18 = 19", False),
                                         ("planets.yaml", 0, " B", True),
                                         ("planets.yaml", 0, " (B) Jupiter", True),
                                         ("planets.yaml", 0, " Mars", False),
                                         ("plurals.jsonl", 2, " cactuses", True),
                                         ("plurals.jsonl", 2, " cactus", False)):
        task = get_task(f"examples/{name}")
        assert task.check(task.instances[instance], text) is passes, (name, text)
    facts = get_task(str(tmp_path / "facts.yaml"))
    assert facts.check(facts.instances[0], " Yes, it is.") and not facts.check(facts.instances[0], " No.")


def test_console_blocks_of_the_page_print_what_they_show(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    consoles = [body for kind, _, body in _doc_blocks() if kind == "console"]
    assert consoles
    for body in consoles:
        command, *expected = body.rstrip("\n").split("\n")
        assert command.startswith("$ passuntil ")
        code, out, err = run_cli(capsys, *command[len("$ passuntil "):].split())
        assert code == 0, err
        assert out.rstrip("\n").split("\n") == expected
