"""The run store: SQLite in WAL mode, schema versioned by small migration functions.

One file holds any number of runs. Per (run, model, task, instance) it keeps the counted
samples, passes, indices of the passing samples, overshoot, stopping outcome, the sample
stream's seed, and the distinct completion texts with their counts (capped per instance).

Counting is safe against crashes and against a second writer:
- each engine round reaches the store as an immutable delta (`RoundDelta`: what the round added
  to one instance, from its first sample index), applied only if the stored count still equals
  that index (compare-and-set, inside one `BEGIN IMMEDIATE` transaction). A round the store
  already counts (a replay) is a no-op; a writer whose view of the run is out of date gets a
  `UserError` and writes nothing. So no interleaving counts a sample or a completion twice, and
  a kill at any moment loses at most the round in flight. Only the totals are kept: a ledger of
  rounds would grow with rounds x instances (one row per instance per round).
- a process samples a run only while holding its lease (`with store.lease(run_id):`, see
  `passuntil.lease`); a second writer is refused with one line naming the holder.
- creating a store is one transaction, so processes opening a new path at once all see either
  nothing or a whole store.

Every run records its resolved configuration, the package version and the git commit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from passuntil import __version__
from passuntil import lease as lease_mod
from passuntil.errors import UserError
from passuntil.lease import Lease

if TYPE_CHECKING:
    from passuntil.engine import InstanceState, RoundUpdate

APPLICATION_ID = 0x50415353  # "PASS": marks a SQLite file as a passuntil store
BUSY_TIMEOUT_S = 60.0  # how long a connection waits for another process's write


def _m1_initial(db: sqlite3.Connection) -> None:
    _run_script(db, """
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            config_json TEXT NOT NULL,
            package_version TEXT NOT NULL,
            git_commit TEXT
        );
        CREATE TABLE models (
            run_id TEXT NOT NULL REFERENCES runs(run_id),
            model TEXT NOT NULL,
            n_params REAL NOT NULL,
            spec_json TEXT NOT NULL,
            PRIMARY KEY (run_id, model)
        );
        CREATE TABLE results (
            run_id TEXT NOT NULL,
            model TEXT NOT NULL,
            task TEXT NOT NULL,
            instance_id TEXT NOT NULL,
            seed INTEGER NOT NULL,
            samples INTEGER NOT NULL,
            passes INTEGER NOT NULL,
            pass_indices TEXT NOT NULL,
            overshoot INTEGER NOT NULL,
            overflow INTEGER NOT NULL,
            stopped TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (run_id, model, task, instance_id),
            FOREIGN KEY (run_id, model) REFERENCES models(run_id, model)
        );
        CREATE TABLE completions (
            run_id TEXT NOT NULL,
            model TEXT NOT NULL,
            task TEXT NOT NULL,
            instance_id TEXT NOT NULL,
            text TEXT NOT NULL,
            count INTEGER NOT NULL,
            passed INTEGER NOT NULL,
            PRIMARY KEY (run_id, model, task, instance_id, text)
        );
    """)


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Execute ;-separated DDL inside the caller's transaction (executescript would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _m2_reference_scores(db: sqlite3.Connection) -> None:
    _run_script(db, """
        CREATE TABLE reference_scores (
            run_id TEXT NOT NULL,
            model TEXT NOT NULL,
            task TEXT NOT NULL,
            instance_id TEXT NOT NULL,
            ref_logprob REAL NOT NULL,
            ref_tokens INTEGER NOT NULL,
            exact_p REAL,
            PRIMARY KEY (run_id, model, task, instance_id)
        )
    """)


def _m3_leases(db: sqlite3.Connection) -> None:
    """Run leases: one writer per run (see `passuntil.lease`)."""
    db.execute(lease_mod.LEASES_TABLE)


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _m1_initial, _m2_reference_scores, _m3_leases]


@dataclass(frozen=True)
class RoundDelta:
    """What one engine round added for one instance; `first_sample` is the count before it."""

    task: str
    instance_id: str
    seed: int
    first_sample: int
    samples: int  # counted in this round
    passes: int
    pass_indices: tuple[int, ...]  # absolute indices of this round's passes
    overshoot: int
    overflow: int
    stopped: str | None
    completions: tuple[tuple[str, int, bool], ...]  # (text, count added, passed)

    @property
    def end(self) -> int:
        return self.first_sample + self.samples


@dataclass(frozen=True)
class InstanceCounts:
    """What the store holds for one instance of one model: plain counts."""

    task: str
    instance_id: str
    seed: int
    samples: int
    passes: int
    pass_indices: tuple[int, ...]
    overshoot: int
    overflow: int
    stopped: str | None
    completions: tuple[tuple[str, int, bool], ...]  # (text, count, passed)


_ZERO = (0, 0, 0, 0, 0)  # samples, passes, len(pass_indices), overshoot, overflow


def git_commit() -> str | None:
    """The commit of the source tree passuntil runs from, if it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class Store:
    """A passuntil run store at `path` (created on first use)."""

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise UserError(f"no run store at {self.path}")
        if self.path.is_dir():
            raise UserError(f"{self.path} is a directory, not a run store")
        self._tallies: dict[tuple[str, str, str, str], tuple[int, ...]] = {}  # this writer's view
        self._leases: dict[str, str] = {}  # run -> token of the lease this object holds
        self._reserved: dict[str, str] = {}  # run -> token of the "starting" row of a run it created
        try:
            self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self._refuse_foreign()
            self._enter_wal()
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as err:
            raise UserError(f"{self.path} is not a readable run store ({err})") from None

    def _enter_wal(self) -> None:
        """Switch to WAL, retrying while another process holds the file. SQLite answers a
        journal-mode change racing another opener with "database is locked" at once, without
        calling the busy handler (30 processes opening a new store hit it in 1 of 7 tries)."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) and "busy" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))

    def _refuse_foreign(self) -> None:
        """A file is ours (our application id), or empty (never initialised, or being
        initialised by another process: that is one transaction, not visible until whole)."""
        app_id, tables = self.db.execute(  # one statement: one snapshot of the file
            "SELECT (SELECT * FROM pragma_application_id), (SELECT COUNT(*) FROM sqlite_master)").fetchone()
        if app_id != APPLICATION_ID and (app_id != 0 or tables):
            raise UserError(f"{self.path} is a SQLite file but not a passuntil run store")

    def _schema_version(self) -> int:
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name='schema_migrations'").fetchone():
            return 0
        return self.db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]

    def _migrate(self) -> None:
        """Bring the schema up to date in one IMMEDIATE transaction (re-read inside it, since
        another process may have migrated meanwhile); an up-to-date store is not written."""
        if self._schema_version() == len(MIGRATIONS):
            return
        with self._tx():
            self._refuse_foreign()
            done = self._schema_version()
            if done > len(MIGRATIONS):
                raise UserError(f"{self.path} was written by a newer passuntil (schema {done}); "
                                "upgrade passuntil")
            if done < len(MIGRATIONS):
                self.db.execute(f"PRAGMA application_id={APPLICATION_ID}")
                self.db.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                                "(version INTEGER PRIMARY KEY, applied_at TEXT)")
            for version in range(done + 1, len(MIGRATIONS) + 1):
                MIGRATIONS[version - 1](self.db)
                self.db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, _now()))

    def close(self) -> None:
        """Close the file, first dropping the "starting" marks of runs this object created but
        never sampled (a run whose creator is gone is free for others anyway)."""
        with contextlib.suppress(sqlite3.Error):
            for run_id, token in self._reserved.items():
                self.db.execute("DELETE FROM leases WHERE run_id=? AND token=?", (run_id, token))
        self.db.close()

    # runs ---------------------------------------------------------------------------------

    def create_run(self, run_id: str, config: dict, models: Iterable[dict]) -> None:
        """Record a new run with its resolved config and its models (name, n_params, ...).
        Of several processes creating the same run at once exactly one succeeds; the run is
        marked as being started by this process until its `lease` is taken here."""
        row = (run_id, _now(), json.dumps(config, sort_keys=True), __version__, git_commit())
        specs = [(run_id, m["name"], float(m["n_params"]), json.dumps(m, sort_keys=True)) for m in models]
        with self._tx():
            if self.run_exists(run_id):
                raise UserError(f"run {run_id!r} already exists in {self.path}; use --resume to continue it")
            self.db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?)", row)
            self.db.executemany("INSERT INTO models VALUES (?, ?, ?, ?)", specs)
            self._reserved[run_id] = lease_mod.reserve(self.db, run_id).token

    def delete_run(self, run_id: str) -> None:
        """Forget a run that never counted anything (recorded, then failed to start), so that its
        name is free again. Refused while another process is starting or sampling it, and for a
        run with results (those are only continued, with --resume)."""
        with self._tx():
            if not self.run_exists(run_id):
                return
            held = lease_mod.current(self.db, run_id)
            if lease_mod.blocks(held):
                raise UserError(f"run {run_id!r} already exists in {self.path} and is {held.describe()}; "
                                "pass --resume once it stops, or --run NAME for a new one")
            for table in ("results", "reference_scores"):
                if self.db.execute(f"SELECT 1 FROM {table} WHERE run_id=? LIMIT 1", (run_id,)).fetchone():
                    raise UserError(f"run {run_id!r} already exists in {self.path}; pass --resume to "
                                    "continue it or --run NAME for a new one")
            for table in ("completions", "leases", "models", "runs"):
                self.db.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))

    def run_exists(self, run_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone() is not None

    def run_config(self, run_id: str) -> dict:
        row = self.db.execute("SELECT config_json FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise UserError(f"no run {run_id!r} in {self.path} (runs: {', '.join(self.runs()) or 'none'})")
        try:
            config = json.loads(row[0])
        except (TypeError, ValueError):
            config = None
        if not isinstance(config, dict) or not isinstance(config.get("engine"), dict):
            raise UserError(f"{self.path}: the stored configuration of run {run_id!r} is not "
                            "readable (a damaged store)")
        return config

    def runs(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT run_id FROM runs ORDER BY created_at, run_id")]

    def run_info(self, run_id: str) -> dict:
        row = self.db.execute("SELECT run_id, created_at, config_json, package_version, git_commit "
                              "FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise UserError(f"no run {run_id!r} in {self.path}")
        return {"run_id": row[0], "created_at": row[1], "config": json.loads(row[2]),
                "package_version": row[3], "git_commit": row[4]}

    def models(self, run_id: str) -> list[dict]:
        return [json.loads(r[0]) for r in self.db.execute(
            "SELECT spec_json FROM models WHERE run_id=? ORDER BY n_params, model", (run_id,))]

    # one writer per run -------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, run_id: str) -> Iterator[Lease]:
        """Hold the run's lease while sampling it: a second writer gets a `UserError` naming the
        holder; a stale lease (its holder gone) is taken over. Released on exit, also on errors."""
        with self._tx():
            if not self.run_exists(run_id):
                raise UserError(f"no run {run_id!r} in {self.path}")
            held = lease_mod.acquire(self.db, run_id, self.path)
        self._leases[run_id] = held.token
        self._reserved.pop(run_id, None)
        beat = lease_mod.Heartbeat(self.path, held)
        try:
            yield held
        finally:
            beat.stop()
            self._leases.pop(run_id, None)
            with contextlib.suppress(sqlite3.Error, UserError):  # if this fails, the row goes stale
                self.db.execute("DELETE FROM leases WHERE run_id=? AND token=?", (run_id, held.token))

    def lease_holder(self, run_id: str) -> Lease | None:
        """The lease on a run, if any (possibly stale: see `Lease.is_stale`)."""
        return lease_mod.current(self.db, run_id)

    def _check_writer(self, run_id: str) -> None:
        """Inside a write: this object must still hold the run's lease if it took one, and
        must not write a run another live process holds."""
        held = lease_mod.current(self.db, run_id)
        token = self._leases.get(run_id)
        if token is not None and (held is None or held.token != token):
            who = f"now {held.describe()}" if held else "released"
            raise UserError(f"this process lost its lease on run {run_id!r} in {self.path} ({who}); "
                            "nothing was counted twice: run `passuntil eval --resume` again")
        if token is None and lease_mod.blocks(held):
            raise UserError(lease_mod.held_message(held, self.path))

    # engine state ---------------------------------------------------------------------------

    def counts(self, run_id: str, model: str) -> dict[tuple[str, str], InstanceCounts]:
        """Everything stored for a model of a run, per (task, instance id). Also sets this
        writer's view of the run, from which `commit_round` measures each round's delta."""
        self._tallies = {k: v for k, v in self._tallies.items() if k[:2] != (run_id, model)}
        texts: dict[tuple[str, str], list[tuple[str, int, bool]]] = {}
        for task, iid, text, count, passed in self.db.execute(
                "SELECT task, instance_id, text, count, passed FROM completions WHERE run_id=? AND model=? "
                "ORDER BY task, instance_id, text", (run_id, model)):
            texts.setdefault((task, iid), []).append((text, count, bool(passed)))
        out = {}
        for task, iid, seed, samples, passes, idx, overshoot, overflow, stopped in self.db.execute(
                "SELECT task, instance_id, seed, samples, passes, pass_indices, overshoot, overflow, stopped "
                "FROM results WHERE run_id=? AND model=?", (run_id, model)):
            indices = tuple(json.loads(idx))
            out[task, iid] = InstanceCounts(task, iid, seed, samples, passes, indices, overshoot, overflow,
                                            stopped, tuple(texts.get((task, iid), ())))
            self._tallies[run_id, model, task, iid] = (samples, passes, len(indices), overshoot, overflow)
        return out

    def load_states(self, run_id: str, model: str, states: list[InstanceState]) -> None:
        """Overwrite fresh engine `states` with the stored counts (the engine's resume door)."""
        stored = self.counts(run_id, model)
        for st in states:
            c = stored.get(st.key)
            if c is None:
                continue
            if st.seed != c.seed:
                raise UserError(f"stored seed for {c.task}/{c.instance_id} differs from this run's: "
                                "not the same run")
            st.samples, st.passes, st.pass_indices = c.samples, c.passes, list(c.pass_indices)
            st.overshoot, st.overflow, st.stopped = c.overshoot, c.overflow, c.stopped
            st.completions = {text: n for text, n, _ in c.completions}
            st.verdicts = {text: ok for text, _, ok in c.completions}

    def commit_round(self, run_id: str, model: str, updates: list[RoundUpdate]) -> None:
        """Write one engine round atomically, as one immutable delta per instance measured
        against what this writer last loaded or committed (see `commit_deltas`)."""
        deltas = [self._delta(run_id, model, u) for u in updates]
        self.commit_deltas(run_id, model, deltas)

    def _delta(self, run_id: str, model: str, u: RoundUpdate) -> RoundDelta:
        st = u.state
        samples, passes, n_idx, overshoot, overflow = self._tallies.get(
            (run_id, model, st.task, st.instance.id), _ZERO)
        return RoundDelta(st.task, st.instance.id, st.seed, samples, st.samples - samples,
                          st.passes - passes, tuple(st.pass_indices[n_idx:]), st.overshoot - overshoot,
                          st.overflow - overflow, st.stopped,
                          tuple((text, n, bool(st.verdicts[text])) for text, n in u.new_completions.items()))

    def commit_deltas(self, run_id: str, model: str, deltas: Iterable[RoundDelta]) -> None:
        """Apply round deltas in one transaction. A delta applies only where the stored count
        equals its first sample (compare-and-set); one the store already holds (a replayed
        round) is skipped; any other is a second writer's and raises, writing nothing."""
        deltas = [d for d in deltas if d.samples > 0]
        now = _now()
        with self._tx():
            self._check_writer(run_id)
            pending: dict[tuple, tuple] = {}  # key -> the results row this call writes
            comps: list[tuple] = []
            for d in deltas:
                key = (run_id, model, d.task, d.instance_id)
                row = self._advance(key, d, pending.get(key), now)
                if row is not None:
                    pending[key] = row
                    comps.extend((*key, text, n, int(ok)) for text, n, ok in d.completions)
            self.db.executemany(
                "INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                "samples=excluded.samples, passes=excluded.passes, pass_indices=excluded.pass_indices, "
                "overshoot=excluded.overshoot, overflow=excluded.overflow, stopped=excluded.stopped, "
                "updated_at=excluded.updated_at", pending.values())
            self.db.executemany("INSERT INTO completions VALUES (?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                                "count = count + excluded.count", comps)
        for d in deltas:  # this writer's view now includes the rounds (also those skipped)
            key = (run_id, model, d.task, d.instance_id)
            samples, passes, n_idx, overshoot, overflow = self._tallies.get(key, _ZERO)
            if samples == d.first_sample:
                self._tallies[key] = (d.end, passes + d.passes, n_idx + len(d.pass_indices),
                                      overshoot + d.overshoot, overflow + d.overflow)

    def _advance(self, key: tuple, d: RoundDelta, pending: tuple | None, now: str) -> tuple | None:
        """The instance's new results row after delta `d` (compare-and-set against the stored
        row, or the row this call already wrote), None for a replay; raises for a stale writer."""
        row = pending[4:10] if pending else self.db.execute(
            "SELECT seed, samples, passes, pass_indices, overshoot, overflow FROM results "
            "WHERE run_id=? AND model=? AND task=? AND instance_id=?", key).fetchone()
        seed, stored, passes, idx, overshoot, overflow = row or (d.seed, 0, 0, "[]", 0, 0)
        if seed != d.seed:
            raise UserError(f"stored seed for {d.task}/{d.instance_id} differs from this run's: "
                            "not the same run")
        if stored >= d.end:
            return None  # the store already counts this round: a replay adds nothing
        if stored != d.first_sample:
            raise UserError(
                f"run {key[0]!r} in {self.path} was written by another process while this one "
                f"sampled it ({key[1]}/{d.task}/{d.instance_id}: {stored} samples stored, this "
                f"process expected {d.first_sample}); nothing was counted twice: stop the other "
                "writer and run `passuntil eval --resume`")
        return (*key, d.seed, d.end, passes + d.passes, json.dumps(json.loads(idx) + list(d.pass_indices)),
                overshoot + d.overshoot, overflow + d.overflow, d.stopped, now)

    def save_reference_scores(self, run_id: str, model: str, rows: list[tuple]) -> None:
        """rows: (task, instance_id, ref_logprob, ref_tokens, exact_p or None)."""
        with self._tx():
            self.db.executemany("INSERT OR REPLACE INTO reference_scores VALUES (?,?,?,?,?,?,?)",
                                [(run_id, model, *r) for r in rows])

    def has_reference_scores(self, run_id: str, model: str) -> bool:
        return self.db.execute("SELECT 1 FROM reference_scores WHERE run_id=? AND model=? LIMIT 1",
                               (run_id, model)).fetchone() is not None

    @contextlib.contextmanager
    def _tx(self):
        """One IMMEDIATE transaction: it takes the write lock first, waiting up to the busy timeout."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            raise UserError(f"{self.path} stayed locked by another process ({err}); try again") from None
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # reading ----------------------------------------------------------------------------------

    def results(self, run_id: str | None = None):
        """The tidy table: one row per run x model x task x instance (a pandas DataFrame)."""
        import pandas as pd

        query = ("SELECT r.run_id, r.model, m.n_params, r.task, r.instance_id, r.samples, r.passes, "
                 "r.pass_indices, r.overshoot, r.overflow, r.stopped, r.seed, "
                 "s.ref_logprob, s.ref_tokens, s.exact_p "
                 "FROM results r JOIN models m ON m.run_id = r.run_id AND m.model = r.model "
                 "LEFT JOIN reference_scores s ON s.run_id = r.run_id AND s.model = r.model "
                 "AND s.task = r.task AND s.instance_id = r.instance_id")
        params: tuple = ()
        if run_id is not None:
            self.run_config(run_id)
            query += " WHERE r.run_id = ?"
            params = (run_id,)
        query += " ORDER BY r.run_id, m.n_params, r.task, r.instance_id"
        return pd.read_sql_query(query, self.db, params=params)

    def instance_ids(self, run_id: str) -> dict[str, set[str]]:
        """The instance ids with stored results, per task name."""
        out: dict[str, set[str]] = {}
        for task, iid in self.db.execute("SELECT DISTINCT task, instance_id FROM results WHERE run_id=?",
                                         (run_id,)):
            out.setdefault(task, set()).add(iid)
        return out

    def completions(self, run_id: str):
        import pandas as pd

        return pd.read_sql_query(
            "SELECT model, task, instance_id, text, count, passed FROM completions WHERE run_id=? "
            "ORDER BY model, task, instance_id, count DESC", self.db, params=(run_id,))
