"""Real task sources: BIG-bench task files (scored as BIG-bench scores them) and user task files."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import types
from pathlib import Path

import pytest

from passuntil.errors import UserError
from passuntil.tasks import get_task
from passuntil.tasks.bigbench import (
    available,
    bigbench_task_names,
    cache_dir,
    copyable_date,
    is_common_word,
    load_task_json,
)
from passuntil.tasks.files import load_task_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
needs_bigbench = pytest.mark.skipif(
    not available() and not os.environ.get("PASSUNTIL_REQUIRE_DATA"),
    reason="BIG-bench data not fetched (`passuntil fetch-data`); CI fetches it")


def _load_bigbench_module(relpath: str, name: str):
    """Import one of bigbench's own files from the cache, with its heavy imports stubbed (the
    functions used here do not touch them)."""
    for stub in ("datasets", "t5", "t5.evaluation", "sklearn", "sklearn.metrics"):
        sys.modules.setdefault(stub, types.ModuleType(stub))
    sys.modules["datasets"].load_metric = None
    sys.modules["t5.evaluation"].metrics = None
    sys.modules["sklearn.metrics"].f1_score = None
    spec = importlib.util.spec_from_file_location(name, cache_dir() / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_bigbench
def test_exact_match_equals_bigbench_implementation():
    metrics = _load_bigbench_module("bigbench/api/task_metrics.py", "bb_task_metrics")
    utils = _load_bigbench_module("bigbench/models/model_utils.py", "bb_model_utils")
    rng = random.Random(0)
    names = [n for n in bigbench_task_names() if "/uicl/" in n or "/modified_arithmetic/" in n]
    for name in names:
        task = get_task(name)
        data = load_task_json(task.source.split()[-1].rsplit("/", 1)[0])
        stop, regex = data.get("stop_string"), data.get("output_regex")
        outputs, targets = [], []
        for x in task.instances:
            ref = x.references[0]
            for text in (ref, ref + "\n" + ref, "\n" + ref, " " + ref, ref + " junk", ref[:-1],
                         "", "\n\n", ref + "\nInput: x", f"{rng.randint(0, 999)}\n{ref}"):
                outputs.append((x, text))
                targets.append(list(x.references))
        responses = [utils.postprocess_output(t, None, stop, regex) for _, t in outputs]
        theirs = [metrics.exact_str_match_fn([tg], [r])["exact_str_match"]
                  for tg, r in zip(targets, responses)]
        ours = [float(task.check(x, t)) for x, t in outputs]
        assert ours == theirs, name
        assert 0 < sum(ours) < len(ours)


@needs_bigbench
def test_bigbench_test_sets_follow_the_paper():
    emoji = get_task("bigbench/emoji_movie")
    dates = get_task("bigbench/date_understanding")
    assert len(emoji.instances) == 41 and len(dates.instances) == 47
    assert not any(is_common_word(x.references[0]) for x in emoji.instances)
    assert all(not copyable_date(x.prompt.rsplit("Q: ", 1)[1], x.references[0])
               for x in dates.instances)
    assert is_common_word("up") and is_common_word("frozen") and not is_common_word("zootopia")
    for name in bigbench_task_names():
        task = get_task(name)
        if "/uicl/" in name:
            assert len(task.instances) == 20
            # 4-shot: four solved examples precede the query, none of them the query itself.
            prompt = task.prompt(task.instances[0])
            assert prompt.count("Output: ") == 5 or prompt.count(" = ") == 5
        assert len({x.id for x in task.instances}) == len(task.instances) >= 20
    cot = get_task("bigbench/emoji_movie_cot")
    assert "So the answer is" in cot.prompt(cot.instances[0])
    assert cot.check(cot.instances[0], " Lions... So the answer is " + cot.instances[0].references[0])


def test_task_file_examples_load():
    caps = load_task_file(EXAMPLES / "capitals.yaml")
    assert caps.name == "capitals" and len(caps.instances) == 6
    prompt = caps.prompt(caps.instances[0])
    assert prompt.endswith("Q: What is the capital of France?\nA:") and prompt.count("Q:") == 3
    assert caps.check(caps.instances[0], " Paris.")
    code = get_task(str(EXAMPLES / "add_function.jsonl"))
    assert code.name == "add_function" and code.check.spec == "unit_tests"  # its header says so
    x = code.instances[0]
    assert x.meta["entry_point"] == "inc" and code.max_new_tokens == 64


@pytest.mark.parametrize("text, message", [
    ("name: t\ninstances: []\n", "'instances' must be a non-empty list"),
    ("name: t\nfoo: 1\ninstances: [{prompt: a, references: [b]}]\n", "unknown field"),
    ("name: t\ninstances: [{prompt: a}]\n", "missing 'references'"),
    ("name: t\ntemplate: '{q}'\ninstances: [{x: a, references: [b]}]\n", "needs field(s) ['q']"),
    ("name: t\ncheck: fuzzy\ninstances: [{prompt: a, references: [b]}]\n", "unknown check"),
    ("name: t\ninstances: [{id: 1, prompt: a, references: [b]}, {id: 1, prompt: c, "
     "references: [d]}]\n", "duplicate id"),
    ("name: t\ncheck: unit_tests\ninstances: [{prompt: a, references: [b]}]\n", "needs a 'test'"),
    ("name: [t\n", "not valid YAML"),
])
def test_task_file_errors_are_one_clear_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_task_file(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"prompt": "a", "references": ["b"]}\n{oops\n')
    with pytest.raises(UserError, match=r"items.jsonl:2: not valid JSON"):
        load_task_file(path)
