"""Tasks: instances, prompt assembly (few-shot), and the check that decides a pass."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Instance:
    """One test item: its input, the acceptable references, and free-form metadata."""

    id: str
    prompt: str
    references: tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["meta"] = dict(self.meta)
        return d


Check = Callable[[Instance, str], bool]


@dataclass(frozen=True)
class FewShot:
    """Prepend `n_shots` solved examples drawn (seeded, per instance) from `pool`.

    The instance itself is never one of its own shots: when the pool is the task's own instances
    the instance's id is left out; when it is a separate pool (`separate_pool`, a task file's
    `shots_from`) any example with the instance's very prompt is. Shots are formatted as
    `shot_template.format(prompt=..., answer=...)` and joined by `separator`.
    """

    pool: tuple[Instance, ...]
    n_shots: int = 4
    seed: int = 0
    shot_template: str = "{prompt}{answer}"
    separator: str = "\n\n"
    separate_pool: bool = False

    def shots_for(self, instance: Instance) -> list[Instance]:
        if self.separate_pool:
            candidates = [x for x in self.pool if x.prompt != instance.prompt]
        else:
            candidates = [x for x in self.pool if x.id != instance.id]
        if len(candidates) < self.n_shots:
            raise ValueError(f"few-shot pool has {len(candidates)} items, needs {self.n_shots}")
        return random.Random(f"{self.seed}:{instance.id}").sample(candidates, self.n_shots)

    def render(self, instance: Instance) -> str:
        shots = [self.shot_template.format(prompt=s.prompt, answer=s.references[0])
                 for s in self.shots_for(instance)]
        return self.separator.join([*shots, instance.prompt])


@dataclass(frozen=True)
class Task:
    """A named set of instances with its prompt format, stop sequences and pass check."""

    name: str
    instances: tuple[Instance, ...]
    check: Check
    stop: tuple[str, ...] = ("\n",)
    max_new_tokens: int = 32
    preamble: str = ""
    few_shot: FewShot | None = None
    source: str = ""
    description: str = ""
    answer_prefix: str = ""  # text between the prompt and the answer when scoring references

    def __post_init__(self):
        ids = [x.id for x in self.instances]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task {self.name!r}: instance ids are not unique")

    def prompt(self, instance: Instance) -> str:
        """The full text given to the model for this instance."""
        body = self.few_shot.render(instance) if self.few_shot else instance.prompt
        return self.preamble + body

    def subset(self, ids: Sequence[str]) -> Task:
        keep = set(ids)
        return Task(**{**self.__dict__, "instances": tuple(x for x in self.instances if x.id in keep)})

    def digest(self) -> str:
        """A fingerprint of what the model is asked and what passes: every instance's id, full
        prompt and references, the stop sequences, the token limit and the check. A run stores
        it, so that resuming after the task changed is refused instead of mixing old results
        with new instances of the same id."""
        h = hashlib.sha256()
        for part in (self.name, repr(self.stop), str(self.max_new_tokens),
                     str(getattr(self.check, "spec", type(self.check).__name__))):
            h.update(part.encode() + b"\0")
        for x in self.instances:
            for part in (x.id, self.prompt(x), *x.references):
                h.update(part.encode() + b"\0")
            h.update(b"\1")
        return h.hexdigest()[:16]

    def describe(self) -> dict:
        return {"name": self.name, "instances": len(self.instances), "source": self.source,
                "stop": list(self.stop), "max_new_tokens": self.max_new_tokens,
                "check": getattr(self.check, "spec", repr(self.check)),
                "description": self.description,
                "shots": self.few_shot.n_shots if self.few_shot else 0,
                "shots_pool": ("" if not self.few_shot else f"{len(self.few_shot.pool)} separate examples"
                               if self.few_shot.separate_pool else "the task's instances")}
