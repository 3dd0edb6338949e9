"""One writer per run: the lease a process holds in the run store while it samples a run.

A lease is a row of the store's `leases` table naming its holder (host, boot, pid and the
pid's start time, so a reused pid is not mistaken for the holder) with a heartbeat that a
background thread refreshes. Another process asking for the run gets a `UserError` naming the
holder. A lease is stale, and is taken over, when its holder is gone: on this host (same boot)
when its pid no longer runs that process, on another host when its heartbeat is older than
`STALE_AFTER_S`. Taking and taking over happen in one `BEGIN IMMEDIATE` transaction, so of
processes racing for a run exactly one wins.

Creating a run leaves a "starting" row for its creator, which the creator's own `lease` adopts:
between recording a run and sampling it no other process can take the run, nor discard it as a
run that never started. `Store.lease(run_id)` is the door; this module holds the parts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from passuntil.errors import UserError

HEARTBEAT_S = 10.0  # how often a holder refreshes its heartbeat
STALE_AFTER_S = 120.0  # a holder on another host silent this long is presumed dead

LEASES_TABLE = """
    CREATE TABLE IF NOT EXISTS leases (
        run_id TEXT PRIMARY KEY,
        token TEXT NOT NULL,
        host TEXT NOT NULL,
        boot_id TEXT NOT NULL,
        pid INTEGER NOT NULL,
        pid_started TEXT NOT NULL,
        stage TEXT NOT NULL,
        since TEXT NOT NULL,
        heartbeat REAL NOT NULL
    )
"""


@dataclass(frozen=True)
class Lease:
    """Who holds a run: the row of the `leases` table."""

    run_id: str
    token: str  # unique per acquisition: a commit checks it to know its writer still holds the run
    host: str
    boot_id: str
    pid: int
    pid_started: str  # the pid's start time ("" where /proc is missing)
    stage: str  # "starting" (the run was just created by the holder) or "sampling"
    since: str
    heartbeat: float

    def describe(self) -> str:
        doing = "sampled" if self.stage == "sampling" else "started"
        return f"being {doing} by pid {self.pid} on host {self.host} since {self.since}"

    def is_mine(self) -> bool:
        """Held by this very process (not merely the same pid number)."""
        me = this_process(self.run_id)
        return (self.host, self.boot_id, self.pid, self.pid_started) == (
            me.host, me.boot_id, me.pid, me.pid_started)

    def is_stale(self, now: float | None = None) -> bool:
        """True when the holder is gone: judged by its pid on this host, by its heartbeat elsewhere."""
        me = this_process(self.run_id)
        if (self.host, self.boot_id) == (me.host, me.boot_id) and self.boot_id:
            return not _runs(self.pid, self.pid_started)
        return (now if now is not None else time.time()) - self.heartbeat > STALE_AFTER_S


def this_process(run_id: str, stage: str = "sampling") -> Lease:
    """A lease held by this process (a fresh token each call)."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return Lease(run_id, uuid.uuid4().hex, *_identity(os.getpid()), stage, now, time.time())


@functools.lru_cache(maxsize=4)
def _identity(pid: int) -> tuple[str, str, int, str]:
    """(host, boot id, pid, pid start time) of this process (cached per pid: a fork is another)."""
    return socket.gethostname(), _boot_id(), pid, _start_time(pid)


def reserve(db: sqlite3.Connection, run_id: str) -> Lease:
    """Mark a run this process has just created as "starting" (inside the creating transaction)."""
    mine = this_process(run_id, "starting")
    _put(db, mine)
    return mine


def acquire(db: sqlite3.Connection, run_id: str, path: Path) -> Lease:
    """Take the run's lease inside the caller's IMMEDIATE transaction: adopt this process's own
    "starting" row, take over a stale one, refuse a live holder."""
    held = current(db, run_id)
    if blocks(held):
        raise UserError(held_message(held, path))
    mine = this_process(run_id)
    _put(db, mine)
    return mine


def blocks(held: Lease | None) -> bool:
    """Whether a lease row keeps other writers off: a live holder that is not this process's
    own "starting" row."""
    return held is not None and not held.is_stale() and not (held.stage == "starting" and held.is_mine())


def _put(db: sqlite3.Connection, lease: Lease) -> None:
    db.execute("INSERT OR REPLACE INTO leases VALUES (?,?,?,?,?,?,?,?,?)",
               (lease.run_id, lease.token, lease.host, lease.boot_id, lease.pid, lease.pid_started,
                lease.stage, lease.since, lease.heartbeat))


def current(db: sqlite3.Connection, run_id: str) -> Lease | None:
    row = db.execute("SELECT run_id, token, host, boot_id, pid, pid_started, stage, since, heartbeat "
                     "FROM leases WHERE run_id=?", (run_id,)).fetchone()
    return Lease(*row) if row else None


def held_message(held: Lease, path: Path) -> str:
    return (f"run {held.run_id!r} in {path} is {held.describe()} (one writer per "
            "run): wait for it to finish, or stop it and run `passuntil eval --resume` again")


class Heartbeat:
    """A daemon thread refreshing a lease's heartbeat on its own connection until stopped."""

    def __init__(self, path: Path, lease: Lease):
        self.path, self.lease, self.every = path, lease, HEARTBEAT_S
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="passuntil-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            while not self._stop.wait(self.every):
                with contextlib.suppress(sqlite3.Error):  # busy past the timeout: try next beat
                    db.execute("UPDATE leases SET heartbeat=? WHERE run_id=? AND token=?",
                               (time.time(), self.lease.run_id, self.lease.token))
        finally:
            db.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _runs(pid: int, started: str) -> bool:
    """Whether `pid` is still the process that started at `started` (a zombie does not run)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return _exists(pid)
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and (not started or fields[19] == started)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
