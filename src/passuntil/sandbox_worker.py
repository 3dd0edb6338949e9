"""A pre-started sandbox worker: runs one untrusted program per request, isolated.

Started by `passuntil.execution.SandboxPool` as `python -I -S sandbox_worker.py` with an empty
environment; it imports only the standard library. Protocol on stdin/stdout: 4-byte big-endian
length + JSON, one request and one reply at a time.

For each request the worker forks a child that drops to a fresh random uid (when the worker runs
as root), enters a new network namespace, sets resource limits, changes into a private temporary
directory and executes the untrusted program (prompt + completion). The child then serves calls
to the entry point over a pipe. The test code runs here, in the trusted worker, with `candidate`
a proxy: arguments go to the child pickled, results come back in a strict encoding that builds
only plain built-in values (no subclasses, no user objects), so nothing the completion defines
(`__eq__`, patched builtins or `assert`, `sys.exit`, printed text) can take part in the verdict.
A pass is `check(candidate)` returning normally in this process.
"""

import builtins
import contextlib
import ctypes
import json
import os
import pickle
import random
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time

# Imported before any fork so that a completion's `import math` needs no file access: the child
# may run as a uid that cannot read the interpreter's directory.
PRELOAD = ["abc", "array", "bisect", "calendar", "cmath", "collections", "collections.abc", "copy", "dataclasses", "datetime", "decimal", "enum", "fractions", "functools", "hashlib", "heapq", "io", "itertools", "json", "math", "numbers", "operator", "random", "re", "statistics", "string", "struct", "textwrap", "typing", "unicodedata"]
for _name in PRELOAD:
    __import__(_name)

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 32, 4096, 16384, 1 << 18)
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
MAX_MESSAGE = 8 << 20
_LIBC = ctypes.CDLL(None, use_errno=True)


class Timeout(Exception):
    """The wall-clock deadline passed."""


class ChildGone(Exception):
    """The untrusted process exited or broke the protocol."""


class RemoteError(Exception):
    """The entry point raised inside the untrusted process."""


# ---- framing -------------------------------------------------------------------------------

def _read_exact(fd, n, deadline):
    chunks, left = [], n
    while left:
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            raise Timeout()
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            raise Timeout()
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise ChildGone("end of stream")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd, deadline=None):
    (n,) = struct.unpack(">I", _read_exact(fd, 4, deadline))
    if n > MAX_MESSAGE:
        raise ChildGone("message too large")
    return _read_exact(fd, n, deadline)


def write_frame(fd, data):
    data = struct.pack(">I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


# ---- strict result encoding ----------------------------------------------------------------

def encode(value, depth=0):
    """Plain built-in values only (exact types), as JSON-able tagged lists."""
    if depth > 50:
        raise TypeError("nested too deeply")
    t = type(value)
    if value is None:
        return ["n"]
    if t is bool:
        return ["b", value]
    if t is int:
        return ["i", str(value)]
    if t is float:
        return ["f", repr(value)]
    if t is complex:
        return ["c", repr(value.real), repr(value.imag)]
    if t is str:
        return ["s", value]
    if t is bytes:
        return ["y", value.hex()]
    if t in (list, tuple, set, frozenset):
        tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[t]
        return [tag, [encode(v, depth + 1) for v in value]]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    raise TypeError(f"result of type {t.__name__} is not a plain value")


def decode(obj, depth=0):
    """Inverse of `encode`; builds fresh built-ins and rejects anything else."""
    if depth > 50 or type(obj) is not list or not obj or type(obj[0]) is not str:
        raise ChildGone("malformed result")
    tag, args = obj[0], obj[1:]
    simple = {"n": lambda: None, "b": lambda v: bool(v) if type(v) is bool else _bad(),
              "i": lambda v: int(str(v)), "f": lambda v: float(str(v)),
              "c": lambda r, i: complex(float(str(r)), float(str(i))), "s": lambda v: str(v),
              "y": lambda v: bytes.fromhex(str(v))}
    if tag in simple:
        return simple[tag](*args)
    items = args[0] if len(args) == 1 and type(args[0]) is list else _bad()
    if tag == "d":
        return {decode(k, depth + 1): decode(v, depth + 1) for k, v in items}
    kinds = {"l": list, "t": tuple, "S": set, "F": frozenset}
    if tag in kinds:
        return kinds[tag](decode(v, depth + 1) for v in items)
    return _bad()


def _bad():
    raise ChildGone("malformed result")


# ---- the untrusted child -------------------------------------------------------------------

def _isolate(job, tmp, keep):
    os.setsid()
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, min(keep))
    os.closerange(min(keep) + 1, max(keep))
    os.closerange(max(keep) + 1, 65536)
    uid = job.get("uid")
    if uid is not None:
        tmp = _private_scratch(uid, job["file_bytes"] * 4)
    os.chdir(tmp)
    mem, cpu = job["mem_bytes"], job["cpu_s"]
    limits = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem), (resource.RLIMIT_CORE, 0),
              (resource.RLIMIT_FSIZE, job["file_bytes"]), (resource.RLIMIT_NOFILE, 64)]
    if uid is not None:
        limits.append((resource.RLIMIT_NPROC, job["processes"]))
    for which, value in limits:
        resource.setrlimit(which, (value, value))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    os.environ.clear()
    os.environ.update({"HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"})
    if uid is None:
        sys.addaudithook(_no_network)


def _mount(source, target, fstype, flags, data):
    args = [None if a is None else a.encode() for a in (source, target, fstype, data)]
    if _LIBC.mount(args[0], args[1], args[2], flags, args[3]) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


def enter_namespaces():
    """Once per worker (root only): a network namespace with no interfaces up and a mount
    namespace in which every mount is read-only. Every check's child inherits both."""
    if _LIBC.unshare(CLONE_NEWNET | CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1] for line in f]
    for target in targets:  # a bind remount changes only the read-only flag
        if not target.startswith(("/proc", "/sys")):
            with contextlib.suppress(OSError):
                _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)


def _private_scratch(uid, scratch_bytes):
    """In the child: its own mount namespace with fresh, size-limited tmpfs scratch
    directories owned by `uid` (the only writable places). Returns the working directory."""
    if _LIBC.unshare(CLONE_NEWNS) != 0:
        os._exit(70)  # refuse to run unisolated when isolation was promised
    opts = f"size={scratch_bytes},nr_inodes=4096,mode=0700,uid={uid},gid={uid}"
    for d in SCRATCH_DIRS:
        if os.path.isdir(d):
            _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, opts)
    return "/tmp"


def _no_network(event, args):
    """Fallback when no network namespace is available (not root): refuse socket use."""
    if event.startswith("socket."):
        raise PermissionError("network access is blocked in the sandbox")


def _child(job, tmp, calls_r, results_w):
    _isolate(job, tmp, (calls_r, results_w))
    namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
    try:
        exec(compile(job["program"], "<completion>", "exec"), namespace)
        fn = namespace[job["entry_point"]]
        if not callable(fn):
            raise TypeError("entry point is not callable")
    except BaseException as err:  # noqa: BLE001 - any failure of the program is a failed check
        write_frame(results_w, json.dumps(["error", type(err).__name__]).encode())
        os._exit(0)
    write_frame(results_w, json.dumps(["ready"]).encode())
    while True:
        try:
            args, kwargs = pickle.loads(read_frame(calls_r))
        except ChildGone:
            os._exit(0)
        try:
            reply = ["ok", encode(fn(*args, **kwargs))]
        except BaseException as err:  # noqa: BLE001
            reply = ["raise", type(err).__name__]
        write_frame(results_w, json.dumps(reply).encode())


# ---- the trusted side ----------------------------------------------------------------------

class Candidate:
    """Stands in for the completion's function inside the trusted test code."""

    def __init__(self, calls_w, results_r, deadline):
        self.calls_w, self.results_r, self.deadline = calls_w, results_r, deadline
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        try:
            write_frame(self.calls_w, pickle.dumps((args, kwargs)))
        except (BrokenPipeError, OSError):
            raise ChildGone("program exited") from None
        try:
            reply = json.loads(read_frame(self.results_r, self.deadline))
        except (ValueError, RecursionError):
            raise ChildGone("malformed result") from None
        if type(reply) is not list or not reply:
            raise ChildGone("malformed result")
        if reply[0] == "ok" and len(reply) == 2:
            try:
                return decode(reply[1])
            except (ValueError, TypeError, RecursionError, OverflowError):
                raise ChildGone("malformed result") from None
        if reply[0] == "raise":
            raise RemoteError(str(reply[1:2]))
        raise ChildGone("malformed result")


def _kill_uid(uid):
    """Kill every process of `uid`, including ones that left the process group."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _reap(pid, uid, grace_s=5.0):
    """Kill the child and everything it started, and reap them all.

    The worker is a child subreaper: a descendant that loses its parent becomes the worker's
    child, so once the worker has no children left, no sandbox process is alive. Until then the
    whole uid (or, without root, the process group) is killed again."""
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
        except ChildProcessError:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        if uid is not None:
            _kill_uid(uid)
        if time.monotonic() > deadline:
            return
        time.sleep(0.001)


def _verdict(job, calls_w, results_r, deadline):
    try:
        ready = json.loads(read_frame(results_r, deadline))
    except (ValueError, RecursionError):
        return "crashed"
    if ready != ["ready"]:
        return "program_error"
    namespace = {"__name__": "__check__"}
    try:
        exec(compile(job["test"], "<test>", "exec"), namespace)
    except SyntaxError:
        return "harness_error"
    check = namespace.get("check")
    if not callable(check):
        return "harness_error"
    candidate = Candidate(calls_w, results_r, deadline)
    namespace[job["entry_point"]] = candidate  # tests may call the function by its own name
    try:
        check(candidate)
    except AssertionError:
        return "failed"
    except Timeout:
        return "timeout"
    except ChildGone:
        return "crashed"
    except Exception:  # noqa: BLE001 - the test raised on the completion's values
        return "failed"
    return "passed"


def run_job(job):
    start = time.monotonic()
    deadline = start + job["timeout_s"]
    uid = job.get("uid")
    # With root the child works in a fresh tmpfs of its own mount namespace; without, in a
    # private directory here.
    tmp = None if uid is not None else tempfile.mkdtemp(prefix="passuntil-sbx-")
    calls_r, calls_w = os.pipe()
    results_r, results_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(calls_w)
            os.close(results_r)
            _child(job, tmp, calls_r, results_w)
        finally:
            os._exit(1)
    os.close(calls_r)
    os.close(results_w)
    try:
        status = _verdict(job, calls_w, results_r, deadline)
    except Timeout:
        status = "timeout"
    except ChildGone:
        status = "crashed"
    finally:
        for fd in (calls_w, results_r):
            os.close(fd)
        _reap(pid, uid)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"status": status, "passed": status == "passed",
            "seconds": round(time.monotonic() - start, 6)}


def main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    rng = random.SystemRandom()
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    root = os.geteuid() == 0
    if root:
        try:
            enter_namespaces()
        except OSError:
            root = False  # no namespaces here (a container without CAP_SYS_ADMIN): fallback
    write_frame(stdout, json.dumps({"ready": True, "root": root}).encode())
    while True:
        try:
            job = json.loads(read_frame(stdin))
        except ChildGone:
            return
        if root:
            job["uid"] = rng.randrange(200_000, 2_000_000_000)
        write_frame(stdout, json.dumps(run_job(job)).encode())


if __name__ == "__main__":
    main()
