"""Pass checks: map (instance, completion) to pass/fail.

Each check is a small frozen dataclass (so it pickles into a worker process) with a `spec`
string that `from_spec` parses back: "exact", "contains", "normalized", "regex:PATTERN",
"multiple_choice", "python:module:function", "unit_tests".
"""

from __future__ import annotations

import functools
import importlib
import re
import string
from dataclasses import dataclass

from passuntil.errors import UserError
from passuntil.execution import Job, default_pool
from passuntil.tasks.base import Instance

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, no punctuation or articles, single spaces (SQuAD-style normalisation)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


@dataclass(frozen=True)
class Exact:
    """The completion, stripped of surrounding whitespace, equals a reference."""

    strip: bool = True
    spec: str = "exact"

    def __call__(self, instance: Instance, text: str) -> bool:
        if self.strip:
            return text.strip() in {r.strip() for r in instance.references}
        return text in instance.references


@dataclass(frozen=True)
class Contains:
    """A reference occurs in the completion (the paper's "extract string match")."""

    spec: str = "contains"

    def __call__(self, instance: Instance, text: str) -> bool:
        return any(r.strip() and r.strip() in text for r in instance.references)


@dataclass(frozen=True)
class Normalized:
    """Equal to a reference after `normalize`."""

    spec: str = "normalized"

    def __call__(self, instance: Instance, text: str) -> bool:
        return normalize(text) in {normalize(r) for r in instance.references}


@dataclass(frozen=True)
class Regex:
    """Extract the first match of `pattern` (its group 1 if it has one) and compare exactly."""

    pattern: str

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise UserError(f"invalid regex {self.pattern!r}: {err}") from None

    @property
    def spec(self) -> str:
        return f"regex:{self.pattern}"

    def __call__(self, instance: Instance, text: str) -> bool:
        m = re.search(self.pattern, text)
        if not m:
            return False
        found = m.group(1) if m.re.groups else m.group(0)
        return found.strip() in {r.strip() for r in instance.references}


@dataclass(frozen=True)
class MultipleChoice:
    """Pick the choice the completion names; pass when it is the reference.

    `instance.meta["choices"]` lists the options. The completion names a choice by its letter
    ("B", "(B)", "B.") or by starting with the option's text; the first reading that applies wins.
    """

    spec: str = "multiple_choice"

    def choose(self, instance: Instance, text: str) -> str | None:
        choices = list(instance.meta.get("choices", ()))
        t = text.strip()
        m = re.match(r"^\(?([A-Z])[).:]?(\s|$)", t)
        if m and ord(m.group(1)) - 65 < len(choices):
            return choices[ord(m.group(1)) - 65]
        low = t.lower()
        matches = [c for c in choices if low.startswith(c.strip().lower())]
        return max(matches, key=len) if matches else None

    def __call__(self, instance: Instance, text: str) -> bool:
        picked = self.choose(instance, text)
        return picked is not None and picked.strip() in {r.strip() for r in instance.references}


@dataclass(frozen=True)
class PythonCheck:
    """A user's function `module:function(instance, text) -> bool`, imported by name."""

    target: str

    @property
    def spec(self) -> str:
        return f"python:{self.target}"

    def resolve(self):
        module, _, func = self.target.partition(":")
        if not module or not func:
            raise UserError(f"python check must look like 'module:function', got {self.target!r}")
        try:
            found = getattr(importlib.import_module(module), func)
        except Exception as err:  # the user's module may fail in any way while it is imported
            first = (str(err).splitlines() or [""])[0]
            raise UserError(f"cannot load check {self.target!r}: {type(err).__name__}: {first}") from None
        if not callable(found):
            raise UserError(f"check {self.target!r} is not a function")
        return found

    def __call__(self, instance: Instance, text: str) -> bool:
        return bool(self.resolve()(instance, text))


@dataclass(frozen=True)
class UnitTests:
    """Run prompt + completion in the sandbox; pass when the tests' `check(candidate)` succeeds.

    The instance's meta holds "test" (code defining `check(candidate)`, HumanEval's format) and
    "entry_point" (the function the completion defines). See `passuntil.execution`. The test runs
    after the prompt's own definitions (imports, helpers) when the prompt is valid Python by
    itself, as HumanEval's are; a prompt that is a bare header (`def inc(x):`) is left out of it.
    """

    spec: str = "unit_tests"

    def job(self, instance: Instance, text: str) -> Job:
        context = instance.prompt + "\n" if _compiles(instance.prompt) else ""
        return Job(instance.prompt + text, context + instance.meta["test"], instance.meta["entry_point"])

    def __call__(self, instance: Instance, text: str) -> bool:
        return default_pool().run(self.job(instance, text)).passed

    def check_many(self, instance: Instance, texts: list[str]) -> list[bool]:
        """Check several completions at once, in parallel over the worker pool."""
        return [v.passed for v in default_pool().run_many([self.job(instance, t) for t in texts])]


@functools.lru_cache(maxsize=4096)
def _compiles(code: str) -> bool:
    try:
        compile(code, "<prompt>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def from_spec(spec: str):
    """Parse a check spec string into a check."""
    kind, _, arg = spec.partition(":")
    simple = {"exact": Exact, "contains": Contains, "normalized": Normalized,
              "multiple_choice": MultipleChoice, "unit_tests": UnitTests}
    if kind in simple and not arg:
        return simple[kind]()
    if kind == "regex" and arg:
        return Regex(arg)
    if kind == "python" and arg:
        check = PythonCheck(arg)
        check.resolve()
        return check
    raise UserError(f"unknown check {spec!r} (use exact, contains, normalized, regex:PATTERN, "
                    "multiple_choice, unit_tests or python:module:function)")
