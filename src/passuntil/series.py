"""Model series: named models with their non-embedding parameter counts and backends.

A series file (TOML or YAML) looks like:

    name = "my-series"
    [[models]]
    name = "0.1B"
    n_params = 1.09e8            # non-embedding parameters
    backend = "simulated"        # any backend of passuntil.backends.registry
    path = "ckpt/0.1B"           # a folder (relative to this file) or, for openai, a URL
    options = { latency_s = 0 }  # optional, checked against the backend's registered options

The built-in series "sim" has the paper's seven sizes (0.036B-2.45B, its Table 3) with the
simulated sampler, so the whole pipeline runs without any model.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from passuntil.backends import registry
from passuntil.backends.base import Sampler
from passuntil.errors import UserError
from passuntil.tasks.base import Task

PAPER_SIZES = {"0.03B": 3.6e7, "0.1B": 1.09e8, "0.2B": 2.41e8, "0.5B": 4.99e8,
               "0.9B": 8.92e8, "1.5B": 1.542e9, "2.4B": 2.45e9}
BUNDLED = Path(__file__).parent / "bundled"


@dataclass(frozen=True)
class ModelSpec:
    """One model of a series."""

    name: str
    n_params: float
    backend: str = "simulated"
    path: str | None = None
    train_tokens: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["options"] = dict(self.options)
        return d


@dataclass(frozen=True)
class ModelSeries:
    """An ordered set of models of one shape at several sizes."""

    name: str
    models: tuple[ModelSpec, ...]

    def select(self, names: Iterable[str] | None) -> tuple[ModelSpec, ...]:
        if not names:
            return self.models
        by_name = {m.name: m for m in self.models}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise UserError(f"model {missing[0]!r} is not in series {self.name!r}; "
                            f"it has: {', '.join(by_name)}")
        return tuple(by_name[n] for n in names)

    def to_dict(self) -> dict:
        return {"name": self.name, "models": [m.to_dict() for m in self.models]}


def builtin_series(name: str) -> ModelSeries | None:
    """"sim" (simulated, the paper's sizes) or a series shipped under passuntil/bundled/."""
    if name == "sim":
        return ModelSeries("sim", tuple(ModelSpec(k, v) for k, v in PAPER_SIZES.items()))
    if not name.isidentifier() and not name.replace("-", "_").isidentifier():
        return None
    path = BUNDLED / name / "series.toml"
    if path.is_file():
        return load_series(str(path))
    return None


def builtin_names() -> list[str]:
    return ["sim", *sorted(p.parent.name for p in BUNDLED.glob("*/series.toml"))]


def load_series(name_or_path: str) -> ModelSeries:
    """A built-in series by name, or a series file (.toml, .yaml, .yml)."""
    series = builtin_series(name_or_path)
    if series is not None:
        return series
    path = Path(name_or_path)
    if not path.is_file():
        raise UserError(f"no built-in series and no file named {name_or_path!r} "
                        f"(built-in: {', '.join(builtin_names())})")
    import yaml

    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise UserError(f"series file {path} must end in .toml, .yaml or .yml")
    try:
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, OSError) as err:
        err = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot parse series file {path}: {err}") from None
    return _series_from_dict(raw, default_name=path.stem, where=str(path))


def _series_from_dict(raw: Any, *, default_name: str, where: str) -> ModelSeries:
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list) or not raw["models"]:
        raise UserError(f"{where}: a series needs a non-empty 'models' list")
    models = []
    unknown = sorted(set(raw) - {"name", "models"})
    if unknown:
        raise UserError(f"{where}: unknown top-level field(s) {unknown}; a series has 'name' "
                        "and 'models'")
    allowed = {"name", "n_params", "backend", "path", "train_tokens", "options"}
    for i, m in enumerate(raw["models"]):
        if not isinstance(m, dict) or "name" not in m or "n_params" not in m:
            raise UserError(f"{where}: model #{i + 1} needs 'name' and 'n_params'")
        unknown = set(m) - allowed
        if unknown:
            raise UserError(f"{where}: model {m['name']!r} has unknown field(s) {sorted(unknown)}")
        if not str(m["name"]).strip() or not str(m["name"]).isprintable():
            raise UserError(f"{where}: model #{i + 1}: 'name' must be a non-empty single-line string "
                            f"(got {m['name']!r}): it names the model in the store and on every table")
        n_params = _positive_number(m["n_params"], f"{where}: model {m['name']!r}: n_params")
        train_tokens = m.get("train_tokens")
        if train_tokens is not None:
            train_tokens = _positive_number(train_tokens, f"{where}: model {m['name']!r}: train_tokens")
        backend = registry.get_backend(str(m.get("backend", "simulated")),
                                       where=f"{where}: model {m['name']!r}")
        options = m.get("options", {})
        if not isinstance(options, dict):
            raise UserError(f"{where}: model {m['name']!r}: 'options' must be a table of settings")
        spec = ModelSpec(str(m["name"]), n_params, backend.name,
                         _resolve_path(m.get("path"), backend.path, where), train_tokens, dict(options))
        backend.validate(spec, where=where)
        models.append(spec)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: model names must be unique")
    return ModelSeries(str(raw.get("name", default_name)), tuple(models))


def _positive_number(value: Any, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number") from None
    if isinstance(value, bool) or not math.isfinite(x) or x <= 0:
        raise UserError(f"{what} must be > 0 and finite (got {value!r})")
    return x


def _resolve_path(path: Any, kind: str, where: str) -> str | None:
    """A model's `path` as the backend takes it: URLs stay URLs; a folder relative to the
    series file is made absolute (a model id that is no folder there stays as written)."""
    if path is None:
        return None
    path = str(path)
    if kind == "url" or "://" in path or Path(path).is_absolute():
        return path
    resolved = (Path(where).parent / path).resolve()
    if kind == "folder-or-id" and not resolved.exists():
        return path
    return str(resolved)


def open_sampler(spec: ModelSpec, tasks: Iterable[Task]) -> Sampler:
    """Instantiate the backend for one model (see passuntil.backends.registry)."""
    return registry.open_sampler(spec, tasks)
