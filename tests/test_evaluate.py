"""End to end: PassUntil with the built-in sampler on bundled checkpoints, into a store."""

from pathlib import Path

import numpy as np

from passuntil import stats
from passuntil.evaluate import estimates_table, resolve_config, run_eval
from passuntil.store import Store

BUNDLED = Path(__file__).parents[1] / "src/passuntil/bundled/tiny"


def test_eval_on_bundled_checkpoints(tmp_path):
    series = tmp_path / "series.toml"
    series.write_text("".join(
        f'[[models]]\nname = "{m}"\nn_params = {n}\nbackend = "torch"\npath = "{BUNDLED / m}"\n'
        for m, n in [("tiny-2", 23712), ("tiny-3", 79824)]))
    store = Store(tmp_path / "s.sqlite")
    config = resolve_config(store, "r", resume=False, series=str(series), models=(), tasks=["arith"],
                            engine_overrides={"k_target": 1, "max_samples": 300, "batch_size": 2048})
    run_eval(store, "r", config)
    df = estimates_table(store, "r")
    assert len(df) == 2 * 26  # two models x the arith instances
    assert (df["ref_logprob"] < 0).all() and (df["ref_tokens"] >= 2).all()
    # the exact pass probability is recorded for the exact-match task; it is a lower bound of the
    # stripped check's pass probability, and PassUntil's interval is consistent with it
    assert df["exact_p"].notna().all() and (df["exact_p"] > 0).all()
    low, high = stats.interval(df["passes"].to_numpy(), df["samples"].to_numpy(), k_target=1, confidence=0.99)
    assert np.mean(df["exact_p"] <= high) >= 0.9
    # at temperature 1 the exact probability is the reference's probability times P(stop after it)
    assert (df["exact_p"] <= np.exp(df["ref_logprob"]) * (1 + 1e-6)).all()
