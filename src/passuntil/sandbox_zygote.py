"""The sandbox zygote: the only process that creates untrusted processes; it never holds a test.

Started by a sandbox worker (`sandbox_worker.py`) as `python -I -S sandbox_zygote.py --fd N`
with an empty environment, before the worker reads any job. It imports only the standard
library. Over its control socket (fd N, SOCK_SEQPACKET) it receives, per check, nothing but the
limits and two pipe ends (SCM_RIGHTS): the program (prompt + completion) and the calls reach the
untrusted child through those pipes from the worker, and the test never leaves the worker. So no
process the completion descends from ever held a test, a reference answer or a secret.

Isolation as root (see docs/sandbox.md):
  once per zygote  a network namespace with no interface up; a mount namespace whose root is a
                   fresh read-only tmpfs holding only system software (/usr, /etc, /lib*, /bin,
                   /sbin), a few device nodes and the interpreter's own prefix (bind-mounted, so
                   it is readable even under a mode-700 directory), every site-packages covered
                   by an empty tmpfs (no datasets or project code are visible); one memory
                   cgroup (v2, else v1) that holds one check at a time.
  per check        the check joins the cgroup (one memory limit over its whole process tree),
                   then new PID, IPC and mount namespaces: a trusted init (pid 1) mounts /proc
                   and size-limited tmpfs scratch, forks the child, and exits when it does
                   (the kernel then kills everything left in the namespace); the child drops to
                   a fresh random uid, sets rlimits and no_new_privs and runs the program.
Without root or namespaces the zygote runs the "unsafe-local" fallback (same uid, rlimits,
private temporary directory), which `passuntil.execution` only uses when the user opts in.

The isolation primitives are in `sandbox_isolation.py`, the wire format (frames, the strict
encoding of values; never pickle) in `sandbox_wire.py`, both beside this file.
"""

import builtins
import contextlib
import gc
import glob
import json
import os
import random
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox_isolation as iso  # noqa: E402 - this file runs as a script, beside its modules
from sandbox_isolation import (  # noqa: E402
    CLONE_NEWIPC,
    CLONE_NEWNS,
    CLONE_NEWPID,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    PR_SET_CHILD_SUBREAPER,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    SCRATCH_DIRS,
    clone,
    mount,
    prctl,
)
from sandbox_wire import ChildGone, decode, encode, loads, read_frame, write_frame  # noqa: E402

# Imported before any fork, so a check's `import math` costs nothing (the zygote holds no test).
PRELOAD = ["abc", "array", "bisect", "calendar", "cmath", "collections", "collections.abc", "copy", "dataclasses", "datetime", "decimal", "enum", "fractions", "functools", "hashlib", "heapq", "io", "itertools", "json", "math", "numbers", "operator", "random", "re", "statistics", "string", "struct", "textwrap", "typing", "unicodedata"]
for _name in PRELOAD:
    __import__(_name)


# ---- the untrusted child -------------------------------------------------------------------

def _close_fds_but(keep):
    lo = 3
    for fd in sorted(keep):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 16)


def _drop(limits, uid, scratch, keep):
    """In the child: nothing open but `keep`, limits, scratch as cwd, then the fresh uid."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _close_fds_but(keep)
    os.chdir(scratch)
    rl = [(resource.RLIMIT_CPU, limits["cpu_s"]), (resource.RLIMIT_AS, limits["mem_bytes"]),
          (resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, limits["file_bytes"]),
          (resource.RLIMIT_NOFILE, 64)]
    if uid is not None:
        rl.append((resource.RLIMIT_NPROC, limits["processes"]))
    for which, value in rl:
        resource.setrlimit(which, (value, value))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    os.environ.clear()
    os.environ.update({"HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"})
    if uid is None:
        sys.addaudithook(_no_network)


def _no_network(event, args):
    """Fallback without a network namespace (unsafe-local only): refuse socket use."""
    if event.startswith("socket."):
        raise PermissionError("network access is blocked in the sandbox")


def serve(calls_r, results_w):
    """Read the program from the worker, run it, then answer calls to its entry point."""
    try:
        job = loads(read_frame(calls_r))
        namespace = {"__name__": "__sandbox__", "__builtins__": builtins}
        exec(compile(job["program"], "<completion>", "exec"), namespace)
        fn = namespace[job["entry_point"]]
        if not callable(fn):
            raise TypeError("entry point is not callable")
    except BaseException as err:  # noqa: BLE001 - any failure of the program fails the check
        write_frame(results_w, json.dumps(["error", type(err).__name__]).encode())
        os._exit(0)
    write_frame(results_w, json.dumps(["ready"]).encode())
    while True:
        try:
            args, kwargs = decode(loads(read_frame(calls_r)))
            reply = ["ok", encode(fn(*args, **kwargs))]
        except ChildGone:
            os._exit(0)
        except BaseException as err:  # noqa: BLE001
            reply = ["raise", type(err).__name__]
        write_frame(results_w, json.dumps(reply).encode())


def _run_child(limits, uid, scratch, calls_r, results_w):
    try:
        os.setsid()
        _drop(limits, uid, scratch, (calls_r, results_w))
        serve(calls_r, results_w)
    finally:
        os._exit(1)


# ---- the zygote ----------------------------------------------------------------------------

class Zygote:
    """Creates one isolated child per check and removes everything it left afterwards."""

    def __init__(self, isolated, cgroup):
        self.isolated = isolated
        self.cgroup = cgroup
        self.rng = random.SystemRandom()
        self.pid = None
        self.tmp = None
        self.under_scratch = [d for d in iso.python_dirs() if isolated and any(
            d == s or d.startswith(s + "/") for s in SCRATCH_DIRS)]

    @property
    def mode(self):
        if not self.isolated:
            return "unsafe-local"
        return {2: "namespaces+cgroup2", 1: "namespaces+cgroup1"}.get(self.cgroup.version,
                                                                     "namespaces+rlimit")

    def start(self, limits, calls_r, results_w):
        if not self.isolated:
            self.tmp = tempfile.mkdtemp(prefix="passuntil-sbx-")
            pid = os.fork()
            if pid == 0:
                _run_child(limits, None, self.tmp, calls_r, results_w)
            self.pid = pid
            return
        uid = self.rng.randrange(200_000, 2_000_000_000)
        if self.cgroup.version:
            self.cgroup.prepare(limits["mem_bytes"])
        pid = clone(CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNS)
        if pid == 0:  # pid 1 of the check's namespaces: set up as root, then drop to `uid`
            try:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if self.cgroup.version:
                    self.cgroup.join()
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                hidden = [(d, os.open(d, os.O_PATH)) for d in self.under_scratch]
                opts = (f"size={limits['file_bytes'] * 4},nr_inodes=4096,mode=0700,"
                        f"uid={uid},gid={uid}")
                mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, opts)
                for d, fd in hidden:  # an interpreter under /tmp: back on top of the scratch
                    iso.bind(fd, d, True)
                    os.close(fd)
                _run_child(limits, uid, "/tmp", calls_r, results_w)
            finally:
                os._exit(1)
        self.pid = pid

    def end(self):
        """Kill the check's processes, reap them all; (peak bytes, OOM kills) when known."""
        if self.pid is None:
            return None, 0
        with contextlib.suppress(ProcessLookupError):  # pid 1 of the check: all of it dies
            os.kill(self.pid, signal.SIGKILL)
        if self.isolated and self.cgroup.version:
            self.cgroup.kill_all()
        if not self.isolated:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            _reap_all(time.monotonic() + 5)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.pid = None
            return None, 0
        self.pid = None
        with contextlib.suppress(ChildProcessError):
            while True:  # the zygote is a subreaper: every descendant ends up here
                os.waitpid(-1, 0)
        if self.cgroup.version:
            while self.cgroup.pids():  # nothing can leave the cgroup; wait until it is empty
                self.cgroup.kill_all()
                time.sleep(0.001)
            return self.cgroup.usage()
        return None, 0


def _reap_all(deadline):
    """unsafe-local: kill and reap every process reparented to the zygote (setsid escapees)."""
    me = str(os.getpid())
    while time.monotonic() < deadline:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
        except ChildProcessError:
            return
        for stat in glob.glob("/proc/[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(stat) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[1] == me:
                    os.kill(int(stat.split("/")[2]), signal.SIGKILL)
        time.sleep(0.001)


def probe():
    """Can this process make a check's namespaces (PID, IPC, mount) and mount /proc there?"""
    pid = clone(CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNS)
    if pid == 0:
        try:
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            os._exit(0)
        finally:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    sock = socket.socket(fileno=fd)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    isolated = os.geteuid() == 0 and "--unprivileged" not in sys.argv
    cgroup = iso.Cgroup() if isolated else None  # before the pivot hides /sys
    if isolated:
        try:
            iso.build_root()
            isolated = probe()
        except OSError:
            isolated = False
    z = Zygote(isolated, cgroup if isolated else None)
    gc.freeze()  # the checks' collections then leave the zygote's pages shared (fewer copies)
    if cgroup is not None and not isolated:
        cgroup.remove()
    sock.send(json.dumps({"mode": z.mode, "cgroup": z.cgroup.path if z.cgroup else None}).encode())
    try:
        serve_zygote(z, sock)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the worker is gone
    finally:
        if z.pid is not None:
            z.end()
        if z.cgroup is not None:
            z.cgroup.remove()


def serve_zygote(z, sock):
    """Answer the worker: "start" (limits + two pipe ends) and "end", until it hangs up."""
    while True:
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
        if not data:
            return
        request = loads(data)
        if request.get("op") == "start" and len(fds) == 2:
            z.start(request["limits"], *fds)
            for f in fds:
                os.close(f)
            sock.send(b'{"started": true}')
        elif request.get("op") == "end":
            peak, ooms = z.end()
            sock.send(json.dumps({"peak_bytes": peak, "oom_kills": ooms}).encode())
        else:
            for f in fds:
                os.close(f)
            return


if __name__ == "__main__":
    main()
