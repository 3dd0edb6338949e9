"""`examples/my-series.toml`'s served model end to end through the CLI, against a real
`transformers serve` on 127.0.0.1 (started here, serving the bundled tiny-7 as `tiny-7`):
`passuntil eval` samples from the model (not greedily), degrades the reference scores the
server cannot compute into a note, keeps the API key out of the store, and `passuntil show`
reads the run."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my-series.toml"
TINY = ROOT / "src" / "passuntil" / "bundled" / "tiny"
BIN = Path(sys.executable).parent
KEY = "sk-served-test-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_tiny7(tmp_path_factory):
    """`transformers serve` on a free loopback port whose working directory holds `tiny-7`, so
    the request's model name `tiny-7` (the example's `options.model`) is that folder."""
    exe = shutil.which("transformers", path=str(BIN))
    if exe is None:
        pytest.skip("transformers serve cannot start: the `transformers` CLI is not installed")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        pytest.skip(f"transformers serve cannot start: {err.name} is missing (the dev extra "
                    "installs it)")
    home = tmp_path_factory.mktemp("serve")
    (home / "tiny-7").symlink_to(TINY / "tiny-7", target_is_directory=True)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(home / "serve.log", "w") as log:
        proc = subprocess.Popen([exe, "serve", "--host", "127.0.0.1", "--port", str(port)],
                                cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            _wait_for_health(proc, port, home / "serve.log")
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def _wait_for_health(proc: subprocess.Popen, port: int, log: Path, *, limit_s: float = 180) -> None:
    """Poll /health (bounded: `limit_s`); skip if the server exits, saying why."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None:
                tail = log.read_text()[-300:].strip().splitlines()[-1:]
                pytest.skip(f"transformers serve cannot start: it exited with status "
                            f"{proc.returncode}: {' '.join(tail)}")
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not answer /health within {limit_s:.0f} s")
            time.sleep(0.5)


def _series_copy(tmp_path: Path, port: int) -> Path:
    """The example file, verbatim but for the port (and its relative checkpoint paths made
    absolute, since the copy lives elsewhere)."""
    text = EXAMPLE.read_text()
    assert "http://127.0.0.1:8000/v1" in text and 'model = "tiny-7"' in text
    text = text.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    text = text.replace('"../src/', f'"{ROOT}/src/')
    path = tmp_path / "my-series.toml"
    path.write_text(text)
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(cwd), "OPENAI_API_KEY": KEY,
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "passuntil"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_my_series_served_model_end_to_end(served_tiny7, tmp_path):
    series = _series_copy(tmp_path, served_tiny7)
    store = tmp_path / "served.sqlite"
    ev = _cli("eval", "--series", str(series), "--model", "served", "--task", "arith",
              "--k", "1", "--max-samples", "8", "--store", str(store), cwd=tmp_path)
    out = ev.stdout + ev.stderr
    assert ev.returncode == 0, out
    assert "Traceback" not in out and KEY not in out
    # samples drawn from the model: the server needed `generation_config`, and said so once
    assert out.count("`generation_config`") == 1 and "ignores temperature" not in out
    assert "instance results" in ev.stdout

    shown = _cli("show", str(store), cwd=tmp_path)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "served" in shown.stdout and "arith" in shown.stdout
    assert "reference scores" in shown.stdout and "HTTP 500" in shown.stdout  # degraded, noted

    db = sqlite3.connect(store)
    dump = "\n".join(db.iterdump())
    samples = dict(((i, s) for i, s in db.execute(
        "select instance_id, samples from results where model = 'served'")))
    distinct = dict(db.execute("select instance_id, count(*) from completions "
                               "where model = 'served' group by instance_id").fetchall())
    db.close()
    assert KEY not in dump
    assert len(samples) == 26 and all(1 <= s <= 8 for s in samples.values())
    # greedy decoding gives one text per instance; sampling gives several where it drew several
    several = [i for i, s in samples.items() if s >= 4]
    varied = [i for i in several if distinct.get(i, 0) >= 2]
    assert len(several) >= 3 and len(varied) >= len(several) / 2, (samples, distinct)
