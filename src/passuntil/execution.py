"""Run untrusted code against unit tests: a pool of pre-started sandbox workers.

Each worker (`sandbox_worker.py`, standard library only) is started once with its zygote
(`sandbox_zygote.py`), which creates one isolated child per check, so interpreter start-up is
paid once per worker, not once per completion. The worker holds the test; the zygote and the
child never do. What the sandbox guarantees, how each guarantee is tested, and the fallback
without root are written up in docs/sandbox.md.

Without isolation (not root, or no namespaces) code checks are refused unless the user opts in
with PASSUNTIL_UNSAFE_LOCAL_EXECUTION=1 (the CLI's `--unsafe-local-execution`);
`isolation_mode()` names the isolation the checks get, for the run store and the report.
"""

from __future__ import annotations

import atexit
import contextlib
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

from passuntil import sandbox_wire as wire
from passuntil.errors import UserError

WORKER = Path(wire.__file__).with_name("sandbox_worker.py")
UNSAFE_ENV = "PASSUNTIL_UNSAFE_LOCAL_EXECUTION"
MODES = ("namespaces+cgroup2", "namespaces+cgroup1", "namespaces+rlimit", "unsafe-local")


@dataclass(frozen=True)
class Limits:
    """Per-check limits: wall clock, CPU seconds and address space per process, memory of the
    check's whole process tree (with a cgroup), file size, processes (with namespaces)."""

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
    """A check's outcome; `peak_bytes` is the peak memory of its whole process tree (cgroup)."""

    status: str  # passed, failed, crashed, timeout, program_error, harness_error
    seconds: float
    peak_bytes: int | None = None
    oom_kills: int = 0

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class _Worker:
    def __init__(self, python: str, unprivileged: bool):
        argv = [python, "-I", "-S", str(WORKER)] + (["--unprivileged"] if unprivileged else [])
        self.proc = subprocess.Popen(argv, env={}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     start_new_session=True, cwd="/")
        try:
            hello = json.loads(wire.read_frame(self.proc.stdout.fileno(), time.monotonic() + 60))
        except (wire.Timeout, wire.ChildGone, ValueError) as err:
            self.close()
            raise RuntimeError(f"sandbox worker did not start ({type(err).__name__})") from None
        self.mode = str(hello["mode"])

    def run(self, request: dict, wall_s: float) -> dict:
        wire.write_frame(self.proc.stdin.fileno(), json.dumps(request).encode())
        self.proc.stdin.flush()
        return json.loads(wire.read_frame(self.proc.stdout.fileno(), time.monotonic() + wall_s))

    def close(self, grace_s: float = 10.0):
        """Hang up (the worker then ends its zygote, which removes everything it made); a
        worker killed instead leaves that to its zygote, which sees the hang-up too."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class SandboxPool:
    """`workers` pre-started sandbox workers; `run` is safe to call from many threads.

    `mode` is the isolation the checks get (one of MODES). "unsafe-local" (no root or no
    namespaces) is refused with a UserError unless `allow_unsafe` (default: the environment
    variable PASSUNTIL_UNSAFE_LOCAL_EXECUTION=1). `unprivileged=True` forces that fallback even
    as root; `python` is the interpreter the workers run on."""

    def __init__(self, workers: int | None = None, limits: Limits = Limits(), *,
                 allow_unsafe: bool | None = None, unprivileged: bool = False,
                 python: str = sys.executable):
        self.size = workers or max(1, min(4, os.cpu_count() or 1))
        self.limits = limits
        self.python, self.unprivileged = python, unprivileged
        self.idle: queue.Queue[_Worker] = queue.Queue()
        self.lock = threading.Lock()
        self.workers: list[_Worker] = []
        self._spawn()
        self.mode = self.workers[0].mode
        if allow_unsafe is None:
            allow_unsafe = os.environ.get(UNSAFE_ENV) == "1"
        if self.mode == "unsafe-local" and not allow_unsafe:
            self.close()
            raise UserError("code checks need root and Linux namespaces for the sandbox; to run "
                            "completions unisolated as your own user, pass "
                            f"--unsafe-local-execution (or set {UNSAFE_ENV}=1)")
        for _ in range(self.size - 1):
            self._spawn()

    @property
    def isolated(self) -> bool:
        return self.mode != "unsafe-local"

    def _spawn(self):
        w = _Worker(self.python, self.unprivileged)
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
            w.close(grace_s=0)
            with self.lock:
                self.workers.remove(w)
            self._spawn()
            return Verdict("harness_error", 0.0)
        self.idle.put(w)
        return Verdict(reply["status"], reply["seconds"], reply.get("peak_bytes"),
                       reply.get("oom_kills", 0))

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


def isolation_mode() -> str:
    """The isolation code checks get here (one of MODES), for the run store and the report.

    Starts the default pool if needed; raises UserError where only "unsafe-local" is possible
    and the user has not opted in."""
    return default_pool().mode


def run_unit_tests(program: str, test: str, entry_point: str) -> Verdict:
    """Check one completion in the default pool."""
    return default_pool().run(Job(program, test, entry_point))
