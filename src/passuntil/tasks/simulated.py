"""Simulated tasks with a known true law per instance, for tests, benchmarks and the demo.

Each instance asks for a code word; its true pass probability on a model with N
non-embedding parameters is stored in `meta` as a law the simulated sampler evaluates:

* "sim-scaling": the task scaling law, p = exp(-c N^-alpha) (log(-log p) linear in log N);
* "sim-accelerated": two circuits in soft majority, p = w exp(-c1 N^-a1) + (1-w) exp(-c2 N^-a2)
  with a steeper second circuit, which makes log(-log p) concave in log N.
"""

from __future__ import annotations

import math
import string

import numpy as np

from passuntil.tasks.base import Instance, Task
from passuntil.tasks.checks import Exact

N_REF = 3.6e7  # the paper's smallest model (0.03B); laws are anchored there
N_INSTANCES = 20


def _code_word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(string.ascii_uppercase), size=6))


def law_probability(law: dict, n_params: float) -> float:
    """True pass probability of an instance law at N non-embedding parameters."""
    def circuit(c: float, alpha: float) -> float:
        return math.exp(-c * n_params ** (-alpha))

    if law["kind"] == "scaling":
        return circuit(law["c"], law["alpha"])
    if law["kind"] == "circuits":
        w = law["w"]
        return w * circuit(law["c1"], law["a1"]) + (1 - w) * circuit(law["c2"], law["a2"])
    raise ValueError(f"unknown law kind {law['kind']!r}")


def _scaling_law(rng: np.random.Generator) -> dict:
    # -log p at the smallest model between 3 and 12 (p from 5e-2 to 6e-6), alpha in [0.3, 0.6]
    alpha = float(rng.uniform(0.3, 0.6))
    neg_log_p0 = float(rng.uniform(3.0, 12.0))
    return {"kind": "scaling", "c": neg_log_p0 * N_REF**alpha, "alpha": alpha}


def _circuits_law(rng: np.random.Generator) -> dict:
    slow = _scaling_law(rng)
    a2 = float(rng.uniform(1.6, 2.0))  # a steep circuit, negligible below ~0.5B, dominant by 2.4B
    neg_log_p0 = float(rng.uniform(300.0, 600.0))
    return {"kind": "circuits", "w": 0.5, "c1": slow["c"], "a1": slow["alpha"],
            "c2": neg_log_p0 * N_REF**a2, "a2": a2}


def make_task(name: str, *, seed: int = 0) -> Task:
    """Build one of the simulated tasks (deterministic for a given seed)."""
    makers = {"sim-scaling": _scaling_law, "sim-accelerated": _circuits_law}
    rng = np.random.default_rng([seed, sorted(makers).index(name)])
    instances = []
    for i in range(N_INSTANCES):
        word = _code_word(rng)
        instances.append(Instance(
            id=f"{i:02d}",
            prompt=f"Repeat the code word {word}.\nAnswer:",
            references=(word,),
            meta={"law": makers[name](rng)},
        ))
    return Task(
        name=name,
        instances=tuple(instances),
        check=Exact(),
        stop=("\n",),
        max_new_tokens=8,
        source="simulated (known true law per instance)",
        description={"sim-scaling": "the task scaling law: log(-log p) linear in log N",
                     "sim-accelerated": "two circuits in soft majority: accelerated emergence"}[name],
    )


SIMULATED_TASKS = ("sim-scaling", "sim-accelerated")
