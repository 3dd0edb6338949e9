"""Run a program with unit tests in a separate, resource-limited Python process.

A pass is declared only when the process prints a random token that it reads from standard
input after the program and its tests have run, and exits 0. This first version limits CPU
time, memory, file size and wall time and runs in a private temporary directory with a
scrubbed environment; it is not yet a sandbox against hostile code (see the open issue on
the code sandbox).
"""

from __future__ import annotations

import os
import resource
import secrets
import subprocess
import sys
import tempfile

_HARNESS = """
import sys
_src = sys.stdin.read()
_token, _, _program = _src.partition("\\n")
del _src
exec(compile(_program, "<program>", "exec"), {"__name__": "__main__"})
sys.stdout.write("\\n" + _token + "\\n")
"""


def _limits(cpu_s: int, mem_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    os.setsid()


def run_program(program: str, *, timeout_s: float = 5.0, mem_bytes: int = 512 << 20) -> bool:
    """True when `program` (code + its asserts) runs to the end without error."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="passuntil-exec-") as tmp:
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        try:
            out = subprocess.run(
                [sys.executable, "-I", "-S", "-c", _HARNESS], input=token + "\n" + program,
                capture_output=True, text=True, timeout=timeout_s, cwd=tmp, env=env,
                preexec_fn=lambda: _limits(int(timeout_s) + 1, mem_bytes))
        except subprocess.TimeoutExpired:
            return False
    return out.returncode == 0 and out.stdout.endswith("\n" + token + "\n")
