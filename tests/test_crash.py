"""Crash safety: `passuntil eval` killed with SIGKILL at random moments and resumed each time
ends with exactly the store an uninterrupted run writes; each resume takes over the lease the
killed process left behind."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

SERIES = """name = "slow-sim"
[[models]]
name = "0.03B"
n_params = 3.6e7
options = { latency_s = 0.002 }
[[models]]
name = "0.1B"
n_params = 1.09e8
options = { latency_s = 0.002 }
[[models]]
name = "0.2B"
n_params = 2.41e8
options = { latency_s = 0.002 }
"""


def _cmd(store, series, *extra):
    return [sys.executable, "-m", "passuntil", "eval", "--store", str(store), *extra]


def _fresh_args(series):
    return ["--task", "sim-scaling", "--task", "sim-accelerated", "--series", str(series),
            "--k", "2", "--max-samples", "20000", "--batch-size", "128", "--seed", "11"]


def _snapshot(store):
    con = sqlite3.connect(store)
    results = con.execute("SELECT model, task, instance_id, samples, passes, pass_indices, stopped, seed "
                          "FROM results ORDER BY model, task, instance_id").fetchall()
    completions = con.execute("SELECT model, task, instance_id, text, count, passed FROM completions "
                              "ORDER BY model, task, instance_id, text").fetchall()
    con.close()
    return results, completions


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    series = tmp_path / "series.toml"
    series.write_text(SERIES)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    ref_store = tmp_path / "ref.sqlite"
    t0 = time.monotonic()
    subprocess.run(_cmd(ref_store, series, *_fresh_args(series)), check=True, env=env,
                   capture_output=True, timeout=300)
    duration = time.monotonic() - t0

    store = tmp_path / "killed.sqlite"
    rng = np.random.default_rng(2024)
    kills, attempts, left_behind = 0, 0, 0
    while kills < 6 and attempts < 40:
        attempts += 1
        args = _fresh_args(series) if attempts == 1 else ["--resume"]
        proc = subprocess.Popen(_cmd(store, series, *args), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if attempts % 2:  # odd tries: kill while it samples, holding the lease (the first must
            _wait_for_lease(store, proc)  # get that far: a run never recorded cannot be resumed)
            time.sleep(rng.uniform(0.0, 0.6))
        else:  # even tries: at any moment after the start
            time.sleep(rng.uniform(0.4, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            left_behind += _lease_pid(store) == proc.pid
        else:
            assert proc.returncode == 0, proc.stderr.read().decode()
            break  # the run finished before we could kill it
    assert kills >= 5, f"only {kills} kills landed (uninterrupted run took {duration:.1f}s)"
    done = subprocess.run(_cmd(store, series, "--resume"), env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr

    ref_results, ref_completions = _snapshot(ref_store)
    results, completions = _snapshot(store)
    assert len(ref_results) == 3 * 40
    assert results == ref_results
    assert completions == ref_completions
    assert left_behind >= 1, "no kill landed while the run held its lease"
    assert _lease_pid(store) is None  # the last resume released it


def _wait_for_lease(store, proc):
    """Until `proc` holds the run's lease (or has ended); polled, not timed."""
    while proc.poll() is None and _lease_pid(store) != proc.pid:
        time.sleep(0.02)


def _lease_pid(store):
    """The pid holding the run's lease, if any (without creating the file if it is missing)."""
    try:
        con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
        row = con.execute("SELECT pid FROM leases").fetchone()
        con.close()
    except sqlite3.Error:  # killed before the store (or its tables) existed
        row = None
    return row[0] if row else None
