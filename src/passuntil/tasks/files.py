"""User task files: a YAML task, or a JSONL file of instances whose first line may be a header.

Both forms take the same task fields (docs/task-files.md lists each with its default)::

    # capitals.yaml                                  # add_function.jsonl
    name: capitals                                   {"task": {"check": "unit_tests"}}
    template: "Q: What is the capital of {country}?\\nA:"   {"id": "inc", "prompt": "def inc...",
    check: contains                                   "references": [...], "test": "...",
    shots: {n: 2}                                     "entry_point": "inc"}
    instances:                  # or instances_file: items.jsonl
      - {id: fr, country: France, references: [Paris]}

A JSONL task without a header is checked by exact match, or by its unit tests when every record
carries `test` and `entry_point`. Few-shot examples come from the task's own instances or from a
separate pool (`shots_from`). Every problem is one `UserError` line naming the file (and, for
JSONL, the line); the fields themselves are checked in `passuntil.tasks.fields`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from passuntil.errors import UserError
from passuntil.tasks.base import Task
from passuntil.tasks.fields import Row, build_task, check_fields, describe_value


def is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml", ".jsonl"))


def load_task_file(path: str | Path) -> Task:
    """The task a YAML or JSONL file describes; one clear `UserError` for anything wrong in it."""
    path = Path(path)
    if path.suffix == ".jsonl":
        header, rows = read_jsonl(path, "task file", header=True)
        spec, where = (header.fields, header.where) if header else ({}, str(path))
        check_fields(spec, where, jsonl=True)
    else:
        spec = _read_yaml(path)
        where = str(path)
        check_fields(spec, where, jsonl=False)
        rows = _yaml_rows(spec, path)
    return build_task(spec, rows, where=where, base=path.parent, default_name=path.stem,
                      source=f"file: {path}", read_pool=_read_pool)


def read_text(path: Path, what: str) -> str:
    """A file's text as UTF-8 (a byte-order mark is allowed); a clear line when it is not one."""
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                        "save the file as UTF-8") from None


def read_jsonl(path: Path, what: str, *, header: bool) -> tuple[Row | None, list[Row]]:
    """The records of a JSONL file with their line numbers, and its header record if it has one.

    A header is a first record of the form `{"task": {...}}`; it is refused where no header
    belongs (an `instances_file`, a `shots_from` pool), since the options there come from the
    task that names the file."""
    text = read_text(path, what)
    head, rows = None, []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        record = _parse_json_line(line, where)
        if _is_header(record):
            if not header:
                raise UserError(f"{where}: a header record {{\"task\": {{...}}}} belongs in a task "
                                f"file, not in a {what}")
            if rows or head is not None:
                raise UserError(f"{where}: the header record {{\"task\": {{...}}}} must be the "
                                "first record of the file")
            if set(record) != {"task"}:
                raise UserError(f"{where}: a header record holds only 'task'; move "
                                f"{sorted(set(record) - {'task'})} inside it")
            head = Row(record["task"], where)
            continue
        rows.append(Row(record, where))
    if not rows:
        raise UserError(f"{path}: no instances (the file is empty)" if head is None and not text.strip()
                        else f"{path}: no instances")
    return head, rows


def _is_header(record) -> bool:
    """A header is `{"task": {...}}`; a record with references (or an answer) is an instance even
    when one of its own fields is called `task` and holds a mapping (kept as its meta)."""
    return (isinstance(record, dict) and isinstance(record.get("task"), dict)
            and not {"references", "answer"} & set(record))


def _parse_json_line(line: str, where: str):
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise ValueError(f"key {dup!r} is given twice")
        return dict(pairs)

    try:
        return json.loads(line, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line "
                        "must hold one whole JSON object") from None
    except (ValueError, RecursionError) as err:  # duplicate keys, an integer of > 4300 digits, deep nesting
        raise UserError(f"{where}: not valid JSON ({_problem(err)})") from None


def _problem(err: Exception) -> str:
    """What a parser's ValueError or RecursionError means, in the file's terms."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    text = (str(err).splitlines() or [""])[0]
    return "a number with more than 4300 digits" if "4300 digits" in text else text


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (YAML keeps the last)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            dup = key in seen
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if dup:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> dict:
    text = read_text(path, "task file")
    try:
        spec = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: not valid YAML ({err.problem or err.context})") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except (ValueError, RecursionError) as err:  # an integer of > 4300 digits, deep nesting
        raise UserError(f"{path}: not valid YAML ({_problem(err)})") from None
    if spec is None:
        raise UserError(f"{path}: the task file is empty")
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping of task fields at the top level, got "
                        f"{describe_value(spec)}")
    return spec


def _yaml_rows(spec: dict, path: Path) -> list[Row]:
    if ("instances" in spec) == ("instances_file" in spec):
        raise UserError(f"{path}: give exactly one of 'instances' or 'instances_file'")
    if "instances_file" in spec:
        name = spec["instances_file"]
        if not isinstance(name, str) or not name.endswith(".jsonl"):
            raise UserError(f"{path}: 'instances_file' must name a .jsonl file, got {describe_value(name)}")
        return read_jsonl(path.parent / name, "instances file", header=False)[1]
    items = spec["instances"]
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: 'instances' must be a non-empty list, got {describe_value(items)}")
    return [Row(item, f"{path}: instance {k}") for k, item in enumerate(items, 1)]


def _read_pool(value, base: Path, where: str) -> list[Row]:
    """The records of `shots_from`: a .jsonl file (relative to the task file) or an inline list."""
    if isinstance(value, str):
        if not value.endswith(".jsonl"):
            raise UserError(f"{where}: 'shots_from' must name a .jsonl file or be a list of "
                            f"records, got {value!r}")
        return read_jsonl(base / value, "shots_from pool", header=False)[1]
    if isinstance(value, list) and value:
        return [Row(item, f"{where}: shots_from item {k}") for k, item in enumerate(value, 1)]
    raise UserError(f"{where}: 'shots_from' must name a .jsonl file or be a non-empty list of "
                    f"records, got {describe_value(value)}")
