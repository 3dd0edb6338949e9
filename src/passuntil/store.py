"""The run store: SQLite in WAL mode, schema versioned by small migration functions.

One file holds any number of runs. Per (run, model, task, instance) it keeps the counted
samples, passes, indices of the passing samples, overshoot, stopping outcome, the sample
stream's seed, and the distinct completion texts with their counts (capped per instance).
Each engine round is written in one transaction holding absolute totals, so a kill at any
moment loses at most the round in flight and never counts a sample twice; resuming reloads
exactly the committed state.

Every run records its resolved configuration, the package version and the git commit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from passuntil import __version__
from passuntil.engine import InstanceState, RoundUpdate
from passuntil.errors import UserError

APPLICATION_ID = 0x50415353  # "PASS": marks a SQLite file as a passuntil store


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


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_m1_initial, _m2_reference_scores]


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
        if self.path.exists() and self.path.is_dir():
            raise UserError(f"{self.path} is a directory, not a run store")
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            app_id = self.db.execute("PRAGMA application_id").fetchone()[0]
            if not fresh and app_id != APPLICATION_ID:
                raise UserError(f"{self.path} is a SQLite file but not a passuntil run store")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as err:
            raise UserError(f"{self.path} is not a readable run store ({err})") from None

    def _migrate(self) -> None:
        db = self.db
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT)")
        done = db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
        if done > len(MIGRATIONS):
            raise UserError(f"{self.path} was written by a newer passuntil (schema {done}); upgrade passuntil")
        for version in range(done + 1, len(MIGRATIONS) + 1):
            db.execute("BEGIN IMMEDIATE")
            MIGRATIONS[version - 1](db)
            db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, _now()))
            db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # runs ---------------------------------------------------------------------------------

    def create_run(self, run_id: str, config: dict, models: Iterable[dict]) -> None:
        """Record a new run with its resolved config and its models (name, n_params, ...)."""
        if self.run_exists(run_id):
            raise UserError(f"run {run_id!r} already exists in {self.path}; use --resume to continue it")
        with self._tx():
            self.db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
                            (run_id, _now(), json.dumps(config, sort_keys=True), __version__, git_commit()))
            self.db.executemany("INSERT INTO models VALUES (?, ?, ?, ?)",
                                [(run_id, m["name"], float(m["n_params"]), json.dumps(m, sort_keys=True))
                                 for m in models])

    def run_exists(self, run_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone() is not None

    def run_config(self, run_id: str) -> dict:
        row = self.db.execute("SELECT config_json FROM runs WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            raise UserError(f"no run {run_id!r} in {self.path} (runs: {', '.join(self.runs()) or 'none'})")
        return json.loads(row[0])

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

    # engine state ---------------------------------------------------------------------------

    def load_states(self, run_id: str, model: str, states: list[InstanceState]) -> None:
        """Overwrite fresh `states` with whatever the store holds for them."""
        by_key = {st.key: st for st in states}
        for task, iid, seed, samples, passes, idx, overshoot, overflow, stopped in self.db.execute(
                "SELECT task, instance_id, seed, samples, passes, pass_indices, overshoot, overflow, stopped "
                "FROM results WHERE run_id=? AND model=?", (run_id, model)):
            st = by_key.get((task, iid))
            if st is None:
                continue
            if st.seed != seed:
                raise UserError(f"stored seed for {task}/{iid} differs from this run's: not the same run")
            st.samples, st.passes, st.pass_indices = samples, passes, json.loads(idx)
            st.overshoot, st.overflow, st.stopped = overshoot, overflow, stopped
        for task, iid, text, count, passed in self.db.execute(
                "SELECT task, instance_id, text, count, passed FROM completions WHERE run_id=? AND model=?",
                (run_id, model)):
            st = by_key.get((task, iid))
            if st is not None:
                st.completions[text] = count
                st.verdicts[text] = bool(passed)

    def commit_round(self, run_id: str, model: str, updates: list[RoundUpdate]) -> None:
        """Write one engine round: new totals and completion-count deltas, atomically."""
        now = _now()
        with self._tx():
            self.db.executemany(
                "INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                "samples=excluded.samples, passes=excluded.passes, pass_indices=excluded.pass_indices, "
                "overshoot=excluded.overshoot, overflow=excluded.overflow, stopped=excluded.stopped, "
                "updated_at=excluded.updated_at",
                [(run_id, model, u.state.task, u.state.instance.id, u.state.seed, u.state.samples,
                  u.state.passes, json.dumps(u.state.pass_indices), u.state.overshoot, u.state.overflow,
                  u.state.stopped, now) for u in updates])
            self.db.executemany(
                "INSERT INTO completions VALUES (?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                "count = count + excluded.count",
                [(run_id, model, u.state.task, u.state.instance.id, text, n, int(u.state.verdicts[text]))
                 for u in updates for text, n in u.new_completions.items()])

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
        self.db.execute("BEGIN IMMEDIATE")
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
