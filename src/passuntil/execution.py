"""Run untrusted code against unit tests: a pool of pre-started sandbox workers.

Each worker (`sandbox_worker.py`, standard library only) is started once and forks one isolated
child per check, so interpreter start-up is paid once per worker, not once per completion. What
the sandbox does and does not protect against is written up in docs/sandbox.md.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from passuntil import sandbox_worker as wire

WORKER = Path(wire.__file__)


@dataclass(frozen=True)
class Limits:
    """Per-check limits: wall clock, CPU, address space, file size, processes (root only)."""

    timeout_s: float = 10.0
    cpu_s: int = 5
    mem_bytes: int = 1 << 30
    file_bytes: int = 16 << 20
    processes: int = 16


@dataclass(frozen=True)
class Job:
    """One check: the untrusted program, the trusted test code defining `check(candidate)`."""

    program: str
    test: str
    entry_point: str


@dataclass(frozen=True)
class Verdict:
    status: str  # passed, failed, crashed, timeout, program_error, harness_error
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class _Worker:
    def __init__(self):
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", str(WORKER)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     start_new_session=True, cwd="/")
        try:
            hello = json.loads(wire.read_frame(self.proc.stdout.fileno(), time.monotonic() + 60))
        except (wire.Timeout, wire.ChildGone) as err:
            self.close()
            raise RuntimeError(f"sandbox worker did not start ({type(err).__name__})") from None
        self.root = bool(hello["root"])

    def run(self, request: dict, wall_s: float) -> dict:
        wire.write_frame(self.proc.stdin.fileno(), json.dumps(request).encode())
        self.proc.stdin.flush()
        return json.loads(wire.read_frame(self.proc.stdout.fileno(), time.monotonic() + wall_s))

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class SandboxPool:
    """`workers` pre-started sandbox workers; `run` is safe to call from many threads."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits()):
        self.size = workers or max(1, min(4, os.cpu_count() or 1))
        self.limits = limits
        self.idle: queue.Queue[_Worker] = queue.Queue()
        self.lock = threading.Lock()
        self.workers: list[_Worker] = []
        for _ in range(self.size):
            self._spawn()
        self.isolated = self.workers[0].root

    def _spawn(self):
        w = _Worker()
        with self.lock:
            self.workers.append(w)
        self.idle.put(w)

    def run(self, job: Job) -> Verdict:
        lim = self.limits
        request = {"program": job.program, "test": job.test, "entry_point": job.entry_point,
                   "timeout_s": lim.timeout_s, "cpu_s": lim.cpu_s, "mem_bytes": lim.mem_bytes,
                   "file_bytes": lim.file_bytes, "processes": lim.processes}
        w = self.idle.get()
        try:
            reply = w.run(request, lim.timeout_s + 10)
        except (wire.Timeout, wire.ChildGone, OSError, ValueError):
            # The worker itself failed (it never should): replace it, count the check as failed.
            w.close()
            with self.lock:
                self.workers.remove(w)
            self._spawn()
            return Verdict("harness_error", 0.0)
        self.idle.put(w)
        return Verdict(reply["status"], reply["seconds"])

    def run_many(self, jobs: list[Job]) -> list[Verdict]:
        with ThreadPoolExecutor(self.size) as ex:
            return list(ex.map(self.run, jobs))

    def close(self):
        with self.lock:
            for w in self.workers:
                w.close()
            self.workers.clear()


_DEFAULT: SandboxPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> SandboxPool:
    """The process-wide pool (started on first use, closed at exit)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            _DEFAULT = SandboxPool()
            atexit.register(_DEFAULT.close)
        return _DEFAULT


def run_unit_tests(program: str, test: str, entry_point: str) -> Verdict:
    """Check one completion in the default pool."""
    return default_pool().run(Job(program, test, entry_point))
