"""One writer per run, and counts no interleaving can double: the run lease, race-free store
creation, and round deltas applied by compare-and-set (a replayed round adds nothing)."""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing as mp
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from passuntil import lease as lease_mod
from passuntil import store as store_mod
from passuntil.engine import EngineConfig, new_states, run_passuntil
from passuntil.errors import UserError
from passuntil.store import RoundDelta, Store
from tests.conftest import make_sampler

PASSUNTIL = str(Path(sys.executable).with_name("passuntil"))
CFG = EngineConfig(k_target=2, max_samples=3000, batch_size=64, seed=7)


def _make_run(store, run_id="r1"):
    store.create_run(run_id, {"engine": CFG.to_dict()}, [{"name": "m", "n_params": 1e6}])


def _table(store_path):
    con = sqlite3.connect(store_path)
    results = con.execute("SELECT model, task, instance_id, samples, passes, pass_indices, overflow, "
                          "stopped FROM results ORDER BY 1, 2, 3").fetchall()  # (overshoot depends on rounds)
    comps = con.execute("SELECT model, task, instance_id, text, count, passed FROM completions "
                        "ORDER BY 1, 2, 3, 4").fetchall()
    con.close()
    return results, comps


def _recording(store, log):
    """A commit that writes each round and keeps a copy of it (to replay later)."""
    def commit(updates):
        log.append(copy.deepcopy(updates))
        store.commit_round("r1", "m", updates)
    return commit


# counting -------------------------------------------------------------------------------------

def test_replaying_committed_rounds_changes_no_count(tmp_path, toy_task):
    path = tmp_path / "s.sqlite"
    writer = Store(path)
    _make_run(writer)
    rounds = []
    run_passuntil(make_sampler(toy_task), [toy_task], CFG, model="m", commit=_recording(writer, rounds))
    before = _table(path)
    assert len(rounds) > 5 and sum(r[3] for r in before[0]) > 1000
    for updates in rounds:  # the same writer commits every round again
        writer.commit_round("r1", "m", updates)
    second = Store(path)  # a second writer that saw the run from its start replays it all
    for updates in rounds:
        second.commit_round("r1", "m", updates)
    assert _table(path) == before
    results, comps = before
    for _, _, iid, samples, *_rest, overflow, _stopped in results:  # each sample counted once
        assert sum(c[4] for c in comps if c[2] == iid) + overflow == samples


def test_two_writers_running_one_run_at_once_count_each_sample_once(tmp_path, toy_task):
    """The issue's double submit, without the lease: both run the engine from the same state."""
    ref = Store(tmp_path / "ref.sqlite")
    _make_run(ref)
    run_passuntil(make_sampler(toy_task), [toy_task], CFG, model="m",
                  commit=lambda u: ref.commit_round("r1", "m", u))
    path = tmp_path / "two.sqlite"
    _make_run(Store(path))
    errors = []

    def sample():
        try:
            store = Store(path)
            states = new_states([toy_task], model="m", seed=CFG.seed)
            store.load_states("r1", "m", states)
            run_passuntil(make_sampler(toy_task), [toy_task], CFG, model="m", states=states,
                          commit=lambda u: store.commit_round("r1", "m", u))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=sample) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Without the lease the two writers' rounds need not line up (checks are pipelined), so a
    # writer may be refused; what must hold is that nothing is ever counted twice: a refusal is
    # the clear one, and the store is either the uninterrupted run or a consistent prefix of it.
    assert all(isinstance(e, UserError) and "nothing was counted twice" in str(e) for e in errors)
    results, comps = _table(path)
    ref_results, _ = _table(tmp_path / "ref.sqlite")
    if not errors:
        assert (results, comps) == _table(tmp_path / "ref.sqlite")
    ref = {r[2]: r for r in ref_results}
    for _, _, iid, samples, passes, _indices, overflow, _stopped in results:
        assert sum(c[4] for c in comps if c[2] == iid) + overflow == samples
        assert samples <= ref[iid][3] and passes <= ref[iid][4]


def test_a_round_that_overlaps_stored_counts_is_refused_and_writes_nothing(store):
    _make_run(store)
    first = RoundDelta("toy", "i0", 5, 0, 10, 1, (3,), 0, 0, None, (("a", 9, False), ("WORD0", 1, True)))
    store.commit_deltas("r1", "m", [first])
    before = _table(store.path)
    stale = RoundDelta("toy", "i0", 5, 0, 20, 2, (3, 15), 0, 0, "k_passes", (("a", 18, False),))
    with pytest.raises(UserError, match=r"written by another process .* 10 samples stored, this process "
                                        r"expected 0\); nothing was counted twice"):
        store.commit_deltas("r1", "m", [stale])
    assert _table(store.path) == before
    store.commit_deltas("r1", "m", [first])  # a replay of the stored round: nothing changes
    assert _table(store.path) == before
    nxt = RoundDelta("toy", "i0", 5, 10, 6, 1, (14,), 2, 0, "k_passes", (("a", 5, False), ("WORD0", 1, True)))
    store.commit_deltas("r1", "m", [nxt])
    (row,), comps = _table(store.path)
    assert row == ("m", "toy", "i0", 16, 2, "[3, 14]", 0, "k_passes")
    assert store.db.execute("SELECT overshoot FROM results").fetchone() == (2,)
    assert [(c[3], c[4]) for c in comps] == [("WORD0", 2), ("a", 14)]


def test_an_older_store_is_migrated_and_resumes(tmp_path, toy_task):
    """A store of schema 2 (before leases): its counts read as before and the run continues."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA application_id={store_mod.APPLICATION_ID}")
    db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
    for version, migrate in enumerate(store_mod.MIGRATIONS[:2], 1):
        migrate(db)
        db.execute("INSERT INTO schema_migrations VALUES (?, 'then')", (version,))
    db.close()
    ref = Store(tmp_path / "ref.sqlite")
    _make_run(ref)
    run_passuntil(make_sampler(toy_task), [toy_task], CFG, model="m",
                  commit=lambda u: ref.commit_round("r1", "m", u))
    # the old store holds the first three rounds, written as the old code wrote them (totals)
    old = Store(tmp_path / "partial.sqlite")
    _make_run(old)
    rounds = []
    with pytest.raises(KeyboardInterrupt):
        run_passuntil(make_sampler(toy_task), [toy_task], CFG, model="m",
                      commit=lambda u: (old.commit_round("r1", "m", u), rounds.append(1),
                                        len(rounds) == 3 and _interrupt()))
    db = sqlite3.connect(path)
    for table in ("runs", "models", "results", "completions"):
        rows = old.db.execute(f"SELECT * FROM {table}").fetchall()
        db.executemany(f"INSERT INTO {table} VALUES ({','.join('?' * len(rows[0]))})", rows)
    db.commit()
    db.close()
    store = Store(path)
    assert [r[0] for r in store.db.execute("SELECT version FROM schema_migrations")] == [1, 2, 3]
    states = new_states([toy_task], model="m", seed=CFG.seed)
    store.load_states("r1", "m", states)
    assert 0 < sum(st.samples for st in states) < ref.results("r1")["samples"].sum()
    with store.lease("r1"):
        run_passuntil(make_sampler(toy_task), [toy_task], CFG, model="m", states=states,
                      commit=lambda u: store.commit_round("r1", "m", u))
    assert _table(path) == _table(tmp_path / "ref.sqlite")


def _interrupt():
    raise KeyboardInterrupt


# one writer per run ---------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "s.sqlite"
    first = Store(path)
    _make_run(first)
    second = Store(path)
    with first.lease("r1") as held:
        assert held.pid == os.getpid() and held.host == socket.gethostname()
        holder = re.escape(f"pid {os.getpid()} on host {socket.gethostname()} since {held.since}")
        with pytest.raises(UserError, match=rf"run 'r1' in .* is being sampled by {holder}"), \
                second.lease("r1"):
            pass
        delta = RoundDelta("toy", "i0", 5, 0, 3, 0, (), 0, 0, None, (("a", 3, False),))
        with pytest.raises(UserError, match="is being sampled by"):
            second.commit_deltas("r1", "m", [delta])  # nor can it write without the lease
        first.commit_deltas("r1", "m", [delta])
    assert second.lease_holder("r1") is None
    with second.lease("r1"):  # released: the next writer takes it
        pass


def test_the_lease_is_released_when_sampling_fails(store):
    _make_run(store)
    with pytest.raises(RuntimeError, match="sampler died"), store.lease("r1"):
        raise RuntimeError("sampler died")
    assert store.lease_holder("r1") is None


def _holder(path, enter):
    """Another process that runs `enter` on the store at `path` and waits: (process, its pid)."""
    code = ("import sys; from passuntil.store import Store; s = Store(sys.argv[1]); "
            f"held = {enter}; print(flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    return proc, proc.pid


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_dead_holders_lease_is_taken_over(tmp_path):
    """kill -9 of the holder leaves its row; the next writer finds the pid gone and takes over."""
    path = tmp_path / "s.sqlite"
    store = Store(path)
    _make_run(store)
    store.close()  # (drops the creator's "starting" mark)
    store = Store(path)
    holder, pid = _holder(path, "s.lease('r1'); held.__enter__()")
    with pytest.raises(UserError, match=f"is being sampled by pid {pid} on host"), store.lease("r1"):
        pass
    _kill(holder)
    assert store.lease_holder("r1").pid == pid  # left behind by the kill ...
    with store.lease("r1") as mine:  # ... and taken over
        assert mine.pid == os.getpid()


def test_a_run_being_started_elsewhere_is_neither_taken_nor_discarded(tmp_path):
    """Between recording a run and sampling it, its creator holds it: a process starting the
    same run name must not take it, nor discard it as a run that never started."""
    path = tmp_path / "s.sqlite"
    creator, pid = _holder(path, "s.create_run('r1', {}, [{'name': 'm', 'n_params': 1}])")
    store = Store(path)
    with pytest.raises(UserError, match=f"'r1' already exists in .* and is being started by pid {pid} "):
        store.delete_run("r1")
    with pytest.raises(UserError, match=f"is being started by pid {pid} "), store.lease("r1"):
        pass
    _kill(creator)  # the creator died before sampling: the empty run no longer blocks its name
    store.delete_run("r1")
    assert store.runs() == [] and store.lease_holder("r1") is None
    _make_run(store)
    store.commit_deltas("r1", "m", [RoundDelta("toy", "i0", 5, 0, 3, 0, (), 0, 0, None, ())])
    with pytest.raises(UserError, match="already exists .* pass --resume to continue it"):
        store.delete_run("r1")  # a run with counts is only ever continued


def _plant(store, **row):
    """Put a lease row of someone else into the store."""
    me = lease_mod.this_process("r1")
    values = {**dataclasses.asdict(me), **row}
    store.db.execute(f"INSERT OR REPLACE INTO leases ({', '.join(values)}) "
                     f"VALUES ({', '.join('?' * len(values))})", tuple(values.values()))


def test_staleness_by_pid_here_and_by_heartbeat_elsewhere(store):
    _make_run(store)
    _plant(store, pid_started="1")  # our own pid, but started at another time: a reused pid
    with store.lease("r1"):
        pass
    _plant(store, host="gpu-node-7", boot_id="other-boot", heartbeat=time.time())
    with pytest.raises(UserError, match="sampled by pid .* on host gpu-node-7"), store.lease("r1"):
        pass
    _plant(store, host="gpu-node-7", boot_id="other-boot",
           heartbeat=time.time() - lease_mod.STALE_AFTER_S - 1)
    with store.lease("r1") as mine:
        assert mine.host == socket.gethostname()


def test_a_writer_that_lost_its_lease_cannot_commit(tmp_path):
    path = tmp_path / "s.sqlite"
    slow = Store(path)
    _make_run(slow)
    delta = RoundDelta("toy", "i0", 5, 0, 3, 0, (), 0, 0, None, (("a", 3, False),))
    with slow.lease("r1"):
        # its heartbeat stopped long enough for a process elsewhere to presume it dead
        slow.db.execute("UPDATE leases SET host='elsewhere', heartbeat=0")
        other = Store(path)
        with other.lease("r1"), pytest.raises(UserError, match="this process lost its lease on run 'r1'"):
            slow.commit_deltas("r1", "m", [delta])
    assert _table(path) == ([], [])


def test_the_heartbeat_is_refreshed(store, monkeypatch):
    _make_run(store)
    monkeypatch.setattr(lease_mod, "HEARTBEAT_S", 0.01)
    with store.lease("r1") as held:
        deadline = time.monotonic() + 30
        while store.lease_holder("r1").heartbeat == held.heartbeat and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.lease_holder("r1").heartbeat > held.heartbeat


# creating a store under concurrent starts ---------------------------------------------------------

def _start(path, barrier, out):
    """One of many processes: open the new store, create run 'r', then ask for its lease."""
    try:
        barrier.wait()
        store = Store(path)
        try:
            store.create_run("r", {"engine": {}}, [{"name": "m", "n_params": 1}])
            made = "created"
        except UserError as err:
            made = f"user error: {err}"
        barrier.wait()
        try:
            with store.lease("r"):
                barrier.wait()  # everyone asks while the winner holds it
                leased = "leased"
        except UserError as err:
            barrier.wait()
            leased = f"user error: {err}"
        out.put((made, leased))
    except BaseException as err:  # noqa: BLE001 - a traceback is what this test counts
        barrier.abort()  # the others fail at once, not after the barrier's timeout
        out.put((f"TRACEBACK {type(err).__name__}: {err}", ""))


def _open(path, barrier, out):
    try:
        barrier.wait()
        Store(path).close()
        out.put("opened")
    except BaseException as err:  # noqa: BLE001 - what went wrong is what this test reports
        out.put(f"{type(err).__name__}: {err}")


def test_thirty_processes_opening_a_new_store_are_never_told_it_is_locked(tmp_path):
    """SQLite answers a journal-mode switch racing another opener with "database is locked"
    without waiting (before the fix: 6 of 40 rounds of 30 openers, as 'not a readable run store')."""
    ctx = mp.get_context("fork")
    for trial in range(15):
        path = tmp_path / f"open{trial}.sqlite"
        barrier, out = ctx.Barrier(30, timeout=60), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(path, barrier, out)) for _ in range(30)]
        for p in procs:
            p.start()
        got = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
        assert got == ["opened"] * 30, (trial, [g for g in got if g != "opened"][:3])


def test_thirty_processes_creating_one_store_and_run_at_once(tmp_path):
    ctx = mp.get_context("fork")
    for trial in range(3):
        path = tmp_path / f"new{trial}.sqlite"
        barrier, out = ctx.Barrier(30, timeout=60), ctx.Queue()
        procs = [ctx.Process(target=_start, args=(path, barrier, out)) for _ in range(30)]
        for p in procs:
            p.start()
        got = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join()
        made = sorted(m for m, _ in got)
        assert made.count("created") == 1, made
        assert all(m.startswith("user error: run 'r' already exists") for m in made if m != "created"), made
        leased = [x for _, x in got]
        assert leased.count("leased") == 1, leased
        assert all(re.search("is being (started|sampled) by pid", x) for x in leased if x != "leased"), leased


# through the command line -----------------------------------------------------------------------

SLOW_SERIES = """name = "slow-sim"
[[models]]
name = "0.03B"
n_params = 3.6e7
options = { latency_s = 0.01 }
[[models]]
name = "0.1B"
n_params = 1.09e8
options = { latency_s = 0.01 }
"""
FRESH = ["--task", "sim-scaling", "--k", "2", "--max-samples", "3000", "--batch-size", "64", "--seed", "5"]


def _eval(store, *args, **kw):
    return subprocess.Popen([PASSUNTIL, "eval", "--store", str(store), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_lease(path, proc):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            row = con.execute("SELECT pid FROM leases").fetchone()
            rounds = con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            con.close()
        except sqlite3.Error:
            row = None
        if row and row[0] == proc.pid and rounds:
            return row[0]
        time.sleep(0.05)
    raise AssertionError(f"no lease taken (exit {proc.poll()}: {proc.stderr.read() if proc.stderr else ''})")


@pytest.mark.slow
def test_second_resume_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    """A run killed (-9) while sampling; a --resume takes its lease over; a second --resume at the
    same time exits 2 with one line naming the first; killed too, a last --resume ends the run
    with exactly the store of an uninterrupted run."""
    series = tmp_path / "series.toml"
    series.write_text(SLOW_SERIES)
    ref = tmp_path / "ref.sqlite"
    done = _eval(ref, "--series", str(series), *FRESH)
    assert done.wait(timeout=300) == 0, done.stderr.read()

    path = tmp_path / "runs.sqlite"
    started = _eval(path, "--series", str(series), *FRESH)
    assert _wait_for_lease(path, started) == started.pid
    _kill(started)
    first = _eval(path, "--resume")
    assert _wait_for_lease(path, first) == first.pid  # took the dead holder's lease over
    second = _eval(path, "--resume")
    assert second.wait(timeout=120) == 2
    err = second.stderr.read().splitlines()
    holder = re.escape(f"is being sampled by pid {first.pid} on host {socket.gethostname()} since ")
    assert len(err) == 1 and re.match(rf"error: run 'main' in \S+ {holder}\S+ \(one writer per run\)", err[0]), err
    _kill(first)
    resumed = _eval(path, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert _table(path) == _table(ref)
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0


@pytest.mark.slow
def test_thirty_fresh_starts_on_a_new_store(tmp_path):
    """30 `passuntil eval` at once on a new store, two per run name: one of each pair runs,
    the other says the run exists; no traceback, no false "not a store"."""
    path = tmp_path / "new.sqlite"
    args = ["--series", "sim", "--task", "sim-scaling", "--model", "0.03B", "--k", "1",
            "--max-samples", "100", "--seed", "3"]
    procs = [_eval(path, "--run", f"r{i // 2}", *args) for i in range(30)]
    codes = [p.wait(timeout=600) for p in procs]
    errs = [p.stderr.read() for p in procs]
    assert not [e for e in errs if "Traceback" in e]
    assert sorted(codes) == [0] * 15 + [2] * 15, list(zip(codes, errs))
    for code, err in zip(codes, errs):
        if code == 2:
            assert len(err.splitlines()) == 1 and "already exists" in err, err
    store = Store(path)
    assert sorted(store.runs()) == sorted(f"r{i}" for i in range(15))
    tables = {r: store.results(r).drop(columns="run_id").to_csv() for r in store.runs()}
    assert len(set(tables.values())) == 1  # the same seed: the same counts, no cross-talk
