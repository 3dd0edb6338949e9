"""The code sandbox: correct code passes (HumanEval's canonical solutions, every stdlib module
imports even with the interpreter under a mode-700 directory), wrong code fails, and without
isolation code checks are refused unless the user opts in. Hostile completions:
tests/test_sandbox_hostile.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from passuntil.engine import EngineConfig, run_passuntil
from passuntil.errors import UserError
from passuntil.execution import MODES, Job, Limits, SandboxPool, isolation_mode
from passuntil.tasks.humaneval import humaneval

PROMPT = 'def add(x, y):\n    """Return x + y."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


@pytest.fixture(scope="module")
def pool():
    # Benign completions only: runs unisolated too where the machine has no root.
    p = SandboxPool(2, Limits(timeout_s=3.0, cpu_s=2, mem_bytes=512 << 20), allow_unsafe=True)
    yield p
    p.close()


def body(code: str) -> str:
    return "".join("    " + line + "\n" for line in code.strip("\n").splitlines())


def test_only_a_real_pass_passes(pool):
    run = lambda code: pool.run(Job(PROMPT + body(code), PROMPT + TEST, "add"))  # noqa: E731
    assert run("return x + y").status == "passed"
    assert run("return x - y").status == "failed"
    assert run("raise ValueError('no')").status == "failed"
    assert run("return (x + y").status == "program_error"
    assert pool.run(Job(PROMPT, PROMPT + TEST, "add")).status == "failed"  # empty completion


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail(pool):
    task = humaneval()
    assert len(task.instances) == 164
    canonical = [x.references[0] for x in task.instances]

    def passes(texts):
        jobs = [task.check.job(x, t) for x, t in zip(task.instances, texts)]
        return [v.passed for v in pool.run_many(jobs)]

    assert all(passes(canonical))
    assert not any(passes([""] * 164))
    assert not any(passes([c[: len(c) // 2] for c in canonical]))
    assert not any(passes(canonical[1:] + canonical[:1]))  # another problem's solution


class _ScriptedSampler:
    """Returns a fixed cycle of completions (good and hostile) for every prompt."""

    name = "scripted"

    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, params):
        from passuntil.backends.base import Completion

        return [[Completion(j, self.texts[(sp.first_sample + j) % len(self.texts)])
                 for j in range(sp.n)] for sp in params]


def test_evaluation_goes_on_through_hostile_completions(tmp_path, pool, monkeypatch):
    if not pool.isolated:  # a machine without root: these mild ones may run unisolated
        monkeypatch.setenv("PASSUNTIL_UNSAFE_LOCAL_EXECUTION", "1")
    task = humaneval().subset(["0"])
    x = task.instances[0]
    hostile = [body(c) for c in ("import os\nos._exit(0)", "while True:\n    pass",
                                 "import sys\nsys.exit(0)")]
    texts = [*hostile, x.references[0]]
    results = run_passuntil(_ScriptedSampler(texts), [task],
                            EngineConfig(k_target=2, max_samples=16, batch_size=8), model="scripted")
    (r,) = results
    assert r.passes == 2 and r.samples == 8  # exactly every fourth sample passes
    os.kill(os.getpid(), 0)  # the test process is alive
    assert signal.getsignal(signal.SIGINT) is not None


def test_without_isolation_code_checks_are_refused_unless_the_user_opts_in(monkeypatch, tmp_path):
    monkeypatch.delenv("PASSUNTIL_UNSAFE_LOCAL_EXECUTION", raising=False)
    with pytest.raises(UserError, match="--unsafe-local-execution") as err:
        SandboxPool(1, unprivileged=True)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("PASSUNTIL_UNSAFE_LOCAL_EXECUTION", "1")
    p = SandboxPool(1, unprivileged=True)
    try:
        assert p.mode == "unsafe-local" and not p.isolated
        assert p.run(Job(PROMPT + body("return x + y"), PROMPT + TEST, "add")).passed
        assert not p.run(Job(PROMPT + body("return x - y"), PROMPT + TEST, "add")).passed
        # A setsid() grandchild does not survive its check (finding 4 of issue 14).
        pid_file = tmp_path / "escapee.pid"
        escape = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                  f"        open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                  f"        time.sleep(60)\n    os._exit(0)\ntime.sleep(0.5)\nreturn x + y")
        assert p.run(Job(PROMPT + body(escape), PROMPT + TEST, "add")).passed
        escapee = int(pid_file.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(escapee, 0)
    finally:
        p.close()


def test_isolation_mode_names_the_isolation_checks_get(pool, monkeypatch):
    assert pool.mode in MODES
    if not pool.isolated:  # a machine without root: the default pool needs the opt-in
        monkeypatch.setenv("PASSUNTIL_UNSAFE_LOCAL_EXECUTION", "1")
    assert isolation_mode() in MODES
    if os.geteuid() == 0:  # this machine: root with namespaces, and a writable memory cgroup
        assert pool.mode.startswith("namespaces+")


def _stdlib_that_imports_here() -> list[str]:
    """Public stdlib modules that import in a normal (host) interpreter."""
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_"))
    code = ("import sys, json, io, contextlib\nok = []\n"
            "for n in json.loads(sys.argv[1]):\n    try:\n"
            "        with contextlib.redirect_stdout(io.StringIO()):\n            __import__(n)\n"
            "        ok.append(n)\n    except BaseException:\n        pass\n"
            "print(json.dumps(ok))")
    out = subprocess.run([sys.executable, "-I", "-c", code, json.dumps(names)], env={},
                         capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
    return json.loads(out.stdout.splitlines()[-1])


# Run as root in a private mount namespace (`unshare --mount`): the interpreter's prefix is
# bind-mounted under a fresh mode-700 directory and the pool runs on that copy of it.
PRIVATE_PREFIX = textwrap.dedent(r"""
    import ctypes, json, os, sys
    from passuntil.execution import Job, Limits, SandboxPool
    private, names = sys.argv[1], json.loads(sys.argv[2])
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mount(b"none", b"/", None, (1 << 14) | (1 << 18), None) == 0  # rprivate
    os.makedirs(private + "/prefix")
    os.chmod(private, 0o700)
    assert libc.mount(sys.base_prefix.encode(), (private + "/prefix").encode(), None,
                      4096 | (1 << 14), None) == 0
    python = private + "/prefix/bin/" + os.path.basename(os.path.realpath(sys.executable))
    prompt = "def imports(names):\n    \"\"\"Import each module.\"\"\"\n"
    program = prompt + (
        "    import io, contextlib\n    bad = []\n    for n in names:\n        try:\n"
        "            with contextlib.redirect_stdout(io.StringIO()):\n"
        "                __import__(n)\n        except BaseException:\n"
        "            bad.append(n)\n    return bad\n")
    test = "def check(candidate):\n    assert candidate(%r) == []\n"
    pool = SandboxPool(2, Limits(timeout_s=60, cpu_s=50, mem_bytes=2 << 30), python=python)
    try:
        checked = pool.run(Job(program, prompt + test % (names,), "imports"))
        failing = [] if checked.passed else [
            n for n, v in zip(names, pool.run_many(
                [Job(program, prompt + test % ([n],), "imports") for n in names]))
            if not v.passed]
        probe = "import sys\nassert sys.base_prefix.startswith(%r)\n" % private
        where = pool.run(Job(prompt + "    " + probe.replace("\n", "\n    ") + "return []\n",
                             prompt + test % ([],), "imports")).passed
    finally:
        pool.close()
    print(json.dumps({"mode": pool.mode, "passed": checked.passed, "failing": failing,
                      "private_python_used": where}))
""")


def test_every_stdlib_module_imports_in_a_check_with_the_interpreter_under_mode_700(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"):
        pytest.skip("needs root and util-linux unshare")
    names = _stdlib_that_imports_here()
    assert len(names) > 200
    private = tmp_path / "private"
    out = subprocess.run(["/usr/bin/unshare", "--mount", sys.executable, "-c", PRIVATE_PREFIX,
                          str(private), json.dumps(names)], capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["mode"].startswith("namespaces+")
    assert result["private_python_used"]
    assert result["failing"] == [] and result["passed"]
