"""The pre-registered forecast as a typed record: one JSON round trip, one hash, one score.

A `ForecastRecord` holds what a forecast file says (schema `passuntil-forecast/3`): the task,
the fit method and level, the target (model and N), the exact data the fit used
(`ForecastData`), the point forecast with two labelled intervals — "these instances" (`low`,
`high`: the mean over the user's own test set, the default and what scoring uses) and
"population" (`population_low`, `population_high`: the mean over the task's whole
population of instances) — the per-instance forecasts and lack-of-fit factors, the pass@k profile of the
target model (`pass_at_k`), threshold sizes, the emergence class, warnings (`code: message`),
and when, by which version and commit it was made. An exact-ls record (exact pass
probabilities as data, `data.exact_p`) carries the same fields from `scaling.exact`: its
per-instance values are null for an instance left out of the fit (too few sizes with 0 < p < 1)
and its `dispersion` is each instance's residual variance over the pooled one. Its SHA-256
covers every field but itself, so editing the point, an interval, a threshold or the data
afterwards is detected and the file refused. Schema-2 files (whose `low`/`high` were the
population interval and `test_set` the "these instances" one) are still read and verified;
schema-1 files are refused with one line.

`record.score(...)` is the one place a forecast is scored (`score-forecast`, the demo and the
report all call it): the fit is remade from `record.data` with the record's method
(deterministic, seed 0) and `scaling.scoring.score_cells` scores the target's cells — against
the mean exact probability where it is known for every instance, else by the cells' own
likelihood (a zero-pass cell is not "outside"). "Observed" has one meaning everywhere: the mean
over the forecast's instances of the unbiased PassUntil estimate (K-1)/(n-1) of the target
model (the MLE K/n overstates a small p twice at K = 2); it is reported beside the score. A
target computed by `eval --exact` (no samples) is scored by the exact rule on the recorded
interval, and its "observed" is the mean exact probability (what the tidy table's unbiased PU
column holds for such a row).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from passuntil import stats
from passuntil.errors import UserError
from passuntil.jsonio import dumps, json_safe

SCHEMA = "passuntil-forecast/3"
SCHEMA_2 = "passuntil-forecast/2"  # still read: low/high = population, test_set = these instances
OBSERVED = "mean over instances of the unbiased PassUntil estimate (K-1)/(n-1)"
EXACT = "mean over instances of the exact pass probability"


@dataclass(frozen=True)
class ForecastData:
    """The counts a forecast was fitted on: passes[i][m] of samples[i][m] per instance and model."""

    instance_ids: tuple[str, ...]
    models: tuple[str, ...]
    n_params: tuple[float, ...]
    k_target: int
    passes: tuple[tuple[int, ...], ...]
    samples: tuple[tuple[int, ...], ...]
    exact_p: tuple[tuple[float, ...], ...] | None = None  # an exact-mode forecast's data (no samples)

    def to_dict(self) -> dict:
        """Plain data; `exact_p` only where present (older files' hashes stay valid)."""
        d = asdict(self)
        if self.exact_p is None:
            del d["exact_p"]
        return d

    @classmethod
    def from_counts(cls, counts) -> ForecastData:
        return cls(tuple(map(str, counts.instance_ids)), tuple(map(str, counts.models)),
                   tuple(float(n) for n in counts.n_params), int(counts.k_target),
                   tuple(tuple(int(v) for v in r) for r in counts.passes),
                   tuple(tuple(int(v) for v in r) for r in counts.samples))

    @classmethod
    def from_dict(cls, d: dict) -> ForecastData:
        rows = lambda key: tuple(tuple(int(v) for v in r) for r in d[key])  # noqa: E731
        exact = d.get("exact_p")
        return cls(tuple(map(str, d["instance_ids"])), tuple(map(str, d["models"])),
                   tuple(float(n) for n in d["n_params"]), int(d["k_target"]), rows("passes"), rows("samples"),
                   None if exact is None else tuple(tuple(float(v) for v in r) for r in exact))


@dataclass(frozen=True)
class Threshold:
    """The size N at which the mean PU reaches `target`, with its interval (inf: not reached)."""

    target: float
    n_params: float
    low: float
    high: float


@dataclass(frozen=True)
class PassAtK:
    """Mean pass@k = mean_i 1 - (1 - p_i)^k over the forecast's instances at the target size,
    with its "these instances" interval (from the per-instance posterior draws)."""

    k: int
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class ForecastScore:
    """A forecast against the target model's results (`scaling.scoring.score_cells`).

    `against` says what was scored: "exact" (the mean exact probability, `exact`, inside the
    refitted "these instances" interval or not), "likelihood" (the cells' own likelihood: |z|
    within the level's normal quantile) or "interval" (a method that cannot be refitted from
    the file, e.g. exact-ls: the observed mean inside the recorded interval). `observed` is
    always `OBSERVED`, reported beside the score."""

    model: str | None
    instances: int
    observed: float
    observed_mle: float
    exact: float | None
    point: float
    low: float
    high: float
    level: float
    abs_error: float
    log_ratio: float
    inside_interval: bool
    exact_inside_interval: bool | None
    against: str = "likelihood"
    z: float | None = None
    p_value: float | None = None
    log_score: float | None = None
    refit_method: str | None = None
    observed_is: str = OBSERVED
    exact_note: str | None = None  # why a known exact p was not what the forecast was scored against

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


def k_label(k: int) -> str:
    """1, 10, 100, 1e3, ..., 1e6: how a pass@k profile names its k."""
    return str(k) if k < 1000 else f"{k:.0e}".replace("e+0", "e").replace("e+", "e")


def _inf(v) -> float:  # JSON null in a threshold: never reached within the searched range
    return math.inf if v is None else float(v)


def _floats(v) -> tuple[float, ...]:  # JSON null: NaN (an exact-ls record's unfitted instance)
    return tuple(math.nan if x is None else float(x) for x in v)


@dataclass(frozen=True)
class ForecastRecord:
    """One pre-registered forecast (see the module docstring)."""

    task: str
    method: str
    level: float
    target_n: float
    target_model: str | None
    point: float
    low: float  # "these instances" (schema 2: population)
    high: float
    data: ForecastData
    test_set_low: float | None = None  # schema 2 only: its "these instances" interval
    test_set_high: float | None = None
    thresholds: tuple[Threshold, ...] = ()
    emergence: str = ""
    curvature_z: float | None = None
    warnings: tuple[str, ...] = ()
    created_at: str = ""
    package_version: str = ""
    git_commit: str | None = None
    schema: str = field(default=SCHEMA)
    population_low: float | None = None
    population_high: float | None = None
    instance_point: tuple[float, ...] = ()
    instance_low: tuple[float, ...] = ()
    instance_high: tuple[float, ...] = ()
    dispersion: tuple[float, ...] = ()
    pass_at_k: tuple[PassAtK, ...] = ()

    @property
    def these_low(self) -> float:
        """The "these instances" interval, whatever the schema."""
        return self.test_set_low if self.schema == SCHEMA_2 and self.test_set_low is not None else self.low

    @property
    def these_high(self) -> float:
        return self.test_set_high if self.schema == SCHEMA_2 and self.test_set_high is not None else self.high

    @property
    def pop_interval(self) -> tuple[float, float] | None:
        """The "population" interval, whatever the schema (None: the method has none)."""
        if self.schema == SCHEMA_2:
            return (self.low, self.high)
        return None if self.population_low is None else (self.population_low, self.population_high)

    def _body(self) -> dict:
        common = {"schema": self.schema, "created_at": self.created_at, "package_version": self.package_version,
                  "git_commit": self.git_commit, "task": self.task, "method": self.method,
                  "target": {"n_params": self.target_n, "model": self.target_model},
                  "thresholds": [asdict(t) for t in self.thresholds],
                  "emergence": {"category": self.emergence, "curvature_z": self.curvature_z},
                  "warnings": list(self.warnings), "data": self.data.to_dict()}
        if self.schema == SCHEMA_2:  # byte-for-byte what schema 2 hashed
            test_set = (None if self.test_set_low is None
                        else {"low": self.test_set_low, "high": self.test_set_high})
            return json_safe({**common, "forecast": {"point": self.point, "low": self.low, "high": self.high,
                                                     "level": self.level, "test_set": test_set}})
        population = (None if self.population_low is None
                      else {"low": self.population_low, "high": self.population_high})
        return json_safe({**common, "forecast": {
            "point": self.point, "low": self.low, "high": self.high, "level": self.level,
            "interval": "these instances", "population": population,
            "instances": {"point": list(self.instance_point), "low": list(self.instance_low),
                          "high": list(self.instance_high), "dispersion": list(self.dispersion)},
            "pass_at_k": [asdict(q) for q in self.pass_at_k]}})

    def content_hash(self) -> str:
        """SHA-256 of the canonical strict JSON of every field (the hash field excluded)."""
        text = json.dumps(self._body(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self) -> dict:
        return {**self._body(), "sha256": self.content_hash()}

    def to_json(self) -> str:
        return dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "forecast") -> ForecastRecord:
        """Parse and verify: a file whose content no longer matches its hash is refused."""
        if not isinstance(d, dict) or not str(d.get("schema", "")).startswith("passuntil-forecast/"):
            raise UserError(f"{source} is not a passuntil forecast file (schema {SCHEMA})")
        if d["schema"] == "passuntil-forecast/1":
            raise UserError(f"{source} is a schema-1 forecast (passuntil 0.1) whose hash covers only its data, "
                            "so its point and interval cannot be verified; make a new one with `passuntil forecast`")
        if d["schema"] not in (SCHEMA, SCHEMA_2):
            raise UserError(f"{source} has forecast schema {d['schema']!r}; this passuntil reads {SCHEMA} "
                            f"and {SCHEMA_2}")
        try:
            fc = d["forecast"]
            kw = {}
            if d["schema"] == SCHEMA_2:
                test_set = fc.get("test_set")
                kw = {"test_set_low": None if test_set is None else float(test_set["low"]),
                      "test_set_high": None if test_set is None else float(test_set["high"])}
            else:
                pop, inst = fc["population"], fc["instances"]
                kw = {"population_low": None if pop is None else float(pop["low"]),
                      "population_high": None if pop is None else float(pop["high"]),
                      "instance_point": _floats(inst["point"]), "instance_low": _floats(inst["low"]),
                      "instance_high": _floats(inst["high"]), "dispersion": _floats(inst["dispersion"]),
                      "pass_at_k": tuple(PassAtK(int(q["k"]), float(q["mean"]), float(q["low"]), float(q["high"]))
                                         for q in fc["pass_at_k"])}
            record = cls(
                task=str(d["task"]), method=str(d["method"]), level=float(fc["level"]),
                target_n=float(d["target"]["n_params"]), target_model=d["target"]["model"],
                point=float(fc["point"]), low=float(fc["low"]), high=float(fc["high"]),
                data=ForecastData.from_dict(d["data"]),
                thresholds=tuple(Threshold(float(t["target"]), _inf(t["n_params"]), _inf(t["low"]),
                                           _inf(t["high"])) for t in d["thresholds"]),
                emergence=str(d["emergence"]["category"]), curvature_z=d["emergence"]["curvature_z"],
                warnings=tuple(map(str, d["warnings"])), created_at=str(d["created_at"]),
                package_version=str(d["package_version"]), git_commit=d["git_commit"], schema=d["schema"], **kw)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{source} is not a valid forecast file (bad or missing field: {err})") from None
        if record.content_hash() != d.get("sha256"):
            raise UserError(f"{source}: its content no longer matches its SHA-256 (edited after it was made); "
                            "a pre-registered forecast is refused once changed")
        return record

    def counts(self):
        """The `SeriesCounts` the forecast was fitted on (from `data`; no reference losses)."""
        from passuntil.scaling.data import SeriesCounts

        d = self.data
        return SeriesCounts(np.asarray(d.n_params, dtype=float), np.asarray(d.passes, dtype=np.int64).reshape(
            len(d.instance_ids), len(d.n_params)), np.asarray(d.samples, dtype=np.int64).reshape(
            len(d.instance_ids), len(d.n_params)), d.k_target, d.instance_ids, d.models)

    def refit(self):
        """(fit, method): the forecast's fit remade from `data` (deterministic, seed 0). A file
        holds no reference losses, so a loss-assisted forecast is refitted by likelihood; None
        for a method that is not a task-law fitter (exact-ls)."""
        from passuntil.scaling.fitters import FITTERS, fit_task_law

        if self.method not in FITTERS or self.data.exact_p is not None:
            return None, None
        method = "likelihood" if self.method == "loss-assisted" else self.method
        return fit_task_law(self.counts(), method), method

    def score(self, passes, samples, exact_p=None, *, k_target: int | None = None,
              model: str | None = None) -> ForecastScore:
        """Score against the target's counts, one entry per instance of `data.instance_ids`
        (the rule: see the module docstring).

        k_target is the target run's K (default: the K of the forecast's data), used for
        `observed`. exact_p counts only where it is known for every instance."""
        from passuntil.scaling.scoring import score_cells

        passes, samples = np.asarray(passes, dtype=np.int64), np.asarray(samples, dtype=np.int64)
        exact = None
        if exact_p is not None:
            e = np.asarray(exact_p, dtype=float)
            exact = float(e.mean()) if e.size and e.shape == passes.shape and np.isfinite(e).all() else None
            exact_p = e if exact is not None else None
        # a target computed by `eval --exact` (cells without samples): its exact p is the truth and
        # "observed"; scored by the exact rule on the recorded interval (no cells to score by likelihood)
        exact_only = exact is not None and samples.shape == passes.shape and bool(np.any(samples == 0))
        if passes.shape != (len(self.data.instance_ids),) or samples.shape != passes.shape or (
                np.any(samples < 1) and not exact_only):
            raise UserError("the target model's results must cover every instance of the forecast")
        k = self.data.k_target if k_target is None else k_target
        observed = exact if exact_only else float(stats.pu_unbiased(passes, samples, k_target=k).mean())
        inside = lambda v: None if v is None else bool(self.these_low <= v <= self.these_high)  # noqa: E731
        fit, method = (None, None) if exact_only else self.refit()
        common = dict(model=model or self.target_model, instances=int(passes.size), observed=observed,
                      observed_mle=exact if exact_only else float(stats.pu_mle(passes, samples).mean()),
                      exact=exact, point=self.point,
                      low=self.these_low, high=self.these_high, level=self.level, abs_error=abs(self.point - observed),
                      exact_inside_interval=inside(exact), refit_method=method,
                      observed_is=EXACT if exact_only else OBSERVED)
        if fit is None:
            truth = exact if exact is not None else observed
            return ForecastScore(**common, log_ratio=float(np.log(max(self.point, 1e-300) / max(truth, 1e-300))),
                                 inside_interval=bool(inside(truth)), against="exact" if exact is not None else "interval")
        s = score_cells(fit, self.target_n, passes, samples, exact_p, level=self.level)
        nan = lambda v: None if v != v else float(v)  # noqa: E731
        # log(point / truth): the exact mean, else the unbiased observed mean (not the pooled k/n,
        # which PassUntil's stopping rule biases upward)
        ratio = s.log_ratio if s.against == "exact" else float(np.log(max(self.point, 1e-300) / max(observed, 1e-300)))
        note = None if not s.exact_contradicted else (
            f"the exact p of {s.exact_contradicted} instance(s) is ruled out by their own samples (e.g. a check "
            "that also passes whitespace variants the exact computation does not count): scored by likelihood")
        return ForecastScore(**common, log_ratio=float(ratio), inside_interval=bool(s.inside),
                             against=s.against, z=nan(s.z), p_value=nan(s.p_value), log_score=nan(s.log_score),
                             exact_note=note)

    def target_rows(self, results, *, model: str | None = None):
        """The target model's finished rows of the forecast's instances from a tidy table
        (columns task, model, instance_id, passes, samples[, done, exact_p]), in the
        forecast's instance order; None where some instance is missing."""
        model = model or self.target_model
        g = results[(results["task"] == self.task) & (results["model"] == model)]
        computed = g["stopped"].eq("exact") & g["exact_p"].notna() if {"stopped", "exact_p"} <= set(g) else False
        g = g[(g["samples"] > 0) | computed]  # sampled, or computed exactly (`eval --exact`: no samples)
        if "done" in g:
            g = g[g["done"]]
        g = g.drop_duplicates("instance_id", keep="last").set_index("instance_id")
        if not set(self.data.instance_ids) <= set(g.index):
            return None
        return g.loc[list(self.data.instance_ids)]

    def _check_target_size(self, model: str, rows) -> None:
        """Refuse to score against a model the forecast was fitted on, or one whose size is not the
        forecast's target (beyond a 25% slip in a typed N): the verdict would be about another N."""
        if model in self.data.models:
            raise UserError(f"model {model!r} is one of the sizes the {self.task} forecast was fitted on; "
                            f"score it against the model it forecasts (N = {self.target_n:.3g})")
        sizes = rows["n_params"].to_numpy(dtype=float) if "n_params" in rows else np.array([])
        if sizes.size and np.all(sizes > 0) and abs(math.log(float(sizes[0]) / self.target_n)) > math.log(1.25):
            raise UserError(f"model {model!r} has N = {sizes[0]:.3g}, but the {self.task} forecast is for "
                            f"N = {self.target_n:.3g}; make a forecast at that model's size to score it")

    def score_results(self, results, *, model: str | None = None, k_target: int | None = None) -> ForecastScore:
        """`score` on a tidy results table (see `target_rows`)."""
        model = model or self.target_model
        if not model:
            raise UserError("the forecast names no target model; give the model to score it against")
        g = self.target_rows(results, model=model)
        if g is None:
            raise UserError(f"model {model!r} has no finished result for some instance(s) of the {self.task} forecast")
        self._check_target_size(model, g)
        exact = g["exact_p"].to_numpy(dtype=float) if "exact_p" in g else None
        return self.score(g["passes"].to_numpy(), g["samples"].to_numpy(), exact, k_target=k_target, model=model)
