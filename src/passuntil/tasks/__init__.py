"""Task registry: `get_task(name)` and `list_tasks()`.

Names: the bundled tasks (arith, dates, reverse, code), the simulated ones (sim-*), `humaneval`,
the BIG-bench tasks (`bigbench/...`, after `passuntil fetch-data`), or a path to a YAML or JSONL
task file (docs/task-files.md), or `lm_eval:NAME` (an lm-evaluation-harness
generation task, docs/lm-eval.md; `passuntil prompts --task NAME` shows any task's exact prompts).
"""

from __future__ import annotations

from passuntil.errors import UserError
from passuntil.tasks.base import FewShot, Instance, Task
from passuntil.tasks.bigbench import bigbench_task_names, make_bigbench
from passuntil.tasks.bundled import BUNDLED_TASKS, make_bundled
from passuntil.tasks.files import is_task_file, load_task_file
from passuntil.tasks.humaneval import humaneval
from passuntil.tasks.simulated import SIMULATED_TASKS, make_task


def list_tasks() -> list[str]:
    """Names of every built-in task."""
    return [*BUNDLED_TASKS, *SIMULATED_TASKS, "humaneval", *bigbench_task_names()]


def get_task(name: str, *, seed: int = 0) -> Task:
    """A built-in task by name, or a task file by path; one clear error otherwise."""
    if name in SIMULATED_TASKS:
        return make_task(name, seed=seed)
    if name in BUNDLED_TASKS:
        return make_bundled(name)
    if name == "humaneval":
        return humaneval()
    if name in bigbench_task_names():
        return make_bigbench(name)
    if is_task_file(name):
        return load_task_file(name)
    if name.startswith("lm_eval:"):  # lm-evaluation-harness tasks (optional extra, imported lazily)
        from passuntil.tasks.lm_eval import make_lm_eval_task

        return make_lm_eval_task(name)
    raise UserError(f"unknown task {name!r}; `passuntil tasks` lists them (or give a .yaml/.jsonl "
                    "task file)")


__all__ = ["FewShot", "Instance", "Task", "get_task", "list_tasks"]
