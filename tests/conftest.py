"""Shared fixtures: a toy task, a simulated sampler with known pass probabilities, a store."""

from __future__ import annotations

import pytest

from passuntil.backends.simulated import SimulatedSampler
from passuntil.store import Store
from passuntil.tasks.base import Instance, Task
from passuntil.tasks.checks import Exact

TRUE_P = [0.5, 0.2, 0.05, 0.01, 2e-3, 5e-4, 1e-4, 0.0]


@pytest.fixture
def toy_task() -> Task:
    instances = tuple(Instance(f"i{j}", f"Q{j}: say WORD{j}\nA:", (f"WORD{j}",)) for j in range(len(TRUE_P)))
    return Task("toy", instances, Exact(), stop=("\n",), max_new_tokens=8)


def make_sampler(task: Task, probs=TRUE_P, **kw) -> SimulatedSampler:
    truth = {task.prompt(x): (x.references[0], p) for x, p in zip(task.instances, probs)}
    return SimulatedSampler("toy-model", truth, **kw)


@pytest.fixture
def toy_sampler(toy_task) -> SimulatedSampler:
    return make_sampler(toy_task)


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "store.sqlite")
    yield s
    s.close()


def run_cli(capsys, *args):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    from passuntil.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
