"""Metric choice: the same samples under different metrics (the "mirage" argument).

Analytic model (Schaeffer et al.): with per-token loss L(N) = (N / c)^-alpha, a token is right
with p = exp(-L); exact match on a T-token answer is p^T (sharp, looks emergent) while the
expected token edit distance is T (1 - p) (smooth). `sharpness` measures how much of a metric's
total change across a series happens in its single largest step (1/(M-1) when even, 1 when all
at once). `metric_table` applies exact match, contains, character and token edit distance and
edit similarity to the completions a run stored, so a user sees on their own samples how the
metric shapes the curve; `score_metrics` adds the metrics that need log-probs (log-prob of the
reference, multiple-choice grade, Brier score); `resolution_floor` is the smallest accuracy a
test set can show.
"""

from __future__ import annotations

import re

import numpy as np

_TOKEN = re.compile(r"\w+|[^\w\s]")


def analytic_metrics(n_params, *, c: float, alpha: float, answer_tokens: int) -> dict[str, np.ndarray]:
    """Per-token accuracy p, exact match p^T and expected token edit distance T(1-p) vs N."""
    n = np.asarray(n_params, dtype=float)
    p = np.exp(-((n / c) ** -alpha))
    return {"token_accuracy": p, "exact_match": p**answer_tokens,
            "edit_distance": answer_tokens * (1 - p)}


def sharpness(values) -> float:
    """Largest single-step change over the total change (0 if nothing changes)."""
    v = np.asarray(values, dtype=float)
    steps = np.abs(np.diff(v))
    total = steps.sum()
    return float(steps.max() / total) if total > 0 else 0.0


def resolution_floor(test_set_size: int) -> float:
    """The smallest non-zero accuracy a test set of this size can report."""
    return 1.0 / test_set_size


def tokens(text: str) -> list[str]:
    """Words and single punctuation marks: the units of the token edit distance."""
    return _TOKEN.findall(text)


def edit_distance(a, b) -> int:
    """Levenshtein distance between two sequences (strings: characters; lists: tokens)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def metric_table(completions, references: dict[tuple[str, str], str], n_params: dict[str, float]):
    """Per model x task: sample-weighted exact match (the task's check), contains, mean character
    edit distance to the reference and edit similarity 1 - d / max(len), averaged over instances.

    completions: DataFrame with model, task, instance_id, text, count, passed (the store's);
    references: (task, instance_id) -> reference text.
    """
    import pandas as pd

    rows = []
    for (model, task, iid), g in completions.groupby(["model", "task", "instance_id"]):
        ref = references[(task, iid)].strip()
        w = g["count"].to_numpy(dtype=float)
        texts = [t.strip() for t in g["text"]]
        dist = np.array([edit_distance(t, ref) for t in texts], dtype=float)
        sim = 1 - dist / np.maximum(1, np.array([max(len(t), len(ref)) for t in texts]))
        ref_tokens = tokens(ref)
        tok = np.array([edit_distance(tokens(t), ref_tokens) for t in texts], dtype=float)
        rows.append({"model": model, "n_params": n_params[model], "task": task, "instance_id": iid,
                     "exact_match": np.average(g["passed"].to_numpy(dtype=float), weights=w),
                     "contains": np.average([ref in t for t in texts], weights=w),
                     "edit_distance": np.average(dist, weights=w),
                     "token_edit_distance": np.average(tok, weights=w),
                     "edit_similarity": np.average(sim, weights=w)})
    per_instance = pd.DataFrame(rows)
    cols = ["exact_match", "contains", "edit_distance", "token_edit_distance", "edit_similarity"]
    return (per_instance.groupby(["task", "model", "n_params"], as_index=False)[cols].mean()
            .sort_values(["task", "n_params"]))


def score_metrics(sampler, task) -> list[dict]:
    """Per instance, from teacher-forced log-probs: the reference's log-prob and test loss, and,
    where the instance lists `choices`, BIG-bench's multiple-choice grade (the reference has the
    highest log-prob) and Brier score (squared error of the choice probabilities normalised over
    the choices, against the one-hot reference)."""
    rows = []
    for x in task.instances:
        prompt, ref = task.prompt(x), x.references[0]
        choices = list(x.meta.get("choices", ()))
        conts = [task.answer_prefix + c for c in [ref, *choices]]
        scores = sampler.score([prompt] * len(conts), conts)
        row = {"instance_id": x.id, "ref_logprob": scores[0].logprob, "ref_loss": scores[0].loss,
               "mc_grade": np.nan, "brier": np.nan}
        if choices:
            lp = np.array([s.logprob for s in scores[1:]])
            prob = np.exp(lp - lp.max())
            prob /= prob.sum()
            target = np.array([float(c.strip() == ref.strip()) for c in choices])
            row["mc_grade"] = float(target[int(np.argmax(lp))])
            row["brier"] = float(np.sum((prob - target) ** 2))
        rows.append(row)
    return rows
