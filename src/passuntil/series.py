"""Model series: named models with their non-embedding parameter counts and backends.

A series file (TOML or YAML) looks like:

    name = "my-series"
    [[models]]
    name = "0.1B"
    n_params = 1.09e8            # non-embedding parameters
    backend = "simulated"        # later: torch | hf | vllm | openai
    path = "ckpt/0.1B"           # optional, backend-specific
    options = { latency_s = 0 }  # optional, backend-specific

The built-in series "sim" has the paper's seven sizes (0.036B-2.45B, its Table 3) with the
simulated sampler, so the whole pipeline runs without any model.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from passuntil.backends.base import Sampler
from passuntil.errors import UserError
from passuntil.tasks.base import Task

PAPER_SIZES = {"0.03B": 3.6e7, "0.1B": 1.09e8, "0.2B": 2.41e8, "0.5B": 4.99e8,
               "0.9B": 8.92e8, "1.5B": 1.542e9, "2.4B": 2.45e9}
BACKENDS = ("simulated", "torch")
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
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(path.read_text())
        else:
            raise UserError(f"series file {path} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, ValueError) as err:
        raise UserError(f"cannot parse series file {path}: {err}") from None
    return _series_from_dict(raw, default_name=path.stem, where=str(path))


def _series_from_dict(raw: Any, *, default_name: str, where: str) -> ModelSeries:
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list) or not raw["models"]:
        raise UserError(f"{where}: a series needs a non-empty 'models' list")
    models = []
    allowed = {"name", "n_params", "backend", "path", "train_tokens", "options"}
    for i, m in enumerate(raw["models"]):
        if not isinstance(m, dict) or "name" not in m or "n_params" not in m:
            raise UserError(f"{where}: model #{i + 1} needs 'name' and 'n_params'")
        unknown = set(m) - allowed
        if unknown:
            raise UserError(f"{where}: model {m['name']!r} has unknown field(s) {sorted(unknown)}")
        try:
            n_params = float(m["n_params"])
        except (TypeError, ValueError):
            raise UserError(f"{where}: model {m['name']!r}: n_params must be a number") from None
        if n_params <= 0:
            raise UserError(f"{where}: model {m['name']!r}: n_params must be > 0")
        backend = m.get("backend", "simulated")
        if backend not in BACKENDS:
            raise UserError(f"{where}: model {m['name']!r}: unknown backend {backend!r} "
                            f"(available: {', '.join(BACKENDS)})")
        path = m.get("path")
        if path is not None and not Path(path).is_absolute():
            path = str((Path(where).parent / path).resolve())  # relative to the series file
        models.append(ModelSpec(str(m["name"]), n_params, backend, path,
                                m.get("train_tokens"), dict(m.get("options", {}))))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: model names must be unique")
    return ModelSeries(str(raw.get("name", default_name)), tuple(models))


def open_sampler(spec: ModelSpec, tasks: Iterable[Task]) -> Sampler:
    """Instantiate the backend for one model."""
    if spec.backend == "simulated":
        from passuntil.backends.simulated import SimulatedSampler
        from passuntil.tasks.simulated import law_probability

        truth = {}
        for task in tasks:
            for inst in task.instances:
                if "law" not in inst.meta:
                    raise UserError(f"the simulated backend cannot run task {task.name!r}: "
                                    "it knows only the simulated tasks")
                truth[task.prompt(inst)] = (inst.references[0],
                                            law_probability(inst.meta["law"], spec.n_params))
        return SimulatedSampler(spec.name, truth, **dict(spec.options))
    if spec.backend == "torch":
        from passuntil.backends.torch_backend import TorchSampler

        if not spec.path:
            raise UserError(f"model {spec.name!r}: the torch backend needs a checkpoint 'path'")
        return TorchSampler.from_folder(spec.path, name=spec.name, **dict(spec.options))
    if spec.backend in ("transformers", "vllm"):
        if not spec.path:
            raise UserError(f"model {spec.name!r}: the {spec.backend} backend needs a 'path'")
        if spec.backend == "vllm":
            from passuntil.backends.vllm_backend import VLLMSampler as Backend
        else:
            from passuntil.backends.hf import TransformersSampler as Backend
        return Backend(spec.path, name=spec.name, **dict(spec.options))
    if spec.backend == "openai":
        from passuntil.backends.openai_compat import OpenAICompatSampler

        opts = dict(spec.options)
        if not spec.path:
            raise UserError(f"model {spec.name!r}: the openai backend needs 'path' = the base URL")
        return OpenAICompatSampler(spec.path, opts.pop("model", spec.name), name=spec.name, **opts)
    raise UserError(f"backend {spec.backend!r} is not available")
