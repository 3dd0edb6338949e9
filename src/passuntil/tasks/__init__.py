"""Task registry: `get_task(name)` and `list_tasks()`."""

from __future__ import annotations

from passuntil.errors import UserError
from passuntil.tasks.base import FewShot, Instance, Task
from passuntil.tasks.bundled import BUNDLED_TASKS, make_bundled
from passuntil.tasks.simulated import SIMULATED_TASKS, make_task


def list_tasks() -> list[str]:
    """Names of every built-in task."""
    return [*BUNDLED_TASKS, *SIMULATED_TASKS]


def get_task(name: str, *, seed: int = 0) -> Task:
    """A built-in task by name; one clear error for an unknown name."""
    if name in SIMULATED_TASKS:
        return make_task(name, seed=seed)
    if name in BUNDLED_TASKS:
        return make_bundled(name)
    raise UserError(f"unknown task {name!r}; available: {', '.join(list_tasks())}")


__all__ = ["FewShot", "Instance", "Task", "get_task", "list_tasks"]
