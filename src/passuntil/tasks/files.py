"""User task files: a YAML task description, or a JSONL file of instances.

YAML (see examples/capitals.yaml)::

    name: capitals
    template: "Q: What is the capital of {country}?\\nA:"   # fields of each instance
    check: exact            # exact, contains, normalized, regex:PAT, multiple_choice, unit_tests
    stop: ["\\n"]
    max_new_tokens: 16
    shots: {n: 2, seed: 0, separator: "\\n\\n", template: "{prompt} {answer}"}   # optional
    instances:              # or `instances_file: items.jsonl` (relative to the YAML file)
      - {id: fr, country: France, references: [Paris]}

JSONL: one instance per line, `{"id": ..., "prompt": ..., "references": [...]}`; the task is named
after the file and checked by exact match. Every problem is reported as one line naming the file
(and line or item) at fault.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import yaml

from passuntil.errors import UserError
from passuntil.tasks.base import FewShot, Instance, Task
from passuntil.tasks.checks import from_spec

TASK_KEYS = {"name", "description", "template", "check", "stop", "max_new_tokens", "shots",
             "instances", "instances_file", "preamble"}
SHOT_KEYS = {"n", "seed", "separator", "template"}


def is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml", ".jsonl"))


def load_task_file(path: str | Path) -> Task:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file {path} does not exist")
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path)
        return Task(path.stem, _instances(rows, None, path), from_spec("exact"),
                    source=f"file: {path}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping of task fields at the top level")
    unknown = set(spec) - TASK_KEYS
    if unknown:
        raise UserError(f"{path}: unknown field(s) {sorted(unknown)}; allowed: {sorted(TASK_KEYS)}")
    if ("instances" in spec) == ("instances_file" in spec):
        raise UserError(f"{path}: give exactly one of 'instances' or 'instances_file'")
    if "instances_file" in spec:
        rows = _read_jsonl(path.parent / str(spec["instances_file"]))
    else:
        rows = spec["instances"]
        if not isinstance(rows, list) or not rows:
            raise UserError(f"{path}: 'instances' must be a non-empty list")
    instances = _instances(rows, spec.get("template"), path)
    stop = spec.get("stop", ["\n"])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise UserError(f"{path}: 'stop' must be a list of non-empty strings")
    max_new = spec.get("max_new_tokens", 32)
    if not isinstance(max_new, int) or max_new < 1:
        raise UserError(f"{path}: 'max_new_tokens' must be a positive integer")
    check = from_spec(str(spec.get("check", "exact")))
    if getattr(check, "spec", "") == "unit_tests":
        for x in instances:
            if not {"test", "entry_point"} <= set(x.meta):
                raise UserError(f"{path}: instance {x.id!r} needs 'test' and 'entry_point' "
                                "for the unit_tests check")
    try:
        return Task(str(spec.get("name") or path.stem), instances, check, stop=tuple(stop),
                    max_new_tokens=max_new, preamble=str(spec.get("preamble", "")),
                    few_shot=_few_shot(spec.get("shots"), instances, path),
                    source=f"file: {path}", description=str(spec.get("description", "")))
    except ValueError as err:
        raise UserError(f"{path}: {err}") from None


def _few_shot(shots, instances, path) -> FewShot | None:
    if shots is None:
        return None
    if not isinstance(shots, dict) or set(shots) - SHOT_KEYS:
        raise UserError(f"{path}: 'shots' must be a mapping with keys from {sorted(SHOT_KEYS)}")
    n = shots.get("n", 4)
    if not isinstance(n, int) or not 0 < n < len(instances):
        raise UserError(f"{path}: shots.n must be between 1 and {len(instances) - 1}")
    return FewShot(instances, n_shots=n, seed=int(shots.get("seed", 0)),
                   shot_template=str(shots.get("template", "{prompt} {answer}")),
                   separator=str(shots.get("separator", "\n\n")))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"instances file {path} does not exist")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
    if not rows:
        raise UserError(f"{path}: no instances")
    return rows


def _instances(rows: list, template: str | None, path: Path) -> tuple[Instance, ...]:
    fields = {f for _, f, _, _ in string.Formatter().parse(template or "") if f}
    out, seen = [], set()
    for k, row in enumerate(rows, 1):
        where = f"{path}: instance {k}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a mapping")
        refs = row.get("references", row.get("answer"))
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise UserError(f"{where}: 'references' must be a non-empty list of strings")
        if template is None:
            if not isinstance(row.get("prompt"), str):
                raise UserError(f"{where}: needs a 'prompt' string (or give the task a template)")
            prompt = row["prompt"]
        else:
            missing = fields - set(row)
            if missing:
                raise UserError(f"{where}: the template needs field(s) {sorted(missing)}")
            prompt = template.format(**{f: row[f] for f in fields})
        iid = str(row.get("id", k - 1))
        if iid in seen:
            raise UserError(f"{where}: duplicate id {iid!r}")
        seen.add(iid)
        meta = {m: v for m, v in row.items() if m not in {"id", "prompt", "references", "answer"}}
        out.append(Instance(iid, prompt, tuple(refs), meta))
    return tuple(out)
