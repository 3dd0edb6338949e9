"""The code sandbox: HumanEval's canonical solutions pass; hostile completions are contained."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from passuntil.engine import EngineConfig, run_passuntil
from passuntil.execution import Job, Limits, SandboxPool
from passuntil.tasks.humaneval import humaneval

PROMPT = 'def add(x, y):\n    """Return x + y."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


@pytest.fixture(scope="module")
def pool():
    p = SandboxPool(2, Limits(timeout_s=3.0, cpu_s=2, mem_bytes=512 << 20))
    yield p
    p.close()


def body(code: str) -> str:
    return "".join("    " + line + "\n" for line in code.strip("\n").splitlines())


def hostile_cases(sentinel: str) -> dict[str, str]:
    """Completions that try to harm the host or fake a pass; every one must fail."""
    parent = os.getpid()
    return {
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "memory_bomb": "a = []\nwhile True:\n    a.append(bytearray(1 << 26))",
        "disk_filling": "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1",
        "infinite_loop": "while True:\n    pass",
        "sleep_forever": "import time\ntime.sleep(10 ** 6)",
        "network": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\nreturn x + y - 1",
        "delete_outside": f"import os\nos.remove({sentinel!r})\nreturn 0",
        "write_outside": f"open({sentinel!r}, 'w').write('pwned')\nreturn 0",
        "write_project": "open('/work/passuntil-pwned', 'w').write('x')\nreturn 0",
        "read_secret": "import os\nreturn len(os.environ['PASSUNTIL_TEST_SECRET'])",
        "signal_parent": f"import os, signal\nos.kill({parent}, signal.SIGKILL)\n"
                         "os.kill(os.getppid(), signal.SIGKILL)\nreturn 0",
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
        "stdout_flood": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
        "escape_group": "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
                        "return x + y - 1",
    }


def test_hostile_completions_are_contained(pool, tmp_path, monkeypatch):
    monkeypatch.setenv("PASSUNTIL_TEST_SECRET", "hunter2")
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    free_before = shutil.disk_usage(tmp_path).free
    cases = hostile_cases(str(sentinel))
    start = time.monotonic()
    jobs = [Job(PROMPT + body(code), PROMPT + TEST, "add") for code in cases.values()]
    verdicts = dict(zip(cases, pool.run_many(jobs)))
    passed = [name for name, v in verdicts.items() if v.passed]
    assert passed == [], f"hostile completions counted as passes: {passed}"
    # The host is unharmed and the pool still checks correctly afterwards.
    assert sentinel.read_text() == "keep me"
    assert not os.path.exists("/work/passuntil-pwned")
    assert shutil.disk_usage(tmp_path).free > free_before - (64 << 20)
    assert pool.run(Job(PROMPT + body("return x + y"), PROMPT + TEST, "add")).passed
    assert time.monotonic() - start < 60
    if pool.isolated:
        leftover = [p for p in os.listdir("/proc") if p.isdigit() and _uid(p) >= 200_000]
        assert leftover == [], "sandbox processes outlived their check"


def _uid(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return -1


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


def test_evaluation_goes_on_through_hostile_completions(tmp_path):
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
