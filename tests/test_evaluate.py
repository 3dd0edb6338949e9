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


def test_run_spec_round_trips_and_reads_old_configs(tmp_path):
    from passuntil.runspec import RunSpec

    store = Store(tmp_path / "s.sqlite")
    task = Path(__file__).parents[1] / "examples/capitals.yaml"
    spec = resolve_config(store, "r", resume=False, series="tiny", models=["tiny-2"],
                          tasks=[str(task), "arith"], engine_overrides={"max_samples": 5}, limit=2)
    assert RunSpec.from_json(spec.to_json()) == spec == RunSpec.from_store(store, "r")
    assert [(t.source, t.name) for t in spec.tasks] == [(str(task.resolve()), "capitals"), ("arith", "arith")]
    assert spec.samplers["tiny-2"]["backend"] == "torch" and spec.limit == 2
    tasks = spec.tasks_by_name()
    assert list(tasks) == ["capitals", "arith"] and len(tasks["capitals"].instances) == 2
    # what a run of an earlier version stored: no names, no samplers, no options
    old = {"engine": {"k_target": 1, "max_samples": 5}, "tasks": [str(task.resolve())], "series": "tiny",
           "models": [{"name": "tiny-2", "n_params": 23712, "backend": "torch",
                       "path": "x", "train_tokens": None, "options": {}}]}
    old_spec = RunSpec.from_dict(old)
    assert old_spec.tasks[0].name is None and old_spec.reference_scores and old_spec.limit is None
    assert list(old_spec.tasks_by_name()) == ["capitals"]


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_mode_progress_names_model_stage_and_eta():
    """Not a terminal: one line at most every 30 s, with model, tasks, stage, done/total,
    samples, rate and the ETA with its bound."""
    import io

    from rich.console import Console

    from passuntil.progress import RichProgress

    clock, log = _Clock(), io.StringIO()
    console = Console(file=io.StringIO(), force_terminal=False)
    with RichProgress(10, max_samples=100, console=console, clock=clock, log_file=log) as p:
        p.set_model("tiny-2", ["arith", "dates"])
        for _ in range(60):  # 60 s of progress, an event every second
            clock.t += 1
            p.stage("sampling")
            p.advance(samples=5)
        p.advance(instances=5)
        clock.t += 30
        p.stage("checking")
    lines = log.getvalue().splitlines()
    assert len(lines) == 4  # at 0 s, 30 s, 60 s and 90 s
    assert lines[0].startswith("passuntil: tiny-2 · arith, dates · loading: 0/10 instances")
    # ETA: 90 s so far for 5 of 10 instances; bound: (10 x 100 - 300) samples at 300 / 90 s
    assert lines[-1] == ("passuntil: tiny-2 · arith, dates · checking: 5/10 instances, 300 samples "
                         "(3/s), ETA 90s (at most 3.5m)")


def test_terminal_progress_shows_the_model_verbatim():
    """In a terminal the bar's description is text, not rich markup: a model name in brackets
    shows as written (it used to vanish)."""
    import io

    from rich.console import Console

    from passuntil.progress import RichProgress

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with RichProgress(4, max_samples=10, console=console) as p:
        p.set_model("[tiny-2]", ["arith"])
        p.stage("sampling")
        p.advance(instances=1, samples=3)
    assert "[tiny-2] · arith · sampling" in out.getvalue()
