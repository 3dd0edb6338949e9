"""A pre-started sandbox worker: holds the trusted test of one check at a time, never runs
untrusted code.

Started by `passuntil.execution.SandboxPool` as `python -I -S sandbox_worker.py` with an empty
environment; it imports only the standard library and `sandbox_wire.py` beside it. Protocol
on stdin/stdout: 4-byte big-endian length + JSON, one request and one reply at a time.

Before reading any job the worker starts its zygote (`sandbox_zygote.py`, a fresh interpreter
that gets only its control socket). Per job the worker makes two pipes, hands one end of each to
the zygote (which creates the isolated child from a process that never saw a test), writes the
program (prompt + completion) into the child's pipe, and runs the test code here with
`candidate` a proxy: arguments go to the child and results come back in a strict encoding that
builds only plain built-in values (no pickle, no subclasses, no user objects), so nothing the
completion defines (`__eq__`, patched builtins or `assert`, `sys.exit`, printed text) takes part
in the verdict. A pass is `check(candidate)` returning normally in this process.
"""

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox_wire as z  # noqa: E402 - this file runs as a script, beside its modules

ChildGone, Timeout, read_frame, write_frame = z.ChildGone, z.Timeout, z.read_frame, z.write_frame
ZYGOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_zygote.py")


class RemoteError(Exception):
    """The entry point raised inside the untrusted process."""


class HarnessError(Exception):
    """The trusted test itself is broken (not the completion's fault)."""


class Candidate:
    """Stands in for the completion's function inside the trusted test code."""

    def __init__(self, calls_w, results_r, deadline):
        self.calls_w, self.results_r, self.deadline = calls_w, results_r, deadline

    def __call__(self, *args, **kwargs):
        try:
            message = json.dumps(z.encode([list(args), kwargs])).encode()
        except TypeError:
            raise HarnessError("the test passed a value that is not plain") from None
        try:
            write_frame(self.calls_w, message, self.deadline)
        except (BrokenPipeError, OSError):
            raise ChildGone("program exited") from None
        reply = z.loads(read_frame(self.results_r, self.deadline))
        if type(reply) is not list or not reply:
            raise ChildGone("malformed result")
        if reply[0] == "ok" and len(reply) == 2:
            return z.decode(reply[1])
        if reply[0] == "raise":
            raise RemoteError(str(reply[1:2]))
        raise ChildGone("malformed result")


class Zygote:
    """The worker's handle on its zygote process."""

    def __init__(self, python, unprivileged):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [python, "-I", "-S", ZYGOTE, "--fd", str(theirs.fileno())]
        if unprivileged:
            argv.append("--unprivileged")
        self.proc = subprocess.Popen(argv, env={}, cwd="/", pass_fds=(theirs.fileno(),),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()
        hello = self._reply(60)
        self.mode, self.cgroup = hello["mode"], hello["cgroup"]

    def _reply(self, wait_s):
        ready, _, _ = select.select([self.sock], [], [], wait_s)
        data = self.sock.recv(1 << 16) if ready else b""
        if not data:
            raise ChildGone("zygote gone")
        return z.loads(data)

    def start(self, limits, fds):
        socket.send_fds(self.sock, [json.dumps({"op": "start", "limits": limits}).encode()], fds)
        return self._reply(30)

    def end(self):
        self.sock.send(b'{"op": "end"}')
        return self._reply(60)

    def close(self):
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.cgroup:  # normally removed by the zygote; not if it was killed
            with contextlib.suppress(OSError):
                os.rmdir(self.cgroup)


def _verdict(job, calls_w, results_r, deadline):
    program = json.dumps({"program": job["program"], "entry_point": job["entry_point"]})
    try:
        write_frame(calls_w, program.encode(), deadline)
    except OSError:  # the child is gone (it never should be before its program)
        raise ChildGone("child gone") from None
    ready = z.loads(read_frame(results_r, deadline))
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
    except HarnessError:
        return "harness_error"
    except Exception:  # noqa: BLE001 - the test raised on the completion's values
        return "failed"
    return "passed"


class Checks:
    """Runs jobs; the next check's isolated child is started while the host handles a reply,
    so its set-up is off the critical path (it holds nothing until the job's program comes)."""

    def __init__(self, zygote):
        self.zygote = zygote
        self.ready = None  # (limits, calls_w, results_r) of a started, idle child

    def prepare(self, limits):
        calls_r, calls_w = os.pipe()
        results_r, results_w = os.pipe()
        try:
            self.zygote.start(limits, [calls_r, results_w])
        finally:
            os.close(calls_r)
            os.close(results_w)
        self.ready = (limits, calls_w, results_r)

    def _take(self, limits):
        if self.ready is not None and self.ready[0] != limits:
            self._discard()
        if self.ready is None:
            self.prepare(limits)
        ready, self.ready = self.ready, None
        return ready[1], ready[2]

    def _discard(self):
        _, calls_w, results_r = self.ready
        self.ready = None
        os.close(calls_w)
        os.close(results_r)
        self.zygote.end()

    def run(self, job):
        start = time.monotonic()
        deadline = start + job["timeout_s"]
        limits = {k: job[k] for k in ("cpu_s", "mem_bytes", "file_bytes", "processes")}
        calls_w, results_r = self._take(limits)
        try:
            status = _verdict(job, calls_w, results_r, deadline)
        except Timeout:
            status = "timeout"
        except ChildGone:
            status = "crashed"
        finally:
            os.close(calls_w)
            os.close(results_r)
        usage = self.zygote.end()
        return {"status": status, "seconds": round(time.monotonic() - start, 6),
                "peak_bytes": usage.get("peak_bytes"), "oom_kills": usage.get("oom_kills", 0)}


def main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    zygote = Zygote(sys.executable, "--unprivileged" in sys.argv)
    checks = Checks(zygote)
    write_frame(stdout, json.dumps({"ready": True, "mode": zygote.mode}).encode())
    try:
        while True:
            try:
                job = json.loads(read_frame(stdin))
            except ChildGone:
                return
            limits = {k: job[k] for k in ("cpu_s", "mem_bytes", "file_bytes", "processes")}
            write_frame(stdout, json.dumps(checks.run(job)).encode())
            checks.prepare(limits)
    finally:
        if checks.ready is not None:
            checks._discard()
        zygote.close()


if __name__ == "__main__":
    main()
