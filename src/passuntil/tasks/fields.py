"""The fields of a task file, checked one by one, and the `Task` they describe.

`files.py` reads YAML and JSONL into plain records (`Row`: the fields and where they came from);
this module checks every field's type and range, resolves the defaults (which depend on the check:
a unit-test task stops where top-level code starts and may write 512 tokens) and builds the task.
docs/task-files.md documents each field; a test holds `TASK_FIELDS` and that page together.
"""

from __future__ import annotations

import ast
import difflib
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from passuntil.errors import UserError
from passuntil.tasks.base import FewShot, Instance, Task
from passuntil.tasks.checks import MultipleChoice, PythonCheck, UnitTests, from_spec
from passuntil.tasks.humaneval import STOP as CODE_STOP

TASK_FIELDS = ("name", "description", "template", "preamble", "check", "stop", "max_new_tokens",
               "answer_prefix", "shots", "shots_from", "instances", "instances_file")
YAML_ONLY = ("instances", "instances_file")
SHOT_FIELDS = ("n", "seed", "separator", "template")
MAX_NEW_TOKENS = 100_000
_FIELD = re.compile(r"[A-Za-z_]\w*(\[\d+\])*")  # {name} or {name[0]}: no attribute access
RECORD_KEYS = ("id", "prompt", "references", "answer")
# Defaults that depend on the check: (stop, max_new_tokens, shot template).
DEFAULTS = {"unit_tests": (CODE_STOP, 512, "{prompt}{answer}")}
PLAIN_DEFAULTS = (("\n",), 32, "{prompt} {answer}")


@dataclass(frozen=True)
class Row:
    """One record as read (task options, an instance or a shot) and where it is, for error lines."""

    fields: Any
    where: str


def describe_value(value) -> str:
    """A short description of a wrong value for an error line (never a 5,000-digit number)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int) and value.bit_length() > 64:
        return "a huge integer"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:37]) + "..."
    kind = {dict: "a mapping", list: "a list"}.get(type(value), type(value).__name__)
    try:
        text = repr(value)
    except ValueError:  # holds an integer too long to print
        return kind
    return text if len(text) <= 40 else kind


def _unknown(keys, allowed, where: str, what: str) -> None:
    unknown = [str(k) for k in keys if k not in allowed]
    if not unknown:
        return
    hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, allowed, 1))
             else repr(k) for k in unknown]
    raise UserError(f"{where}: unknown {what} {', '.join(hints)}; allowed: {', '.join(allowed)}")


def check_fields(spec, where: str, *, jsonl: bool) -> None:
    """Refuse a task spec that is not a mapping or names a field the format does not have."""
    if not isinstance(spec, dict):
        raise UserError(f"{where}: expected a mapping of task fields, got {describe_value(spec)}")
    if jsonl:
        misplaced = [k for k in YAML_ONLY if k in spec]
        if misplaced:
            raise UserError(f"{where}: '{misplaced[0]}' does not belong in a JSONL header: the "
                            "instances are the file's other records")
    _unknown(spec, [f for f in TASK_FIELDS if not (jsonl and f in YAML_ONLY)], where, "field(s)")


def _text(spec: dict, key: str, where: str, default: str) -> str:
    value = spec.get(key, default)
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string, got {describe_value(value)}")
    return value


def _int(value, key: str, where: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
        bound = f"from {low} to {high:,}" if high else f">= {low}"
        raise UserError(f"{where}: '{key}' must be an integer {bound}, got {describe_value(value)}")
    return value


def _template_fields(template: str, key: str, where: str, allowed=None) -> set[str]:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise UserError(f"{where}: '{key}' is not a valid template ({err}); write literal braces "
                        "as {{ and }}") from None
    for f in fields:
        if allowed is not None and f not in allowed:
            need = " or ".join("{" + a + "}" for a in allowed)
        elif allowed is None and not _FIELD.fullmatch(f):
            need = "names such as {country}, or items of a list field such as {choices[0]}"
        else:
            continue
        raise UserError(f"{where}: '{key}' uses {{{f}}}; its fields must be {need}")
    return {f.partition("[")[0] for f in fields}


def build_task(spec: dict, rows: list[Row], *, where: str, base: Path, default_name: str,
               source: str, read_pool: Callable[[Any, Path, str], list[Row]]) -> Task:
    """Check every field of a task spec and its records; the task they describe."""
    name = _text(spec, "name", where, default_name)
    if not name.strip() or not name.isprintable():
        raise UserError(f"{where}: 'name' must be a non-empty single-line string")
    template = spec.get("template")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{where}: 'template' must be a string, got {describe_value(template)}")
    instances = _instances(rows, template, where)
    check = _check(spec.get("check"), instances, rows, where)
    stop_default, max_default, shot_default = DEFAULTS.get(check.spec, PLAIN_DEFAULTS)
    stop = spec.get("stop", list(stop_default))
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise UserError(f"{where}: 'stop' must be a string or a list of non-empty strings, got "
                        f"{describe_value(stop)}")
    max_new = _int(spec.get("max_new_tokens", max_default), "max_new_tokens", where, 1, MAX_NEW_TOKENS)
    return Task(name, instances, check, stop=tuple(stop), max_new_tokens=max_new,
                preamble=_text(spec, "preamble", where, ""),
                few_shot=_few_shot(spec, instances, template, where, base, shot_default, read_pool),
                source=source, description=_text(spec, "description", where, ""),
                answer_prefix=_text(spec, "answer_prefix", where, ""))


def _instances(rows: list[Row], template: str | None, where: str, id_prefix: str = "") -> tuple[Instance, ...]:
    fields = None if template is None else _template_fields(template, "template", where)
    out, seen = [], {}
    for k, row in enumerate(rows):
        x = _instance(row, template, fields, f"{id_prefix}{k}")
        if x.id in seen:
            raise UserError(f"{row.where}: duplicate id {x.id!r} (first used at {seen[x.id]})")
        seen[x.id] = row.where
        out.append(x)
    return tuple(out)


def _instance(row: Row, template: str | None, fields: set[str] | None, default_id: str) -> Instance:
    rec, where = row.fields, row.where
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a mapping of instance fields, got {describe_value(rec)}")
    if "references" in rec and "answer" in rec:
        raise UserError(f"{where}: give 'references' or 'answer', not both")
    refs = rec.get("references", rec.get("answer"))
    if refs is None:
        raise UserError(f"{where}: missing 'references' (the list of accepted answers)")
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise UserError(f"{where}: 'references' must be a non-empty list of strings (quote "
                        f"numbers), got {describe_value(refs)}")
    iid = rec.get("id", default_id)
    if isinstance(iid, bool) or not isinstance(iid, (str, int)) or not str(iid).strip():
        raise UserError(f"{where}: 'id' must be a non-empty string or an integer, got {describe_value(iid)}")
    if template is None:
        prompt = rec.get("prompt")
        if not isinstance(prompt, str):
            raise UserError(f"{where}: needs a 'prompt' string (or give the task a "
                            f"'template'), got {describe_value(prompt)}")
    else:
        missing = sorted(fields - set(rec))
        if missing:
            raise UserError(f"{where}: the template needs field(s) {missing}")
        try:
            prompt = template.format(**{f: rec[f] for f in fields})
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise UserError(f"{where}: cannot fill the template ({type(err).__name__}: {err})") from None
    meta = {m: v for m, v in rec.items() if m not in RECORD_KEYS}
    return Instance(str(iid), prompt, tuple(refs), meta)


def _has_tests(x: Instance) -> bool:
    return "test" in x.meta and "entry_point" in x.meta


def _check(given, instances: tuple[Instance, ...], rows: list[Row], where: str):
    """The check named by `check`, or inferred: unit tests when every record carries them."""
    coded = [x for x in instances if _has_tests(x)]
    if given is None:
        if coded and len(coded) < len(instances):
            bare = next(r.where for x, r in zip(instances, rows) if not _has_tests(x))
            raise UserError(f"{bare}: has no 'test' and 'entry_point' while {len(coded)} other "
                            "record(s) do; give every record its tests, or set 'check'")
        given = "unit_tests" if coded else "exact"
    if not isinstance(given, str) or not given:
        raise UserError(f"{where}: 'check' must be a string such as 'exact', got {describe_value(given)}")
    try:
        check = from_spec(given)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    for x, row in zip(instances, rows):
        if isinstance(check, UnitTests):
            test, entry = x.meta.get("test"), x.meta.get("entry_point")
            if not isinstance(test, str) or not test.strip():
                raise UserError(f"{row.where}: the unit_tests check needs a 'test' string "
                                f"defining check(candidate), got {describe_value(test)}")
            _check_test_code(test, row.where)
            if not isinstance(entry, str) or not entry.isidentifier():
                raise UserError(f"{row.where}: the unit_tests check needs an 'entry_point' "
                                f"(the function's name), got {describe_value(entry)}")
        elif _has_tests(x) and not isinstance(check, PythonCheck):
            raise UserError(f"{row.where}: carries 'test' and 'entry_point' but the check is "
                            f"{given!r}, so its unit tests would be ignored; use check: unit_tests")
        if isinstance(check, MultipleChoice):
            _check_choices(x, row.where)
    return check


def _check_test_code(test: str, where: str) -> None:
    """A test that cannot run would fail every sample silently: refuse it at load time."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError) as err:
        raise UserError(f"{where}: 'test' is not valid Python (line {getattr(err, 'lineno', '?')}: "
                        f"{getattr(err, 'msg', err)})") from None
    if not any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in tree.body):
        raise UserError(f"{where}: 'test' must define check(candidate), which asserts on the "
                        "completion's function")


def _check_choices(x: Instance, where: str) -> None:
    choices = x.meta.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip()
                                                                    for c in choices):
        raise UserError(f"{where}: the multiple_choice check needs 'choices', a list of at least "
                        f"2 strings, got {describe_value(choices)}")
    options = {c.strip() for c in choices}
    wrong = [r for r in x.references if r.strip() not in options]
    if wrong:
        raise UserError(f"{where}: reference {wrong[0]!r} is not one of its choices")


def _few_shot(spec: dict, instances, template, where: str, base: Path, shot_default: str,
              read_pool) -> FewShot | None:
    shots, pool_spec = spec.get("shots"), spec.get("shots_from")
    if shots is None:
        if pool_spec is not None:
            raise UserError(f"{where}: 'shots_from' needs 'shots' (for example shots: {{n: 2}}) "
                            "to say how many to draw")
        return None
    if not isinstance(shots, dict):
        raise UserError(f"{where}: 'shots' must be a mapping such as {{n: 2, seed: 0}}, got "
                        f"{describe_value(shots)}")
    _unknown(shots, SHOT_FIELDS, where, "shots field(s)")
    n = _int(shots.get("n", 4), "shots.n", where, 1, 10_000)
    seed = _int(shots.get("seed", 0), "shots.seed", where, 0, 2**63 - 1)
    sep = _text(shots, "separator", where, "\n\n")
    shot_template = _text(shots, "template", where, shot_default)
    _template_fields(shot_template, "shots.template", where, allowed=("prompt", "answer"))
    if pool_spec is None:
        if n > len(instances) - 1:
            raise UserError(f"{where}: shots.n is {n}, but each instance draws its shots from the "
                            f"other {len(instances) - 1} instance(s); lower it or add a "
                            "'shots_from' pool")
        return FewShot(instances, n_shots=n, seed=seed, shot_template=shot_template, separator=sep)
    pool = _instances(read_pool(pool_spec, base, where), template, where, id_prefix="shot-")
    same = Counter(x.prompt for x in pool)
    short = next((x for x in instances if len(pool) - same[x.prompt] < n), None)
    if short is not None:
        raise UserError(f"{where}: shots.n is {n}, but the shots_from pool has only "
                        f"{len(pool) - same[short.prompt]} usable example(s) for instance {short.id!r}")
    return FewShot(pool, n_shots=n, seed=seed, shot_template=shot_template, separator=sep,
                   separate_pool=True)


__all__ = ["TASK_FIELDS", "Row", "build_task", "check_fields", "describe_value"]
