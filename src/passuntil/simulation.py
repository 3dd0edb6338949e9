"""Known-truth simulation of PassUntil outcomes, for checking the statistics and planning.

`simulate_counts` draws the exact outcome of "sample until K passes or the budget" for a true
pass probability p, without sampling any text: the positions of the passes are cumulative
sums of geometric gaps.
"""

from __future__ import annotations

import numpy as np

from passuntil import stats


def simulate_counts(
    p: float, *, k_target: int, max_samples: int, runs: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(passes, samples) for `runs` independent PassUntil runs at true probability p."""
    if p <= 1e-15:  # (geometric draws overflow int64 below this; no pass is ever seen anyway)
        return np.zeros(runs, dtype=np.int64), np.full(runs, max_samples, dtype=np.int64)
    gaps = np.minimum(rng.geometric(p, size=(runs, k_target)), max_samples + 1)
    positions = np.cumsum(gaps, axis=1)
    stopped = positions[:, -1] <= max_samples
    passes = np.where(stopped, k_target, (positions <= max_samples).sum(axis=1))
    samples = np.where(stopped, positions[:, -1], max_samples)
    return passes.astype(np.int64), samples.astype(np.int64)


def coverage_table(
    ps=(1e-4, 1e-3, 1e-2, 0.1, 0.5, 0.9),
    ks=(1, 2, 5),
    *,
    runs: int = 2000,
    budget_factor: float = 4.0,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """Coverage of the exact interval and bias of the unbiased estimator, by simulation.

    The budget is budget_factor * K / p, so a few runs of every setting stop at the budget
    and both stopping outcomes are exercised.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for p in ps:
        for k in ks:
            budget = int(np.ceil(budget_factor * k / p))
            passes, samples = simulate_counts(p, k_target=k, max_samples=budget, runs=runs, rng=rng)
            low, high = stats.interval(passes, samples, k_target=k, confidence=confidence)
            unbiased = stats.pu_unbiased(passes, samples, k_target=k)
            # For K = 1 the unbiased estimator is Bernoulli(p) (1 if the first sample passed):
            # use its known variance, since a rare p leaves the sample variance at 0.
            sd = np.sqrt(p * (1 - p)) if k == 1 else unbiased.std(ddof=1)
            mc_se = sd / np.sqrt(runs)
            rows.append({
                "p": p,
                "K": k,
                "budget": budget,
                "budget_stops": float(np.mean(passes < k)),
                "coverage": float(np.mean((low <= p) & (p <= high))),
                "unbiased_mean": float(unbiased.mean()),
                "bias_z": float((unbiased.mean() - p) / mc_se) if mc_se > 0 else 0.0,
                "mle_mean": float(stats.pu_mle(passes, samples).mean()),
            })
    return rows


def coverage_markdown(rows: list[dict]) -> str:
    """The coverage table as Markdown (written to docs/statistics.md)."""
    lines = ["| p | K | budget | budget stops | coverage (95% exact) | unbiased mean / p | bias z | MLE mean / p |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['p']:g} | {r['K']} | {r['budget']} | {r['budget_stops']:.3f} | {r['coverage']:.4f} "
            f"| {r['unbiased_mean'] / r['p']:.3f} | {r['bias_z']:+.2f} | {r['mle_mean'] / r['p']:.3f} |"
        )
    return "\n".join(lines)
