"""The input of every fit: PassUntil counts of one task across a model series.

`SeriesCounts` holds, per instance i and model m, the passes k[i, m] and samples n[i, m]
(n = 0: not evaluated), the models' non-embedding sizes N[m], and optionally the reference
answer's mean per-token test loss. It is built from the tidy table (one row per model x task
x instance: n_params, instance_id, passes, samples[, ref_logprob, ref_tokens]), so a user's
CSV works as well as a run store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SeriesCounts:
    n_params: np.ndarray  # (M,)
    passes: np.ndarray  # (I, M)
    samples: np.ndarray  # (I, M)
    k_target: int = 1
    instance_ids: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    ref_loss: np.ndarray | None = None  # (I, M) mean per-token loss of the reference

    def __post_init__(self):
        if self.passes.shape != self.samples.shape or self.passes.shape[1] != self.n_params.size:
            raise ValueError("passes and samples must be (instances, models), matching n_params")
        if not np.all(np.isfinite(self.n_params) & (self.n_params > 0)):
            raise ValueError(f"model sizes must be finite and > 0 (got {self.n_params.tolist()})")
        if np.any(self.passes > self.samples) or np.any(self.passes < 0):
            raise ValueError("passes must lie in [0, samples]")

    @property
    def log_n(self) -> np.ndarray:
        return np.log(self.n_params)

    @property
    def pu(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.samples > 0, self.passes / np.maximum(self.samples, 1), np.nan)

    @property
    def zero_share(self) -> float:
        """The share of evaluated (instance, size) cells with no pass: over half, and the
        instances' slopes come mostly from the pooled prior (the `mostly-zero` warning, and
        `--method auto`'s switch to the full-Bayes fit)."""
        evaluated = self.samples > 0
        return float(((self.passes == 0) & evaluated).sum() / max(int(evaluated.sum()), 1))

    def select_models(self, keep) -> SeriesCounts:
        keep = np.asarray(keep)
        return SeriesCounts(self.n_params[keep], self.passes[:, keep], self.samples[:, keep], self.k_target,
                            self.instance_ids, tuple(np.asarray(self.models, dtype=object)[keep]) if self.models else (),
                            None if self.ref_loss is None else self.ref_loss[:, keep])

    def select_instances(self, idx) -> SeriesCounts:
        idx = np.asarray(idx)
        ids = tuple(np.asarray(self.instance_ids, dtype=object)[idx]) if self.instance_ids else ()
        return SeriesCounts(self.n_params, self.passes[idx], self.samples[idx], self.k_target, ids, self.models,
                            None if self.ref_loss is None else self.ref_loss[idx])

    @classmethod
    def from_table(cls, df, *, k_target: int = 1) -> SeriesCounts:
        """From a tidy table of one task (columns n_params, instance_id, passes, samples, ...)."""
        models = df.groupby("model", sort=False)["n_params"].first().sort_values()
        ids = sorted(df["instance_id"].unique())
        shape = (len(ids), len(models))
        passes, samples = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
        loss = np.full(shape, np.nan)
        col = {m: j for j, m in enumerate(models.index)}
        row = {x: i for i, x in enumerate(ids)}
        for r in df.itertuples():
            i, j = row[r.instance_id], col[r.model]
            passes[i, j], samples[i, j] = r.passes, r.samples
            if hasattr(r, "ref_logprob") and r.ref_logprob == r.ref_logprob and getattr(r, "ref_tokens", 0):
                loss[i, j] = -r.ref_logprob / r.ref_tokens
        return cls(models.to_numpy(dtype=float), passes, samples, k_target, tuple(ids), tuple(models.index),
                   None if np.isnan(loss).all() else loss)
