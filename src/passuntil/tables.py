"""The tidy tables of a stored run: one row per model x task x instance with PU, the unbiased
PU and the exact interval (`estimates_table`), and per model x task the mean PU over instances
with its bootstrap SE (`summary_table`). `show`, `export`, the analyses and the report read runs
through these; they know the store, not the samplers or the run layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from passuntil import stats

if TYPE_CHECKING:
    from passuntil.store import Store


def estimates_table(store: Store, run_id: str, *, confidence: float = 0.95):
    """The tidy table of a run with PU, unbiased PU and exact interval per row."""
    import pandas as pd

    df = store.results(run_id)
    k = store.run_config(run_id)["engine"]["k_target"]
    counts = df[["samples", "passes"]].apply(pd.to_numeric, errors="coerce")
    if counts.isna().any().any() or (counts < 0).any().any():
        raise stats.InvalidCounts(f"{store.path}: run {run_id!r} holds sample or pass counts that "
                                  "are not whole numbers >= 0 (a damaged store)")
    df = df[df["samples"] > 0].copy()  # an instance not sampled yet
    exact = _exact_rows(store, run_id)
    if df.empty and exact.empty:
        return df
    if not df.empty:
        df["pu"] = stats.pu_mle(df["passes"], df["samples"])
        df["pu_unbiased"] = stats.pu_unbiased(df["passes"], df["samples"], k_target=k)
        low, high = stats.interval(df["passes"].to_numpy(), df["samples"].to_numpy(), k_target=k,
                                   confidence=confidence)
        df["ci_low"], df["ci_high"] = low, high
        df["done"] = df["stopped"].notna()
    if exact.empty:
        return df
    df = exact if df.empty else pd.concat([df, exact], ignore_index=True)
    return df.sort_values(["n_params", "task", "instance_id"], kind="stable", ignore_index=True)


def _exact_rows(store: Store, run_id: str):
    """The (model, instance) pairs of an exact-mode run computed exactly and never sampled (no
    results row): PU, unbiased PU and interval are the exact probability, `stopped` = "exact"."""
    import pandas as pd

    if store.run_config(run_id).get("exact", "off") == "off":
        return pd.DataFrame()
    df = pd.read_sql_query(
        "SELECT s.run_id, s.model, m.n_params, s.task, s.instance_id, 0 AS samples, 0 AS passes, "
        "'[]' AS pass_indices, 0 AS overshoot, 0 AS overflow, 'exact' AS stopped, NULL AS seed, "
        "s.ref_logprob, s.ref_tokens, s.exact_p FROM reference_scores s "
        "JOIN models m ON m.run_id = s.run_id AND m.model = s.model "
        "LEFT JOIN results r ON r.run_id = s.run_id AND r.model = s.model AND r.task = s.task "
        "AND r.instance_id = s.instance_id "
        "WHERE s.run_id = ? AND s.exact_p IS NOT NULL AND r.instance_id IS NULL "
        "ORDER BY m.n_params, s.task, s.instance_id", store.db, params=(run_id,))
    for col in ("pu", "pu_unbiased", "ci_low", "ci_high"):
        df[col] = df["exact_p"]
    df["done"] = True
    return df


def summary_table(df, *, n_boot: int = 1000, seed: int = 0):
    """Per model x task: mean PU over instances with its bootstrap SE, and non-zero count."""
    import pandas as pd

    rows = []
    for (model, n_params, task), g in df.groupby(["model", "n_params", "task"], sort=False):
        boot = stats.bootstrap_mean(g["pu"].to_numpy(), n_boot=n_boot, seed=seed)
        rows.append({"model": model, "n_params": n_params, "task": task, "instances": len(g),
                     "nonzero": int(np.sum((g["passes"] > 0) | ((g["samples"] == 0) & (g["pu"] > 0)))),
                     "mean_pu": boot.mean, "se": boot.se,
                     "samples": int(g["samples"].sum()), "done": int(g["done"].sum())})
    return pd.DataFrame(rows)
